"""Hypothesis: arbitrary JSON or bytes never raise out of the message parser or PhoenixChannel.receive_text, and every
number an accepted model holds is usable (finite, in range, a valid time)."""

from __future__ import annotations

import datetime
import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

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


# --- Issue 11: every value a model accepts is usable -------------------------------------------------------------

numbers = (
    st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # json.loads turns Infinity/NaN/1e999 into floats, so they reach the models
    | st.sampled_from([0, -1, 65535, 65536, 2**32, 2**63, 2**64, 10**400, 1e300, float("inf"), float("nan"), True])
    | st.text(alphabet="0123456789-+.e", max_size=30)
    | st.none()
)
ids = st.sampled_from(["c1", "r1", "5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a"])
KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
relays = st.fixed_dictionaries(
    {
        "id": ids,
        "type": st.sampled_from(["turn", "stun"]),
        "addr": st.sampled_from(["1.2.3.4:3478", "[2001:db8::1]:3478"]),
        "username": st.just("u"),
        "password": st.just("p"),
        "expires_at": numbers,
    }
)
filters = st.fixed_dictionaries(
    {"protocol": st.sampled_from(["tcp", "udp", "icmp"])},
    optional={"port_range_start": numbers, "port_range_end": numbers},
)
resources = st.fixed_dictionaries(
    {
        "id": ids,
        "type": st.sampled_from(["cidr", "dns", "internet"]),
        "address": st.sampled_from(["10.0.0.0/8", "a.example", "::/0"]),
        "filters": st.lists(filters, max_size=3),
    }
)
authorizations = st.fixed_dictionaries({"client_id": ids, "resource_id": ids}, optional={"expires_at": numbers})
interface = st.just({"ipv4": "100.64.0.1", "ipv6": "fd00::1"})
credentials = st.just({"username": "u", "password": "p"})
client = st.just({"id": "c1", "public_key": KEY, "preshared_key": KEY, "ipv4": "100.64.0.2", "ipv6": "fd00::2"})
flow_logs = st.fixed_dictionaries(
    {}, optional={"api_url": st.text(max_size=5), "upload_interval_secs": numbers, "upload_batch_size": numbers}
)
candidates = st.lists(
    st.sampled_from(["candidate:1 1 udp 2130706431 1.2.3.4 5 typ host", "x"])
    | numbers
    | st.builds("candidate:1 1 udp {} 1.2.3.4 5 typ host".format, numbers),
    max_size=5,
)
VALID_SHAPED: dict[str, st.SearchStrategy[Any]] = {
    "init": st.fixed_dictionaries(
        {"interface": interface, "relays": st.lists(relays, max_size=3)},
        optional={"authorizations": st.lists(authorizations, max_size=3), "flow_logs": flow_logs | numbers},
    ),
    "create_authorization": st.fixed_dictionaries(
        {
            "ref": st.just("r"),
            "resource": resources,
            "client": client,
            "client_ice_credentials": credentials,
            "gateway_ice_credentials": credentials,
        },
        optional={"expires_at": numbers},
    ),
    "ice_candidates": st.fixed_dictionaries({"client_id": ids, "candidates": candidates}),
    "invalidate_ice_candidates": st.fixed_dictionaries({"client_id": ids, "candidates": candidates}),
    "relays_presence": st.fixed_dictionaries({"disconnected_ids": st.lists(ids), "connected": st.lists(relays)}),
    "resource_updated": resources,
    "access_authorization_expiry_updated": st.fixed_dictionaries(
        {"client_id": ids, "resource_id": ids, "expires_at": numbers}
    ),
}
valid_shaped = st.sampled_from(sorted(VALID_SHAPED)).flatmap(
    lambda event: st.tuples(st.just(event), VALID_SHAPED[event])
)


def _numbers_in(value: Any, name: str = "") -> list[tuple[str, int | float]]:
    if isinstance(value, BaseModel):
        return [n for field in type(value).model_fields for n in _numbers_in(getattr(value, field), field)]
    if isinstance(value, list | tuple):
        return [n for item in value for n in _numbers_in(item, name)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(name, value)]
    return []


@settings(max_examples=500, deadline=None)
@given(message=valid_shaped)
def test_every_accepted_number_is_usable(message: tuple[str, Any]) -> None:
    event, payload = message
    # Through JSON as the portal link sees it (non-finite floats survive as Infinity/NaN, Python's json allows them).
    decoded = json.loads(json.dumps(payload))
    result = parse_portal_message(event, decoded, DropCounter())
    if isinstance(result, DropReason):
        return
    for name, number in _numbers_in(result):
        as_float = float(number)
        assert math.isfinite(as_float), (name, number)
        assert 0 <= number <= 2**64 - 1, (name, number)
        if name == "expires_at":
            datetime.datetime.fromtimestamp(as_float, datetime.UTC)
            assert int(number) == number
        if name.startswith("port_range"):
            assert 0 <= number <= 65535
