"""Device behaviour the mutation run of dataplane/wireguard/device.py showed nothing else pinned down.

Receive path: datagrams are grouped into runs by receiver index and source (docs/architecture.md, the batched
receive path), a handshake message of the wrong size or a datagram too short for a type is dropped as bad length, an
unknown type as bad type, and every drop is logged with the datagram's source. Any 32-bit receiver index is valid,
0 included (wireguard-go draws them uniformly). Handshake load counts in one-second buckets [start, start + 1 s).
Send path: an IP packet that is neither a full IPv4 nor a full IPv6 header is an invalid inner packet; a bad or
unroutable packet is dropped alone, never the rest of the batch; consecutive datagrams to one destination leave as
one run (one GSO send). Configuration (UAPI semantics): an all-zero preshared key means none, removing a peer that is
not there is a no-op, and a removed peer holds no allowed IPs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import struct
from collections.abc import Callable

import pytest

from dataplane.base import Address
from dataplane.io.rng import SeededRng
from dataplane.wireguard.constants import KEY_SIZE, MESSAGE_TRANSPORT
from dataplane.wireguard.device import Device, DropReason

from .test_wg_device import (
    ADDRESS_A,
    ADDRESS_B,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    Pair,
    ipv4_packet,
    ipv6_packet,
)

STRANGER: Address = ("192.0.2.77", 4242)
OTHER: Address = ("198.51.100.9", 5555)


def transport_header_only(receiver_index: int) -> bytes:
    """A transport-shaped datagram (type 4, the receiver index, counter 0, a 16-byte tag of zeros): the minimum size."""
    return struct.pack("<IIQ", MESSAGE_TRANSPORT, receiver_index, 0) + bytes(16)


def mac1(responder_public: bytes, body: bytes) -> bytes:
    """Whitepaper §5.4.4: MAC(HASH("mac1----" || Spub_responder), message up to mac1)."""
    key = hashlib.blake2s(b"mac1----" + responder_public).digest()
    return hashlib.blake2s(body, key=key, digest_size=16).digest()


# --- receive path: grouping into runs ---


def test_open_datagrams_groups_consecutive_transport_messages_by_receiver_index_and_source() -> None:
    pair = Pair()
    other_copy: Address = (OTHER[0], OTHER[1])  # equal, but another tuple: a driver builds one per datagram
    assert other_copy == OTHER and other_copy is not OTHER
    handshake_like = b"\x01\x00\x00\x00" + bytes(20)
    datagrams = [
        (transport_header_only(7), STRANGER),
        (transport_header_only(7), STRANGER),
        (transport_header_only(9), STRANGER),  # another index from the same source: another run
        (transport_header_only(9), OTHER),  # the same index from another source: another run
        (transport_header_only(9), other_copy),  # the same source, as an equal address: the same run
        (handshake_like, OTHER),  # anything else is a run of its own, in its place
        (transport_header_only(9), OTHER),
    ]
    runs = pair.b.open_datagrams(datagrams)
    assert [(run.index, run.source, len(run.messages)) for run in runs] == [
        (7, STRANGER, 2),
        (9, STRANGER, 1),
        (9, OTHER, 2),
        (-1, OTHER, 1),  # ReceivedRun: index -1 marks a datagram that is not a transport message
        (9, OTHER, 1),
    ]
    assert [message for run in runs for message in run.messages] == [data for data, _ in datagrams]
    assert all(run.keypair is None and run.plaintexts is None for run in runs)  # no session holds these indices
    pair.b.receive_opened(runs, 0.0)
    assert pair.b.drops[DropReason.UNKNOWN_INDEX] == 6  # every transport message counted, one by one
    assert pair.b.drops[DropReason.BAD_LENGTH] == 1


def test_transport_runs_under_two_indices_from_one_source_are_each_decrypted_with_their_own_session() -> None:
    # two peers behind one address (one NAT mapping, one relay allocation): their messages interleave in one batch
    pair = Pair()
    rng = SeededRng(61)
    third_key = rng.random_bytes(KEY_SIZE)
    third = Device(rng=SeededRng(62), wall_clock=pair.wall, private_key=third_key)
    assert third.public_key is not None and pair.b.public_key is not None
    third.upsert_peer(pair.b.public_key, 0.0, endpoint=ADDRESS_B, allowed_ips=[ipaddress.ip_network("10.9.0.0/24")])
    pair.b.upsert_peer(third.public_key, 0.0, allowed_ips=[ipaddress.ip_network("10.9.0.3/32")])
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    third.send_packets([ipv4_packet("10.9.0.3", TUNNEL_B)], 0.0)
    pair.b.receive_datagrams([(t.payload, ADDRESS_A) for t in third.drain_transmits()], 0.0)
    third.receive_datagrams([(t.payload, ADDRESS_B) for t in pair.b.drain_transmits()], 0.0)
    assert pair.b.drain_packets() == []  # the third peer's packet waits in its staging until the handshake is done
    from_third = [(t.payload, ADDRESS_A) for t in third.drain_transmits()]
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"from a")], 0.0)
    from_a = [(t.payload, ADDRESS_A) for t in pair.a.drain_transmits()]
    assert [int.from_bytes(d[:4], "little") for d, _ in from_third + from_a] == [MESSAGE_TRANSPORT] * 2
    pair.b.receive_datagrams(from_third + from_a, 0.0)
    assert pair.b.drain_packets() == [ipv4_packet("10.9.0.3", TUNNEL_B), ipv4_packet(TUNNEL_A, TUNNEL_B, b"from a")]
    assert pair.b.drops.total() == 0


class FirstIndexZeroRng(SeededRng):
    """Seeded, except that the first 32-bit number it draws (the first session index) is 0."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.drawn = 0

    def random_u32(self) -> int:
        self.drawn += 1
        return 0 if self.drawn == 1 else super().random_u32()


def test_a_receiver_index_of_zero_carries_transport_data_like_any_other() -> None:
    pair = Pair()
    assert pair.b.private_key is not None and pair.a.public_key is not None
    pair.b = Device(rng=FirstIndexZeroRng(7), wall_clock=pair.wall, private_key=pair.b.private_key)
    pair.peer_a = pair.b.upsert_peer(pair.a.public_key, 0.0, allowed_ips=[ipaddress.ip_network(f"{TUNNEL_A}/32")])
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"second")], pair.now)
    (message,) = pair.a.drain_transmits()
    assert struct.unpack_from("<II", message.payload) == (MESSAGE_TRANSPORT, 0)  # B's session index is 0
    pair.b.receive_datagrams([(message.payload, ADDRESS_A)], pair.now)
    assert pair.b.drain_packets() == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"second")]
    assert pair.b.drops.total() == 0


# --- receive path: lengths, types, and the drop log ---


def test_a_four_byte_datagram_of_unknown_type_is_a_bad_type_and_shorter_is_a_bad_length() -> None:
    pair = Pair()
    pair.b.receive_datagrams([(b"\x05\x00\x00\x00", STRANGER)], 0.0)
    assert pair.b.drops[DropReason.BAD_TYPE] == 1 and pair.b.drops[DropReason.BAD_LENGTH] == 0
    pair.b.receive_datagrams([(b"\x05\x00\x00", STRANGER)], 0.0)  # too short to hold a type
    assert pair.b.drops[DropReason.BAD_TYPE] == 1 and pair.b.drops[DropReason.BAD_LENGTH] == 1


def _too_short_for_a_type(pair: Pair) -> tuple[bytes, Address]:
    return b"\x01\x00\x00", STRANGER


def _initiation_of_the_wrong_size(pair: Pair) -> tuple[bytes, Address]:
    return b"\x01\x00\x00\x00" + bytes(140), STRANGER  # an initiation is 148 bytes


def _transport_shorter_than_its_header_and_tag(pair: Pair) -> tuple[bytes, Address]:
    return struct.pack("<IIQ", MESSAGE_TRANSPORT, 1, 0) + bytes(8), STRANGER  # a transport message is >= 32 bytes


def _initiation_to_a_device_without_a_key(pair: Pair) -> tuple[bytes, Address]:
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    initiation = pair.a.drain_transmits()[0].payload
    pair.b = Device(rng=SeededRng(3), wall_clock=pair.wall)  # UAPI: a device may run before it has a key
    return initiation, ADDRESS_A


def _initiation_without_a_cookie_under_load(pair: Pair) -> tuple[bytes, Address]:
    pair.b.force_under_load = True
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    return pair.a.drain_transmits()[0].payload, ADDRESS_A


def _response_for_no_handshake(pair: Pair) -> tuple[bytes, Address]:
    # type 2, sender index, receiver index (none of B's), ephemeral, empty; then mac1 for B and an empty mac2
    assert pair.b.public_key is not None
    body = struct.pack("<III", 2, 0x1234, 0xDEADBEEF) + bytes(32 + 16)
    return body + mac1(pair.b.public_key, body) + bytes(16), STRANGER


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_too_short_for_a_type, DropReason.BAD_LENGTH),
        (_initiation_of_the_wrong_size, DropReason.BAD_LENGTH),
        (_transport_shorter_than_its_header_and_tag, DropReason.BAD_LENGTH),
        (_initiation_to_a_device_without_a_key, DropReason.NO_PRIVATE_KEY),
        (_initiation_without_a_cookie_under_load, DropReason.COOKIE_REQUIRED),
        (_response_for_no_handshake, DropReason.UNKNOWN_INDEX),
    ],
)
def test_each_receive_path_drop_is_counted_and_logged_with_the_datagram_source(
    build: Callable[[Pair], tuple[bytes, Address]], reason: DropReason, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.wireguard.drops")
    pair = Pair()
    datagram, source = build(pair)
    pair.b.receive_datagrams([(datagram, source)], 0.0)
    assert pair.b.drops[reason] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.drops"]
    assert lines == [f"dropped a datagram from {source}: {reason.value}"]


def test_a_handshake_message_exactly_one_second_after_its_bucket_began_starts_a_new_bucket() -> None:
    pair = Pair()
    pair.b.under_load_threshold = 2
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    initiation = pair.a.drain_transmits()[0].payload
    for now in (1.5, 1.75):
        pair.b.receive_datagrams([(initiation, ADDRESS_A)], now)
    pair.b.receive_datagrams([(initiation, ADDRESS_A)], 2.5)  # the bucket is [1.5, 2.5): this one opens the next
    assert not pair.b.is_under_load(2.5)
    pair.b.receive_datagrams([(initiation, ADDRESS_A)], 2.75)
    pair.b.receive_datagrams([(initiation, ADDRESS_A)], 2.875)  # the third in [2.5, 3.5)
    assert pair.b.is_under_load(2.875)


# --- send path ---


def test_a_packet_that_is_not_a_full_ipv4_or_ipv6_header_is_an_invalid_inner_packet() -> None:
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    routable_v6 = ipv6_packet(TUNNEL6_A, TUNNEL6_B, b"x" * 20)
    version_five = bytes([0x50]) + routable_v6[1:]  # a routable destination where IPv6 keeps it, but version 5
    short_v6 = routable_v6[:39]
    pair.a.send_packets([version_five, short_v6], pair.now)
    assert pair.a.drops[DropReason.INVALID_INNER_PACKET] == 2
    assert pair.a.drops[DropReason.NO_ROUTE] == 0
    assert pair.a.drain_transmits() == []


def test_a_bad_or_unroutable_packet_is_dropped_alone_and_the_rest_of_the_batch_goes_out() -> None:
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    good = [ipv4_packet(TUNNEL_A, TUNNEL_B, b"one"), ipv4_packet(TUNNEL_A, TUNNEL_B, b"two")]
    pair.a.send_packets([b"", good[0], ipv4_packet(TUNNEL_A, "10.200.0.1"), good[1]], pair.now)
    assert pair.a.drops[DropReason.INVALID_INNER_PACKET] == 1
    assert pair.a.drops[DropReason.NO_ROUTE] == 1
    pair.pump()
    assert pair.b.drain_packets() == good


def test_datagrams_queued_by_several_sends_to_one_endpoint_leave_as_one_run() -> None:
    # drain_datagram_runs: runs of datagrams to one destination in order, one GSO send per run
    pair = Pair()
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"one")], pair.now)
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"two"), ipv4_packet(TUNNEL_A, TUNNEL_B, b"3")], pair.now)
    runs = pair.a.drain_datagram_runs()
    assert [(destination, len(messages)) for destination, messages in runs] == [(ADDRESS_B, 3)]
    pair.b.receive_datagrams([(message, ADDRESS_A) for message in runs[0][1]], pair.now)
    assert pair.b.drain_packets() == [
        ipv4_packet(TUNNEL_A, TUNNEL_B, b"one"),
        ipv4_packet(TUNNEL_A, TUNNEL_B, b"two"),
        ipv4_packet(TUNNEL_A, TUNNEL_B, b"3"),
    ]


# --- configuration ---


def test_an_all_zero_preshared_key_means_no_preshared_key() -> None:
    # UAPI (wireguard-go, wg(8)): preshared_key=000…0 removes the key
    pair = Pair()
    pair.a.upsert_peer(pair.peer_b.public_key, 0.0, preshared_key=b"\x11" * KEY_SIZE)
    assert pair.peer_b.preshared_key == b"\x11" * KEY_SIZE
    pair.a.upsert_peer(pair.peer_b.public_key, 0.0, preshared_key=bytes(KEY_SIZE))
    assert pair.peer_b.preshared_key is None
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]  # B has none either: the handshake agrees


def test_removing_a_peer_that_is_not_there_changes_nothing() -> None:
    pair = Pair()
    pair.a.remove_peer(SeededRng(9).random_bytes(KEY_SIZE), 0.0)
    assert list(pair.a.peers) == [pair.peer_b.public_key]
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]


def test_a_removed_peer_holds_no_allowed_ips_and_its_networks_route_nowhere() -> None:
    pair = Pair()
    removed = pair.peer_b
    pair.a.remove_peer(removed.public_key, 0.0)
    assert removed.allowed_ips == []
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    assert pair.a.drops[DropReason.NO_ROUTE] == 1
