"""Timelines of protocol/phoenix.py on a fake clock (docs/protocol.md §1.4–§1.6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protocol.errors import FatalReason, LocalProtocolError
from protocol.phoenix import (
    ChannelEvent,
    ChannelFailed,
    ChannelJoined,
    DropReason,
    HiccupReason,
    LinkHiccuped,
    PhoenixChannel,
    PushReceived,
    ReplyReceived,
    State,
    TimerKind,
)


def sent(channel: PhoenixChannel) -> list[dict[str, Any]]:
    frames = []
    while (frame := channel.poll_send()) is not None:
        frames.append(json.loads(frame))
    return frames


def events(channel: PhoenixChannel) -> list[ChannelEvent]:
    out = []
    while (event := channel.poll_event()) is not None:
        out.append(event)
    return out


def reply(ref: int | None, topic: str = "gateway", status: str = "ok", response: Any = None) -> str:
    return json.dumps(
        {"topic": topic, "event": "phx_reply", "payload": {"status": status, "response": response or {}}, "ref": ref}
    )


def push(event: str, payload: Any) -> str:
    return json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": None})


def joined_channel(now: float = 0.0, **kwargs: Any) -> PhoenixChannel:
    channel = PhoenixChannel(**kwargs)
    channel.connect(now)
    assert sent(channel) == [{"topic": "gateway", "event": "phx_join", "payload": None, "ref": 0}]
    channel.receive_text(reply(0), now)
    assert events(channel) == [ChannelJoined()]
    return channel


def test_join_is_first_frame_with_null_payload_and_ref_zero() -> None:
    channel = PhoenixChannel()
    channel.connect(100.0)
    frame = channel.poll_send()
    assert frame is not None
    assert json.loads(frame) == {"topic": "gateway", "event": "phx_join", "payload": None, "ref": 0}
    assert channel.state is State.JOINING
    assert channel.poll_timeout() == (105.0, TimerKind.JOIN_TIMEOUT)


def test_join_reply_ok_joins() -> None:
    channel = joined_channel()
    assert channel.joined
    assert channel.poll_timeout() == (10.0, TimerKind.HEARTBEAT)


def test_heartbeats_every_interval_starting_interval_after_connect() -> None:
    channel = joined_channel()
    times = []
    now = 0.0
    for _ in range(3):
        timer = channel.poll_timeout()
        assert timer is not None and timer[1] is TimerKind.HEARTBEAT
        now = timer[0]
        channel.handle_timeout(now)
        (frame,) = sent(channel)
        assert frame["topic"] == "phoenix" and frame["event"] == "heartbeat" and frame["payload"] == {}
        channel.receive_text(reply(frame["ref"], topic="phoenix"), now + 0.05)
        times.append(now)
    assert times == [10.0, 20.0, 30.0]
    assert events(channel) == []


def test_heartbeat_refs_continue_the_connection_counter() -> None:
    channel = joined_channel()
    assert channel.push("no_relays", {}, 1.0)
    assert [f["ref"] for f in sent(channel)] == [1]
    channel.handle_timeout(10.0)
    assert [f["ref"] for f in sent(channel)] == [2]


def test_fourth_unanswered_heartbeat_is_sent_then_the_link_hiccups_at_40s() -> None:
    channel = joined_channel()
    for t in (10.0, 20.0, 30.0):
        channel.handle_timeout(t - 0.001)
        assert sent(channel) == []
        channel.handle_timeout(t)
        assert len(sent(channel)) == 1
        assert events(channel) == []
    channel.handle_timeout(39.999)
    assert events(channel) == []
    channel.handle_timeout(40.0)
    assert events(channel) == [LinkHiccuped(HiccupReason.MISSED_HEARTBEATS)]
    assert channel.state is State.DISCONNECTED
    assert channel.poll_timeout() is None
    # Like Firezone's phoenix-channel, the 4th heartbeat goes on the wire before the link gives up.
    assert sent(channel) == [{"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": 4}]
    assert sent(channel) == []


def test_the_last_heartbeat_is_discarded_if_the_socket_is_already_gone() -> None:
    channel = joined_channel()
    for t in (10.0, 20.0, 30.0, 40.0):
        channel.handle_timeout(t)
        if t < 40.0:
            sent(channel)
    assert events(channel) == [LinkHiccuped(HiccupReason.MISSED_HEARTBEATS)]
    channel.connection_lost(40.1)
    assert sent(channel) == []


def test_a_reconnect_after_missed_heartbeats_starts_clean() -> None:
    channel = joined_channel()
    for t in (10.0, 20.0, 30.0, 40.0):
        channel.handle_timeout(t)
    events(channel)
    channel.connect(41.0)
    assert sent(channel) == [{"topic": "gateway", "event": "phx_join", "payload": None, "ref": 0}]
    assert channel.poll_timeout() == (46.0, TimerKind.JOIN_TIMEOUT)


def test_answered_heartbeats_keep_the_link_forever() -> None:
    channel = joined_channel(heartbeat_interval=1.0)
    for step in range(1, 200):
        channel.handle_timeout(float(step))
        (frame,) = sent(channel)
        channel.receive_text(reply(frame["ref"], topic="phoenix"), step + 0.5)
    assert events(channel) == []
    assert channel.joined


def test_late_heartbeat_reply_still_counts() -> None:
    channel = joined_channel()
    refs = []
    for t in (10.0, 20.0, 30.0):
        channel.handle_timeout(t)
        refs.append(sent(channel)[0]["ref"])
    channel.receive_text(reply(refs[0], topic="phoenix"), 35.0)
    channel.handle_timeout(40.0)
    assert events(channel) == []
    assert len(sent(channel)) == 1


def test_heartbeat_interval_is_configurable() -> None:
    channel = PhoenixChannel(heartbeat_interval=0.5)
    channel.connect(0.0)
    channel.receive_text(reply(0), 0.1)
    events(channel)
    sent(channel)
    for t in (0.5, 1.0, 1.5):
        channel.handle_timeout(t)
    assert len(sent(channel)) == 3
    assert events(channel) == []
    channel.handle_timeout(2.0)
    assert events(channel) == [LinkHiccuped(HiccupReason.MISSED_HEARTBEATS)]
    assert len(sent(channel)) == 1


def test_join_timeout_after_5s() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    sent(channel)
    channel.handle_timeout(4.999)
    assert events(channel) == []
    channel.handle_timeout(5.0)
    assert events(channel) == [LinkHiccuped(HiccupReason.JOIN_TIMEOUT)]


def test_join_error_is_fatal_and_stays_failed() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    sent(channel)
    channel.receive_text(reply(0, status="error", response={"reason": "disabled"}), 0.1)
    (event,) = events(channel)
    assert isinstance(event, ChannelFailed) and event.reason is FatalReason.JOIN_REJECTED
    assert "disabled" in event.detail
    assert channel.state is State.FAILED
    with pytest.raises(LocalProtocolError):
        channel.connect(1.0)
    with pytest.raises(LocalProtocolError):
        channel.push("no_relays", {}, 1.0)


def test_token_expired_disconnect_is_fatal() -> None:
    channel = joined_channel()
    channel.receive_text(push("disconnect", {"reason": "token_expired"}), 1.0)
    (event,) = events(channel)
    assert isinstance(event, ChannelFailed) and event.reason is FatalReason.INVALID_TOKEN
    assert channel.state is State.FAILED


def test_other_disconnect_reasons_are_plain_pushes() -> None:
    channel = joined_channel()
    channel.receive_text(push("disconnect", {"reason": "maintenance"}), 1.0)
    assert events(channel) == [PushReceived("disconnect", {"reason": "maintenance"})]
    assert channel.joined


def test_phx_close_is_a_hiccup_and_phx_error_is_ignored() -> None:
    channel = joined_channel()
    channel.receive_text(push("phx_error", {}), 1.0)
    assert events(channel) == []
    assert channel.drops[DropReason.PHX_ERROR] == 1
    channel.receive_text(push("phx_close", {}), 2.0)
    assert events(channel) == [LinkHiccuped(HiccupReason.CHANNEL_CLOSED)]


def test_replies_are_matched_by_ref() -> None:
    channel = joined_channel()
    channel.push("authorization_created", {"ref": "a"}, 1.0)
    channel.push("authorization_created", {"ref": "b"}, 1.0)
    first, second = sent(channel)
    channel.receive_text(reply(second["ref"], status="error", response={"reason": "invalid_ref"}), 1.1)
    channel.receive_text(reply(first["ref"]), 1.2)
    assert events(channel) == [
        ReplyReceived(second["ref"], "error", {"reason": "invalid_ref"}),
        ReplyReceived(first["ref"], "ok", {}),
    ]


def test_reply_to_a_ref_never_sent_is_dropped() -> None:
    channel = joined_channel()
    channel.receive_text(reply(99), 1.0)
    channel.receive_text(reply(None), 1.0)
    assert events(channel) == []
    assert channel.drops[DropReason.UNEXPECTED_REPLY] == 2


def test_unmatched_topic_triggers_rejoin_and_requeues_unsent() -> None:
    channel = joined_channel()
    channel.push("no_relays", {}, 1.0)
    (frame,) = sent(channel)
    channel.push("broadcast_ice_candidates", {"client_ids": ["c"], "candidates": ["x"]}, 1.5)
    channel.receive_text(reply(frame["ref"], status="error", response={"reason": "unmatched topic"}), 2.0)
    assert events(channel) == []
    assert channel.state is State.JOINING
    rejoin = sent(channel)
    assert [f["event"] for f in rejoin] == ["phx_join"]
    assert rejoin[0]["ref"] == frame["ref"] + 1
    assert channel.poll_timeout() == (7.0, TimerKind.JOIN_TIMEOUT)
    channel.receive_text(reply(rejoin[0]["ref"]), 2.5)
    assert events(channel) == [ChannelJoined()]
    assert [f["event"] for f in sent(channel)] == ["broadcast_ice_candidates"]


def test_messages_while_joining_are_held_and_flushed_after_join() -> None:
    channel = PhoenixChannel()
    channel.connect(1.0)
    assert [f["event"] for f in sent(channel)] == ["phx_join"]
    assert channel.push("no_relays", {}, 1.0)
    assert channel.push("authorization_created", {"ref": "r"}, 1.0)
    assert sent(channel) == []
    channel.receive_text(reply(0), 1.1)
    assert [(f["event"], f["ref"]) for f in sent(channel)] == [("no_relays", 1), ("authorization_created", 2)]


def test_messages_pushed_without_a_connection_are_refused() -> None:
    # As Firezone's phoenix-channel (NotConnected): nothing pushed while disconnected is replayed after the next join.
    channel = PhoenixChannel()
    assert not channel.push("authorization_created", {"ref": "stale"}, 0.0)
    assert channel.drops[DropReason.NOT_CONNECTED] == 1
    assert channel.held_count == 0
    channel.connect(1.0)
    channel.receive_text(reply(0), 1.1)
    assert [f["event"] for f in sent(channel)] == ["phx_join"]


def test_held_queue_refuses_exact_duplicates() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    assert channel.push("no_relays", {}, 0.0)
    assert not channel.push("no_relays", {}, 0.0)
    assert channel.push("authorization_created", {"ref": "1"}, 0.0)
    assert not channel.push("authorization_created", {"ref": "1"}, 0.0)
    assert channel.push("authorization_created", {"ref": "2"}, 0.0)
    assert channel.held_count == 3
    assert channel.drops[DropReason.HELD_DUPLICATE] == 2


def test_held_queue_is_bounded_to_32() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    accepted = [channel.push("authorization_created", {"ref": str(i)}, 0.0) for i in range(40)]
    assert accepted == [True] * 32 + [False] * 8
    assert channel.drops[DropReason.HELD_QUEUE_FULL] == 8
    channel.receive_text(reply(0), 0.0)
    frames = sent(channel)
    assert [f["payload"]["ref"] for f in frames[1:]] == [str(i) for i in range(32)]


def test_duplicates_are_fine_once_joined() -> None:
    channel = joined_channel()
    assert channel.push("no_relays", {}, 1.0)
    assert channel.push("no_relays", {}, 1.0)
    assert len(sent(channel)) == 2


def test_refs_restart_at_zero_on_every_connection() -> None:
    channel = joined_channel()
    channel.handle_timeout(10.0)
    sent(channel)
    channel.connection_lost(11.0)
    assert channel.state is State.DISCONNECTED
    channel.connect(12.0)
    assert sent(channel)[0]["ref"] == 0
    assert channel.poll_timeout() == (17.0, TimerKind.JOIN_TIMEOUT)
    channel.receive_text(reply(0), 12.5)
    assert channel.poll_timeout() == (22.0, TimerKind.HEARTBEAT)


def test_unsent_messages_are_discarded_with_the_connection() -> None:
    channel = joined_channel()
    channel.push("no_relays", {}, 1.0)
    channel.connection_lost(1.5)
    assert channel.held_count == 0
    assert channel.drops[DropReason.UNSENT_ON_DISCONNECT] == 1
    channel.connect(2.0)
    channel.receive_text(reply(0), 2.1)
    assert [f["event"] for f in sent(channel)] == ["phx_join"]


def test_messages_held_while_joining_are_discarded_by_a_hiccup() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    sent(channel)
    assert channel.push("authorization_created", {"ref": "r"}, 1.0)
    channel.handle_timeout(5.0)
    assert events(channel) == [LinkHiccuped(HiccupReason.JOIN_TIMEOUT)]
    assert channel.held_count == 0
    assert channel.drops[DropReason.UNSENT_ON_DISCONNECT] == 1
    assert not channel.push("authorization_created", {"ref": "r"}, 5.1)


def test_connect_twice_is_misuse() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    with pytest.raises(LocalProtocolError):
        channel.connect(0.0)


def test_pushes_are_surfaced_with_raw_payload() -> None:
    channel = joined_channel()
    channel.receive_text(push("init", {"interface": {}}), 1.0)
    channel.receive_text(push("whatever_new", [1, 2]), 1.0)
    assert events(channel) == [PushReceived("init", {"interface": {}}), PushReceived("whatever_new", [1, 2])]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", DropReason.NOT_JSON),
        ("[1,2]", DropReason.NOT_AN_OBJECT),
        ('{"topic": 1, "event": "x", "payload": {}, "ref": null}', DropReason.BAD_ENVELOPE),
        ('{"topic": "gateway", "event": "x", "payload": {}, "ref": "abc"}', DropReason.BAD_ENVELOPE),
        ('{"topic": "gateway", "event": "x", "payload": {}, "ref": true}', DropReason.BAD_ENVELOPE),
        ('{"topic": "other", "event": "x", "payload": {}, "ref": null}', DropReason.UNKNOWN_TOPIC),
        ('{"topic": "gateway", "event": "phx_reply", "payload": "ok", "ref": 0}', DropReason.BAD_REPLY),
        ("[" * 100_000, DropReason.NOT_JSON),
    ],
)
def test_garbage_is_dropped_and_counted(frame: str, reason: DropReason) -> None:
    channel = joined_channel()
    channel.receive_text(frame, 1.0)
    assert events(channel) == []
    assert channel.drops[reason] == 1
    assert channel.joined


def test_string_refs_from_other_servers_are_accepted() -> None:
    channel = PhoenixChannel()
    channel.connect(0.0)
    channel.receive_text(
        json.dumps({"topic": "gateway", "event": "phx_reply", "payload": {"status": "ok"}, "ref": "0"}), 0.1
    )
    assert events(channel) == [ChannelJoined()]


def test_a_late_driver_does_not_burst_heartbeats() -> None:
    channel = joined_channel()
    channel.handle_timeout(35.0)
    assert len(sent(channel)) == 1
    assert channel.poll_timeout() == (45.0, TimerKind.HEARTBEAT)


def test_invalid_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError):
        PhoenixChannel(heartbeat_interval=0)
