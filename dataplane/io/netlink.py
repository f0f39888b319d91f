"""Link helpers for the I/O drivers, tests and the benchmark: namespaces and the gateway's tunnel interface.

:func:`run_in_netns` runs a function on a short-lived thread that has entered a named network namespace. Whatever the
function creates there (TUN devices, sockets) stays bound to that namespace and can be used from any thread afterwards,
so a test process can own devices in several namespaces at once without ``ip netns exec``.

:func:`configure_tunnel_interface` gives the TUN device its portal-assigned addresses and routes (docs/protocol.md §2.1
``init`` steps 6-7, §4.1) through rtnetlink (pyroute2); :func:`remove_tunnel_routes` takes the routing away at exit.

Routing choice: like Firezone (docs/protocol.md §4.7) the tunnel ranges 100.64.0.0/11 and fd00:2021:1111::/107 are
routed in a table of their own, ``0x2021fd00``, consulted by one rule per address family at priority 100, "not fwmark
0xfd002021". Plain main-table routes would be simpler but wrong in two cases that occur in practice:

* the tunnel range is carrier-grade NAT space (100.64.0.0/10): a peer or relay whose public address lies in it must be
  reached through the host's uplink by the gateway's own sockets, which carry ``SO_MARK 0xfd002021`` and so skip the
  table, while forwarded and other traffic for the tunnel range goes into the TUN;
* other policy routing on the host (Tailscale's table 52 at priority 5270, for instance, holds routes inside
  100.64.0.0/10) is consulted before the main table, so a main-table route could lose; priority 100 comes first.

Firezone's other two tables (copies of link-scope routes, default routes) serve the client, whose routes cover the
whole Internet; the gateway routes only the tunnel ranges and needs neither.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from dataplane.io.udp import FIREZONE_MARK

if TYPE_CHECKING:
    # Imported where used: pyroute2 takes ~0.3 s to import and most users of this module only need run_in_netns.
    from pyroute2 import IPRoute

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

TUNNEL_MTU = 1280
TUNNEL_IPV4_RANGE = "100.64.0.0/11"
TUNNEL_IPV6_RANGE = "fd00:2021:1111::/107"
TUNNEL_ROUTE_TABLE = 0x2021FD00
TUNNEL_RULE_PRIORITY = 100

FIB_RULE_INVERT = 0x2
IN6_ADDR_GEN_MODE_NONE = 1
_ENOENT_LIKE = {2, 3, 19}  # ENOENT, ESRCH, ENODEV: already gone
_EEXIST = 17

_ipv6_warning_logged = False

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Calls ``fn`` on a new thread inside network namespace ``netns`` (a name under /run/netns) and returns its
    result (or raises its exception). The thread ends afterwards, so no thread of the caller changes namespace."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_RUN_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


class TunnelInterfaceError(OSError):
    """The kernel refused part of the tunnel interface configuration (missing device, no CAP_NET_ADMIN, ...)."""


def configure_tunnel_interface(name: str, ipv4: str | None, ipv6: str | None, *, mtu: int = TUNNEL_MTU) -> None:
    """Makes ``name`` carry exactly ``ipv4``/32 and ``ipv6``/128 (either may be None), with MTU ``mtu``, no IPv6
    link-local address, the link up, and the tunnel range of each configured family routed into it (module docstring).

    Idempotent; a call with other addresses replaces the previous ones, and a family passed as None loses its address,
    route and rule (the portal re-sends ``init`` when the gateway's tunnel IPs change). When IPv6 is unavailable on the
    host or disabled for the device the IPv6 part is skipped with one warning per process. Raises ValueError for a
    malformed address and :class:`TunnelInterfaceError` when the kernel refuses."""
    wanted_v4 = ipaddress.IPv4Address(ipv4) if ipv4 is not None else None
    wanted_v6 = ipaddress.IPv6Address(ipv6) if ipv6 is not None else None
    _on_helper_thread(lambda: _configure_tunnel_interface(name, wanted_v4, wanted_v6, mtu))


def _configure_tunnel_interface(
    name: str, wanted_v4: ipaddress.IPv4Address | None, wanted_v6: ipaddress.IPv6Address | None, mtu: int
) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            index = _link_index(ipr, name)
            ipv6_usable = _ipv6_usable_on(name)
            if wanted_v6 is not None and not ipv6_usable:
                _warn_ipv6_unavailable(name)
                wanted_v6 = None
            ipr.link("set", index=index, mtu=mtu)
            if ipv6_usable:
                # Before the link goes up, so the kernel never generates an fe80:: address for it.
                ipr.link(
                    "set",
                    index=index,
                    IFLA_AF_SPEC={
                        "attrs": [["AF_INET6", {"attrs": [["IFLA_INET6_ADDR_GEN_MODE", IN6_ADDR_GEN_MODE_NONE]]}]]
                    },
                )
            addresses: set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
            routes: dict[int, str] = {}
            if wanted_v4 is not None:
                addresses.add((socket.AF_INET, wanted_v4, 32))
                routes[socket.AF_INET] = TUNNEL_IPV4_RANGE
            if wanted_v6 is not None:
                addresses.add((socket.AF_INET6, wanted_v6, 128))
                routes[socket.AF_INET6] = TUNNEL_IPV6_RANGE
            _sync_addresses(ipr, index, addresses)
            ipr.link("set", index=index, state="up")
            _sync_routes(ipr, index, routes)
            _sync_rules(ipr, routes.keys())
    except NetlinkError as exc:
        raise TunnelInterfaceError(exc.code, f"configuring tunnel interface {name}: {exc}") from exc
    log.info("tunnel interface %s: %s, %s, mtu %d", name, wanted_v4 or "no IPv4", wanted_v6 or "no IPv6", mtu)


def remove_tunnel_routes(name: str) -> None:
    """Removes the tunnel routes (the whole table ``TUNNEL_ROUTE_TABLE``, which only this agent uses) and the rules
    that select it. For exit: the TUN device and its addresses go away when its last fd closes, the rules would not.
    Idempotent; raises :class:`TunnelInterfaceError` when the kernel refuses."""
    _on_helper_thread(lambda: _remove_tunnel_routes(name))


def _remove_tunnel_routes(name: str) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            _sync_routes(ipr, None, {})
            _sync_rules(ipr, ())
    except NetlinkError as exc:
        raise TunnelInterfaceError(exc.code, f"removing tunnel routes of {name}: {exc}") from exc
    log.debug("tunnel routes and rules of %s removed", name)


def _on_helper_thread(fn: Callable[[], None]) -> None:
    """Runs ``fn`` on a short-lived thread and waits for it. pyroute2's synchronous API drives an asyncio loop of its own
    and fails inside a running one, and the agent calls from its event loop; a new thread inherits the calling thread's
    network namespace, so this also works under :func:`run_in_netns`. The calls are rare (start, ``init``, exit)."""
    failure: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=body, name="netlink-config")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _link_index(ipr: IPRoute, name: str) -> int:
    indexes: list[int] = ipr.link_lookup(ifname=name)
    if not indexes:
        raise TunnelInterfaceError(19, f"tunnel interface {name} does not exist")
    return indexes[0]


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ipv6_usable_on(name: str) -> bool:
    """Whether IPv6 can be configured on ``name``. A device created while ``net.ipv6.conf.default.disable_ipv6`` was 1
    starts without IPv6 even when ``all`` is 0 (host setup writes ``all``); then IPv6 is enabled on this one device,
    which is ours. With ``all`` at 1 the operator turned IPv6 off and that stands."""
    conf = "/proc/sys/net/ipv6/conf"
    device = _read_text(f"{conf}/{name}/disable_ipv6")
    if device is None:  # IPv6 disabled at boot (ipv6.disable=1) or not built in
        return False
    if device == "0":
        return True
    if _read_text(f"{conf}/all/disable_ipv6") != "0":
        return False
    try:
        with open(f"{conf}/{name}/disable_ipv6", "w") as f:
            f.write("0")
    except OSError as exc:
        log.debug("cannot enable IPv6 on %s: %s", name, exc)
        return False
    return True


def _warn_ipv6_unavailable(name: str) -> None:
    global _ipv6_warning_logged
    if not _ipv6_warning_logged:
        _ipv6_warning_logged = True
        log.warning("IPv6 is disabled on this host or on %s: configuring the tunnel for IPv4 only", name)


def _sync_addresses(
    ipr: IPRoute, index: int, wanted: set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]
) -> None:
    present: set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
    for msg in ipr.get_addr(index=index):
        family: int = msg["family"]
        # IFA_LOCAL is the device's own address on point-to-point links; IFA_ADDRESS would be the peer there.
        text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if text is None:
            continue
        entry = (family, ipaddress.ip_address(text), int(msg["prefixlen"]))
        if entry in wanted:
            present.add(entry)
            continue
        _ignore_missing(ipr.addr, "del", index=index, address=text, prefixlen=entry[2])
    for family, address, prefixlen in sorted(wanted - present, key=lambda e: e[0]):
        ipr.addr("add", index=index, family=family, address=str(address), prefixlen=prefixlen)


def _sync_routes(ipr: IPRoute, index: int | None, wanted: dict[int, str]) -> None:
    """Leaves exactly ``wanted`` (family → destination, via ``index``) in the tunnel table."""
    for family in (socket.AF_INET, socket.AF_INET6):
        destination = wanted.get(family)
        for route in _tunnel_table_routes(ipr, family):
            current = f"{route.get('RTA_DST')}/{route['dst_len']}"
            if destination is not None and current == destination and route.get("RTA_OIF") == index:
                continue
            _ignore_missing(
                ipr.route,
                "del",
                family=route["family"],
                dst=current,
                oif=route.get("RTA_OIF"),
                table=TUNNEL_ROUTE_TABLE,
            )
        if destination is not None:
            ipr.route("replace", family=family, dst=destination, oif=index, table=TUNNEL_ROUTE_TABLE)


def _tunnel_table_routes(ipr: IPRoute, family: int) -> list[Any]:
    routes = ipr.get_routes(family=family, table=TUNNEL_ROUTE_TABLE)
    return [r for r in routes if r.get("RTA_TABLE", r["table"]) == TUNNEL_ROUTE_TABLE]


def _sync_rules(ipr: IPRoute, families: Iterable[int]) -> None:
    """Leaves exactly one "not fwmark FIREZONE_MARK lookup TUNNEL_ROUTE_TABLE" rule per family in ``families``."""
    keep = set(families)
    for family in (socket.AF_INET, socket.AF_INET6):
        ours = [
            rule
            for rule in ipr.get_rules(family=family)
            if rule.get("FRA_TABLE") == TUNNEL_ROUTE_TABLE and rule.get("FRA_PRIORITY") == TUNNEL_RULE_PRIORITY
        ]
        exact = [
            rule
            for rule in ours
            if rule.get("FRA_FWMARK") == FIREZONE_MARK
            and rule.get("FRA_FWMASK") == 0xFFFFFFFF
            and rule["flags"] & FIB_RULE_INVERT
        ]
        if family in keep and len(ours) == 1 and exact:
            continue
        for rule in ours:
            _ignore_missing(
                ipr.rule,
                "del",
                family=family,
                priority=TUNNEL_RULE_PRIORITY,
                table=TUNNEL_ROUTE_TABLE,
                fwmark=rule.get("FRA_FWMARK"),
                fwmask=rule.get("FRA_FWMASK"),
                flags=rule["flags"],
            )
        if family in keep:
            ipr.rule(
                "add",
                family=family,
                priority=TUNNEL_RULE_PRIORITY,
                table=TUNNEL_ROUTE_TABLE,
                fwmark=FIREZONE_MARK,
                fwmask=0xFFFFFFFF,
                flags=FIB_RULE_INVERT,
            )


def _ignore_missing(action: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Runs a netlink delete; something already gone (another agent run, the device closing) is not an error."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        action(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in _ENOENT_LIKE:
            raise
