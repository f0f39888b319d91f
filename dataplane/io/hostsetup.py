"""Kernel setup on the host for the gateway: forwarding sysctls and an nftables table of our own (docs/protocol.md §4.7).

Firezone leaves this to an init script that inserts iptables rules; here the agent does it at start (:meth:`HostSetup.
apply`) and undoes it at exit (:meth:`HostSetup.undo`), unless the operator turns that off and does it themselves.

What :meth:`HostSetup.apply` does:

* sysctls ``net.ipv4.ip_forward=1``, ``net.ipv4.conf.all.src_valid_mark=1``, ``net.ipv6.conf.all.disable_ipv6=0``,
  ``net.ipv6.conf.all.forwarding=1``, ``net.ipv6.conf.default.forwarding=1``. Only values that differ are written and
  their previous values remembered; :meth:`HostSetup.undo` restores exactly those. On a host without IPv6 (booted with
  ``ipv6.disable=1``) the IPv6 sysctls and rules are skipped with a warning.
* the table ``inet firezone-gateway``, loaded by one ``nft -f -`` transaction that also deletes an older copy, so a
  second apply (or one after a crash) leaves the same ruleset: a ``forward`` chain accepting packets in from and out to
  the TUN, and a ``postrouting`` NAT chain masquerading 100.64.0.0/11 and fd00:2021:1111::/107 leaving through any
  other interface. :meth:`HostSetup.undo` deletes the table.

Coexistence with the operator's rules: nothing outside our table is added, changed or removed, so rules an install
script made (iptables-nft or nft, the same accepts and masquerades included) keep working and survive our exit. A
connection masqueraded by their rule is not masqueraded twice: NAT is decided once per connection. What our table
cannot fix:

* an ``accept`` ends evaluation only in its own base chain. A ``drop`` policy or rule in another table's forward chain
  (Docker sets the iptables ``FORWARD`` policy to DROP; hardened hosts use ``policy drop`` in ``inet filter``) still
  drops the tunnel's traffic. :meth:`HostSetup.apply` warns about forward chains with a drop policy that nft can see;
  the operator must add accepts for the TUN there (``iptables -I FORWARD -i tun-firezone -j ACCEPT`` and ``-o``).
  Rules of iptables-legacy are invisible to nft and are not detected.
* a later ``nft flush ruleset`` (reloading nftables.service, for instance) removes our table: restart the agent then.
* IPv6 forwarding makes the kernel ignore router advertisements on interfaces with ``accept_ra=1``; a host that gets
  its IPv6 address or default route by SLAAC needs ``accept_ra=2`` on its uplink. Firezone's setup has the same effect.
* undo restores sysctls to the values seen at apply; if a crashed earlier run already changed them, those are what we
  saw, so they stay.

Errors (nft missing, not permitted, a sysctl that cannot be written) raise :class:`HostSetupError` with one line of
explanation; a failed apply undoes what it had done before raising.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Sequence

from dataplane.io.netlink import TUNNEL_IPV4_RANGE, TUNNEL_IPV6_RANGE

log = logging.getLogger(__name__)

TABLE_FAMILY = "inet"
DEFAULT_TABLE_NAME = "firezone-gateway"
NFT_TIMEOUT_SECONDS = 10.0

IPV4_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.src_valid_mark", "1"),
)
IPV6_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("net.ipv6.conf.all.disable_ipv6", "0"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv6.conf.default.forwarding", "1"),
)

_PROC_SYS = "/proc/sys"


class HostSetupError(RuntimeError):
    """The host could not be set up; the message is one line saying why and what to do."""


def sysctl_path(key: str) -> str:
    return os.path.join(_PROC_SYS, *key.split("."))


def read_sysctl(key: str) -> str | None:
    """The value of ``key`` (e.g. ``net.ipv4.ip_forward``), None when the key does not exist."""
    try:
        with open(sysctl_path(key)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_sysctl(key: str, value: str) -> None:
    with open(sysctl_path(key), "w") as f:
        f.write(value)


def ipv6_available() -> bool:
    """False on a host booted with ``ipv6.disable=1`` (or without IPv6 support): no ``net.ipv6.conf`` at all."""
    return os.path.isdir(os.path.join(_PROC_SYS, "net", "ipv6", "conf"))


class HostSetup:
    """Forwarding sysctls and the ``inet firezone-gateway`` nftables table for TUN device ``tun_name`` (see the module
    docstring). Works in the network namespace of the calling thread."""

    def __init__(self, tun_name: str, *, table_name: str = DEFAULT_TABLE_NAME, nft: str = "nft") -> None:
        if not tun_name or len(tun_name.encode()) > 15 or '"' in tun_name:
            raise ValueError(f"invalid interface name {tun_name!r}")
        self.tun_name = tun_name
        self.table_name = table_name
        self.nft = nft
        # key → value before we changed it, only for keys we wrote.
        self._previous_sysctls: dict[str, str] = {}
        self._table_loaded = False

    def ruleset(self, *, ipv6: bool = True) -> str:
        """The nft script that (re)creates our table; deleting an older copy first makes it idempotent."""
        tun = json.dumps(self.tun_name)  # a quoted nft string
        masquerade = [f"oifname != {tun} ip saddr {TUNNEL_IPV4_RANGE} masquerade"]
        if ipv6:
            masquerade.append(f"oifname != {tun} ip6 saddr {TUNNEL_IPV6_RANGE} masquerade")
        lines = [
            f"table {TABLE_FAMILY} {self.table_name} {{}}",
            f"delete table {TABLE_FAMILY} {self.table_name}",
            f"table {TABLE_FAMILY} {self.table_name} {{",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    iifname {tun} accept",
            f"    oifname {tun} accept",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            *(f"    {rule}" for rule in masquerade),
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    def apply(self) -> None:
        """Sets the sysctls and (re)loads our table. Idempotent. Raises :class:`HostSetupError`."""
        ipv6 = ipv6_available()
        if not ipv6:
            log.warning("IPv6 is disabled on this host: forwarding and masquerading IPv4 only")
        try:
            for key, value in IPV4_SYSCTLS + (IPV6_SYSCTLS if ipv6 else ()):
                self._set_sysctl(key, value)
            self._run_nft(self.ruleset(ipv6=ipv6))
            self._table_loaded = True
        except HostSetupError:
            self.undo()
            raise
        log.info("host setup: forwarding on, table %s %s loaded", TABLE_FAMILY, self.table_name)
        self._warn_about_dropping_forward_chains()

    def undo(self) -> None:
        """Deletes our table (also one left by an earlier run) and restores the sysctls :meth:`apply` changed.
        Best effort and idempotent: failures are logged as warnings, never raised, since this runs at exit."""
        try:
            self._run_nft(
                f"table {TABLE_FAMILY} {self.table_name} {{}}\ndelete table {TABLE_FAMILY} {self.table_name}\n"
            )
        except HostSetupError as exc:
            if self._table_loaded:
                log.warning("host setup undo: %s", exc)
            else:
                log.debug("host setup undo: %s", exc)
        self._table_loaded = False
        # Reverse order: forwarding goes off before disable_ipv6 goes back on.
        for key, value in reversed(list(self._previous_sysctls.items())):
            try:
                write_sysctl(key, value)
            except OSError as exc:
                log.warning("host setup undo: cannot restore %s=%s: %s", key, value, exc)
        self._previous_sysctls.clear()

    def _set_sysctl(self, key: str, value: str) -> None:
        try:
            current = read_sysctl(key)
        except OSError as exc:
            raise HostSetupError(f"cannot read sysctl {key}: {exc.strerror or exc}") from exc
        if current is None:
            raise HostSetupError(f"sysctl {key} does not exist on this kernel")
        if current == value:
            return
        try:
            write_sysctl(key, value)
        except OSError as exc:
            raise HostSetupError(
                f"cannot set sysctl {key}={value} (is {current}): {exc.strerror or exc}; run as root, or set it "
                "outside the agent (Docker: --sysctl) and turn off the agent's host setup"
            ) from exc
        self._previous_sysctls.setdefault(key, current)

    def _run_nft(self, script: str, args: Sequence[str] = ("-f", "-")) -> str:
        try:
            proc = subprocess.run(
                [self.nft, *args],
                input=script,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT_SECONDS,
            )
        except FileNotFoundError:
            raise HostSetupError(
                f"{self.nft} not found: install nftables, or turn off the agent's host setup and set up forwarding and "
                "masquerading yourself"
            ) from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostSetupError(f"running {self.nft} failed: {exc}") from exc
        if proc.returncode != 0:
            message = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            if "Operation not permitted" in message:
                raise HostSetupError(f"{self.nft} is not permitted (needs root or CAP_NET_ADMIN): {message}")
            raise HostSetupError(f"{self.nft} failed: {message}")
        return proc.stdout

    def _warn_about_dropping_forward_chains(self) -> None:
        """Names the forward base chains in other tables whose policy drops: our accepts cannot override them."""
        try:
            listing = json.loads(self._run_nft("", ("-j", "list", "chains")))
        except (HostSetupError, ValueError) as exc:
            log.debug("cannot list nft chains: %s", exc)
            return
        for item in listing.get("nftables", []) if isinstance(listing, dict) else []:
            chain = item.get("chain") if isinstance(item, dict) else None
            if not isinstance(chain, dict) or chain.get("hook") != "forward" or chain.get("policy") != "drop":
                continue
            if chain.get("family") == TABLE_FAMILY and chain.get("table") == self.table_name:
                continue
            log.warning(
                "nft chain %s %s %s drops forwarded packets by default; our accept cannot override it: add accepts "
                "for iifname/oifname %s there (iptables: -I FORWARD -i %s -j ACCEPT and -o)",
                chain.get("family"),
                chain.get("table"),
                chain.get("name"),
                self.tun_name,
                self.tun_name,
            )
