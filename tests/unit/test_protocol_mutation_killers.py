"""Portal message rules that the mutation run showed were unpinned (``make mutate``, issue 11).

docs/protocol.md §2: relay ``addr`` is ``ip:port`` / ``[ipv6]:port`` with a port in 1..65535; WireGuard keys are
standard base64 of 32 bytes; a candidate list keeps the ``candidate:`` lines whose 4th field is a u32 (RFC 8839:
1*10DIGIT); outbound payloads are JSON-ready. Drops are logged with the event (cut to 64 characters), the reason and,
for invalid payloads, only an error count — never the payload's values.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from dataplane.base import DropCounter
from protocol.messages import (
    U32_MAX,
    Client,
    DropReason,
    IceCandidates,
    OutboundMessage,
    StunRelay,
    TurnRelay,
    candidate_priority,
    parse_portal_message,
)

KEY = base64.b64encode(bytes(range(32))).decode()
PSK = base64.b64encode(bytes(range(100, 132))).decode()


def _client(**overrides: str) -> dict[str, str]:
    return {"id": "c1", "public_key": KEY, "preshared_key": PSK, "ipv4": "100.64.0.1", "ipv6": "fd00::1", **overrides}


def _only_error(exc: ValidationError) -> str:
    (error,) = exc.errors()
    return str(error["msg"])


# ---- WireGuard keys ---------------------------------------------------------------------------------------------


def test_a_standard_base64_32_byte_key_is_accepted() -> None:
    assert Client.model_validate(_client()).public_key == KEY


@pytest.mark.parametrize("key", [KEY[:20] + "!" + KEY[20:], KEY[:20] + "\n" + KEY[20:], " " + KEY, KEY[:-1]])
def test_keys_with_characters_outside_the_alphabet_or_bad_padding_are_refused(key: str) -> None:
    with pytest.raises(ValidationError) as info:
        Client.model_validate(_client(public_key=key))
    assert _only_error(info.value) == "Value error, not standard base64"


@pytest.mark.parametrize("length", [0, 16, 31, 33, 64])
def test_keys_of_another_length_are_refused(length: int) -> None:
    with pytest.raises(ValidationError) as info:
        Client.model_validate(_client(preshared_key=base64.b64encode(bytes(length)).decode()))
    assert _only_error(info.value) == "Value error, a WireGuard key is 32 bytes"


# ---- relay addresses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "address"),
    [
        ("192.0.2.1:1", ("192.0.2.1", 1)),
        ("192.0.2.1:65535", ("192.0.2.1", 65535)),
        ("[2001:db8::1]:3478", ("2001:db8::1", 3478)),
    ],
)
def test_relay_ports_span_1_to_65535(addr: str, address: tuple[str, int]) -> None:
    assert StunRelay.model_validate({"id": "r", "type": "stun", "addr": addr}).address == address


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("192.0.2.1:0", "port out of range: '192.0.2.1:0'"),
        ("192.0.2.1:65536", "port out of range: '192.0.2.1:65536'"),
        ("192.0.2.1:+80", "not host:port: '192.0.2.1:+80'"),
        ("192.0.2.1: 80", "not host:port: '192.0.2.1: 80'"),
        ("192.0.2.1", "not host:port: '192.0.2.1'"),
    ],
)
def test_malformed_relay_addresses_are_refused_with_a_reason(addr: str, reason: str) -> None:
    relay = {"id": "r", "type": "turn", "addr": addr, "username": "u", "password": "p", "expires_at": 1}
    with pytest.raises(ValidationError) as info:
        TurnRelay.model_validate(relay)
    assert _only_error(info.value) == f"Value error, {reason}"


@pytest.mark.parametrize("addr", ["[::1:3478", "::1]:3478", "[192.0.2.1]:3478", "2001:db8::1:3478"])
def test_ipv6_relay_addresses_need_both_brackets(addr: str) -> None:
    with pytest.raises(ValidationError):
        StunRelay.model_validate({"id": "r", "type": "stun", "addr": addr})


# ---- candidate lines ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "priority"),
    [
        ("candidate:1 1 udp 7", 7),
        ("candidate:1 1 udp +7 10.0.0.1 1 typ host", 7),
        (f"candidate:1 1 udp {U32_MAX} 10.0.0.1 1 typ host", U32_MAX),
        ("candidate:1 1 udp 0000000009 10.0.0.1 1 typ host", 9),
        ("candidate:1 1 udp", None),
        ("candidate:1 1 udp abc 10.0.0.1 1 typ host", None),
        ("candidate:1 1 udp 7a 10.0.0.1 1 typ host", None),
        ("candidate:1 1 udp \u0667 10.0.0.1 1 typ host", None),
        ("candidate:1 1 udp 00000000009 10.0.0.1 1 typ host", None),
        (f"candidate:1 1 udp {U32_MAX + 1} 10.0.0.1 1 typ host", None),
        ("a=candidate:1 1 udp 7 10.0.0.1 1 typ host", None),
    ],
)
def test_candidate_priority_is_the_fourth_field_as_a_u32(line: str, priority: int | None) -> None:
    assert candidate_priority(line) == priority


def test_a_candidate_list_skips_lines_without_a_u32_priority() -> None:
    drops = DropCounter()
    lines = ["candidate:1 1 udp 7", "candidate:1 1 udp abc 10.0.0.1 1 typ host", "candidate:1 1 udp \u0667 x"]
    message = parse_portal_message("ice_candidates", {"client_id": "c", "candidates": lines}, drops)
    assert isinstance(message, IceCandidates)
    assert message.candidates == ["candidate:1 1 udp 7"]
    assert dict(drops.counts) == {DropReason.INVALID_CANDIDATE.value: 2}


# ---- outbound payloads ----------------------------------------------------------------------------------------


class _AddressReport(OutboundMessage):
    EVENT: ClassVar[str] = "address_report"
    address: ipaddress.IPv4Address
    network: ipaddress.IPv6Network


def test_outbound_payloads_are_json_ready_whatever_the_field_types() -> None:
    payload = _AddressReport(address="192.0.2.1", network="2001:db8::/32").to_payload()  # type: ignore[arg-type]
    assert payload == {"address": "192.0.2.1", "network": "2001:db8::/32"}
    assert json.loads(json.dumps(payload)) == payload


# ---- drop logs ------------------------------------------------------------------------------------------------


def _portal_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    # getMessage() formats the record: a format string that does not match its arguments fails here.
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "protocol.messages"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [("no_such_event", DropReason.UNKNOWN_EVENT), ("allow_access", DropReason.LEGACY_EVENT)],
)
def test_dropped_events_are_logged_with_their_name_and_reason(
    caplog: pytest.LogCaptureFixture, event: str, reason: DropReason
) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.messages")
    assert parse_portal_message(event, {}) is reason
    assert _portal_records(caplog) == [(logging.DEBUG, f"portal message {event!r} dropped: {reason.value}")]


@pytest.mark.parametrize(("length", "shown_length"), [(63, 63), (64, 64), (65, 64), (500, 64)])
def test_long_event_names_are_cut_to_64_characters_in_the_log(
    caplog: pytest.LogCaptureFixture, length: int, shown_length: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.messages")
    event = "".join(chr(ord("a") + i % 26) for i in range(length))
    parse_portal_message(event, {})
    shown = event[:shown_length] + ("…" if length > 64 else "")
    assert _portal_records(caplog) == [(logging.DEBUG, f"portal message {shown!r} dropped: unknown_event")]


def test_an_invalid_payload_is_logged_as_a_warning_with_an_error_count_and_no_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.messages")
    secret = base64.b64encode(b"s" * 31).decode()
    payload = {
        "ref": "r",
        "resource": {"id": "x", "type": "internet"},
        "client": _client(preshared_key=secret, ipv4="not-an-ip"),
        "client_ice_credentials": {"username": "u", "password": "p"},
    }
    drops = DropCounter()
    assert parse_portal_message("create_authorization", payload, drops) is DropReason.INVALID_PAYLOAD
    assert dict(drops.counts) == {DropReason.INVALID_PAYLOAD.value: 1}
    records = _portal_records(caplog)
    assert records == [(logging.WARNING, "portal message 'create_authorization' dropped: invalid_payload (3 errors)")]
    assert secret not in records[0][1]


def test_skipped_candidates_are_logged_with_their_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.messages")
    payload: dict[str, Any] = {"client_id": "c", "candidates": ["x", 5, "candidate:1 1 udp 1"]}
    parse_portal_message("invalidate_ice_candidates", payload)
    assert _portal_records(caplog) == [
        (logging.DEBUG, "portal message 'invalidate_ice_candidates': 2 invalid candidates skipped")
    ]
