"""STUN messages (RFC 8489/8656) as the ICE agent and the TURN client receive them: ``stun.decode`` and friends.

Invariants: the only exception is :class:`StunParseError`; the never-raising helpers never raise; every typed getter
works on a decoded message; a decoded message re-encodes to one that decodes to the same attributes.
"""

from __future__ import annotations

from dataplane import stun
from dataplane.stun import Attr, Method
from fuzz.harness import fuzz_main
from fuzz.seeds import hex_fields

INTEGRITY_KEY = b"fuzz-integrity-key"
TRANSACTION_ID = bytes(range(12))


def seeds() -> list[bytes]:
    request = (
        stun.StunMessage.request(Method.BINDING, TRANSACTION_ID)
        .add_username("abcd:efgh")
        .add_priority(1853824767)
        .add_ice_controlling(0x1122334455667788)
        .add_use_candidate()
    )
    allocate = (
        stun.StunMessage.request(Method.ALLOCATE, TRANSACTION_ID)
        .add_requested_transport()
        .add_additional_address_family()
        .add_lifetime(600)
        .add_realm("firezone")
        .add_nonce("nonce")
        .add_software("fuzz")
    )
    response = (
        request.success_response()
        .add_xor_address(Attr.XOR_MAPPED_ADDRESS, ("203.0.113.20", 40000))
        .add_xor_address(Attr.XOR_RELAYED_ADDRESS, ("2001:db8::7", 50000))
        .add_address(Attr.MAPPED_ADDRESS, ("192.0.2.1", 1))
    )
    error = allocate.error_response(401, "Unauthorized").add_unknown_attributes([0x0001, 0x7FFF])
    channel_bind = stun.StunMessage.request(Method.CHANNEL_BIND, TRANSACTION_ID).add_channel_number(0x4000)
    data_indication = (
        stun.StunMessage.indication(Method.DATA, TRANSACTION_ID)
        .add_xor_address(Attr.XOR_PEER_ADDRESS, ("192.0.2.50", 6000))
        .add_data(b"payload")
    )
    built = [
        stun.encode(request, integrity_key=INTEGRITY_KEY),
        stun.encode(allocate, integrity_key=INTEGRITY_KEY, integrity_sha256=True),
        stun.encode(response, fingerprint=False),
        stun.encode(error),
        stun.encode(channel_bind, integrity_key=INTEGRITY_KEY),
        stun.encode(data_indication, fingerprint=False),
    ]
    return hex_fields("stun-rfc5769.json", "message_hex") + built


def TestOneInput(data: bytes) -> None:
    stun.is_stun(data)
    stun.has_fingerprint(data)
    stun.check_integrity(data, INTEGRITY_KEY)
    try:
        message = stun.decode(data)
    except stun.StunParseError:
        return
    for attr in (Attr.XOR_MAPPED_ADDRESS, Attr.XOR_RELAYED_ADDRESS, Attr.XOR_PEER_ADDRESS):
        message.xor_address(attr)
        message.xor_addresses(attr)
    for attr in (Attr.MAPPED_ADDRESS, Attr.ALTERNATE_SERVER, Attr.RESPONSE_ORIGIN, Attr.OTHER_ADDRESS):
        message.address(attr)
    message.username(), message.realm(), message.nonce(), message.software()
    message.priority(), message.use_candidate(), message.ice_controlling(), message.ice_controlled()
    message.error_code(), message.unknown_attributes(), message.lifetime(), message.requested_transport()
    message.additional_address_family(), message.requested_address_family(), message.channel_number()
    message.data(), message.unknown_comprehension_required()
    again = stun.decode(stun.encode(message, fingerprint=False))
    if (again.method, again.message_class, again.transaction_id, again.attributes) != (
        message.method,
        message.message_class,
        message.transaction_id,
        message.attributes,
    ):
        raise AssertionError("a decoded STUN message does not survive re-encoding")


if __name__ == "__main__":
    fuzz_main("fuzz_stun")
