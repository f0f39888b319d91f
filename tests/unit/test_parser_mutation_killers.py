"""Tests that kill mutants ``make mutate`` found surviving in the network parsers (tools/mutation_report.py).

Each pins a boundary or an error message the rest of the suite left loose: a mutant that moves the boundary by one
byte, reads the type field big-endian, or drops the reason from a parse error now fails a test.
"""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest

from dataplane import p2p_control
from dataplane.wireguard import messages
from dataplane.wireguard.constants import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
)

# --- dataplane/wireguard/messages.py ---------------------------------------------------------------------------------


def test_message_type_reads_exactly_four_little_endian_bytes() -> None:
    assert messages.message_type(b"\x01\x00\x00\x00") == 1
    assert messages.message_type(b"\x04\x00\x00\x00\xff\xff") == 4
    assert messages.message_type(b"\x00\x00\x00\x01") == 1 << 24


@pytest.mark.parametrize("data", [b"", b"\x04", b"\x04\x00\x00"])
def test_message_type_of_a_short_datagram_says_why(data: bytes) -> None:
    with pytest.raises(messages.MessageParseError, match="^shorter than a message type$"):
        messages.message_type(data)


def test_the_smallest_transport_message_is_a_keepalive() -> None:
    keepalive = struct.pack("<IIQ", MESSAGE_TRANSPORT, 7, 9) + bytes(16)
    assert len(keepalive) == MESSAGE_TRANSPORT_MIN_SIZE
    assert messages.parse(keepalive) == messages.Transport(7, 9, bytes(16))
    with pytest.raises(messages.MessageParseError, match="^transport message of 31 bytes$"):
        messages.parse(keepalive[:-1])


@pytest.mark.parametrize(
    ("kind", "size", "reason"),
    [
        (MESSAGE_INITIATION, 147, "^initiation of 147 bytes$"),
        (MESSAGE_RESPONSE, 93, "^response of 93 bytes$"),
        (MESSAGE_COOKIE_REPLY, 63, "^cookie reply of 63 bytes$"),
        (5, 148, "^unknown message type 0x5$"),
    ],
)
def test_parse_errors_name_the_message_and_its_size(kind: int, size: int, reason: str) -> None:
    with pytest.raises(messages.MessageParseError, match=reason):
        messages.parse(struct.pack("<I", kind) + bytes(size - 4))


# --- dataplane/p2p_control.py ----------------------------------------------------------------------------------------

PROXY_IPS = [ipaddress.ip_address(f"100.96.0.{n}") for n in range(1, 5)]


def test_control_packet_layout_is_exact() -> None:
    packet = p2p_control.build(2, b"xy")
    # version 6, payload 10 bytes, next header 0xFF, hop limit 0, :: -> ::, event byte then seven zero bytes.
    assert packet == bytes.fromhex("60000000000aff00") + bytes(32) + bytes.fromhex("0200000000000000") + b"xy"


def test_event_type_is_one_byte() -> None:
    assert p2p_control.parse(p2p_control.build(0xFF)) == p2p_control.ControlMessage(0xFF, b"")
    for event in (0x100, -1):
        with pytest.raises(ValueError, match="^an event type is one byte$"):
            p2p_control.build(event)


def test_too_large_a_control_message_says_so() -> None:
    with pytest.raises(p2p_control.ControlMessageTooLarge, match="does not fit the tunnel MTU"):
        p2p_control.build(0, bytes(p2p_control.MAX_PACKET_SIZE))


def test_assigned_ips_refuses_other_counts_and_encodes_compact_json() -> None:
    with pytest.raises(ValueError, match="^assigned_ips carries exactly 4 or 8 proxy IPs$"):
        p2p_control.assigned_ips("r", "d", PROXY_IPS[:3])
    message = p2p_control.parse(p2p_control.assigned_ips("r", "d", PROXY_IPS))
    assert message is not None
    ips = ",".join(f'"{ip}"' for ip in PROXY_IPS)
    assert message.body == f'{{"resource":"r","domain":"d","proxy_ips":[{ips}]}}'.encode()


@pytest.mark.parametrize(("active", "status"), [(True, "Active"), (False, "Inactive")])
def test_domain_status_encodes_compact_json(active: bool, status: str) -> None:
    message = p2p_control.parse(p2p_control.domain_status("r", "d", active))
    assert message is not None
    assert message.body == f'{{"resource":"r","domain":"d","status":"{status}"}}'.encode()


def test_only_the_reserved_next_header_marks_a_control_packet() -> None:
    packet = bytearray(p2p_control.build(0))
    assert p2p_control.is_control_packet(bytes(packet[:40]))  # the bare header is enough to recognise one
    packet[6] = 17  # UDP between unspecified addresses is still not a control packet
    assert not p2p_control.is_control_packet(bytes(packet))
    assert p2p_control.parse(bytes(packet)) is None


def test_a_body_cut_short_is_not_parsed() -> None:
    assert p2p_control.parse(p2p_control.build(0, b"body")[:-1]) is None


def _assigned(resource: object, domain: object, proxy_ips: object) -> bytes:
    return json.dumps({"resource": resource, "domain": domain, "proxy_ips": proxy_ips}).encode()


def test_assigned_ips_needs_a_list_of_addresses() -> None:
    as_dict = {str(ip): 0 for ip in PROXY_IPS}  # iterating it would yield four valid addresses
    assert p2p_control.parse_assigned_ips(_assigned("r", "d", as_dict)) is None


@pytest.mark.parametrize(
    ("resource", "domain", "accepted"),
    [
        ("r" * p2p_control.MAX_RESOURCE_ID_LENGTH, "d", True),
        ("r" * (p2p_control.MAX_RESOURCE_ID_LENGTH + 1), "d", False),
        ("r", "d" * p2p_control.MAX_DOMAIN_LENGTH, True),
        ("r", "d" * (p2p_control.MAX_DOMAIN_LENGTH + 1), False),
    ],
)
def test_assigned_ips_name_length_limits(resource: str, domain: str, accepted: bool) -> None:
    parsed = p2p_control.parse_assigned_ips(_assigned(resource, domain, [str(ip) for ip in PROXY_IPS]))
    assert (parsed is not None) is accepted


def test_domain_status_needs_a_string_resource() -> None:
    body = json.dumps({"resource": 1, "domain": "d", "status": "Active"}).encode()
    assert p2p_control.parse_domain_status(body) is None
