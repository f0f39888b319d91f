"""agent/eventloop.py: portal events → AuthorizationBook, and the messages the gateway answers with."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.eventloop import AuthorizationBook, Eventloop
from protocol.messages import CidrResource, DnsResource, PortFilter
from protocol.phoenix import ChannelJoined, HiccupReason, LinkHiccuped, PushReceived

RELAY = {
    "id": "relay-1",
    "type": "turn",
    "addr": "172.28.0.101:3478",
    "username": "2145916800:s",
    "password": "p",
    "expires_at": 2145916800,
}
INIT: dict[str, Any] = {
    "interface": {"ipv4": "100.115.164.78", "ipv6": "fd00:2021:1111::2c:f6ab"},
    "relays": [RELAY],
    "authorizations": [],
    "account_slug": "acme",
}


def create_authorization(
    client: str,
    resource: str,
    *,
    ref: str = "ref",
    expires_at: int | None = None,
    resource_type: str = "cidr",
    psk: str = "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM=",
) -> dict[str, Any]:
    resource_obj: dict[str, Any] = {"id": resource, "type": resource_type, "name": "n", "filters": []}
    resource_obj["address"] = "172.20.0.0/16" if resource_type == "cidr" else "*.corp.example"
    return {
        "ref": ref,
        "resource": resource_obj,
        "client": {
            "id": client,
            "public_key": "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
            "preshared_key": psk,
            "ipv4": "100.93.74.51",
            "ipv6": "fd00:2021:1111::f:853b",
        },
        "client_ice_credentials": {"username": "hgwh", "password": "j2fqufatn7xlrrvv6fsvea"},
        "gateway_ice_credentials": {"username": "ejqt", "password": "zfjrrjdkbci42t2axyd45a"},
        "expires_at": expires_at,
    }


class Harness:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 0.0
        self.pushed: list[tuple[str, Any]] = []
        self.book = AuthorizationBook(wall_clock=lambda: self.wall)
        self.loop = Eventloop(self, self.book, lambda: self.mono)

    def push(self, event: str, payload: Any) -> bool:
        self.pushed.append((event, payload))
        return True

    def portal(self, event: str, payload: Any) -> None:
        self.loop.handle_channel_event(PushReceived(event, copy.deepcopy(payload)))

    def resources(self, client: str) -> set[str]:
        access = self.book.clients.get(client)
        return set(access.resources) if access else set()


@pytest.fixture
def h() -> Harness:
    harness = Harness()
    harness.loop.handle_channel_event(ChannelJoined())
    harness.portal("init", INIT)
    harness.pushed.clear()
    return harness


def test_join_announces_classic_ice_capabilities() -> None:
    harness = Harness()
    harness.loop.handle_channel_event(ChannelJoined())
    assert harness.pushed == [("set_snownet_capabilities", {"iceless": False})]
    assert not harness.loop.init_applied


def test_init_applied_and_reset_on_hiccup_and_rejoin(h: Harness) -> None:
    assert h.loop.init_applied
    assert h.book.interface is not None and str(h.book.interface.ipv4) == "100.115.164.78"
    assert list(h.book.relays) == ["relay-1"]
    h.loop.handle_channel_event(LinkHiccuped(HiccupReason.MISSED_HEARTBEATS))
    assert not h.loop.init_applied
    h.loop.handle_channel_event(ChannelJoined())
    assert not h.loop.init_applied
    h.portal("init", INIT)
    assert h.loop.init_applied


def test_create_authorization_is_answered_with_the_same_ref(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", ref="SFMyNTY.abc"))
    assert h.pushed == [("authorization_created", {"ref": "SFMyNTY.abc"})]
    assert h.resources("c1") == {"r1"}
    access = h.book.clients["c1"]
    assert str(access.client.ipv4) == "100.93.74.51" and access.gateway_ice.username == "ejqt"


def test_without_relays_the_answer_is_no_relays(h: Harness) -> None:
    h.portal("relays_presence", {"disconnected_ids": ["relay-1"], "connected": []})
    h.portal("create_authorization", create_authorization("c1", "r1"))
    assert h.pushed == [("no_relays", {})]
    assert h.resources("c1") == set()


def test_second_resource_for_same_connection_keeps_the_first(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", ref="a"))
    h.portal("create_authorization", create_authorization("c1", "r2", ref="b"))
    assert h.resources("c1") == {"r1", "r2"}
    assert [p for _, p in h.pushed] == [{"ref": "a"}, {"ref": "b"}]


def test_new_keys_replace_the_connection_but_keep_authorizations(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1"))
    h.portal(
        "create_authorization", create_authorization("c1", "r2", psk="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    )
    assert h.resources("c1") == {"r1", "r2"}
    assert h.book.clients["c1"].client.preshared_key.startswith("AAAA")


def test_reject_access_removes_and_drops_empty_clients(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1"))
    h.portal("create_authorization", create_authorization("c1", "r2"))
    h.portal("reject_access", {"client_id": "c1", "resource_id": "r1"})
    assert h.resources("c1") == {"r2"}
    h.portal("reject_access", {"client_id": "c1", "resource_id": "r2"})
    assert "c1" not in h.book.clients
    h.portal("reject_access", {"client_id": "nobody", "resource_id": "r2"})  # harmless


def test_init_resync_drops_unlisted_and_refreshes_expiry(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", expires_at=2_000_000))
    h.portal("create_authorization", create_authorization("c1", "r2"))
    h.portal("create_authorization", create_authorization("c2", "r1"))
    init = dict(
        INIT,
        authorizations=[
            {"client_id": "c1", "resource_id": "r1", "expires_at": 3_000_000},
            {"client_id": "c9", "resource_id": "r9", "expires_at": None},
        ],
    )
    h.portal("init", init)
    assert h.resources("c1") == {"r1"}
    assert h.book.clients["c1"].resources["r1"].expires_at == 3_000_000
    assert "c2" not in h.book.clients
    assert "c9" not in h.book.clients  # unknown pairs are only logged


def test_expiry_tick_evicts(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", expires_at=int(h.wall) + 10))
    h.portal("create_authorization", create_authorization("c1", "r2", expires_at=None))
    h.portal("create_authorization", create_authorization("c2", "r1", expires_at=int(h.wall) + 5))
    h.wall += 5
    h.loop.tick()
    assert h.resources("c1") == {"r1", "r2"} and "c2" not in h.book.clients
    h.wall += 5
    h.loop.tick()
    assert h.resources("c1") == {"r2"}


def test_already_expired_authorization_is_evicted_immediately(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", expires_at=int(h.wall) - 1))
    assert "c1" not in h.book.clients


def test_resource_updated_changes_filters_only(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1"))
    h.portal(
        "resource_updated",
        {
            "id": "r1",
            "type": "cidr",
            "address": "10.0.0.0/8",
            "name": "renamed",
            "filters": [{"protocol": "tcp", "port_range_start": 443, "port_range_end": 443}],
        },
    )
    resource = h.book.clients["c1"].resources["r1"].resource
    assert isinstance(resource, CidrResource)
    assert resource.filters == [PortFilter(protocol="tcp", port_range_start=443, port_range_end=443)]
    assert str(resource.address) == "172.20.0.0/16" and resource.name == "n"


def test_resource_updated_cannot_change_type(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1", resource_type="dns"))
    h.portal(
        "resource_updated",
        {"id": "r1", "type": "cidr", "address": "10.0.0.0/8", "name": "x", "filters": [{"protocol": "icmp"}]},
    )
    resource = h.book.clients["c1"].resources["r1"].resource
    assert isinstance(resource, DnsResource) and resource.filters == []


def test_ice_candidates_are_tracked_per_client(h: Harness) -> None:
    h.portal("create_authorization", create_authorization("c1", "r1"))
    candidate = "candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host"
    h.portal("ice_candidates", {"client_id": "c1", "candidates": [candidate, "garbage"]})
    assert h.book.clients["c1"].remote_candidates == {candidate}
    h.portal("invalidate_ice_candidates", {"client_id": "c1", "candidates": [candidate]})
    assert h.book.clients["c1"].remote_candidates == set()


def test_relays_presence_upserts_and_removes(h: Harness) -> None:
    other = dict(RELAY, id="relay-2", addr="[2001:db8::1]:3478")
    h.portal(
        "relays_presence", {"disconnected_ids": ["relay-1"], "connected": [other, dict(other, addr="10.0.0.1:3478")]}
    )
    assert list(h.book.relays) == ["relay-2"] and len(h.book.relays["relay-2"]) == 2


def test_garbage_pushes_are_counted_not_raised(h: Harness) -> None:
    h.portal("create_authorization", {"ref": 5})
    h.portal("brand_new_event", {})
    h.portal("init", "not an object")
    assert h.loop.drops.total() == 3
    assert h.pushed == []
    assert h.loop.init_applied  # a bad init does not undo the good one


def test_obsolete_and_disconnect_events_are_accepted_quietly(h: Harness) -> None:
    h.portal("access_authorization_expiry_updated", {"client_id": "c", "resource_id": "r", "expires_at": 1})
    h.portal("disconnect", {"reason": "other"})
    assert h.loop.drops.total() == 0 and h.pushed == []
