"""STUN codec against the RFC 5769 vectors, plus encode/decode, integrity and validation rules."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from dataplane import stun
from dataplane.stun import Attr, ErrorCode, MessageClass, Method, StunMessage, StunParseError
from lab.relay import firezone_password
from tests.vectors import load_vectors

RFC5769 = load_vectors("stun-rfc5769.json")
RELAY_CREDS = load_vectors("firezone-relay-credentials.json")
VECTOR_BY_NAME = {v["name"]: v for v in RFC5769["vectors"]}


def _key(vector: dict[str, Any]) -> bytes:
    cred = vector["credential"]
    if cred["mechanism"] == "short-term":
        return stun.short_term_key(cred["password"])
    return stun.long_term_key(cred["username"], cred["realm"], cred["password"])


@pytest.mark.parametrize("vector", RFC5769["vectors"], ids=lambda v: v["name"])
def test_rfc5769_vector_decodes_with_expected_attributes(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["message_hex"])
    msg = stun.decode(data)
    assert msg.transaction_id.hex() == vector["header"]["transaction_id_hex"]
    assert stun.encode_message_type(msg.method, msg.message_class) == int(vector["header"]["message_type"], 16)
    expected = vector["expected"]
    if "software" in expected:
        assert msg.software() == expected["software"]
    if "username" in expected:
        assert msg.username() == expected["username"]
    if "realm" in expected:
        assert msg.realm() == expected["realm"]
        assert msg.nonce() == expected["nonce"]
    if "priority" in expected:
        assert msg.priority() == expected["priority"]
        assert msg.ice_controlled() == int(expected["ice_controlled_tiebreaker_hex"], 16)
    if "xor_mapped_address" in expected:
        xma = expected["xor_mapped_address"]
        assert msg.xor_address(Attr.XOR_MAPPED_ADDRESS) == (xma["ip"], xma["port"])
    kept = [a for a in vector["attributes"] if a["name"] not in ("MESSAGE-INTEGRITY", "FINGERPRINT")]
    assert [(t, v.hex()) for t, v in msg.attributes] == [(int(a["type"], 16), a["value_hex"]) for a in kept]
    assert stun.has_fingerprint(data) == expected["fingerprint"]["present"]


@pytest.mark.parametrize("vector", RFC5769["vectors"], ids=lambda v: v["name"])
def test_rfc5769_vector_integrity_valid_with_right_key_only(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["message_hex"])
    key = _key(vector)
    assert key.hex() == vector["credential"]["hmac_key_hex"]
    assert stun.check_integrity(data, key)
    assert not stun.check_integrity(data, key + b"x")
    assert stun.has_integrity(data)


def test_long_term_key_applies_saslprep_to_the_password() -> None:
    vector = VECTOR_BY_NAME["sample_request_long_term"]
    cred = vector["credential"]
    assert stun.saslprep(cred["password_before_saslprep"]) == cred["password"]
    key = stun.long_term_key(cred["username"], cred["realm"], cred["password_before_saslprep"])
    assert key.hex() == cred["hmac_key_hex"]


def test_saslprep_rejects_prohibited_characters() -> None:
    with pytest.raises(ValueError):
        stun.saslprep("pass\x07word")


@pytest.mark.parametrize("vector", RFC5769["negative_vectors"], ids=lambda v: v["name"])
def test_rfc5769_negative_vector_fails_fingerprint_and_integrity(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["message_hex"])
    assert stun.has_fingerprint(data) is vector["expected"]["fingerprint_valid"]
    assert (
        stun.check_integrity(data, stun.short_term_key(vector["password"]))
        is vector["expected"]["message_integrity_valid"]
    )
    with pytest.raises(StunParseError, match="FINGERPRINT"):
        stun.decode(data)


@pytest.mark.parametrize("vector", RFC5769["reencoded_vectors"]["vectors"], ids=lambda v: v["name"])
def test_reencoded_vector_matches_our_encoder(vector: dict[str, Any]) -> None:
    without = bytes.fromhex(vector["message_without_integrity_hex"])
    msg = stun.decode(without)
    assert stun.encode(msg, fingerprint=False) == without
    signed = stun.encode(msg, integrity_key=stun.short_term_key(vector["password"]), fingerprint=False)
    assert signed.hex() == vector["message_with_integrity_hex"]
    assert signed[-20:].hex() == vector["expected_message_integrity_hex"]


def test_rfc5769_request_reencoded_with_fingerprint_round_trips() -> None:
    vector = VECTOR_BY_NAME["sample_request_short_term"]
    key = _key(vector)
    msg = stun.decode(bytes.fromhex(vector["message_hex"]))
    data = stun.encode(msg, integrity_key=key)
    assert stun.has_fingerprint(data)
    assert stun.check_integrity(data, key)
    assert stun.decode(data) == msg


def test_firezone_computed_message_integrity_example() -> None:
    example = RELAY_CREDS["computed_message_integrity_example"]
    key = stun.long_term_key(example["username"], example["realm"], example["password"])
    assert key.hex() == example["long_term_key_hex"]
    msg = StunMessage.request(Method.BINDING, bytes(12))
    data = stun.encode(msg, integrity_key=key, fingerprint=False)
    assert data.hex() == example["message_hex"]
    assert stun.check_integrity(data, key)


@pytest.mark.parametrize("case", RELAY_CREDS["verification_cases"]["cases"], ids=lambda c: c["name"])
def test_firezone_verification_case_message_integrity(case: dict[str, Any]) -> None:
    made = case["credentials_made_with"]
    username = f"{made['expiry_unix']}:{made['salt']}"
    password = firezone_password(made["relay_secret"], made["expiry_unix"], made["salt"])
    key = stun.long_term_key(username, "firezone", password)
    data = stun.encode(StunMessage.request(Method.BINDING, bytes(12)), integrity_key=key, fingerprint=False)
    assert data[-20:].hex() == case["message_integrity_hex"]


def test_message_type_interleaving() -> None:
    assert stun.encode_message_type(Method.BINDING, MessageClass.REQUEST) == 0x0001
    assert stun.encode_message_type(Method.BINDING, MessageClass.SUCCESS) == 0x0101
    assert stun.encode_message_type(Method.BINDING, MessageClass.ERROR) == 0x0111
    assert stun.encode_message_type(Method.ALLOCATE, MessageClass.SUCCESS) == 0x0103
    assert stun.encode_message_type(Method.CHANNEL_BIND, MessageClass.ERROR) == 0x0119
    assert stun.encode_message_type(Method.DATA, MessageClass.INDICATION) == 0x0017
    for method in range(0x1000):
        for cls in range(4):
            assert stun.decode_message_type(stun.encode_message_type(method, cls)) == (method, cls)


def test_typed_attributes_round_trip() -> None:
    tid = bytes(range(12))
    msg = (
        StunMessage.request(Method.ALLOCATE, tid)
        .add_username("1892160000:salt")
        .add_realm("firezone")
        .add_nonce("abc")
        .add_software("snownet")
        .add_requested_transport()
        .add_additional_address_family()
        .add_lifetime(600)
        .add_xor_address(Attr.XOR_PEER_ADDRESS, ("2001:db8::1", 5000))
        .add_xor_address(Attr.XOR_RELAYED_ADDRESS, ("203.0.113.9", 49999))
        .add_address(Attr.MAPPED_ADDRESS, ("10.1.2.3", 1))
        .add_channel_number(0x4001)
        .add_data(b"\x01\x02\x03")
        .add_priority(0x6E0001FF)
        .add_use_candidate()
        .add_ice_controlling(2**64 - 1)
        .add_unknown_attributes([0x0031, 0x7FFF])
    )
    decoded = stun.decode(stun.encode(msg, integrity_key=b"k", integrity_sha256=True))
    assert decoded == msg
    assert decoded.username() == "1892160000:salt"
    assert decoded.realm() == "firezone"
    assert decoded.nonce() == "abc"
    assert decoded.software() == "snownet"
    assert decoded.requested_transport() == stun.TRANSPORT_UDP
    assert decoded.additional_address_family() == stun.FAMILY_IPV6
    assert decoded.lifetime() == 600
    assert decoded.xor_address(Attr.XOR_PEER_ADDRESS) == ("2001:db8::1", 5000)
    assert decoded.xor_address(Attr.XOR_RELAYED_ADDRESS) == ("203.0.113.9", 49999)
    assert decoded.address(Attr.MAPPED_ADDRESS) == ("10.1.2.3", 1)
    assert decoded.channel_number() == 0x4001
    assert decoded.data() == b"\x01\x02\x03"
    assert decoded.priority() == 0x6E0001FF
    assert decoded.use_candidate()
    assert decoded.ice_controlling() == 2**64 - 1
    assert decoded.ice_controlled() is None
    assert decoded.unknown_attributes() == [0x0031, 0x7FFF]
    assert decoded.error_code() is None


def test_error_response_carries_code_and_reason() -> None:
    request = StunMessage.request(Method.ALLOCATE, b"\x07" * 12)
    response = stun.decode(stun.encode(request.error_response(ErrorCode.STALE_NONCE, "Stale Nonce")))
    assert response.message_class == MessageClass.ERROR
    assert response.method == Method.ALLOCATE
    assert response.transaction_id == request.transaction_id
    assert response.error_code() == (438, "Stale Nonce")
    assert request.success_response().message_class == MessageClass.SUCCESS


def test_integrity_sha256_is_checked_too() -> None:
    msg = StunMessage.request(Method.BINDING, bytes(12)).add_username("a:b")
    data = bytearray(stun.encode(msg, integrity_key=b"key", integrity_sha256=True, fingerprint=False))
    assert stun.check_integrity(bytes(data), b"key")
    data[-1] ^= 1  # last byte of the SHA-256 MAC
    assert not stun.check_integrity(bytes(data), b"key")


def test_attributes_after_integrity_are_ignored_but_fingerprint_is_allowed() -> None:
    msg = StunMessage.request(Method.BINDING, bytes(12)).add_username("u")
    signed = stun.encode(msg, integrity_key=b"key", fingerprint=False)
    trailing = struct_attr(Attr.SOFTWARE, b"evil")
    tampered = bytearray(signed + trailing)
    tampered[2:4] = (len(tampered) - 20).to_bytes(2, "big")
    decoded = stun.decode(bytes(tampered))
    assert decoded.software() is None
    assert stun.check_integrity(bytes(tampered), b"key")


def struct_attr(attr: int, value: bytes) -> bytes:
    return attr.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + b"\x00" * (-len(value) % 4)


def test_missing_integrity_is_not_valid() -> None:
    data = stun.encode(StunMessage.request(Method.BINDING, bytes(12)))
    assert not stun.has_integrity(data)
    assert not stun.check_integrity(data, b"anything")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter"),
        (bytes.fromhex("000100002112a442") + bytes(11), "shorter"),
        (bytes.fromhex("c00100002112a442") + bytes(12), "top two bits"),
        (bytes.fromhex("000100002112a443") + bytes(12), "cookie"),
        (bytes.fromhex("000100022112a442") + bytes(12) + b"\x00\x00", "multiple of 4"),
        (bytes.fromhex("000100082112a442") + bytes(12) + bytes(4), "does not match"),
        (bytes.fromhex("000100042112a442") + bytes(12) + bytes.fromhex("80220008"), "overruns"),
        (bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("0020000400010000"), "family 1"),
        (bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("0006000280ff0000"), "UTF-8"),
        (bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("0009000800000299"), "overruns"),
        (bytes.fromhex("0001000c2112a442") + bytes(12) + bytes.fromhex("000900080000020063636363"), "class 2"),
        (bytes.fromhex("000100082112a442") + bytes(12) + bytes.fromhex("0024000300000000"), "PRIORITY"),
    ],
)
def test_malformed_messages_raise_parse_error(data: bytes, reason: str) -> None:
    assert not (stun.is_stun(data) and reason in ("cookie", "top two bits"))
    with pytest.raises(StunParseError, match=reason):
        stun.decode(data)


def test_fingerprint_must_be_last() -> None:
    body = struct_attr(Attr.SOFTWARE, b"x")
    late = struct_attr(Attr.SOFTWARE, b"late")
    header = (
        bytes.fromhex("0001") + (len(body) + 8 + len(late)).to_bytes(2, "big") + stun.MAGIC_COOKIE_BYTES + bytes(12)
    )
    crc = (zlib.crc32(header + body) ^ stun.FINGERPRINT_XOR).to_bytes(4, "big")
    data = header + body + struct_attr(Attr.FINGERPRINT, crc) + late
    with pytest.raises(StunParseError, match="last"):
        stun.decode(data)


def test_is_stun_demux() -> None:
    binding = stun.encode(StunMessage.request(Method.BINDING, bytes(12)))
    assert stun.is_stun(binding)
    assert not stun.is_stun(b"\x40\x00\x00\x04abcd")  # ChannelData
    assert not stun.is_stun(b"\x01\x00\x00\x00" + bytes(144))  # WireGuard initiation
    assert not stun.is_stun(binding[:-1])


def test_request_with_unknown_comprehension_required_attribute_gets_420() -> None:
    request = (
        StunMessage.request(Method.BINDING, b"\x01" * 12)
        .add(0x0031, b"x")  # unknown, comprehension-required
        .add(0x8031, b"y")  # unknown, comprehension-optional: ignored
        .add_username("a:b")
    )
    decoded = stun.decode(stun.encode(request))
    response = stun.unknown_attribute_response(decoded)
    assert response is not None
    assert response.error_code() == (420, "Unknown Attribute")
    assert response.unknown_attributes() == [0x0031]
    assert response.transaction_id == request.transaction_id
    assert stun.unknown_attribute_response(StunMessage.request(Method.BINDING, bytes(12)).add_username("a")) is None
    assert stun.unknown_attribute_response(decoded, understood={0x0031, Attr.USERNAME}) is None
    indication = StunMessage.indication(Method.DATA, bytes(12)).add(0x0031, b"")
    assert stun.unknown_attribute_response(indication) is None


def test_api_misuse_raises() -> None:
    with pytest.raises(ValueError):
        StunMessage.request(Method.BINDING, b"short")
    with pytest.raises(ValueError):
        StunMessage.request(Method.BINDING, bytes(12)).add(Attr.MESSAGE_INTEGRITY, bytes(20))
    with pytest.raises(ValueError):
        stun.encode_error_code(200, "ok")


@pytest.mark.parametrize(
    "vector", [v for v in RFC5769["vectors"] if "xor_mapped_address" in v["expected"]], ids=lambda v: v["name"]
)
def test_xor_address_encodes_to_the_rfc5769_bytes_and_decodes_back(vector: dict[str, Any]) -> None:
    xma = vector["expected"]["xor_mapped_address"]
    address = (xma["ip"], xma["port"])
    message = stun.decode(bytes.fromhex(vector["message_hex"]))
    built = StunMessage.request(Method.BINDING, message.transaction_id).success_response()
    built.add_xor_address(Attr.XOR_MAPPED_ADDRESS, address)
    assert built.get(Attr.XOR_MAPPED_ADDRESS) == message.get(Attr.XOR_MAPPED_ADDRESS)
    assert built.xor_address(Attr.XOR_MAPPED_ADDRESS) == address
