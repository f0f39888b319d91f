"""The C hot path (dataplane._native) and its pure-Python twin give byte-identical results on the same inputs, alone
and inside a pair of Tunns."""

from __future__ import annotations

import struct
import threading
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import native_fallback as pure
from dataplane.wireguard import tunn as tunn_module
from tests.unit.test_wg_device import TUNNEL_A, TUNNEL_B, ipv4_packet
from tests.unit.test_wg_tunn import TunnPair

native: ModuleType | None
try:
    from dataplane import _native as native
except ImportError:  # pragma: no cover - depends on the build
    native = None

pytestmark = pytest.mark.skipif(
    native is None, reason="dataplane._native is not built (no C compiler/OpenSSL headers): pure-Python mode only"
)

keys = st.binary(min_size=32, max_size=32)
# Sizes around the padding rule and the MTU, plus empty (keepalive) packets and an occasional large one.
packets = st.one_of(
    st.binary(max_size=64),
    st.integers(min_value=1380, max_value=1440).map(lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256)),
    st.just(b""),
    st.just(b"\xab" * 65535),
)
mtus = st.one_of(st.none(), st.integers(min_value=-5, max_value=1500))
counters = st.integers(min_value=0, max_value=2**64 - 200)
indices = st.integers(min_value=0, max_value=2**32 - 1)


def _native() -> ModuleType:
    assert native is not None
    return native


@settings(max_examples=150)
@given(keys, indices, counters, st.lists(packets, max_size=20), mtus)
def test_seal_batch_is_identical(key: bytes, index: int, counter: int, batch: list[bytes], mtu: int | None) -> None:
    sealed = _native().seal_batch(key, index, counter, batch, mtu)
    assert sealed == pure.seal_batch(key, index, counter, batch, mtu)
    assert len(sealed) == len(batch)
    for position, message in enumerate(sealed):
        assert struct.unpack_from("<IIQ", message) == (4, index, counter + position)


@settings(max_examples=150)
@given(keys, st.lists(packets, max_size=12), counters, st.data())
def test_open_batch_is_identical_on_sealed_tampered_and_short_messages(
    key: bytes, batch: list[bytes], counter: int, data: st.DataObject
) -> None:
    messages: list[bytes | bytearray | memoryview] = list(pure.seal_batch(key, 7, counter, batch, None))
    # Tamper with some messages (any byte, header included: the counter is in the nonce), add short/garbage ones.
    for position in range(len(messages)):
        if data.draw(st.booleans(), label="tamper"):
            tampered = bytearray(messages[position])
            offset = data.draw(st.integers(0, len(tampered) - 1), label="offset")
            tampered[offset] ^= data.draw(st.integers(1, 255), label="flip")
            messages[position] = tampered
    garbage: list[bytes] = data.draw(st.lists(st.binary(max_size=48), max_size=4), label="garbage")
    messages.extend(garbage)
    use_view: bool = data.draw(st.booleans(), label="memoryview")
    if messages and use_view:
        messages[0] = memoryview(bytes(messages[0]))
    opened = _native().open_batch(key, messages)
    assert opened == pure.open_batch(key, messages)
    for position, packet in enumerate(batch):
        if isinstance(messages[position], bytes):
            plain = opened[position]
            assert plain is not None and plain[: len(packet)] == packet


@given(keys, keys, st.lists(packets, min_size=1, max_size=6))
def test_open_batch_with_the_wrong_key_authenticates_nothing(key: bytes, other: bytes, batch: list[bytes]) -> None:
    messages = _native().seal_batch(key, 1, 0, batch, 1420)
    expected = [None] * len(batch) if key != other else pure.open_batch(key, messages)
    assert _native().open_batch(other, messages) == pure.open_batch(other, messages) == expected


# Each thread keeps its AEAD contexts keyed on the last key it used: a sequence of calls that switches keys, and a
# failed open followed by good ones, must give the same bytes as the pure twin, which keeps no state.
_call_keys = [bytes([n]) * 32 for n in range(3)]


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(_call_keys), st.booleans(), st.booleans(), packets), max_size=12))
def test_calls_that_switch_keys_and_fail_give_the_same_bytes(calls: list[tuple[bytes, bool, bool, bytes]]) -> None:
    for counter, (key, sealing, tamper, packet) in enumerate(calls):
        if sealing:
            assert _native().seal_batch(key, 3, counter, [packet], 1420) == pure.seal_batch(
                key, 3, counter, [packet], 1420
            )
            continue
        message = bytearray(pure.seal_batch(_call_keys[counter % 3], 3, counter, [packet], 1420)[0])
        if tamper:
            message[-1] ^= 1
        assert _native().open_batch(key, [message, bytes(message)]) == pure.open_batch(key, [message, bytes(message)])


def test_threads_sealing_and_opening_at_once_with_their_own_keys() -> None:
    batch = [bytes(range(256)) * 5 + bytes(n) for n in range(16)]
    expected = {
        key: (
            pure.seal_batch(key, 9, 100, batch, 1420),
            pure.open_batch(key, pure.seal_batch(key, 9, 100, batch, 1420)),
        )
        for key in _call_keys
    }
    failures: list[str] = []

    def work(key: bytes) -> None:
        sealed, opened = expected[key]
        other = _call_keys[(_call_keys.index(key) + 1) % 3]
        for _ in range(200):
            if _native().seal_batch(key, 9, 100, batch, 1420) != sealed or _native().open_batch(key, sealed) != opened:
                failures.append(key.hex()[:2])
                return
            if _native().open_batch(other, sealed) != [None] * len(batch):
                failures.append("wrong key authenticated")
                return

    # More threads than keys, and short-lived ones: each thread's contexts are freed when it ends.
    for _ in range(3):
        threads = [threading.Thread(target=work, args=(key,)) for key in _call_keys * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_empty_batches() -> None:
    key = bytes(range(32))
    assert _native().seal_batch(key, 1, 0, [], None) == pure.seal_batch(key, 1, 0, [], None) == []
    assert _native().open_batch(key, []) == pure.open_batch(key, []) == []


@pytest.mark.parametrize("implementation", ["native", "pure"])
def test_bad_arguments_raise_the_same_errors(implementation: str) -> None:
    module = _native() if implementation == "native" else pure
    with pytest.raises(ValueError):
        module.seal_batch(b"short", 1, 0, [b"x"], None)
    with pytest.raises(ValueError):
        module.open_batch(bytes(31), [bytes(40)])
    with pytest.raises(OverflowError):
        module.seal_batch(bytes(32), 2**32, 0, [b"x"], None)
    with pytest.raises(OverflowError):
        module.seal_batch(bytes(32), 1, 2**64 - 1, [b"x", b"y"], None)
    with pytest.raises(OverflowError):
        module.seal_batch(bytes(32), 1, -1, [b"x"], None)
    with pytest.raises(ValueError):
        module.ones_complement_sum(b"ab", -1)
    with pytest.raises(ValueError):
        module.ones_complement_sum(b"ab", 2**62 + 1)


@given(st.binary(max_size=9000), st.integers(min_value=0, max_value=2**62))
def test_ones_complement_sum_is_identical(data: bytes, initial: int) -> None:
    assert _native().ones_complement_sum(data, initial) == pure.ones_complement_sum(data, initial)
    assert _native().ones_complement_sum(data) == pure.ones_complement_sum(data)


@pytest.mark.parametrize(
    ("data", "initial"),
    [
        (b"", 0),
        (b"", 0xFFFF),
        (b"\x00" * 7, 0),
        (b"\xff\xff", 0),
        (b"\xff", 0),
        (b"\x00\x00", 0xFFFF * 3),
        (b"", 2**62),
    ],
)
def test_ones_complement_sum_edges(data: bytes, initial: int) -> None:
    assert _native().ones_complement_sum(data, initial) == pure.ones_complement_sum(data, initial)


def test_checksum_of_a_large_buffer_releases_nothing_wrong() -> None:
    data = bytes(range(256)) * 300 + b"\x01"
    assert _native().ones_complement_sum(memoryview(data)[1:], 12345) == pure.ones_complement_sum(data[1:], 12345)


# --- Tunn end to end: the same scenario through either implementation gives the same datagrams, packets and drops.

inner_packets = st.one_of(
    st.binary(max_size=1400).map(lambda payload: ipv4_packet(TUNNEL_A, TUNNEL_B, payload)),
    st.binary(max_size=60),  # not IP, too short, or lying about its length: dropped after authentication
    st.just(b""),
)
# How the wire treats each message: delivered, bit-flipped, truncated, duplicated (a replay), or lost.
wire_actions = st.sampled_from(["deliver", "deliver", "deliver", "flip", "truncate", "duplicate", "lose"])


def _run_tunn_scenario(
    implementation: ModuleType, batches: list[list[tuple[bytes, str, int]]]
) -> tuple[list[list[bytes]], list[list[bytes]], dict[str, int], int, int]:
    # Tunn binds the selected functions at import; swap them in its namespace for this run.
    namespace = vars(tunn_module)
    saved = (namespace["seal_batch"], namespace["open_batch"])
    namespace["seal_batch"], namespace["open_batch"] = implementation.seal_batch, implementation.open_batch
    try:
        pair = TunnPair()
        pair.a.encapsulate(ipv4_packet(TUNNEL_A, TUNNEL_B), 0.0)
        pair.pump(0.0)
        sent: list[list[bytes]] = []
        received: list[list[bytes]] = []
        for step, batch in enumerate(batches, start=1):
            now = step * 0.01
            pair.a.encapsulate_batch([packet for packet, _, _ in batch], now)
            messages = pair.a.drain_transmits()
            sent.append(messages)
            wire: list[bytes] = []
            for message, (_, action, position) in zip(messages, batch, strict=True):
                if action == "flip":
                    flipped = bytearray(message)
                    flipped[position % len(flipped)] ^= 0x40
                    wire.append(bytes(flipped))
                elif action == "truncate":
                    wire.append(message[: max(32, len(message) - 1 - position % 16)])
                elif action == "duplicate":
                    wire += [message, message]
                elif action == "deliver":
                    wire.append(message)
            out: list[bytes] = []
            pair.b.receive_transport_batch(wire, now, out)
            received.append(out)
        return sent, received, dict(pair.b.drops.counts), pair.b.rx_bytes, pair.a.tx_bytes
    finally:
        namespace["seal_batch"], namespace["open_batch"] = saved


@settings(max_examples=40)
@given(st.lists(st.lists(st.tuples(inner_packets, wire_actions, st.integers(0, 2000)), max_size=12), max_size=5))
def test_a_tunn_pair_behaves_identically_with_either_implementation(
    batches: list[list[tuple[bytes, str, int]]],
) -> None:
    assert _run_tunn_scenario(_native(), batches) == _run_tunn_scenario(pure, batches)


@st.composite
def _flow_packets(draw: st.DrawFn, key: bytes, protocol: int) -> list[bytes | bytearray]:
    """Packets of the flow (key, protocol) and look-alikes with one field off (first byte, protocol, fragment bits,
    total length, a key byte, size), now and then a bytearray."""
    out: list[bytes | bytearray] = []
    for _ in range(draw(st.integers(0, 12))):
        total = draw(st.integers(24, 80))
        packet = bytearray(bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes([0, 0, 0x40, 0, 64, protocol, 0, 0]))
        packet += key + bytes(max(0, total - 24))
        change = draw(st.sampled_from(["none"] * 4 + ["first", "protocol", "flags", "offset", "total", "key", "cut"]))
        if change == "first":
            packet[0] = draw(st.sampled_from([0x46, 0x60, 0x44]))
        elif change == "protocol":
            packet[9] ^= draw(st.integers(1, 255))
        elif change == "flags":
            packet[6] |= draw(st.integers(1, 0x3F))
        elif change == "offset":
            packet[7] = draw(st.integers(1, 255))
        elif change == "total":
            packet[2:4] = draw(st.integers(0, 100)).to_bytes(2, "big")
        elif change == "key":
            packet[12 + draw(st.integers(0, 11))] ^= 1
        elif change == "cut":
            del packet[draw(st.integers(0, len(packet))) :]
        out.append(packet if draw(st.integers(0, 9)) == 0 else bytes(packet))
    return out


@settings(max_examples=300)
@given(st.data())
def test_plain_flow_end_is_identical(data: st.DataObject) -> None:
    key = data.draw(st.binary(min_size=12, max_size=12), label="key")
    protocol = data.draw(st.sampled_from([6, 17, 1]), label="protocol")
    least = data.draw(st.sampled_from([28, 40, 0, 90]), label="least")
    items = data.draw(_flow_packets(key, protocol), label="packets")
    start = data.draw(st.integers(0, len(items) + 1), label="start")
    probe = data.draw(st.sampled_from([key, key[:11], b""]), label="probe")
    end = _native().plain_flow_end(items, start, probe, protocol, least)
    assert end == pure.plain_flow_end(items, start, probe, protocol, least)  # type: ignore[arg-type]
    assert end >= start


def test_plain_flow_end_takes_a_whole_run_and_stops_at_the_first_other_packet() -> None:
    key = bytes(range(12))
    plain = bytes([0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]) + key + bytes(16)
    fragment = plain[:7] + b"\x01" + plain[8:]
    for implementation in (_native(), pure):
        assert implementation.plain_flow_end([plain, plain, fragment, plain], 0, key, 6, 40) == 2
        assert implementation.plain_flow_end([plain, plain, fragment, plain], 3, key, 6, 40) == 4
        assert implementation.plain_flow_end([plain], 0, key, 17, 28) == 0
        assert implementation.plain_flow_end([plain], 0, key, 6, 41) == 0
        assert implementation.plain_flow_end([plain[:39]], 0, key, 6, 28) == 0  # claims 40 bytes, has 39
        with pytest.raises(ValueError):
            implementation.plain_flow_end([plain], -1, key, 6, 40)
        with pytest.raises(TypeError):
            implementation.plain_flow_end((plain,), 0, key, 6, 40)
