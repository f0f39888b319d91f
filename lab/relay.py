"""A real TURN relay (coturn) for tests and the lab, plus the credential schemes a portal would mint.

``Coturn`` starts ``turnserver`` bound to one IP/port (on loopback, or inside a namespace from ``lab.netns``) with
TURN REST shared-secret authentication and realm ``firezone``, waits until it answers a STUN BINDING, and always kills
it again (context manager; also on failure). ``coturn_credentials`` mints the username/password such a coturn accepts;
``firezone_password`` is the scheme Firezone's own relay uses (portal-protocol §4.5).

``python -m lab.relay --probe HOST PORT`` sends one BINDING and exits 0 on an answer (used inside namespaces).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dataplane import stun
from dataplane.base import Address
from lab.netns import Netns

REALM = "firezone"
TURNSERVER = "turnserver"
# Far below the 49152–65535 range Firezone relays use, so a test relay never competes with client sockets.
DEFAULT_RELAY_PORTS = (40000, 40999)


def coturn_password(secret: str, username: str) -> str:
    """The password coturn's TURN REST API scheme expects for ``username``: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def coturn_credentials(secret: str, expiry_unix: int, tag: str = "fz") -> tuple[str, str]:
    """coturn TURN REST API credentials: username ``"<expiry>:<tag>"``, password base64(HMAC-SHA1(secret, username))."""
    username = f"{expiry_unix}:{tag}"
    return username, coturn_password(secret, username)


def firezone_username(expiry_unix: int, salt: str) -> str:
    return f"{expiry_unix}:{salt}"


def firezone_password(relay_secret: str, expiry_unix: int, salt: str) -> str:
    """Firezone relay password: base64 (standard alphabet, no padding) of SHA-256("<expiry>:<secret>:<salt>")."""
    digest = hashlib.sha256(f"{expiry_unix}:{relay_secret}:{salt}".encode()).digest()
    return base64.b64encode(digest).decode().rstrip("=")


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago (the caller retries if someone takes it first)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def binding_probe(server: Address, timeout: float = 0.3) -> Address | None:
    """Sends one unauthenticated BINDING; returns the XOR-MAPPED-ADDRESS or None when nothing (valid) came back."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    request = stun.StunMessage.request(stun.Method.BINDING, os.urandom(12))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(stun.encode(request), server)
            data, _ = sock.recvfrom(2048)
            reply = stun.decode(data)
        except (OSError, stun.StunParseError):
            return None
    if reply.transaction_id != request.transaction_id or reply.message_class != stun.MessageClass.SUCCESS:
        return None
    return reply.xor_address(stun.Attr.XOR_MAPPED_ADDRESS)


@dataclass
class Coturn:
    """One ``turnserver`` process. Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    listen_ip: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port
    secret: str = "fz-test-secret"
    relay_ip: str | None = None  # default: listen_ip
    relay_ports: tuple[int, int] = DEFAULT_RELAY_PORTS
    stale_nonce: int | None = None  # seconds a nonce stays valid; None = coturn's default (no stale-nonce check)
    allow_loopback_peers: bool = True
    channel_lifetime: int | None = None
    max_allocate_lifetime: int | None = None
    netns: Netns | None = None
    verbose: bool = False
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 10.0
    # coturn's relay threads (each with its own UDP listener socket, SO_REUSEPORT); one thread drops datagrams in its
    # socket buffer once hundreds of clients allocate at once (docs/scenarios.md, Load).
    relay_threads: int = 1
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    workdir: Path | None = field(default=None, init=False)

    @property
    def address(self) -> Address:
        if self.port is None:
            raise RuntimeError("coturn has not been started")
        return (self.listen_ip, self.port)

    def credentials(self, expiry_unix: int | None = None, tag: str = "fz") -> tuple[str, str]:
        """REST credentials valid for an hour (or until ``expiry_unix``)."""
        return coturn_credentials(self.secret, expiry_unix or int(time.time()) + 3600, tag)

    @property
    def log_path(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "turnserver.log"

    def log_text(self) -> str:
        path = self.log_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def argv(self) -> list[str]:
        assert self.workdir is not None and self.port is not None
        args = [
            TURNSERVER,
            "-n",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-tcp-relay",
            "--no-rfc5780",
            f"--listening-ip={self.listen_ip}",
            f"--listening-port={self.port}",
            f"--relay-ip={self.relay_ip or self.listen_ip}",
            f"--min-port={self.relay_ports[0]}",
            f"--max-port={self.relay_ports[1]}",
            f"--realm={REALM}",
            "--fingerprint",
            "--use-auth-secret",
            f"--static-auth-secret={self.secret}",
            f"--relay-threads={self.relay_threads}",
            f"--pidfile={self.workdir / 'turnserver.pid'}",
            f"--db={self.workdir / 'turndb'}",
            f"--log-file={self.log_path}",
            "--simple-log",
            "--no-stdout-log",
        ]
        if self.allow_loopback_peers:
            args.append("--allow-loopback-peers")
        if self.stale_nonce is not None:
            args.append(f"--stale-nonce={self.stale_nonce}")
        if self.channel_lifetime is not None:
            args.append(f"--channel-lifetime={self.channel_lifetime}")
        if self.max_allocate_lifetime is not None:
            args.append(f"--max-allocate-lifetime={self.max_allocate_lifetime}")
        if self.verbose:
            args.append("--verbose")
        args.extend(self.extra_args)
        return args

    def start(self) -> Coturn:
        if self.process is not None:
            raise RuntimeError("coturn already started")
        if shutil.which(TURNSERVER) is None:
            raise RuntimeError("turnserver (Debian package coturn) is not installed")
        self.workdir = Path(tempfile.mkdtemp(prefix="fz-coturn-"))
        chosen_port = self.port
        try:
            for _ in range(5):
                if chosen_port is None:
                    self.port = self._free_port()
                if self._launch():
                    return self
                self._kill()
                if chosen_port is not None:
                    break
            raise RuntimeError(f"coturn did not answer a BINDING on {self.address}; log:\n{self.log_text()[-3000:]}")
        except BaseException:
            self.stop()
            raise

    def _free_port(self) -> int:
        if self.netns is None:
            return free_udp_port(self.listen_ip)
        # Ports inside a fresh namespace are all free; stay away from the relay range.
        return 3478

    def _launch(self) -> bool:
        cmd = self.argv()
        if self.netns is not None:
            cmd = self.netns.argv(cmd)
        self.process = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self.answers_binding():
                return True
            time.sleep(0.05)
        return False

    def answers_binding(self) -> bool:
        """Whether the relay answers one unauthenticated BINDING right now (probed from inside its namespace)."""
        if self.netns is None:
            return binding_probe(self.address) is not None
        probe = [sys.executable, "-m", "lab.relay", "--probe", self.listen_ip, str(self.port)]
        result = subprocess.run(self.netns.argv(probe), capture_output=True, timeout=10)
        return result.returncode == 0

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                proc.wait()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop(self) -> None:
        self._kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> Coturn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def coturn(**kwargs: object) -> Iterator[Coturn]:
    """``with coturn(stale_nonce=2) as relay: ...`` — see :class:`Coturn` for the options."""
    relay = Coturn(**kwargs)  # type: ignore[arg-type]
    with relay:
        yield relay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--probe", nargs=2, metavar=("HOST", "PORT"), help="send one BINDING and exit 0 on an answer")
    args = parser.parse_args(argv)
    if args.probe:
        host, port = args.probe
        mapped = binding_probe((host, int(port)))
        if mapped is None:
            return 1
        print(f"{mapped[0]} {mapped[1]}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
