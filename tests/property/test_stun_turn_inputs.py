"""Hypothesis: ChannelData parsing raises only its own error; the TURN client never raises on network input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import stun, turn
from dataplane.io.rng import SeededRng
from dataplane.stun import Attr, Method
from dataplane.turn import ChannelDataParseError

SERVER = ("198.51.100.7", 3478)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_channel_data_parser_raises_only_its_error(data: bytes) -> None:
    try:
        number, payload = turn.decode_channel_data(data)
    except ChannelDataParseError:
        return
    assert 0x4000 <= number <= 0x7FFF
    assert turn.encode_channel_data(number, payload) == data


@settings(max_examples=200, deadline=None)
@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=300))
def test_channel_data_round_trip(number: int, payload: bytes) -> None:
    data = turn.encode_channel_data(number, payload)
    assert turn.is_channel_data(data) and not stun.is_stun(data)
    assert turn.decode_channel_data(data) == (number, payload)


def _allocated() -> tuple[turn.Allocation, bytes]:
    """An allocation past the 401 dance, and the key its relay signs with."""
    alloc = turn.Allocation(SERVER, "1:salt", "pw", rng=SeededRng(3), now=0.0)
    key = stun.long_term_key("1:salt", "firezone", "pw")
    binding = stun.decode(alloc.poll_transmit().payload)  # type: ignore[union-attr]
    alloc.handle_input(
        stun.encode(binding.success_response().add_xor_address(Attr.XOR_MAPPED_ADDRESS, ("203.0.113.1", 1))), SERVER, 0
    )
    first = stun.decode(alloc.poll_transmit().payload)  # type: ignore[union-attr]
    challenge = first.error_response(401, "Unauthorized").add_realm("firezone").add_nonce("n")
    alloc.handle_input(stun.encode(challenge), SERVER, 0.0)
    second = stun.decode(alloc.poll_transmit().payload)  # type: ignore[union-attr]
    success = (
        second.success_response().add_xor_address(Attr.XOR_RELAYED_ADDRESS, ("198.51.100.7", 50000)).add_lifetime(600)
    )
    alloc.handle_input(stun.encode(success, integrity_key=key), SERVER, 0.0)
    assert alloc.is_allocated
    alloc.bind_channel(("192.0.2.1", 9), 0.0)
    bind = stun.decode(alloc.poll_transmit().payload)  # type: ignore[union-attr]
    alloc.handle_input(stun.encode(bind.success_response(), integrity_key=key), SERVER, 0.0)
    assert alloc.has_channel(("192.0.2.1", 9))
    alloc.refresh(0.0)  # leaves a REFRESH transaction open for responses to hit
    return alloc, key


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=60),
            st.binary(max_size=40).map(lambda b: b"\x40\x00" + len(b).to_bytes(2, "big") + b),
            st.builds(
                lambda method, cls, tid, attrs: stun.encode(stun.StunMessage(method, cls, tid, attrs)),
                st.sampled_from(list(Method)),
                st.integers(0, 3),
                st.binary(min_size=12, max_size=12),
                st.lists(
                    st.tuples(st.sampled_from([a.value for a in Attr if a not in (8, 0x1C, 0x8028)]), st.just(b"")),
                    max_size=3,
                ),
            ),
        ),
        max_size=8,
    )
)
def test_allocation_never_raises_on_network_input(datagrams: list[bytes]) -> None:
    alloc, _ = _allocated()
    now = 1.0
    for data in datagrams:
        result = alloc.handle_input(data, SERVER, now)
        assert result is True or isinstance(result, turn.Decapsulated)
        alloc.handle_timeout(now)
        now += 0.5
    while alloc.poll_transmit() is not None:
        pass
