"""Tests that kill mutants ``make mutate`` found surviving in dataplane/stun.py (tools/mutation_report.py).

Each pins an RFC 8489 / RFC 8656 rule (docs/protocol.md §H) or a parse-error reason the rest of the suite left loose:
reserved bytes that must be zero, 16- and 32-bit fields read unsigned, the MESSAGE-INTEGRITY-SHA256 length rule, the
exact limits of the codec, the SASLprep tables, and the edges of the retransmission ladder. Parse-error reasons are
pinned because they become the detail of a counted drop (``MALFORMED_STUN``).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

import pytest

from dataplane import stun
from dataplane.stun import (
    Attr,
    ErrorCode,
    MessageClass,
    Method,
    RetransmitPolicy,
    StunMessage,
    StunParseError,
    Transaction,
    TransactionStep,
)

TID = bytes(range(1, 13))
KEY = b"swordfish"


def _raw(
    attributes: list[tuple[int, bytes]],
    *,
    message_class: int = MessageClass.REQUEST,
    transaction_id: bytes = TID,
) -> bytes:
    """A STUN message built by hand from the RFC 8489 §5/§14 layout: no FINGERPRINT, nothing checked."""
    body = b"".join(struct.pack("!HH", kind, len(value)) + value + bytes(-len(value) % 4) for kind, value in attributes)
    message_type = stun.encode_message_type(Method.BINDING, message_class)
    return struct.pack("!HHI", message_type, len(body), 0x2112A442) + transaction_id + body


def _rfc_fingerprint(data: bytes) -> int:
    """RFC 8489 §14.7: CRC-32 of the message up to the attribute, XOR 0x5354554E."""
    return (zlib.crc32(data) ^ 0x5354554E) & 0xFFFFFFFF


def _with_truncated_sha256_integrity(length: int, *, padded_in_header: bool = False) -> bytes:
    """A message whose MESSAGE-INTEGRITY-SHA256 is the first ``length`` bytes of the right HMAC (RFC 8489 §14.6).

    The header length is set as if the message ended after the attribute (its value padded or not)."""
    prefix_attributes = [(int(Attr.USERNAME), b"alice")]
    head = _raw(prefix_attributes)
    counted = length + (-length % 4) if padded_in_header else length
    signed = head[:2] + (len(head) - 20 + 4 + counted).to_bytes(2, "big") + head[4:]
    mac = hmac.new(KEY, signed, hashlib.sha256).digest()[:length]
    mac += bytes(length - len(mac))
    return _raw([*prefix_attributes, (int(Attr.MESSAGE_INTEGRITY_SHA256), mac)])


# --- parse errors say what was wrong (they become drop details) -----------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (bytes(19), "^shorter than a STUN header$"),
        (b"\x80\x01\x00\x00\x21\x12\xa4\x42" + TID, "^top two bits of the message type are not zero$"),
        (b"\x00\x01\x00\x00\x21\x12\xa4\x43" + TID, "^wrong magic cookie$"),
        (b"\x00\x01\x00\x02\x21\x12\xa4\x42" + TID + b"\x00\x00", "^length is not a multiple of 4$"),
        (b"\x00\x01\x00\x08\x21\x12\xa4\x42" + TID + bytes(4), "^length field 8 does not match 4 bytes of attributes$"),
    ],
    ids=["short", "top-bits", "cookie", "unaligned-length", "length-mismatch"],
)
def test_header_errors_name_the_broken_rule(data: bytes, reason: str) -> None:
    with pytest.raises(StunParseError, match=reason):
        stun.decode(data)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ([(Attr.MAPPED_ADDRESS, b"\x00\x01")], "^address attribute too short$"),
        ([(Attr.XOR_MAPPED_ADDRESS, b"\x00\x03\x12\x34" + bytes(4))], "^unknown address family 3$"),
        ([(Attr.MAPPED_ADDRESS, b"\x00\x01\x12\x34" + bytes(16))], "^address attribute of family 1 has length 20$"),
        ([(Attr.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00")], "^UNKNOWN-ATTRIBUTES has odd length$"),
        ([(Attr.REQUESTED_ADDRESS_FAMILY, b"\x03\x00\x00\x00")], "^REQUESTED-ADDRESS-FAMILY names unknown family 3$"),
        ([(Attr.MESSAGE_INTEGRITY_SHA256, bytes(12))], "^MESSAGE-INTEGRITY-SHA256 length invalid$"),
        ([(Attr.MESSAGE_INTEGRITY_SHA256, bytes(18))], "^MESSAGE-INTEGRITY-SHA256 length invalid$"),
        ([(Attr.USERNAME, b"u" * 513)], "^USERNAME longer than 512$"),
        ([(Attr.LIFETIME, bytes(3))], "^LIFETIME has length 3, expected 4$"),
        ([(Attr.REALM, b"\xff")], "^REALM is not UTF-8$"),
        ([(Attr.ERROR_CODE, b"\x00\x00\x04")], "^ERROR-CODE too short$"),
        ([(Attr.ERROR_CODE, b"\x00\x00\x04\x00\xff")], "^ERROR-CODE reason is not UTF-8$"),
        ([(Attr.ERROR_CODE, b"\x00\x00\x07\x00")], "^ERROR-CODE class 7 number 0 invalid$"),
        ([(Attr.ERROR_CODE, b"\x00\x00\x04\x64")], "^ERROR-CODE class 4 number 100 invalid$"),
        ([(Attr.ERROR_CODE, b"\x00\x00\x02\x00")], "^ERROR-CODE class 2 number 0 invalid$"),
    ],
    ids=[
        "address-short",
        "address-family",
        "address-length",
        "unknown-attributes-odd",
        "requested-family",
        "sha256-12",
        "sha256-18",
        "username-long",
        "lifetime-length",
        "realm-utf8",
        "error-code-short",
        "error-reason-utf8",
        "error-class-7",
        "error-number-100",
        "error-class-2",
    ],
)
def test_attribute_errors_name_the_attribute_and_the_rule(attributes: list[tuple[int, bytes]], reason: str) -> None:
    with pytest.raises(StunParseError, match=reason):
        stun.decode(_raw(attributes, message_class=MessageClass.ERROR))


def test_error_code_classes_3_to_6_and_numbers_0_to_99_are_accepted() -> None:
    # RFC 8489 §14.8: class 3..6, number 0..99.
    for error_class, number in [(3, 0), (6, 99), (4, 99), (5, 0)]:
        value = bytes((0, 0, error_class, number)) + b"ok"
        msg = stun.decode(_raw([(Attr.ERROR_CODE, value)], message_class=MessageClass.ERROR))
        assert msg.error_code() == (error_class * 100 + number, "ok")


def test_fingerprint_errors_name_the_rule() -> None:
    data = stun.encode(StunMessage.request(Method.BINDING, TID).add_software("x"))
    with pytest.raises(StunParseError, match="^FINGERPRINT mismatch$"):
        stun.decode(data[:-1] + bytes([data[-1] ^ 1]))
    # An attribute after FINGERPRINT: the fingerprint itself is still right (the header length is patched in both).
    trailer = struct.pack("!HH", Attr.SOFTWARE, 4) + b"late"
    grown = bytearray(data)
    grown[2:4] = (len(data) - 20 + len(trailer)).to_bytes(2, "big")
    fingerprint_offset = len(data) - 8
    grown[-4:] = _rfc_fingerprint(bytes(grown[:fingerprint_offset])).to_bytes(4, "big")
    with pytest.raises(StunParseError, match="^FINGERPRINT is not the last attribute$"):
        stun.decode(bytes(grown) + trailer)


# --- unsigned fields and the size limits ----------------------------------------------------------------------------


def test_a_message_longer_than_32767_bytes_round_trips() -> None:
    # The header length and attribute lengths are unsigned 16-bit fields (RFC 8489 §5, §14).
    payload = bytes(range(256)) * 160
    msg = StunMessage.indication(Method.SEND, TID).add_data(payload)
    data = stun.encode(msg)
    assert int.from_bytes(data[2:4], "big") == len(data) - 20 > 0x8000
    assert stun.is_stun(data)
    assert stun.has_fingerprint(data)
    assert stun.decode(data).data() == payload


def test_is_stun_reads_the_whole_16_bit_length() -> None:
    data = stun.encode(StunMessage.request(Method.BINDING, TID).add_data(bytes(300)), fingerprint=False)
    assert int.from_bytes(data[2:4], "big") == 304
    assert stun.is_stun(data)
    assert not stun.is_stun(data[:2] + (304 + 256).to_bytes(2, "big") + data[4:])


def test_the_body_limit_is_65535_bytes() -> None:
    msg = StunMessage.indication(Method.SEND, TID).add_data(bytes(65532))  # 4 + 65532 = 65536 bytes of attributes
    with pytest.raises(ValueError, match="^message too long$"):
        stun.encode(msg, fingerprint=False)
    fits = StunMessage.indication(Method.SEND, TID).add_data(bytes(65528))
    assert len(stun.encode(fits, fingerprint=False)) == 20 + 65532


def test_the_body_limit_counts_the_trailer_encode_appends() -> None:
    # 4 + 65520 bytes of DATA leave room for FINGERPRINT (8 bytes) but not for MESSAGE-INTEGRITY on top (24 + 8).
    msg = StunMessage.indication(Method.SEND, TID).add_data(bytes(65520))
    data = stun.encode(msg)
    assert len(data) == 20 + 0xFFFC and stun.decode(data).data() == bytes(65520)
    with pytest.raises(ValueError, match="^message too long$"):
        stun.encode(msg, integrity_key=KEY)
    with pytest.raises(ValueError, match="^message too long$"):
        stun.encode(msg, integrity_key=KEY, fingerprint=False)
    with pytest.raises(ValueError, match="^message too long$"):
        stun.encode(StunMessage.indication(Method.SEND, TID).add_data(bytes(65528)))


def test_an_attribute_value_may_be_65535_bytes_but_no_more() -> None:
    msg = StunMessage.indication(Method.SEND, TID).add(Attr.DATA, bytes(0xFFFF))
    assert len(msg.get(Attr.DATA) or b"") == 0xFFFF
    with pytest.raises(ValueError, match="^attribute value longer than 65535 bytes$"):
        StunMessage.indication(Method.SEND, TID).add(Attr.DATA, bytes(0x10000))


def test_any_16_bit_attribute_type_can_be_added_raw() -> None:
    msg = StunMessage.request(Method.BINDING, TID).add(0x0000, b"").add(0xFFFF, b"\x01")
    decoded = stun.decode(stun.encode(msg))
    assert decoded.attributes == [(0x0000, b""), (0xFFFF, b"\x01")]
    with pytest.raises(ValueError, match="^attribute type 0x10000 out of range$"):
        StunMessage.request(Method.BINDING, TID).add(0x10000, b"")
    with pytest.raises(ValueError, match="^attribute type 0x-1 out of range$"):
        StunMessage.request(Method.BINDING, TID).add(-1, b"")


@pytest.mark.parametrize(
    ("attr", "name"),
    [
        (Attr.FINGERPRINT, "FINGERPRINT"),
        (Attr.MESSAGE_INTEGRITY, "MESSAGE-INTEGRITY"),
        (Attr.MESSAGE_INTEGRITY_SHA256, "MESSAGE-INTEGRITY-SHA256"),
    ],
)
def test_trailer_attributes_are_refused_by_name(attr: int, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} is added by encode\\(\\), not by hand$"):
        StunMessage.request(Method.BINDING, TID).add(attr, bytes(4))


def test_api_misuse_messages() -> None:
    with pytest.raises(ValueError, match="^integrity_sha256 needs an integrity_key$"):
        stun.encode(StunMessage.request(Method.BINDING, TID), integrity_sha256=True)
    with pytest.raises(ValueError, match="^a STUN transaction id has 12 bytes$"):
        StunMessage.request(Method.BINDING, bytes(11))


def test_message_type_range_is_12_method_bits_and_4_classes() -> None:
    assert stun.decode_message_type(stun.encode_message_type(0xFFF, 3)) == (0xFFF, 3)
    with pytest.raises(ValueError, match="^method 0x1000 / class 0 out of range$"):
        stun.encode_message_type(0x1000, 0)
    with pytest.raises(ValueError, match="^method 0x1 / class 4 out of range$"):
        stun.encode_message_type(0x001, 4)


def test_error_codes_range_from_300_to_699() -> None:
    assert stun.decode_error_code(stun.encode_error_code(699, "")) == (699, "")
    assert stun.decode_error_code(stun.encode_error_code(300, "")) == (300, "")
    with pytest.raises(ValueError, match="^error code 700 outside 300..699$"):
        stun.encode_error_code(700, "")
    with pytest.raises(ValueError, match="^error code 299 outside 300..699$"):
        stun.encode_error_code(299, "")


# --- reserved bits are zero, values unsigned (RFC 8489 §14.1/§14.2/§14.8, RFC 8656 §18) -----------------------------


def test_address_attributes_start_with_a_zero_byte_and_carry_high_ports() -> None:
    for address in [("192.0.2.7", 50000), ("2001:db8::7", 65535)]:
        plain = stun.encode_address(address)
        xored = stun.encode_xor_address(address, TID)
        assert plain[0] == 0 and xored[0] == 0
        assert stun.decode_address(plain) == address
        assert stun.decode_xor_address(xored, TID) == address


def test_plain_ipv6_address_attributes_decode() -> None:
    value = b"\x00\x02\x0d\x96" + bytes.fromhex("20010db8000000000000000000000001")
    msg = stun.decode(_raw([(Attr.MAPPED_ADDRESS, value)], message_class=MessageClass.SUCCESS))
    assert msg.address(Attr.MAPPED_ADDRESS) == ("2001:db8::1", 3478)


def test_error_code_reserved_bits_are_zero() -> None:
    value = stun.encode_error_code(438, "Stale Nonce")
    assert value[:4] == b"\x00\x00\x04\x26"


def test_rffu_bytes_of_turn_attributes_are_zero() -> None:
    msg = (
        StunMessage.request(Method.ALLOCATE, TID)
        .add_requested_transport()
        .add_additional_address_family()
        .add_requested_address_family(stun.FAMILY_IPV6)
        .add_channel_number(0x4001)
    )
    assert msg.get(Attr.REQUESTED_TRANSPORT) == b"\x11\x00\x00\x00"
    assert msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY) == b"\x02\x00\x00\x00"
    assert msg.get(Attr.REQUESTED_ADDRESS_FAMILY) == b"\x02\x00\x00\x00"
    assert msg.get(Attr.CHANNEL_NUMBER) == b"\x40\x01\x00\x00"


def test_requested_address_family_round_trips() -> None:
    for family in (stun.FAMILY_IPV4, stun.FAMILY_IPV6):
        msg = StunMessage.request(Method.ALLOCATE, TID).add_requested_address_family(family)
        assert stun.decode(stun.encode(msg)).requested_address_family() == family
    assert StunMessage.request(Method.ALLOCATE, TID).requested_address_family() is None


def test_dont_fragment_is_an_empty_attribute() -> None:
    msg = StunMessage.request(Method.ALLOCATE, TID).add_dont_fragment()
    assert stun.decode(stun.encode(msg)).attributes == [(Attr.DONT_FRAGMENT, b"")]


def test_ice_controlled_carries_the_64_bit_tie_breaker() -> None:
    tie_breaker = 0xFEDCBA9876543210
    msg = StunMessage.request(Method.BINDING, TID).add_ice_controlled(tie_breaker)
    assert msg.get(Attr.ICE_CONTROLLED) == tie_breaker.to_bytes(8, "big")
    decoded = stun.decode(stun.encode(msg))
    assert decoded.ice_controlled() == tie_breaker
    assert decoded.ice_controlling() is None


def test_u32_values_are_unsigned() -> None:
    msg = StunMessage.request(Method.REFRESH, TID).add_lifetime(0xFFFFFFFF).add_priority(0x80000001)
    decoded = stun.decode(stun.encode(msg))
    assert decoded.lifetime() == 0xFFFFFFFF
    assert decoded.priority() == 0x80000001


def test_unknown_attributes_list_unsigned_types() -> None:
    msg = StunMessage(Method.BINDING, MessageClass.ERROR, TID).add_unknown_attributes([0x7FFF, 0x8001, 0xFFFF])
    assert msg.get(Attr.UNKNOWN_ATTRIBUTES) == b"\x7f\xff\x80\x01\xff\xff"
    received = stun.decode(_raw([(Attr.UNKNOWN_ATTRIBUTES, b"\xc0\x01\x00\x2a")], message_class=MessageClass.ERROR))
    assert received.unknown_attributes() == [0xC001, 0x002A]


def test_error_response_reason_defaults_to_empty() -> None:
    request = StunMessage.request(Method.ALLOCATE, TID)
    assert request.error_response(ErrorCode.ALLOCATION_QUOTA_REACHED).error_code() == (486, "")
    bare = StunMessage(Method.ALLOCATE, MessageClass.ERROR, TID).add_error_code(ErrorCode.STALE_NONCE)
    assert bare.get(Attr.ERROR_CODE) == b"\x00\x00\x04\x26"


# --- getters ----------------------------------------------------------------------------------------------------------


def test_has_is_about_the_asked_attribute_only() -> None:
    msg = StunMessage.request(Method.BINDING, TID).add_username("a:b")
    assert msg.has(Attr.USERNAME)
    assert not msg.has(Attr.PRIORITY)
    assert not msg.use_candidate()


def test_xor_addresses_returns_every_family() -> None:
    msg = (
        StunMessage(Method.ALLOCATE, MessageClass.SUCCESS, TID)
        .add_xor_address(Attr.XOR_RELAYED_ADDRESS, ("198.51.100.1", 50000))
        .add_xor_address(Attr.XOR_RELAYED_ADDRESS, ("2001:db8::1", 50001))
    )
    assert stun.decode(stun.encode(msg)).xor_addresses(Attr.XOR_RELAYED_ADDRESS) == [
        ("198.51.100.1", 50000),
        ("2001:db8::1", 50001),
    ]


def test_hand_built_values_are_validated_by_the_getters() -> None:
    bad_username = StunMessage.request(Method.BINDING, TID).add(Attr.USERNAME, b"\xff\xfe")
    with pytest.raises(StunParseError, match="^USERNAME is not UTF-8$"):
        bad_username.username()
    bad_lifetime = StunMessage.request(Method.REFRESH, TID).add(Attr.LIFETIME, b"\x00\x01")
    with pytest.raises(StunParseError, match="^LIFETIME has length 2, expected 4$"):
        bad_lifetime.lifetime()
    # An attribute outside the table has no rules: its text is read as is.
    assert StunMessage.request(Method.BINDING, TID).add(0x7F00, b"free").text(0x7F00) == "free"


def test_attribute_names() -> None:
    assert stun.attribute_name(Attr.XOR_MAPPED_ADDRESS) == "XOR-MAPPED-ADDRESS"
    assert stun.attribute_name(Attr.USERNAME) == "USERNAME"
    assert stun.attribute_name(0x7F00) == "0x7f00"


def test_comprehension_required_range_ends_at_0x7fff() -> None:
    # RFC 8489 §14: 0x0000-0x7FFF comprehension-required, 0x8000-0xFFFF comprehension-optional.
    assert stun.is_comprehension_required(0x7FFF)
    assert not stun.is_comprehension_required(0x8000)
    assert not stun.is_comprehension_required(0xFFFF)


# --- integrity and fingerprint --------------------------------------------------------------------------------------


def test_message_integrity_must_be_20_bytes() -> None:
    full = stun.encode(StunMessage.request(Method.BINDING, TID).add_username("a"), integrity_key=KEY, fingerprint=False)
    assert stun.check_integrity(full, KEY)
    # The same HMAC cut to 16 bytes (and the lengths patched to match) is not a MESSAGE-INTEGRITY.
    attr_offset = len(full) - 24
    short = bytearray(full[: attr_offset + 4 + 16])
    short[2:4] = (len(short) - 20).to_bytes(2, "big")
    short[attr_offset + 2 : attr_offset + 4] = (16).to_bytes(2, "big")
    assert not stun.check_integrity(bytes(short), KEY)


def test_message_integrity_sha256_may_be_truncated_to_16_bytes() -> None:
    # RFC 8489 §14.6: at least 16 bytes, a multiple of 4, at most 32.
    for length in (16, 20, 32):
        data = _with_truncated_sha256_integrity(length)
        assert stun.check_integrity(data, KEY), length
        assert not stun.check_integrity(data, b"wrong")
        assert stun.has_integrity(data)
        assert stun.decode(data).username() == "alice"


@pytest.mark.parametrize("length", [12, 18, 36])
def test_message_integrity_sha256_of_a_bad_length_is_refused(length: int) -> None:
    for padded in (False, True):
        assert not stun.check_integrity(_with_truncated_sha256_integrity(length, padded_in_header=padded), KEY)


def test_has_integrity_is_false_for_malformed_input() -> None:
    data = stun.encode(StunMessage.request(Method.BINDING, TID), integrity_key=KEY)
    assert stun.has_integrity(data)
    assert not stun.has_integrity(data[:-1])
    assert not stun.has_integrity(b"")


def test_has_fingerprint_needs_the_fingerprint_attribute_type() -> None:
    data = bytearray(stun.encode(StunMessage.request(Method.BINDING, TID).add_software("x")))
    assert stun.has_fingerprint(bytes(data))
    # The right CRC under another 4-byte attribute type is not a FINGERPRINT.
    data[-8:-6] = struct.pack("!H", Attr.PRIORITY)
    assert not stun.has_fingerprint(bytes(data))


def test_has_fingerprint_never_reads_one_out_of_the_header() -> None:
    # A header-only message whose transaction id happens to end in what looks like a FINGERPRINT attribute.
    head = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + b"\xaa\xbb\xcc\xdd"
    data = head + b"\x80\x28\x00\x04" + _rfc_fingerprint(head).to_bytes(4, "big")
    assert stun.is_stun(data)
    assert not stun.has_fingerprint(data)


# --- SASLprep (RFC 4013 via RFC 8489 §9.2.2) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("char", "table"),
    [
        ("\ue000", "C.3 private use"),
        ("\ufdd0", "C.4 non-character"),
        ("\ud800", "C.5 surrogate"),
        ("\ufffd", "C.6 inappropriate for plain text"),
        ("\u2ff0", "C.7 inappropriate for canonical representation"),
        ("\u200e", "C.8 change display properties"),
        ("\U000e0001", "C.9 tagging"),
    ],
    ids=["C3", "C4", "C5", "C6", "C7", "C8", "C9"],
)
def test_saslprep_prohibits_every_table(char: str, table: str) -> None:
    with pytest.raises(ValueError, match=f"^SASLprep prohibits U\\+{ord(char):04X}$"):
        stun.saslprep(f"pass{char}word")


def test_saslprep_maps_non_ascii_spaces_to_space() -> None:
    # RFC 4013 §2.1: C.1.2 characters map to SPACE, including ones NFKC leaves alone (U+1680 OGHAM SPACE MARK).
    assert stun.saslprep("a\u1680b\u00a0c") == "a b c"
    assert stun.long_term_key("u", "r", "a\u1680b") == stun.long_term_key("u", "r", "a b")


# --- retransmission policy ------------------------------------------------------------------------------------------


def test_policy_accepts_its_boundaries() -> None:
    constant = RetransmitPolicy(initial_rto=0.5, max_rto=1.0, backoff=1.0, max_transmissions=3)
    assert constant.schedule() == ([0.0, 0.5, 1.0], 1.5)
    single = RetransmitPolicy(initial_rto=2.0, max_transmissions=1)
    assert single.schedule() == ([0.0], 2.0)
    elapsed_only = RetransmitPolicy(initial_rto=1.0, max_elapsed=3.0)
    assert elapsed_only.schedule() == ([0.0, 1.0], 3.0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (
            {"initial_rto": 1.0, "backoff": 0.5, "max_transmissions": 3},
            "^RTOs must be positive and backoff at least 1$",
        ),
        (
            {"initial_rto": 1.0, "max_rto": 0.0, "max_transmissions": 3},
            "^RTOs must be positive and backoff at least 1$",
        ),
        ({"initial_rto": 0.0, "max_transmissions": 3}, "^RTOs must be positive and backoff at least 1$"),
        ({"initial_rto": 1.0}, "^a retransmit policy needs max_transmissions or max_elapsed$"),
        ({"initial_rto": 1.0, "max_transmissions": 0}, "^max_transmissions must be at least 1$"),
        ({"initial_rto": 1.0, "max_transmissions": 0, "max_elapsed": 5.0}, "^max_transmissions must be at least 1$"),
    ],
    ids=["backoff", "max-rto", "initial-rto", "no-limit", "no-transmissions", "no-transmissions-with-elapsed"],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RetransmitPolicy(**kwargs)  # type: ignore[arg-type]


def _drive(policy: RetransmitPolicy) -> tuple[list[float], float]:
    """Send times and give-up time of a Transaction driven exactly at its deadlines."""
    txn = Transaction(TID, b"req", ("192.0.2.1", 3478), policy, now=0.0)
    sends = [0.0]
    while True:
        deadline = txn.poll_timeout()
        assert deadline is not None
        if txn.handle_timeout(deadline) is TransactionStep.GAVE_UP:
            return sends, deadline
        sends.append(deadline)


@pytest.mark.parametrize(
    "policy",
    [
        RetransmitPolicy(initial_rto=1.0, max_elapsed=7.0),  # the give-up lands exactly on a retransmit deadline
        RetransmitPolicy(initial_rto=1.0, max_transmissions=3),
        RetransmitPolicy(initial_rto=1.0, max_transmissions=3, max_elapsed=7.0),
    ],
)
def test_schedule_matches_a_driven_transaction(policy: RetransmitPolicy) -> None:
    assert policy.schedule() == _drive(policy) == ([0.0, 1.0, 3.0], 7.0)


# --- transactions ---------------------------------------------------------------------------------------------------


def test_transaction_keeps_what_it_was_given() -> None:
    txn = Transaction(TID, b"payload", ("192.0.2.1", 3478), stun.TURN_POLICY, now=5.0)
    assert (txn.transaction_id, txn.payload, txn.destination) == (TID, b"payload", ("192.0.2.1", 3478))
    assert (txn.started_at, txn.last_sent_at, txn.transmissions) == (5.0, 5.0, 1)
    assert not txn.finished and not txn.gave_up


def test_transaction_is_finished_after_a_response_or_giving_up() -> None:
    answered = Transaction(TID, b"req", ("192.0.2.1", 3478), stun.TURN_POLICY, now=0.0)
    answered.complete(0.1)
    assert answered.finished is True and answered.gave_up is False
    policy = RetransmitPolicy(initial_rto=1.0, max_transmissions=1)
    abandoned = Transaction(TID, b"req", ("192.0.2.1", 3478), policy, now=0.0)
    assert abandoned.handle_timeout(1.0) is TransactionStep.GAVE_UP
    assert abandoned.finished is True and abandoned.gave_up is True
    assert abandoned.poll_timeout() is None
