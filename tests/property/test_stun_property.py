"""Hypothesis: the STUN decoder raises only StunParseError, and encode/decode round-trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import stun
from dataplane.stun import ATTRIBUTES, MAGIC_COOKIE_BYTES, Attr, StunMessage, StunParseError


def _header(message_type: int, body: bytes, tid: bytes) -> bytes:
    return message_type.to_bytes(2, "big") + len(body).to_bytes(2, "big") + MAGIC_COOKIE_BYTES + tid


attribute_types = st.one_of(st.sampled_from(sorted(ATTRIBUTES)), st.integers(0, 0xFFFF))
raw_attribute = st.tuples(attribute_types, st.binary(max_size=40)).map(
    lambda tv: tv[0].to_bytes(2, "big") + len(tv[1]).to_bytes(2, "big") + tv[1] + b"\x00" * (-len(tv[1]) % 4)
)
plausible_messages = st.builds(
    lambda mtype, attrs, tid: _header(mtype, b"".join(attrs), tid) + b"".join(attrs),
    st.integers(0, 0x3FFF),
    st.lists(raw_attribute, max_size=6),
    st.binary(min_size=12, max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=120), plausible_messages))
def test_decode_raises_only_parse_error_and_getters_never_fail(data: bytes) -> None:
    try:
        msg = stun.decode(data)
    except StunParseError:
        return
    assert stun.is_stun(data)
    # Every typed getter must work on anything decode() accepted.
    msg.username(), msg.realm(), msg.nonce(), msg.software(), msg.priority(), msg.lifetime()
    msg.ice_controlling(), msg.ice_controlled(), msg.error_code(), msg.unknown_attributes()
    msg.channel_number(), msg.requested_transport(), msg.additional_address_family(), msg.data()
    for attr in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_PEER_ADDRESS, Attr.XOR_RELAYED_ADDRESS):
        msg.xor_address(attr)
        msg.xor_addresses(attr)
    msg.address(Attr.MAPPED_ADDRESS)
    stun.unknown_attribute_response(msg)
    assert stun.check_integrity(data, b"key") in (True, False)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=20))
def test_integrity_helpers_never_raise(data: bytes, key: bytes) -> None:
    assert stun.check_integrity(data, key) in (True, False)
    assert stun.has_fingerprint(data) in (True, False)
    assert stun.has_integrity(data) in (True, False)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 65535))
text = st.text(max_size=40)


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    msg = StunMessage(draw(st.integers(0, 0xFFF)), draw(st.integers(0, 3)), draw(st.binary(min_size=12, max_size=12)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            msg.add_xor_address(Attr.XOR_PEER_ADDRESS, draw(addresses))
        elif kind == 1:
            msg.add_username(draw(text))
        elif kind == 2:
            msg.add_priority(draw(st.integers(0, 2**32 - 1)))
        elif kind == 3:
            msg.add_ice_controlling(draw(st.integers(0, 2**64 - 1)))
        elif kind == 4:
            msg.add_data(draw(st.binary(max_size=50)))
        elif kind == 5:
            msg.add_error_code(draw(st.integers(300, 699)), draw(text))
        else:
            msg.add(draw(st.integers(0x8030, 0xFFFF)), draw(st.binary(max_size=10)))
    return msg


@settings(max_examples=300, deadline=None)
@given(messages(), st.booleans(), st.one_of(st.none(), st.binary(min_size=1, max_size=32)))
def test_encode_decode_round_trip(msg: StunMessage, fingerprint: bool, key: bytes | None) -> None:
    data = stun.encode(msg, integrity_key=key, fingerprint=fingerprint)
    assert stun.is_stun(data)
    assert stun.decode(data) == msg
    assert stun.has_fingerprint(data) is fingerprint
    if key is not None:
        assert stun.check_integrity(data, key)
        assert not stun.check_integrity(data, key + b"!")


@settings(max_examples=200, deadline=None)
@given(messages(), st.binary(min_size=1, max_size=16), st.data())
def test_any_single_bit_flip_breaks_integrity_or_parse(msg: StunMessage, key: bytes, data: st.DataObject) -> None:
    wire = bytearray(stun.encode(msg, integrity_key=key, fingerprint=False))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    assert not stun.check_integrity(bytes(wire), key)
