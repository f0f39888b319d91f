"""WireGuard datagrams from the network: ``messages.parse`` and a responder Device that receives them.

The Device holds the responder's static key from the handshake vectors and the initiator as its peer, so the vector
initiations pass MAC1 and reach the Noise code; mutations then probe every stage behind it. Invariants: ``parse``
raises only MessageParseError and its fields re-pack to the input; ``Device.receive_datagrams`` never raises.
"""

from __future__ import annotations

import ipaddress
import struct

from dataplane.io.rng import SeededRng
from dataplane.wireguard import messages
from dataplane.wireguard.constants import MESSAGE_COOKIE_REPLY
from dataplane.wireguard.device import Device
from fuzz.harness import fuzz_main, join_datagrams, split_datagrams
from fuzz.seeds import hex_fields
from tests.vectors import load_vectors

INITIATOR = ("192.0.2.1", 51820)
WALL_CLOCK = 1_700_000_000.0
_KEYS = load_vectors("wireguard-handshake-messages.json")["keys"]


def new_device() -> Device:
    device = Device(
        rng=SeededRng(1),
        wall_clock=lambda: WALL_CLOCK,
        private_key=bytes.fromhex(_KEYS["responder_static_private_hex"]),
    )
    device.upsert_peer(
        bytes.fromhex(_KEYS["initiator_static_public_hex"]),
        0.0,
        allowed_ips=[ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/64")],
    )
    return device


def seeds() -> list[bytes]:
    packets = hex_fields("wireguard-handshake-messages.json", "packet_hex")
    cookie_reply = struct.pack("<II", MESSAGE_COOKIE_REPLY, 1) + bytes(24 + 32)
    return [join_datagrams([packet]) for packet in [*packets, cookie_reply]] + [join_datagrams(packets)]


def TestOneInput(data: bytes) -> None:
    datagrams = split_datagrams(data, limit=16)
    for datagram in datagrams:
        try:
            message = messages.parse(datagram)
        except messages.MessageParseError:
            continue
        if message.to_bytes() != datagram:
            raise AssertionError("a parsed WireGuard message does not re-pack to its datagram")
    device = new_device()
    now = 0.0
    for datagram in datagrams:
        device.receive_datagrams([(datagram, INITIATOR)], now)
        device.drain_transmits()
        device.drain_packets()
        while device.poll_event() is not None:
            pass
        now += 0.5
    device.handle_timeout(now + 200.0)


if __name__ == "__main__":
    fuzz_main("fuzz_wireguard_message")
