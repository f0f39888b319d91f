"""Hypothesis: arbitrary JSON or bytes never raise out of the message parser or PhoenixChannel.receive_text."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.base import DropCounter
from protocol.messages import INBOUND_MODELS, DropReason, parse_portal_message
from protocol.phoenix import PhoenixChannel, State

EVENTS = st.sampled_from([*INBOUND_MODELS, "resource_updated", "request_connection", "phx_reply", "bogus", ""])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
KEYS = [
    "interface",
    "relays",
    "authorizations",
    "ref",
    "resource",
    "client",
    "client_id",
    "candidates",
    "resource_id",
    "disconnected_ids",
    "connected",
    "reason",
    "id",
    "type",
    "address",
    "filters",
    "expires_at",
]
shaped = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(event=EVENTS | st.text(max_size=30), payload=json_values | shaped)
def test_parser_never_raises(event: str, payload: Any) -> None:
    drops = DropCounter()
    result = parse_portal_message(event, payload, drops)
    assert (drops.total() == 1) == isinstance(result, DropReason)


def _joined() -> PhoenixChannel:
    channel = PhoenixChannel()
    channel.connect(0.0)
    channel.receive_text('{"topic":"gateway","event":"phx_reply","payload":{"status":"ok"},"ref":0}', 0.0)
    return channel


envelopes = st.fixed_dictionaries(
    {},
    optional={
        "topic": st.sampled_from(["gateway", "phoenix", "x"]) | json_values,
        "event": st.sampled_from(["phx_reply", "phx_close", "phx_error", "disconnect", "init"]) | json_values,
        "payload": json_values
        | st.fixed_dictionaries({"status": st.sampled_from(["ok", "error"]) | json_values, "response": json_values}),
        "ref": st.integers(-2, 5) | json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(envelopes.map(json.dumps) | st.text(max_size=50) | st.binary(max_size=50), max_size=8))
def test_receive_text_never_raises(frames: list[Any]) -> None:
    channel = _joined()
    now = 0.0
    for frame in frames:
        now += 0.1
        channel.receive_text(frame, now)
        channel.handle_timeout(now)
        while channel.poll_event() is not None:
            pass
        while channel.poll_send() is not None:
            pass
    assert channel.state in set(State)
