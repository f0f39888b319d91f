"""Portal input: Phoenix channel text frames into a joined PhoenixChannel, each push into ``parse_portal_message``.

The input is a sequence of frames (:func:`fuzz.harness.split_datagrams`). Invariants: ``receive_text`` never raises;
``parse_portal_message`` returns a typed message or a DropReason and never raises; a parsed message's JSON form
parses again.
"""

from __future__ import annotations

import json
from typing import Any

from dataplane.base import DropCounter
from fuzz.harness import fuzz_main, join_datagrams, split_datagrams
from protocol import messages
from protocol.phoenix import GATEWAY_TOPIC, PHX_REPLY, PhoenixChannel, PushReceived
from tests.unit import test_messages as samples


def _frame(event: str, payload: Any, ref: int | None = None, topic: str = GATEWAY_TOPIC) -> bytes:
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}).encode()


JOIN_REPLY = _frame(PHX_REPLY, {"status": "ok", "response": {}}, ref=0)


def joined_channel() -> PhoenixChannel:
    channel = PhoenixChannel()
    channel.connect(0.0)
    while channel.poll_send() is not None:
        pass
    channel.receive_text(JOIN_REPLY, 0.0)
    return channel


def seeds() -> list[bytes]:
    resource = json.loads('{"id": "r", "type": "cidr", "address": "10.0.0.0/8", "name": "n", "filters": []}')
    resource["filters"] = json.loads(samples.SPEC_FILTERS)
    pushes = [
        _frame("init", json.loads(samples.SPEC_INIT)),
        _frame("create_authorization", json.loads(samples.SPEC_CREATE_AUTHORIZATION)),
        _frame("ice_candidates", json.loads(samples.SPEC_ICE_CANDIDATES)),
        _frame("invalidate_ice_candidates", json.loads(samples.SPEC_ICE_CANDIDATES)),
        _frame("relays_presence", json.loads(samples.SPEC_RELAYS_PRESENCE)),
        _frame("resource_updated", resource),
        _frame("resource_updated", {"id": "r", "type": "dns", "address": "**.example.com", "name": "n"}),
        _frame("reject_access", {"client_id": "c", "resource_id": "r"}),
        _frame("disconnect", {"reason": "token_expired"}),
        _frame("access_authorization_expiry_updated", {"client_id": "c", "resource_id": "r", "expires_at": 1}),
        _frame(PHX_REPLY, {"status": "ok", "response": {}}, ref=1, topic="phoenix"),
        _frame("request_connection", {}),
    ]
    return [join_datagrams([push]) for push in pushes] + [join_datagrams(pushes)]


def TestOneInput(data: bytes) -> None:
    channel = joined_channel()
    drops = DropCounter()
    now = 0.0
    for frame in split_datagrams(data, limit=16):
        channel.receive_text(frame, now)
        channel.receive_text(frame.decode("utf-8", "replace"), now)
        while (event := channel.poll_event()) is not None:
            if not isinstance(event, PushReceived):
                continue
            message = messages.parse_portal_message(event.event, event.payload, drops)
            if isinstance(message, messages.DropReason):
                continue
            payload = message.model_dump(mode="json")
            if isinstance(message, messages.ResourceUpdated):
                payload = payload["resource"]
            if isinstance(messages.parse_portal_message(event.event, payload), messages.DropReason):
                raise AssertionError(f"a parsed {event.event!r} does not parse again from its JSON form")
        now += 1.0
        channel.handle_timeout(now)
        while channel.poll_send() is not None:
            pass


if __name__ == "__main__":
    fuzz_main("fuzz_portal_message")
