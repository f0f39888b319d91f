"""Portal message and Phoenix channel rules that the mutation run showed were unpinned (``make mutate``, issue 11).

docs/protocol.md §2: relay ``addr`` is ``ip:port`` / ``[ipv6]:port`` with a port in 1..65535; WireGuard keys are
standard base64 of 32 bytes; a candidate list keeps the ``candidate:`` lines whose 4th field is a u32 (RFC 8839:
1*10DIGIT); outbound payloads are JSON-ready. Drops are logged with the event (cut to 64 characters), the reason and,
for invalid payloads, only an error count — never the payload's values.
Phoenix (docs/protocol.md §1.4–§1.6): duplicates judged by canonical content, refs, join rejection details, replies
matched to what was sent, heartbeat cadence, and the reasons given in logs and errors.
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
from protocol.errors import FatalReason, LocalProtocolError
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
from protocol.phoenix import (
    ChannelEvent,
    ChannelFailed,
    ChannelJoined,
    PhoenixChannel,
    ReplyReceived,
    State,
    TimerKind,
)
from protocol.phoenix import (
    DropReason as PhoenixDrop,
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
        # Unicode digits are digits to str.isdigit() and int(), but no portal writes a port that way.
        ("192.0.2.1:\u0663\u0664\u0667\u0668", "not host:port: '192.0.2.1:\u0663\u0664\u0667\u0668'"),
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


# ==== protocol/phoenix.py: Phoenix V1 channel rules (docs/protocol.md §1.4–§1.6) =================================


def _frames(channel: PhoenixChannel) -> list[dict[str, Any]]:
    frames = []
    while (frame := channel.poll_send()) is not None:
        frames.append(json.loads(frame))
    return frames


def _events(channel: PhoenixChannel) -> list[ChannelEvent]:
    out = []
    while (event := channel.poll_event()) is not None:
        out.append(event)
    return out


def _reply(ref: Any, topic: str = "gateway", status: str = "ok", response: Any = None) -> str:
    payload = {"status": status, "response": {} if response is None else response}
    return json.dumps({"topic": topic, "event": "phx_reply", "payload": payload, "ref": ref})


def _joining(now: float = 0.0, **kwargs: Any) -> PhoenixChannel:
    channel = PhoenixChannel(**kwargs)
    channel.connect(now)
    assert [f["event"] for f in _frames(channel)] == ["phx_join"]
    return channel


def _joined(now: float = 0.0, **kwargs: Any) -> PhoenixChannel:
    channel = _joining(now, **kwargs)
    channel.receive_text(_reply(0), now)
    assert _events(channel) == [ChannelJoined()]
    return channel


def _phoenix_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "protocol.phoenix"]


def test_application_frames_carry_the_channel_topic() -> None:
    channel = _joined(topic="gateway")
    assert channel.push("authorization_created", {"ref": "x"}, 0.0)
    assert _frames(channel) == [
        {"topic": "gateway", "event": "authorization_created", "payload": {"ref": "x"}, "ref": 1}
    ]


def test_held_duplicates_are_judged_by_content_not_key_order_or_event_alone() -> None:
    channel = _joining()
    assert channel.push("e", {"a": 1, "b": 2}, 0.0)
    assert not channel.push("e", {"b": 2, "a": 1}, 0.0)
    assert channel.push("other", {"a": 1, "b": 2}, 0.0)
    assert channel.held_count == 2
    assert channel.drops[PhoenixDrop.HELD_DUPLICATE] == 1


@pytest.mark.parametrize(("ref", "joins"), [("0", True), ("0" * 19, True), ("0" * 20, False), ("1" * 20, False)])
def test_string_refs_are_up_to_19_digits(ref: str, joins: bool) -> None:
    channel = _joining()
    channel.receive_text(_reply(ref), 0.0)
    assert channel.joined is joins
    assert channel.drops[PhoenixDrop.BAD_ENVELOPE] == (0 if joins else 1)


@pytest.mark.parametrize(
    ("response", "detail"),
    [
        ({"reason": "invalid_version"}, "invalid_version"),
        ({"other": 1}, '{"other": 1}'),
        ([1, 2], "[1, 2]"),
        ("text", '"text"'),
        ({"reason": "x" * 300}, "x" * 300),
        ({"long": "y" * 300}, json.dumps({"long": "y" * 300})[:200]),
    ],
)
def test_a_rejected_join_fails_with_the_reason_or_the_response_cut_to_200(response: Any, detail: str) -> None:
    channel = _joining()
    channel.receive_text(_reply(0, status="error", response=response), 0.0)
    assert _events(channel) == [ChannelFailed(FatalReason.JOIN_REJECTED, f"join rejected: {detail}")]


def test_a_rejected_join_with_a_null_response_says_null() -> None:
    channel = _joining()
    frame = json.dumps({"topic": "gateway", "event": "phx_reply", "payload": {"status": "error"}, "ref": 0})
    channel.receive_text(frame, 0.0)
    assert _events(channel) == [ChannelFailed(FatalReason.JOIN_REJECTED, "join rejected: null")]


def test_token_expired_fails_the_channel_with_its_detail_and_sends_nothing_more() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)  # the join frame is not polled yet
    channel.receive_text(
        json.dumps({"topic": "gateway", "event": "disconnect", "payload": {"reason": "token_expired"}}), 0.0
    )
    assert _events(channel) == [ChannelFailed(FatalReason.INVALID_TOKEN, "the portal disconnected us: token_expired")]
    assert channel.poll_send() is None


def test_unsent_messages_are_counted_one_by_one_when_the_connection_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.phoenix")
    channel = _joined()
    channel.push("a", {}, 0.0)
    channel.push("b", {}, 0.0)
    channel.connection_lost(0.0)
    assert channel.drops[PhoenixDrop.UNSENT_ON_DISCONNECT] == 2
    assert (logging.DEBUG, "connection lost: 2 unsent portal messages discarded") in _phoenix_records(caplog)


def test_replies_to_refs_never_sent_or_not_in_flight_are_unexpected() -> None:
    channel = _joined()  # refs 0 (join) used; the next ref is 1
    channel.receive_text(_reply(1), 0.0)
    channel.receive_text(_reply(0, topic="phoenix"), 0.0)  # ref 0 was the join, not a heartbeat
    assert channel.drops[PhoenixDrop.UNEXPECTED_REPLY] == 2
    assert _events(channel) == []


def test_replies_on_another_topic_are_dropped() -> None:
    channel = _joined()
    channel.receive_text(_reply(0, topic="client"), 0.0)
    assert channel.drops[PhoenixDrop.UNKNOWN_TOPIC] == 1


def test_an_ok_reply_that_mentions_unmatched_topic_is_just_a_reply() -> None:
    channel = _joined()
    channel.push("a", {}, 0.0)
    assert [f["ref"] for f in _frames(channel)] == [1]
    channel.receive_text(_reply(1, response={"reason": "unmatched topic"}), 0.0)
    assert _events(channel) == [ReplyReceived(1, "ok", {"reason": "unmatched topic"})]
    assert channel.joined


def test_a_late_reply_to_an_earlier_push_during_a_rejoin_is_not_the_join_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.phoenix")
    channel = _joined()
    channel.push("a", {}, 0.0)
    channel.push("b", {}, 0.0)
    assert [f["ref"] for f in _frames(channel)] == [1, 2]
    channel.receive_text(_reply(2, status="error", response={"reason": "unmatched topic"}), 0.0)
    rejoin = _frames(channel)
    assert [(f["event"], f["ref"]) for f in rejoin] == [("phx_join", 3)]
    assert (logging.INFO, "portal says topic 'gateway' is not joined; re-joining") in _phoenix_records(caplog)
    channel.receive_text(_reply(1), 0.0)
    assert _events(channel) == [ReplyReceived(1, "ok", {})]
    assert channel.state is State.JOINING


def test_a_heartbeat_called_late_keeps_the_original_cadence() -> None:
    channel = _joined(heartbeat_interval=10.0)
    channel.handle_timeout(10.5)
    assert [f["event"] for f in _frames(channel)] == ["heartbeat"]
    assert channel.poll_timeout() == (20.0, TimerKind.HEARTBEAT)


def test_a_heartbeat_a_whole_interval_late_is_rescheduled_from_now() -> None:
    channel = _joined(heartbeat_interval=10.0)
    channel.handle_timeout(20.0)
    assert [f["event"] for f in _frames(channel)] == ["heartbeat"]
    assert channel.poll_timeout() == (30.0, TimerKind.HEARTBEAT)


def test_when_join_timeout_and_heartbeat_fall_together_the_timer_is_the_earliest() -> None:
    channel = _joining(heartbeat_interval=5.0, join_timeout=5.0)
    timeout = channel.poll_timeout()
    assert timeout is not None and timeout[0] == 5.0


def test_hiccups_and_frame_drops_are_logged_with_their_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="protocol.phoenix")
    channel = _joining(join_timeout=5.0)
    channel.receive_text("not json", 0.0)
    channel.handle_timeout(5.0)
    assert _phoenix_records(caplog) == [
        (logging.DEBUG, "phoenix frame dropped: not_json"),
        (logging.INFO, "portal link hiccup: join_timeout"),
    ]


def test_misuse_errors_say_what_was_wrong() -> None:
    channel = _joining()
    with pytest.raises(LocalProtocolError) as info:
        channel.connect(0.0)
    assert str(info.value) == "connect() while joining; call connection_lost() first"
    channel.receive_text(_reply(0, status="error"), 0.0)
    with pytest.raises(LocalProtocolError) as info:
        channel.connect(0.0)
    assert str(info.value) == "the channel failed fatally; it cannot be connected again"
    with pytest.raises(LocalProtocolError) as info:
        channel.push("e", {}, 0.0)
    assert str(info.value) == "push() on a failed channel"


def test_frames_are_compact_json_as_serde_json_writes_them() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    assert channel.poll_send() == '{"topic":"gateway","event":"phx_join","payload":null,"ref":0}'


@pytest.mark.parametrize(
    "settings",
    [{"heartbeat_interval": 0.0}, {"join_timeout": 0.0}, {"join_timeout": -1.0}, {"max_held_messages": -1}],
)
def test_channel_settings_out_of_range_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError) as info:
        PhoenixChannel(**settings)  # type: ignore[arg-type]
    assert str(info.value) == "heartbeat_interval and join_timeout must be > 0, max_held_messages >= 0"


def test_small_positive_settings_and_an_empty_hold_queue_are_allowed() -> None:
    channel = _joining(heartbeat_interval=0.5, join_timeout=0.5, max_held_messages=0)
    assert not channel.push("e", {}, 0.0)
    assert channel.drops[PhoenixDrop.HELD_QUEUE_FULL] == 1
    assert channel.poll_timeout() == (0.5, TimerKind.JOIN_TIMEOUT)
