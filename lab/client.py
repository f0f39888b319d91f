"""A headless Node driver: one :class:`dataplane.node.Node` on a UDP socket and a TUN device, signalled over stdio.

It plays either side of a connection: ``--role client`` (ICE controlling, WireGuard initiator, what the lab's headless
client does) or ``--role gateway``. The portal's part, carrying candidates between the two, is done by whoever
starts it (the netns test, later the lab demo) through JSON lines:

* stdin: ``{"candidate": "<sdp>"}``, ``{"invalidate": "<sdp>"}``, ``{"quit": true}``
* stdout: ``{"event": "ready"}`` (relays measured, connection created), ``{"event": "candidate", "sdp": ...}``,
  ``{"event": "invalidated", "sdp": ...}``, ``{"event": "established", "path": ..., "local": ..., "remote": ...,
  "setup_seconds": <first ICE check → established>}``, ``{"event": "path_changed", ...}``, ``{"event": "failed", ...}``,
  ``{"event": "no_relays"}``.

Every IP packet read from the TUN goes to the one connection; every decrypted packet is written to the TUN.

    python -m lab.client --role client --id gw --private-key HEX --peer-public-key HEX --psk HEX \\
        --local-ice ufrag:pwd --remote-ice ufrag:pwd --relay relay-1,192.0.2.254:3478,USER,PASS \\
        --bind 10.2.0.2 --tun tun-fz --tun-address 100.64.0.2/32 --tun-route 100.64.0.1/32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence

from dataplane import stun
from dataplane.base import Address, Transmit
from dataplane.io.rng import SystemRng
from dataplane.io.tun import Tun
from dataplane.io.udp import UdpSocket
from dataplane.node import (
    CandidateGathered,
    CandidateInvalidated,
    ConnectionClosed,
    ConnectionEstablished,
    ConnectionFailed,
    ConnectionPathChanged,
    IceCredentials,
    Node,
    NodeRole,
    NoRelays,
    RelayConfig,
)

log = logging.getLogger("lab.client")
wire = logging.getLogger("lab.client.wire")  # one line per datagram: enable only to debug
CHANNEL_DATA_HEADER = 4


def _is_ice_check(payload: bytes) -> bool:
    """A connectivity check: a BINDING request with USERNAME (relay BINDINGs carry none), maybe inside ChannelData."""
    if payload and 0x40 <= payload[0] <= 0x7F:
        payload = payload[CHANNEL_DATA_HEADER:]
    if not stun.is_stun(payload):
        return False
    try:
        message = stun.decode(payload)
    except stun.StunParseError:
        return False
    return message.method == stun.Method.BINDING and message.is_request and message.username() is not None


def parse_relay(text: str) -> RelayConfig:
    relay_id, address, username, password = text.split(",", 3)
    host, _, port = address.rpartition(":")
    return RelayConfig(relay_id, ((host.strip("[]"), int(port)),), username, password)


def parse_credentials(text: str) -> IceCredentials:
    username, _, password = text.partition(":")
    return IceCredentials(username, password)


class NodeDriver:
    """The event loop around one Node: UDP in/out, TUN in/out, one timer, stdio signalling."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.role = NodeRole(args.role)
        self.node = Node(self.role, bytes.fromhex(args.private_key), rng=SystemRng(), wall_clock=time.time)
        self.socket = UdpSocket.bind(args.bind, args.port, gso=False, gro=False, increase_buffers=False)
        self.local: Address = self.socket.local_address
        self.tun = Tun.create(args.tun, offload=False)
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()
        self.connection_id: str = args.id
        self.first_check_at: float | None = None
        self.created = False
        # Candidates the peer sent before our connection existed (we wait for a measured relay first).
        self.early_candidates: list[str] = []
        self.stdin_buffer = b""

    def emit(self, **fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def configure_tun(self) -> None:
        name = self.args.tun
        subprocess.run(["ip", "addr", "add", self.args.tun_address, "dev", name], check=True)
        subprocess.run(["ip", "link", "set", name, "mtu", "1280", "up"], check=True)
        for route in self.args.tun_route:
            subprocess.run(["ip", "route", "replace", route, "dev", name], check=True)

    async def run(self) -> None:
        self.configure_tun()
        self.loop.add_reader(self.socket.fileno(), self.on_udp)
        self.loop.add_reader(self.tun.wakeup_fd, self.on_tun)
        self.loop.add_reader(sys.stdin.fileno(), self.on_stdin)
        relays = [parse_relay(text) for text in self.args.relay]
        self.node.update_relays([], relays, self.now())
        self.flush()
        try:
            await self.done.wait()
        finally:
            log.info(
                "drops: node %s tun %s udp %s",
                dict(self.node.drops.counts),
                dict(self.tun.drops.counts),
                dict(self.socket.drops.counts),
            )
            for fd in (self.socket.fileno(), self.tun.wakeup_fd, sys.stdin.fileno()):
                self.loop.remove_reader(fd)
            if self.timer is not None:
                self.timer.cancel()
            self.tun.close()
            self.socket.close()

    def now(self) -> float:
        return self.loop.time()

    def maybe_create_connection(self) -> None:
        if self.created or not any(self.node.relay_rtt(r) is not None for r in self.node.relay_ids):
            return
        self.created = True
        ok = self.node.upsert_connection(
            self.connection_id,
            remote_public_key=bytes.fromhex(self.args.peer_public_key),
            preshared_key=bytes.fromhex(self.args.psk),
            local_credentials=parse_credentials(self.args.local_ice),
            remote_credentials=parse_credentials(self.args.remote_ice),
            now=self.now(),
        )
        self.emit(event="ready", ok=ok, local=list(self.local))
        for sdp in self.early_candidates:
            self.node.add_remote_candidate(self.connection_id, sdp, self.now())
        self.early_candidates.clear()

    # -- inputs ---------------------------------------------------------------------------------------------------

    def on_udp(self) -> None:
        now = self.now()
        packets: list[bytes] = []
        for data, src in self.socket.recv_many():
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f recv %s <- %s %s", now, self.local, src, data[:4].hex())
            result = self.node.handle_input(data, src, self.local, now)
            if result is not None:
                packets.append(result[1])
        if packets:
            self.tun.send_many(packets)
        self.flush()

    def on_tun(self) -> None:
        now = self.now()
        for packet in self.tun.poll_recv_many():
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f tun read %d bytes %s", now, len(packet), packet[:20].hex())
            self.node.encapsulate(self.connection_id, packet, now)
        self.flush()

    def on_stdin(self) -> None:
        # Raw reads: a buffered readline() would keep further lines in its buffer where the selector cannot see them.
        chunk = os.read(sys.stdin.fileno(), 65536)
        if not chunk:
            self.done.set()
            return
        self.stdin_buffer += chunk
        now = self.now()
        while b"\n" in self.stdin_buffer:
            line, self.stdin_buffer = self.stdin_buffer.split(b"\n", 1)
            if line.strip():
                self.on_message(json.loads(line), now)
        self.flush()

    def on_message(self, message: dict[str, object], now: float) -> None:
        candidate, invalidated = message.get("candidate"), message.get("invalidate")
        if isinstance(candidate, str):
            if self.created:
                self.node.add_remote_candidate(self.connection_id, candidate, now)
            else:
                self.early_candidates.append(candidate)
        elif isinstance(invalidated, str):
            if invalidated in self.early_candidates:
                self.early_candidates.remove(invalidated)
            self.node.remove_remote_candidate(self.connection_id, invalidated, now)
        elif message.get("quit"):
            self.done.set()

    def on_timer(self) -> None:
        self.timer = None
        self.node.handle_timeout(self.now())
        self.flush()

    # -- outputs --------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        transmits: list[Transmit] = []
        while (transmit := self.node.poll_transmit()) is not None:
            if self.first_check_at is None and _is_ice_check(transmit.payload):
                self.first_check_at = self.now()
            transmits.append(transmit)
            if wire.isEnabledFor(logging.DEBUG):
                wire.debug("%.3f send %s -> %s %s", self.now(), transmit.src, transmit.dst, transmit.payload[:4].hex())
        if transmits:
            self.socket.send_many(transmits)
        while (event := self.node.poll_event()) is not None:
            self.on_event(event)
        self.maybe_create_connection()
        self.arm_timer()

    def on_event(self, event: object) -> None:
        if isinstance(event, CandidateGathered):
            self.emit(event="candidate", sdp=event.candidate.to_sdp())
        elif isinstance(event, CandidateInvalidated):
            self.emit(event="invalidated", sdp=event.candidate.to_sdp())
        elif isinstance(event, ConnectionEstablished):
            setup = None if self.first_check_at is None else self.now() - self.first_check_at
            self.emit(
                event="established",
                path=event.path.value,
                local=list(event.local),
                remote=list(event.remote),
                setup_seconds=setup,
            )
        elif isinstance(event, ConnectionPathChanged):
            self.emit(event="path_changed", path=event.path.value, local=list(event.local), remote=list(event.remote))
        elif isinstance(event, ConnectionFailed):
            self.emit(event="failed", reason=event.reason)
        elif isinstance(event, ConnectionClosed):
            self.emit(event="closed")
        elif isinstance(event, NoRelays):
            self.emit(event="no_relays")

    def arm_timer(self) -> None:
        deadline = self.node.poll_timeout()
        if self.timer is not None:
            if deadline is not None and abs(self.timer.when() - max(deadline, self.now())) < 1e-4:
                return
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            self.timer = self.loop.call_at(max(deadline, self.now()), self.on_timer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=[r.value for r in NodeRole], default=NodeRole.CLIENT.value)
    parser.add_argument("--id", required=True, help="connection id: the peer's portal id")
    parser.add_argument("--private-key", required=True, help="our WireGuard private key, hex")
    parser.add_argument("--peer-public-key", required=True, help="hex")
    parser.add_argument("--psk", required=True, help="preshared key, hex")
    parser.add_argument("--local-ice", required=True, help="ufrag:pwd")
    parser.add_argument("--remote-ice", required=True, help="ufrag:pwd")
    parser.add_argument("--relay", action="append", default=[], help="id,host:port,username,password (repeatable)")
    parser.add_argument("--bind", required=True, help="local IP for the UDP socket (its address is the host candidate)")
    parser.add_argument("--port", type=int, default=52625)
    parser.add_argument("--tun", required=True)
    parser.add_argument("--tun-address", required=True, help="e.g. 100.64.0.2/32")
    parser.add_argument("--tun-route", action="append", default=[], help="prefixes routed into the TUN")
    parser.add_argument("--log-level", default="WARNING")
    return parser


async def _main(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    driver = NodeDriver(args)
    await driver.run()


def main(argv: Sequence[str] | None = None) -> int:
    asyncio.run(_main(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
