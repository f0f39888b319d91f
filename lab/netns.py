"""Network namespaces and veth links for tests, the demo and benchmarks.

Every name carries a unique suffix so that two runs on one machine never collide, and everything a :class:`Topology`
creates is removed again when it closes, also when the code inside the ``with`` block fails. Traffic stays inside the
namespaces: none of them gets a route to the outside world.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dataplane.io.tun import LOCK_DIR

# Namespaces created by this process and not yet deleted: the test fixtures check this, not the machine-wide list, so
# that concurrent runs on one machine never blame each other.
_live_namespaces: set[str] = set()


def unique_suffix() -> str:
    """Six hex characters: short enough for 15-character interface names, unique enough per machine."""
    return uuid.uuid4().hex[:6]


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None) -> str:
    """Runs a command and returns its stdout; raises with stderr in the message when it fails."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


@dataclass
class Netns:
    """One network namespace; ``exec``/``popen`` run commands inside it."""

    name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def exec(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 30.0) -> str:
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        return run(self.argv(cmd), check=check, timeout=timeout)

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Starts a long-running process in the namespace; it is killed when the topology closes."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.argv(cmd), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def stop_processes(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self.processes.clear()


def remove_stale_tun_locks(namespace: str) -> None:
    """Removes the TUN lock files (``dataplane.io.tun.LOCK_DIR``) of a namespace about to be deleted that no process holds
    any more: a gateway or daemon killed with SIGKILL cannot remove its own, and the namespace's inode may be reused."""
    try:
        inode = os.stat(f"/run/netns/{namespace}").st_ino
        names = os.listdir(LOCK_DIR)
    except OSError:
        return
    for name in names:
        if not (name.startswith(f"tun-{inode}-") and name.endswith(".lock")):
            continue
        path = os.path.join(LOCK_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by a live process: leave it alone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)


class Topology:
    """A set of namespaces joined by veth pairs, torn down as a whole.

    >>> with Topology("wgi") as topo:
    ...     a, b = topo.add_ns("a"), topo.add_ns("b")
    ...     topo.link(a, "10.0.0.1/24", b, "10.0.0.2/24")
    """

    def __init__(self, prefix: str) -> None:
        self.suffix = unique_suffix()
        self.prefix = prefix
        self.namespaces: list[Netns] = []
        self._links = 0

    def ns_name(self, role: str) -> str:
        return f"fz{self.prefix}-{role}-{self.suffix}"

    def add_ns(self, role: str) -> Netns:
        ns = Netns(self.ns_name(role))
        run(["ip", "netns", "add", ns.name])
        _live_namespaces.add(ns.name)
        self.namespaces.append(ns)
        ns.exec(["ip", "link", "set", "lo", "up"])
        # Routers and NAT boxes forward; end hosts simply never get a route off the topology.
        ns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        ns.exec(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        return ns

    def link(
        self,
        a: Netns,
        addr_a: str | None,
        b: Netns,
        addr_b: str | None,
        *,
        mtu: int | None = None,
        addrs_a: Sequence[str] = (),
        addrs_b: Sequence[str] = (),
    ) -> tuple[str, str]:
        """Joins two namespaces with a veth pair; returns the interface names (in a, in b)."""
        self._links += 1
        if_a = f"v{self.suffix}{self._links}a"
        if_b = f"v{self.suffix}{self._links}b"
        run(["ip", "link", "add", if_a, "netns", a.name, "type", "veth", "peer", "name", if_b, "netns", b.name])
        for ns, ifname, addrs in ((a, if_a, [addr_a, *addrs_a]), (b, if_b, [addr_b, *addrs_b])):
            if mtu is not None:
                ns.exec(["ip", "link", "set", ifname, "mtu", str(mtu)])
            for addr in addrs:
                if addr:
                    ns.exec(["ip", "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else [])])
            ns.exec(["ip", "link", "set", ifname, "up"])
        return if_a, if_b

    def close(self) -> None:
        for ns in self.namespaces:
            ns.stop_processes()
        for ns in self.namespaces:
            # Kill anything still inside (e.g. daemonised wireguard-go) before deleting the namespace.
            pids = run(["ip", "netns", "pids", ns.name], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            remove_stale_tun_locks(ns.name)
            run(["ip", "netns", "del", ns.name], check=False)
            _live_namespaces.discard(ns.name)
        self.namespaces.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def topology(prefix: str) -> Iterator[Topology]:
    topo = Topology(prefix)
    try:
        yield topo
    finally:
        topo.close()


def leftover_namespaces() -> list[str]:
    """Namespaces this process created that still exist (used by the test fixtures to catch leaks)."""
    if not _live_namespaces:
        return []
    out = run(["ip", "netns", "list"], check=False)
    present = {line.split()[0] for line in out.splitlines() if line.strip()}
    return sorted(_live_namespaces & present)
