"""protocol/messages.py: the spec's example payloads (docs/protocol.md §2, copied verbatim), round-trips, drops."""

from __future__ import annotations

import datetime
import ipaddress
import json
import uuid

import pytest

from agent.portal import MAX_FRAME_SIZE
from dataplane.base import DropCounter
from protocol.messages import (
    INBOUND_MODELS,
    MAX_AUTHORIZATIONS,
    MAX_CANDIDATES,
    MAX_RELAYS,
    MAX_UNIX_TIME,
    OUTBOUND_MODELS,
    AccessAuthorizationExpiryUpdated,
    AuthorizationCreated,
    BroadcastIceCandidates,
    BroadcastInvalidatedIceCandidates,
    CidrResource,
    CreateAuthorization,
    Disconnect,
    DnsResource,
    DropReason,
    IceCandidates,
    IcmpFilter,
    Init,
    InternetResource,
    InvalidateIceCandidates,
    NoRelays,
    PortFilter,
    RejectAccess,
    RelaysPresence,
    ResourceUpdated,
    SetSnownetCapabilities,
    StunRelay,
    TurnRelay,
    candidate_priority,
    parse_portal_message,
)

# --- §2.1 examples, verbatim -------------------------------------------------------------------------------------

SPEC_INIT = """
{
  "interface": {"ipv4": "100.115.164.78", "ipv6": "fd00:2021:1111::2c:f6ab"},
  "relays": [
    {"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "type": "turn",
     "addr": "172.28.0.101:3478", "username": "2145916800:<salt>",
     "password": "<b64 sha256, no padding>", "expires_at": 2145916800},
    {"id": "0a133356-7a9e-4b9a-b413-0d95a5720fd8", "type": "turn",
     "addr": "[2001:db8::65]:3478", "username": "...", "password": "...", "expires_at": 2145916800}
  ],
  "authorizations": [
    {"client_id": "<uuid>", "resource_id": "<uuid>", "expires_at": 1729813989}
  ],
  "account_slug": "acme",
  "flow_logs": {"api_url": "https://flow-api.firezone.dev", "upload_interval_secs": 60, "upload_batch_size": 1000},
  "config": {"ipv4_masquerade_enabled": true, "ipv6_masquerade_enabled": true}
}
"""

SPEC_CREATE_AUTHORIZATION = """
{
  "ref": "SFMyNTY.g2gDbQAA....<opaque signed string>",
  "resource": {"id": "c7793628-...", "type": "cidr", "name": "MyCorp Network", "address": "172.20.0.0/16", "filters": []},
  "client": {
    "id": "3abd725a-...", "public_key": "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
    "preshared_key": "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
    "ipv4": "100.93.74.51", "ipv6": "fd00:2021:1111::f:853b",
    "version": "1.6.0", "device_os_name": "macOS", "device_os_version": "15.5",
    "device_serial": null, "device_uuid": null, "firebase_installation_id": null, "identifier_for_vendor": null
  },
  "client_ice_credentials": {"username": "hgwh", "password": "j2fqufatn7xlrrvv6fsvea"},
  "gateway_ice_credentials": {"username": "ejqt", "password": "zfjrrjdkbci42t2axyd45a"},
  "expires_at": 1729813989,
  "subject": {"actor_id": "...", "actor_name": "...", "actor_email": "...", "actor_type": "...", "auth_provider_id": "...",
              "ip": "...", "ip_region": "...", "ip_city": "...", "ip_lat": 0.0, "ip_lon": 0.0, "user_agent": "..."},
  "use_iceless": false,
  "flow_logs_ingest_token": "<HS256 JWT>"
}
"""

SPEC_ICE_CANDIDATES = """
{"client_id": "2b1524e6-239e-4570-bc73-70a188e12101",
 "candidates": ["candidate:7854631899965427361 1 udp 1694498559 172.28.0.100 47717 typ srflx"]}
"""

SPEC_RELAYS_PRESENCE = """
{"disconnected_ids": ["e95f9517-..."],
 "connected": [{"id": "...", "type": "turn", "username": "2145916800:...", "password": "...", "addr": "172.28.0.101:3478", "expires_at": 2145916800}]}
"""

SPEC_FILTERS = """
[{"protocol": "tcp", "port_range_start": 80, "port_range_end": 443},
 {"protocol": "udp", "port_range_start": 53, "port_range_end": 53},
 {"protocol": "icmp"}]
"""


def parse(event: str, text: str):
    drops = DropCounter()
    message = parse_portal_message(event, json.loads(text), drops)
    assert not isinstance(message, DropReason), message
    assert drops.total() == 0
    return message


def test_spec_init() -> None:
    init = parse("init", SPEC_INIT)
    assert isinstance(init, Init)
    assert init.interface.ipv4 == ipaddress.IPv4Address("100.115.164.78")
    assert init.interface.ipv6 == ipaddress.IPv6Address("fd00:2021:1111::2c:f6ab")
    assert [r.id for r in init.relays] == ["0a133356-7a9e-4b9a-b413-0d95a5720fd8"] * 2
    v4, v6 = init.relays
    assert isinstance(v4, TurnRelay) and isinstance(v6, TurnRelay)
    assert v4.address == ("172.28.0.101", 3478)
    assert v6.address == ("2001:db8::65", 3478)
    assert v4.expires_at == 2145916800 and v4.username == "2145916800:<salt>"
    (auth,) = init.authorizations
    assert (auth.client_id, auth.resource_id, auth.expires_at) == ("<uuid>", "<uuid>", 1729813989)
    assert init.account_slug == "acme"
    assert init.flow_logs is not None and init.flow_logs.upload_interval_secs == 60
    assert init.config is not None and init.config.ipv6_masquerade_enabled


def test_spec_create_authorization() -> None:
    request = parse("create_authorization", SPEC_CREATE_AUTHORIZATION)
    assert isinstance(request, CreateAuthorization)
    assert request.ref == "SFMyNTY.g2gDbQAA....<opaque signed string>"
    assert isinstance(request.resource, CidrResource)
    assert request.resource.address == ipaddress.ip_network("172.20.0.0/16")
    assert request.resource.filters == []
    assert request.client.public_key == "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
    assert request.client.ipv4 == ipaddress.IPv4Address("100.93.74.51")
    assert request.client_ice_credentials.username == "hgwh"
    assert request.gateway_ice_credentials.password == "zfjrrjdkbci42t2axyd45a"
    assert request.expires_at == 1729813989
    assert request.use_iceless is False
    assert request.flow_logs_ingest_token == "<HS256 JWT>"


def test_spec_ice_candidates_and_invalidation() -> None:
    added = parse("ice_candidates", SPEC_ICE_CANDIDATES)
    removed = parse("invalidate_ice_candidates", SPEC_ICE_CANDIDATES)
    assert isinstance(added, IceCandidates) and isinstance(removed, InvalidateIceCandidates)
    assert added.client_id == "2b1524e6-239e-4570-bc73-70a188e12101"
    assert added.candidates == ["candidate:7854631899965427361 1 udp 1694498559 172.28.0.100 47717 typ srflx"]


def test_spec_reject_access() -> None:
    message = parse("reject_access", '{"client_id": "<uuid>", "resource_id": "<uuid>"}')
    assert message == RejectAccess(client_id="<uuid>", resource_id="<uuid>")


def test_spec_relays_presence() -> None:
    message = parse("relays_presence", SPEC_RELAYS_PRESENCE)
    assert isinstance(message, RelaysPresence)
    assert message.disconnected_ids == ["e95f9517-..."]
    (relay,) = message.connected
    assert isinstance(relay, TurnRelay) and relay.address == ("172.28.0.101", 3478)


def test_spec_disconnect() -> None:
    assert parse("disconnect", '{"reason": "token_expired"}') == Disconnect(reason="token_expired")


def test_spec_access_authorization_expiry_updated() -> None:
    message = parse("access_authorization_expiry_updated", '{"client_id": "c", "resource_id": "r", "expires_at": 5}')
    assert isinstance(message, AccessAuthorizationExpiryUpdated)


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        ('{"id": "r", "type": "cidr", "address": "172.20.0.0/16", "name": "n", "filters": []}', CidrResource),
        ('{"id": "r", "type": "cidr", "address": "10:20::/64", "name": "n", "filters": []}', CidrResource),
        ('{"id": "r", "type": "dns", "address": "**.example.com", "name": "n", "filters": []}', DnsResource),
        ('{"id": "r", "type": "dns", "address": "?.httpbin", "name": "n"}', DnsResource),
        ('{"id": "r", "type": "internet", "name": "ignored", "address": "ignored"}', InternetResource),
    ],
)
def test_spec_resource_updated_resource_kinds(payload: str, kind: type) -> None:
    message = parse("resource_updated", payload)
    assert isinstance(message, ResourceUpdated)
    assert isinstance(message.resource, kind)


def test_spec_filters() -> None:
    payload = json.dumps(
        {"id": "r", "type": "cidr", "address": "10.0.0.0/8", "name": "n", "filters": json.loads(SPEC_FILTERS)}
    )
    message = parse("resource_updated", payload)
    assert isinstance(message, ResourceUpdated) and isinstance(message.resource, CidrResource)
    tcp, udp, icmp = message.resource.filters
    assert tcp == PortFilter(protocol="tcp", port_range_start=80, port_range_end=443)
    assert udp == PortFilter(protocol="udp", port_range_start=53, port_range_end=53)
    assert icmp == IcmpFilter(protocol="icmp")


def test_port_filter_without_ranges_covers_all_ports() -> None:
    payload = '{"id": "r", "type": "dns", "address": "a.b", "name": "n", "filters": [{"protocol": "udp"}]}'
    message = parse("resource_updated", payload)
    assert isinstance(message, ResourceUpdated) and isinstance(message.resource, DnsResource)
    assert message.resource.filters == [PortFilter(protocol="udp", port_range_start=0, port_range_end=65535)]


def test_stun_relay_is_accepted() -> None:
    message = parse("relays_presence", '{"connected": [{"id": "s", "type": "stun", "addr": "[::1]:3478"}]}')
    assert isinstance(message, RelaysPresence)
    assert message.connected == [StunRelay(id="s", type="stun", addr="[::1]:3478")]
    assert message.disconnected_ids == []


def test_init_without_optional_parts() -> None:
    init = parse("init", '{"interface": {"ipv4": "100.64.0.1", "ipv6": "fd00:2021:1111::1"}}')
    assert isinstance(init, Init) and init.relays == [] and init.authorizations == [] and init.config is None


def test_unknown_fields_are_ignored() -> None:
    message = parse("reject_access", '{"client_id": "c", "resource_id": "r", "brand_new": {"x": 1}}')
    assert message == RejectAccess(client_id="c", resource_id="r")


def test_cidr_with_host_bits_is_masked() -> None:
    message = parse("resource_updated", '{"id": "r", "type": "cidr", "address": "10.1.2.3/8", "name": "n"}')
    assert isinstance(message, ResourceUpdated) and isinstance(message.resource, CidrResource)
    assert message.resource.address == ipaddress.ip_network("10.0.0.0/8")


@pytest.mark.parametrize(
    ("event", "payload", "reason"),
    [
        ("no_such_event", {}, DropReason.UNKNOWN_EVENT),
        ("request_connection", {}, DropReason.LEGACY_EVENT),
        ("allow_access", {}, DropReason.LEGACY_EVENT),
        ("authorize_flow", {}, DropReason.LEGACY_EVENT),
        ("init", None, DropReason.INVALID_PAYLOAD),
        ("init", {"interface": {"ipv4": "not-an-ip", "ipv6": "::1"}}, DropReason.INVALID_PAYLOAD),
        ("reject_access", {"client_id": 5}, DropReason.INVALID_PAYLOAD),
        ("relays_presence", {"connected": [{"id": "x", "type": "turn", "addr": "nope"}]}, DropReason.INVALID_PAYLOAD),
        ("resource_updated", {"id": "r", "type": "device_pool"}, DropReason.INVALID_PAYLOAD),
        ("ice_candidates", [], DropReason.INVALID_PAYLOAD),
    ],
)
def test_bad_input_is_a_counted_drop(event: str, payload: object, reason: DropReason) -> None:
    drops = DropCounter()
    assert parse_portal_message(event, payload, drops) is reason
    assert drops[reason] == 1


def test_bad_wireguard_keys_are_rejected() -> None:
    payload = json.loads(SPEC_CREATE_AUTHORIZATION)
    payload["client"]["preshared_key"] = "AAAA"
    assert parse_portal_message("create_authorization", payload) is DropReason.INVALID_PAYLOAD


def test_every_inbound_event_has_a_model() -> None:
    assert set(INBOUND_MODELS) | {"resource_updated"} == {
        "init",
        "create_authorization",
        "ice_candidates",
        "invalidate_ice_candidates",
        "reject_access",
        "resource_updated",
        "relays_presence",
        "disconnect",
        "access_authorization_expiry_updated",
    }


# --- §2.2 outbound ---------------------------------------------------------------------------------------------------


def test_outbound_payloads_match_the_spec() -> None:
    assert SetSnownetCapabilities().to_payload() == {"iceless": False}
    assert AuthorizationCreated(ref="abc").to_payload() == {"ref": "abc"}
    assert BroadcastIceCandidates(client_ids=["c"], candidates=["candidate:1"]).to_payload() == {
        "client_ids": ["c"],
        "candidates": ["candidate:1"],
    }
    assert BroadcastInvalidatedIceCandidates(client_ids=["c"], candidates=[]).to_payload() == {
        "client_ids": ["c"],
        "candidates": [],
    }
    assert NoRelays().to_payload() == {}
    assert set(OUTBOUND_MODELS) == {
        "set_snownet_capabilities",
        "authorization_created",
        "broadcast_ice_candidates",
        "broadcast_invalidated_ice_candidates",
        "no_relays",
    }


@pytest.mark.parametrize(
    "message",
    [
        SetSnownetCapabilities(iceless=False),
        AuthorizationCreated(ref="SFMyNTY.x"),
        BroadcastIceCandidates(client_ids=["a", "b"], candidates=["candidate:1 1 udp 1 1.2.3.4 5 typ host"]),
        BroadcastInvalidatedIceCandidates(client_ids=["a"], candidates=["candidate:2"]),
        NoRelays(),
    ],
)
def test_outbound_round_trip_through_json(message) -> None:
    wire = json.dumps(message.to_payload())
    assert type(message).model_validate(json.loads(wire)) == message


def test_inbound_round_trip_through_json() -> None:
    original = parse("create_authorization", SPEC_CREATE_AUTHORIZATION)
    again = parse("create_authorization", json.dumps(original.model_dump(mode="json")))
    assert again == original
    init = parse("init", SPEC_INIT)
    assert parse("init", json.dumps(init.model_dump(mode="json"))) == init


# --- Issue 8 item 5 (Firezone comparison) and issue 11 (bounds) ------------------------------------------------------

HOST = "candidate:1 1 udp 2130706431 172.28.0.100 47717 typ host"
SRFLX = "candidate:7854631899965427361 1 udp 1694498559 172.28.0.100 47717 typ srflx"


@pytest.mark.parametrize("event", ["ice_candidates", "invalidate_ice_candidates"])
def test_bad_candidates_are_skipped_one_by_one(event: str) -> None:
    # Firezone parses the list with VecSkipError: only the bad entries go, the message stays.
    payload = {
        "client_id": "c",
        "candidates": [HOST, 7, "garbage", "candidate:1 1 udp not-a-number 1.1.1.1 80 typ host", None, SRFLX],
    }
    drops = DropCounter()
    message = parse_portal_message(event, payload, drops)
    assert isinstance(message, IceCandidates | InvalidateIceCandidates)
    assert message.candidates == [HOST, SRFLX]
    assert drops[DropReason.INVALID_CANDIDATE] == 4
    assert drops[DropReason.INVALID_PAYLOAD] == 0


def test_candidate_priority_follows_firezone() -> None:
    assert candidate_priority(HOST) == 2130706431
    assert candidate_priority("candidate:1 1 udp +5 1.1.1.1 80 typ host") == 5  # Rust's u32 parse takes a '+'
    assert candidate_priority("candidate:1 1 udp 4294967296 1.1.1.1 80 typ host") is None
    assert candidate_priority("candidate:1 1 udp") is None
    assert candidate_priority(" candidate:1 1 udp 5 1.1.1.1 80 typ host") is None


def test_candidate_lists_are_bounded() -> None:
    drops = DropCounter()
    message = parse_portal_message("ice_candidates", {"client_id": "c", "candidates": [HOST] * 1000}, drops)
    assert isinstance(message, IceCandidates)
    assert len(message.candidates) == MAX_CANDIDATES
    assert drops[DropReason.INVALID_CANDIDATE] == 1000 - MAX_CANDIDATES


@pytest.mark.parametrize(
    "flow_logs",
    [None, "yes", 5, [], {}, {"api_url": 5}, {"upload_interval_secs": -1}, {"upload_batch_size": 10**400}],
)
def test_init_is_accepted_whatever_the_flow_logs_shape(flow_logs: object) -> None:
    payload = json.loads(SPEC_INIT)
    payload["flow_logs"] = flow_logs
    init = parse("init", json.dumps(payload))
    assert isinstance(init, Init) and len(init.authorizations) == 1
    missing = json.loads(SPEC_INIT)
    del missing["flow_logs"]
    assert parse("init", json.dumps(missing)).flow_logs is None


@pytest.mark.parametrize(
    ("field_path", "value", "expected"),
    [
        (("expires_at",), 10**400, MAX_UNIX_TIME),
        (("expires_at",), 1e300, MAX_UNIX_TIME),
        (("expires_at",), 2**64, MAX_UNIX_TIME),
        (("expires_at",), 1729813989, 1729813989),
        (("expires_at",), None, None),
    ],
)
def test_expiry_is_clamped_to_a_usable_time(field_path: tuple[str, ...], value: object, expected: int | None) -> None:
    # Issue 11: expires_at of 10**400 passed validation and float() then raised OverflowError in the event loop.
    payload = json.loads(SPEC_CREATE_AUTHORIZATION)
    payload["expires_at"] = value
    message = parse("create_authorization", json.dumps(payload))
    assert message.expires_at == expected
    if expected is not None:
        assert datetime.datetime.fromtimestamp(float(message.expires_at), datetime.UTC).year <= 9999


def test_negative_expiry_is_invalid_as_in_firezone() -> None:
    payload = json.loads(SPEC_CREATE_AUTHORIZATION)
    payload["expires_at"] = -1
    assert parse_portal_message("create_authorization", payload) is DropReason.INVALID_PAYLOAD


def test_relay_and_authorization_expiries_are_clamped() -> None:
    payload = json.loads(SPEC_INIT)
    payload["relays"][0]["expires_at"] = 10**30
    payload["authorizations"][0]["expires_at"] = 10**30
    init = parse("init", json.dumps(payload))
    assert init.relays[0].expires_at == MAX_UNIX_TIME
    assert init.authorizations[0].expires_at == MAX_UNIX_TIME


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("init", {"interface": {"ipv4": "1.2.3.4", "ipv6": "::1"}, "relays": [{"id": "s", "type": "stun", "addr": "1.2.3.4:3478"}] * (MAX_RELAYS + 1)}),
        ("init", {"interface": {"ipv4": "1.2.3.4", "ipv6": "::1"}, "authorizations": [{"client_id": "c", "resource_id": "r"}] * (MAX_AUTHORIZATIONS + 1)}),
        ("relays_presence", {"disconnected_ids": ["x"] * 100_000}),
        ("resource_updated", {"id": "r", "type": "dns", "address": "a", "filters": [{"protocol": "icmp"}] * 100_000}),
        ("resource_updated", {"id": "r", "type": "dns", "address": "a", "filters": [{"protocol": "tcp", "port_range_start": 70000}]}),
    ],
)  # fmt: skip
def test_oversized_lists_and_out_of_range_ports_are_invalid(event: str, payload: object) -> None:
    assert parse_portal_message(event, payload) is DropReason.INVALID_PAYLOAD


def test_an_init_with_10000_authorizations_fits_the_portal_frame_limit() -> None:
    authorizations = [
        {"client_id": str(uuid.UUID(int=i)), "resource_id": str(uuid.UUID(int=i + 1)), "expires_at": 2145916800}
        for i in range(10_000)
    ]
    payload = {**json.loads(SPEC_INIT), "authorizations": authorizations}
    frame = json.dumps({"topic": "gateway", "event": "init", "payload": payload, "ref": None})
    assert len(frame) < MAX_FRAME_SIZE / 2  # about 1.4 MB against 4 MiB: headroom of 3x
    init = parse("init", json.dumps(payload))
    assert len(init.authorizations) == 10_000
