"""The per-packet loops of the send and receive paths in C (``sealed_size``, ``gso_run_ends``, ``destination_runs``,
``accept_transport_run``, ``split_datagrams``) give the same results as their pure-Python twins, malformed input included."""

from __future__ import annotations

from array import array
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import native_fallback as pure
from dataplane.wireguard.constants import REJECT_AFTER_MESSAGES
from dataplane.wireguard.replay import RING_BLOCKS, WINDOW_SIZE, ReplayFilter, new_ring

# The C module, or a skip of this whole file when it is not built (pure-Python mode), as in the older equivalence tests.
from tests.property.test_native_equivalence import _native, pytestmark  # noqa: F401

IMPLEMENTATIONS = ["native", "pure"]


def _module(name: str) -> ModuleType:
    return _native() if name == "native" else pure


def _as(kind: str, data: bytes) -> bytes | bytearray | memoryview:
    return data if kind == "bytes" else bytearray(data) if kind == "bytearray" else memoryview(data)


buffer_kinds = st.sampled_from(["bytes"] * 6 + ["bytearray", "memoryview"])


# --- sealed_size --------------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.integers(0, 1500) | st.just(65535), buffer_kinds), max_size=40),
    st.none() | st.integers(-5, 1500),
)
def test_sealed_size_is_identical(sizes: list[tuple[int, str]], mtu: int | None) -> None:
    packets = [_as(kind, bytes(size)) for size, kind in sizes]
    assert _native().sealed_size(packets, mtu) == pure.sealed_size(packets, mtu)


def test_sealed_size_counts_header_padding_and_tag() -> None:
    for module in (_native(), pure):
        assert module.sealed_size([], 1420) == 0
        assert module.sealed_size([b""], None) == 32  # a keepalive: header and tag only
        assert module.sealed_size([bytes(17)], None) == 32 + 32  # padded to 32
        assert module.sealed_size([bytes(1415)], 1420) == 1420 + 32  # padding stops at the MTU
        assert module.sealed_size([bytes(1430)], 1420) == 1430 + 32  # never below the packet itself
        with pytest.raises(TypeError):
            module.sealed_size([object()], None)


# --- gso_run_ends -------------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from([0, 1, 60, 100, 1000, 1452, 1452, 1452, 1452, 1500, 40000]), max_size=150),
    st.integers(1, 70),
    st.sampled_from([65535, 3000, 1452, 100]),
)
def test_gso_run_ends_is_identical_and_cuts_valid_gso_sends(sizes: list[int], segments: int, limit: int) -> None:
    payloads = [bytes(size) for size in sizes]
    ends = _native().gso_run_ends(payloads, segments, limit)
    assert ends == pure.gso_run_ends(payloads, segments, limit)
    start = 0
    for end in ends:
        assert end > start
        run = sizes[start:end]
        if len(run) > 1:
            assert len(run) <= segments and sum(run) <= limit
            assert run[0] > 0 and all(size == run[0] for size in run[:-1]) and 0 < run[-1] <= run[0]
        start = end
    assert start == len(payloads)


def test_gso_run_ends_cuts_after_a_short_segment() -> None:
    for module in (_native(), pure):
        assert module.gso_run_ends([bytes(8), bytes(8), bytes(5), bytes(8)], 64, 65535) == [3, 4]
        assert module.gso_run_ends([b"", bytes(8), bytes(8)], 64, 65535) == [1, 3]
        assert module.gso_run_ends([bytes(8)] * 5, 2, 65535) == [2, 4, 5]
        assert module.gso_run_ends([bytes(8)] * 5, 64, 16) == [2, 4, 5]
        assert module.gso_run_ends([], 64, 65535) == []
        with pytest.raises(TypeError):
            module.gso_run_ends([bytes(8), 5], 64, 65535)


# --- destination_runs ---------------------------------------------------------------------------------------------

_DESTINATIONS_4 = [bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])]
_DESTINATIONS_6 = [bytes(15) + b"\x01", bytes(15) + b"\x02"]


@st.composite
def _ip_packets(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "v6", "short4", "short6", "empty", "other"]))
    if kind == "v4":
        data = bytes([0x45]) + bytes(15) + draw(st.sampled_from(_DESTINATIONS_4)) + bytes(draw(st.integers(0, 40)))
    elif kind == "v6":
        data = bytes([0x60]) + bytes(23) + draw(st.sampled_from(_DESTINATIONS_6)) + bytes(draw(st.integers(0, 40)))
    elif kind == "short4":
        data = bytes([0x45]) + bytes(draw(st.integers(0, 18)))
    elif kind == "short6":
        data = bytes([0x60]) + bytes(draw(st.integers(0, 38)))
    elif kind == "empty":
        data = b""
    else:
        data = bytes([draw(st.sampled_from([0x00, 0x15, 0x70, 0xFF]))]) + bytes(draw(st.integers(0, 60)))
    return draw(buffer_kinds), data


@settings(max_examples=300)
@given(st.lists(_ip_packets(), max_size=30))
def test_destination_runs_is_identical(drawn: list[tuple[str, bytes]]) -> None:
    packets = [_as(kind, data) for kind, data in drawn]
    runs = _native().destination_runs(packets)
    assert runs == pure.destination_runs(packets)
    start = 0
    for index, (end, destination) in enumerate(runs):
        assert end > start
        if index:
            assert destination != runs[index - 1][1]  # runs are maximal
        for data in (data for _, data in drawn[start:end]):
            expected = data[16:20] if data[:1] == b"\x45" and len(data) >= 20 else None
            if data[:1] == b"\x60" and len(data) >= 40:
                expected = data[24:40]
            assert destination == expected
        start = end
    assert start == len(packets)


def test_destination_runs_rejects_what_is_no_buffer() -> None:
    for module in (_native(), pure):
        with pytest.raises(TypeError):
            module.destination_runs([5])


# --- accept_transport_run -----------------------------------------------------------------------------------------

_SOURCES_4 = [bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2])]
_SOURCES_6 = [b"\xfd" + bytes(14) + b"\x01"]


@st.composite
def _plaintexts(draw: st.DrawFn) -> bytes | None:
    """What open_batch can return: None (no authentication), a keepalive, padded IP packets, inner garbage."""
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "none", "keepalive", "bad_length", "short", "other"]))
    padding = bytes(draw(st.sampled_from([0, 0, 3, 15])))
    if kind == "none":
        return None
    if kind == "keepalive":
        return b""
    if kind == "v4":
        body = bytes(draw(st.integers(0, 30)))
        total = 20 + len(body)
        header = bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8) + draw(st.sampled_from(_SOURCES_4))
        return header + bytes(4) + body + padding
    if kind == "v6":
        body = bytes(draw(st.integers(0, 30)))
        header = bytes([0x60, 0, 0, 0]) + len(body).to_bytes(2, "big") + bytes(2) + draw(st.sampled_from(_SOURCES_6))
        return header + bytes(16) + body + padding
    if kind == "bad_length":
        # A total length under the header or over what arrived.
        total = draw(st.sampled_from([0, 19, 200]))
        return bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(40)
    if kind == "short":
        return draw(st.sampled_from([b"\x45" + bytes(10), b"\x60" + bytes(30)]))
    return bytes([draw(st.sampled_from([0x00, 0x35, 0xF0]))]) + bytes(draw(st.integers(0, 50)))


_COUNTER_STEPS = st.sampled_from([1, 1, 1, 1, 0, -1, -3, 2, 64, 65, -64, 5000, -8128, -8129, 9000, 100_000])


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[bytes], list[bytes | None], int, list[int], int]:
    """A run of opened messages with counters stepping forward, repeating, going back and jumping, and a replay
    state (``last``, ring blocks) to meet them."""
    last = draw(st.sampled_from([0, 1, 63, 64, 10_000, 2**40, REJECT_AFTER_MESSAGES - 70]))
    ring = [draw(st.sampled_from([0, 0, 1, 2**63, 2**64 - 1, 0x5555])) for _ in range(RING_BLOCKS)]
    limit = draw(st.sampled_from([REJECT_AFTER_MESSAGES, REJECT_AFTER_MESSAGES - 60, 2**64 - 1, last + 3]))
    counter = last + draw(st.integers(-3, 3))
    messages: list[bytes] = []
    plaintexts: list[bytes | None] = []
    for _ in range(draw(st.integers(0, 25))):
        counter = min(max(counter + draw(_COUNTER_STEPS), 0), 2**64 - 1)
        plaintext = draw(_plaintexts())
        tag_and_body = bytes(16 + (len(plaintext) if plaintext is not None else draw(st.integers(0, 20))))
        messages.append(b"\x04\x00\x00\x00" + bytes(4) + counter.to_bytes(8, "little") + tag_and_body)
        plaintexts.append(plaintext)
    return messages, plaintexts, last, ring, limit


@settings(max_examples=400)
@given(_runs(), st.booleans())
def test_accept_transport_run_is_identical(
    run: tuple[list[bytes], list[bytes | None], int, list[int], int], as_tuple: bool
) -> None:
    messages, plaintexts, last, blocks, limit = run
    native_ring, pure_ring = array("Q", blocks), array("Q", blocks)
    message_input: list[bytes] | tuple[bytes, ...] = tuple(messages) if as_tuple else messages
    result = _native().accept_transport_run(message_input, plaintexts, native_ring, last, limit)
    assert result == pure.accept_transport_run(message_input, plaintexts, pure_ring, last, limit)
    assert native_ring == pure_ring


@settings(max_examples=200)
@given(_runs())
def test_accept_transport_run_accepts_what_the_replay_filter_accepts(
    run: tuple[list[bytes], list[bytes | None], int, list[int], int],
) -> None:
    messages, plaintexts, last, blocks, limit = run
    reference = ReplayFilter(limit)
    reference.last, reference.ring = last, array("Q", blocks)
    expected_replays = sum(
        1
        for message, plaintext in zip(messages, plaintexts, strict=True)
        if plaintext is not None and not reference.validate(int.from_bytes(message[8:16], "little"))
    )
    ring = array("Q", blocks)
    _, _, new_last, failed, replayed, _, _, _ = _native().accept_transport_run(messages, plaintexts, ring, last, limit)
    assert (new_last, replayed, failed) == (reference.last, expected_replays, plaintexts.count(None))
    assert ring == reference.ring


def _ipv4(source: bytes, body: bytes = b"") -> bytes:
    return bytes([0x45, 0]) + (20 + len(body)).to_bytes(2, "big") + bytes(8) + source + bytes(4) + body


def _message(counter: int, size: int = 48) -> bytes:
    return b"\x04\x00\x00\x00" + bytes(4) + counter.to_bytes(8, "little") + bytes(size - 16)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accept_transport_run_delivers_cut_packets_in_source_runs(implementation: str) -> None:
    module = _module(implementation)
    a, b = _SOURCES_4
    padded = _ipv4(a, b"xyz") + bytes(9)
    plaintexts: list[bytes | None] = [padded, _ipv4(a), None, _ipv4(b), b"", _ipv4(a), b"\x45" + bytes(5), _ipv4(b)]
    messages = [_message(counter) for counter in (1, 2, 3, 4, 5, 2, 6, 7)]
    ring = new_ring()
    packets, sources, last, failed, replayed, rejected, invalid, keepalives = module.accept_transport_run(
        messages, plaintexts, ring, 0, REJECT_AFTER_MESSAGES
    )
    assert packets == [_ipv4(a, b"xyz"), _ipv4(a), _ipv4(b), _ipv4(b)]
    assert sources == [(2, a), (4, b)]
    assert (last, failed, replayed, rejected, invalid, keepalives) == (7, 1, 1, 96, 1, 1)
    assert ring[0] == 0b11110110  # counters 1-7 seen but 3, which did not authenticate


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accept_transport_run_windows_and_limit(implementation: str) -> None:
    module = _module(implementation)
    packet = _ipv4(_SOURCES_4[0])
    start = 10 * WINDOW_SIZE
    counters = [start, start - WINDOW_SIZE, start - WINDOW_SIZE - 1, start + 1, 2**64 - 1]
    ring = new_ring()
    result = module.accept_transport_run(
        [_message(c) for c in counters], [packet] * len(counters), ring, start - 1, 2**64 - 1
    )
    # In the window: accepted; one beyond it: a replay; at the limit: rejected.
    assert result[2:5] == (start + 1, 0, 2)
    assert len(result[0]) == 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accept_transport_run_refuses_bad_arguments_alike(implementation: str) -> None:
    module = _module(implementation)
    message, packet = _message(1), _ipv4(_SOURCES_4[0])
    limit = REJECT_AFTER_MESSAGES
    with pytest.raises(TypeError):
        module.accept_transport_run([message], [packet], [0] * RING_BLOCKS, 0, limit)
    with pytest.raises(TypeError):
        module.accept_transport_run([message], [packet], array("q", bytes(8 * RING_BLOCKS)), 0, limit)
    with pytest.raises(TypeError):
        module.accept_transport_run([message], [packet], array("Q", bytes(8 * (RING_BLOCKS - 1))), 0, limit)
    with pytest.raises(ValueError):
        module.accept_transport_run([message, message], [packet], new_ring(), 0, limit)
    with pytest.raises(ValueError):
        module.accept_transport_run([message[:15]], [packet], new_ring(), 0, limit)
    with pytest.raises(TypeError):
        module.accept_transport_run([message], [bytearray(packet)], new_ring(), 0, limit)
    with pytest.raises(OverflowError):
        module.accept_transport_run([message], [packet], new_ring(), -1, limit)
    with pytest.raises(OverflowError):
        module.accept_transport_run([message], [packet], new_ring(), 0, 2**64)
    # A message too short for a header that did not authenticate is only counted.
    assert module.accept_transport_run([message[:10]], [None], new_ring(), 0, limit)[3:6] == (1, 0, 10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_differences_the_differential_fuzzer_found_are_gone(implementation: str) -> None:
    """Inputs from fuzz/fuzz_native.py on which the two sides once differed (the first was undefined behaviour in C:
    a signed overflow computing the room left under a hugely negative byte limit)."""
    module = _module(implementation)
    assert module.gso_run_ends([b"a", b"a"], 5, -(2**63)) == [1, 2]
    with pytest.raises(OverflowError):
        module.gso_run_ends([b"a"], 2**63, 5)
    with pytest.raises(OverflowError):
        module.sealed_size([b"a"], 2**63)
    with pytest.raises(TypeError):
        module.accept_transport_run([], [], memoryview(new_ring()), 0, 5)
    with pytest.raises(TypeError):
        module.destination_runs(["abc"])


# --- split_datagrams ----------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.binary(max_size=3000), st.data(), st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_split_datagrams_is_identical_and_cuts_the_read_into_segments(
    data: bytes, draw: st.DataObject, kind: str
) -> None:
    size = draw.draw(st.integers(0, len(data)), label="size")
    segment_size = draw.draw(st.integers(1, 1500), label="segment_size")
    source = ("192.0.2.1", 51820)
    split = _native().split_datagrams(_as(kind, data), size, segment_size, source)
    assert split == pure.split_datagrams(_as(kind, data), size, segment_size, source)
    assert b"".join(datagram for datagram, _ in split) == data[:size]
    assert all(len(datagram) == segment_size for datagram, _ in split[:-1])
    assert all(0 < len(datagram) <= segment_size and owner is source for datagram, owner in split)
    assert all(type(datagram) is bytes for datagram, _ in split)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_split_datagrams_rejects_what_it_cannot_cut(implementation: str) -> None:
    module = _module(implementation)
    buffer = bytearray(100)
    assert module.split_datagrams(buffer, 0, 10, None) == []
    assert module.split_datagrams(buffer, 100, 1000, None) == [(bytes(100), None)]
    for size, segment_size, error in (
        (101, 10, ValueError),
        (-1, 10, ValueError),
        (50, 0, ValueError),
        (50, -3, ValueError),
        (2**63, 10, OverflowError),
        (50, -(2**63) - 1, OverflowError),
    ):
        with pytest.raises(error):
            module.split_datagrams(buffer, size, segment_size, None)
    with pytest.raises(TypeError):
        module.split_datagrams(object(), 1, 1, None)
    with pytest.raises(TypeError):
        module.split_datagrams(buffer, 1.5, 1, None)
