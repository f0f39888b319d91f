"""Property tests for the WireGuard core: routing and replay against naive models; garbage never raises."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.io.rng import SeededRng
from dataplane.wireguard import messages
from dataplane.wireguard.allowedips import AllowedIps, Network
from dataplane.wireguard.cookie import CookieGenerator
from dataplane.wireguard.device import Device
from dataplane.wireguard.replay import BLOCK_BIT_LOG, RING_BLOCKS, WINDOW_SIZE, ReplayFilter
from dataplane.wireguard.tunn import IndexTable, Tunn

from ..unit.test_wg_device import TUNNEL_A, TUNNEL_B, Pair, ipv4_packet


def _networks(version: int) -> st.SearchStrategy[Network]:
    bits = 32 if version == 4 else 128
    # few distinct high bits so prefixes overlap often
    return st.tuples(st.integers(0, 7), st.integers(0, bits)).map(
        lambda t: (
            ipaddress.ip_network((t[0] << (bits - 3), t[1]), strict=False)
            if version == 4
            else ipaddress.IPv6Network((t[0] << (bits - 3), t[1]), strict=False)
        )
    )


def _naive_lookup(entries: dict[Network, int], address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
    best: tuple[int, int] | None = None
    for network, value in entries.items():
        if network.version == address.version and address in network:
            if best is None or network.prefixlen > best[0]:
                best = (network.prefixlen, value)
    return None if best is None else best[1]


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    data=st.data(),
)
def test_allowed_ips_longest_prefix_matches_naive_model(version: int, data: st.DataObject) -> None:
    bits = 32 if version == 4 else 128
    operations = data.draw(
        st.lists(st.tuples(st.booleans(), _networks(version), st.integers(0, 5)), max_size=40), label="ops"
    )
    table: AllowedIps[int] = AllowedIps()
    model: dict[Network, int] = {}
    for insert, network, value in operations:
        if insert:
            table.insert(network, value)
            model[network] = value
        else:
            table.remove(network)
            model.pop(network, None)
    probes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=1, max_size=30), label="probes")
    probes += [int(n.network_address) for n in model] + [int(n.broadcast_address) for n in model]
    for probe in probes:
        address = ipaddress.IPv4Address(probe) if version == 4 else ipaddress.IPv6Address(probe)
        assert table.lookup(address.packed) == _naive_lookup(model, address)
        assert table.lookup_ip(address) == _naive_lookup(model, address)


@settings(max_examples=300, deadline=None)
@given(
    counters=st.lists(
        st.one_of(st.integers(0, 3 * WINDOW_SIZE), st.integers((1 << 64) - 3 * WINDOW_SIZE, (1 << 64) - 1)),
        max_size=200,
    ),
    limit=st.sampled_from([(1 << 64) - (1 << 13) - 1, (1 << 64) - 1 - 8128 - 1]),
)
def test_replay_filter_matches_naive_window(counters: list[int], limit: int) -> None:
    replay = ReplayFilter(limit)
    seen: set[int] = set()
    last = 0
    for counter in counters:
        expected = counter < limit and not (counter < last and last - counter > WINDOW_SIZE) and counter not in seen
        assert replay.validate(counter) == expected
        if expected:
            seen.add(counter)
            last = max(last, counter)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_message_parser_raises_only_parse_error(data: bytes) -> None:
    try:
        message = messages.parse(data)
    except messages.MessageParseError:
        return
    assert message.to_bytes() == data


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([1, 2, 3, 4]), body=st.binary(max_size=180))
def test_message_round_trip_of_typed_garbage(kind: int, body: bytes) -> None:
    data = kind.to_bytes(4, "little") + body
    try:
        message = messages.parse(data)
    except messages.MessageParseError:
        return
    assert message.to_bytes() == data


_PAIR = Pair(seed=42)
_PAIR.a_to_b()
_KNOWN_INDICES = list(_PAIR.b._indices.entries)


def _datagrams() -> st.SearchStrategy[bytes]:
    """Garbage, plus garbage that looks like each message type, addressed to real indices, with valid mac1."""
    generator = CookieGenerator(_PAIR.b.public_key or b"")
    typed = st.tuples(
        st.sampled_from([1, 2, 3, 4]), st.sampled_from([None, *_KNOWN_INDICES]), st.binary(max_size=160)
    ).map(lambda t: t[0].to_bytes(4, "little") + (t[1].to_bytes(4, "little") if t[1] is not None else b"") + t[2])
    with_mac1 = st.tuples(st.sampled_from([(1, 116), (2, 60)]), st.binary(min_size=112, max_size=112)).map(
        lambda t: generator.add_macs(t[0][0].to_bytes(4, "little") + t[1][: t[0][1] - 4], 0.0)
    )
    flipped = st.tuples(st.sampled_from(_PAIR.sent["a->b"]), st.integers(0, 2000)).map(
        lambda t: t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ 1]) + t[0][t[1] % len(t[0]) + 1 :]
    )
    return st.one_of(st.binary(max_size=200), typed, with_mac1, flipped)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    datagrams=st.lists(_datagrams(), max_size=20),
    under_load=st.booleans(),
    now=st.floats(0.0, 1000.0),
)
def test_device_receive_never_raises_and_counts_every_drop(
    datagrams: list[bytes], under_load: bool, now: float
) -> None:
    device = _PAIR.b
    device.force_under_load = under_load
    before = device.drops.total()
    delivered_before = len(device.drain_packets())
    device.receive_datagrams([(d, ("203.0.113.5", 4000)) for d in datagrams], now)
    # nothing here can authenticate, so every datagram is counted as a drop (cookie replies count as drops too)
    assert device.drops.total() - before == len(datagrams)
    device.handle_timeout(now)  # timers may drop staged keepalives of their own; only must not raise
    device.drain_transmits()
    assert len(device.drain_packets()) + delivered_before == 0
    device.force_under_load = False


@settings(max_examples=300, deadline=None)
@given(datagrams=st.lists(_datagrams(), max_size=10))
def test_tunn_decapsulate_never_raises(datagrams: list[bytes]) -> None:
    rng = SeededRng(3)
    tunn = Tunn(rng.random_bytes(32), _PAIR.a.public_key or b"", None, IndexTable(rng), rng, lambda: 0.0)
    for datagram in datagrams:
        assert tunn.decapsulate(datagram, 1.0) is None
    assert tunn.drops.total() == len(datagrams)


def test_pair_still_works_after_fuzzing() -> None:
    pair = Pair(seed=43)
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    device = Device(rng=SeededRng(1), wall_clock=lambda: 0.0)
    device.receive_datagrams([(b"\x01" + bytes(147), ("192.0.2.1", 1))], 0.0)
    assert device.drops.total() == 1


# --- the receive hot path's inline replay check against the naive window ---

_REPLAY_SEED = 77
_REPLAY_MESSAGES = 3 * WINDOW_SIZE + 300
_RING_SPAN = RING_BLOCKS * (1 << BLOCK_BIT_LOG)  # counters that share a ring slot are this far apart


def _replay_pair() -> Pair:
    """A pair with a session (deterministic: the same seed gives the same keys, so the messages below stay valid)."""
    pair = Pair(seed=_REPLAY_SEED)
    assert pair.a_to_b() == [ipv4_packet(TUNNEL_A, TUNNEL_B)]
    return pair


def _sequence_packet(number: int) -> bytes:
    return ipv4_packet(TUNNEL_A, TUNNEL_B, number.to_bytes(4, "big"))


def _replay_messages() -> list[bytes]:
    pair = _replay_pair()
    pair.a.send_packets([_sequence_packet(number) for number in range(_REPLAY_MESSAGES)], pair.now)
    return [payload for _, payload in pair.a.drain_datagrams()]


_MESSAGES = _replay_messages()
_FIRST_COUNTER = int.from_bytes(_MESSAGES[0][8:16], "little")


def _deliveries() -> st.SearchStrategy[list[int]]:
    """Message numbers in delivery order: in-order bursts (the inline path), jumps, duplicates, stragglers."""
    burst = st.tuples(st.integers(0, _REPLAY_MESSAGES - 1), st.integers(1, 200)).map(
        lambda t: list(range(t[0], min(t[0] + t[1], _REPLAY_MESSAGES)))
    )
    single = st.integers(0, _REPLAY_MESSAGES - 1).map(lambda n: [n])
    # The same burst again one ring (or a few blocks) later: the new block's ring slot must have been cleared.
    echo = st.tuples(
        st.integers(0, _REPLAY_MESSAGES - _RING_SPAN - 100),
        st.integers(1, 70),
        st.sampled_from([_RING_SPAN, _RING_SPAN - 64, 64, 128]),
    ).map(lambda t: [*range(t[0], t[0] + t[1]), *range(t[0] + t[2], t[0] + t[2] + t[1])])
    return st.lists(st.one_of(burst, single, echo), max_size=12).map(lambda parts: [n for part in parts for n in part])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(order=_deliveries(), chunk=st.integers(1, 80))
def test_device_receive_replay_matches_naive_window(order: list[int], chunk: int) -> None:
    pair = _replay_pair()
    replays_before = pair.b.drops["replay"]
    last = _FIRST_COUNTER - 1
    seen: set[int] = set()
    expected: list[bytes] = []
    for number in order:
        counter = _FIRST_COUNTER + number
        if counter in seen or (counter < last and last - counter > WINDOW_SIZE):
            continue
        seen.add(counter)
        last = max(last, counter)
        expected.append(_sequence_packet(number))
    delivered: list[bytes] = []
    for start in range(0, len(order), chunk):
        batch = [(_MESSAGES[number], pair.address_a) for number in order[start : start + chunk]]
        pair.b.receive_datagrams(batch, pair.now)
        delivered += pair.b.drain_packets()
    assert delivered == expected
    assert pair.b.drops["replay"] - replays_before == len(order) - len(expected)
