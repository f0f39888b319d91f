"""The headless lab client: its parsers and routing table, and its portal conversation against the dev portal.

The data plane (UDP socket, TUN, ``ip`` commands) is stubbed out here; the netns lab world runs the real thing.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import connect

from dataplane import p2p_control
from lab import client as lab_client
from lab.client import (
    FlowGrant,
    HeadlessClient,
    ResourceRoutes,
    build_headless_parser,
    parse_address,
    parse_portal_relays,
    resource_network,
)
from lab.portal import DevPortal

pytestmark = pytest.mark.timeout(30)

GATEWAY_KEY = base64.b64encode(bytes(range(32))).decode()
PSK = base64.b64encode(bytes(32)).decode()
CONFIG: dict[str, Any] = {
    "sites": [{"id": "site-1"}],
    "gateways": [{"token": "gw-token", "site_id": "site-1", "ipv4": "100.64.0.10", "ipv6": "fd00:2021:1111::a"}],
    "resources": [
        {"id": "res-lan", "type": "cidr", "address": "172.20.0.0/16", "site_id": "site-1"},
        {"id": "res-dns", "type": "dns", "address": "*.corp.example", "site_id": "site-1"},
    ],
    "clients": [
        {
            "id": "client-1",
            "token": "client-token",
            "public_key": GATEWAY_KEY,
            "ipv4": "100.93.74.51",
            "ipv6": "fd00:2021:1111::f:853b",
        }
    ],
    "relays": [{"id": "relay-1", "addrs": ["127.0.0.1:3478", "[::1]:3478"]}],
}


def flow_created(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "resource_id": "res-lan",
        "gateway_id": "gw-1",
        "gateway_public_key": GATEWAY_KEY,
        "gateway_ipv4": "100.64.0.10",
        "gateway_ipv6": "fd00:2021:1111::a",
        "preshared_key": PSK,
        "client_ice_credentials": {"username": "abcd", "password": "p" * 22},
        "gateway_ice_credentials": {"username": "efgh", "password": "q" * 22},
        "relays": [],
    }
    payload.update(changes)
    return payload


def ipv4_packet(destination: str) -> bytes:
    return bytes([0x45]) + bytes(15) + ipaddress.IPv4Address(destination).packed


def ipv6_packet(destination: str) -> bytes:
    return bytes([0x60]) + bytes(23) + ipaddress.IPv6Address(destination).packed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1:3478", ("10.0.0.1", 3478)),
        ("[2001:db8::1]:3478", ("2001:db8::1", 3478)),
        ("10.0.0.1", None),
        ("host:3478", None),
        ("10.0.0.1:70000", None),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_address(text) == expected


def test_relays_are_merged_per_id_and_filtered_by_family() -> None:
    entries = [
        {"id": "r1", "type": "turn", "addr": "10.0.0.1:3478", "username": "u", "password": "p"},
        {"id": "r1", "type": "turn", "addr": "[2001:db8::1]:3478", "username": "u", "password": "p"},
        {"id": "r2", "type": "stun", "addr": "10.0.0.2:3478"},
        {"id": "r3", "type": "turn", "addr": "nonsense", "username": "u", "password": "p"},
        "garbage",
    ]
    [relay] = parse_portal_relays(entries, ipv6=False)
    assert (relay.id, relay.addresses, relay.username, relay.password) == ("r1", (("10.0.0.1", 3478),), "u", "p")
    [relay6] = parse_portal_relays(entries, ipv6=True)
    assert relay6.addresses == (("2001:db8::1", 3478),)
    assert parse_portal_relays("nope", ipv6=False) == []


def test_flow_grant_parsing() -> None:
    grant = FlowGrant.parse(flow_created())
    assert grant is not None
    assert grant.gateway_public_key == bytes(range(32)) and grant.preshared_key == bytes(32)
    assert grant.client_credentials.username == "abcd" and grant.gateway_credentials.username == "efgh"
    assert grant.gateway_ipv4 == ipaddress.IPv4Address("100.64.0.10")
    assert FlowGrant.parse(flow_created(preshared_key="c2hvcnQ=")) is None
    assert FlowGrant.parse(flow_created(gateway_ipv4="not an ip")) is None
    assert FlowGrant.parse({"resource_id": "x"}) is None
    assert FlowGrant.parse([1, 2]) is None


def test_resource_networks() -> None:
    assert resource_network({"type": "cidr", "address": "172.20.1.0/16"}) == ipaddress.ip_network("172.20.0.0/16")
    assert resource_network({"type": "dns", "address": "*.corp"}) is None
    assert resource_network({"type": "cidr", "address": "bad"}) is None
    assert resource_network(None) is None


def test_routes_pick_the_longest_prefix() -> None:
    routes = ResourceRoutes()
    routes.add(ipaddress.ip_network("172.20.0.0/16"), "gw-a")
    routes.add(ipaddress.ip_network("172.20.5.0/24"), "gw-b")
    routes.add(ipaddress.ip_network("fd00:2021:1111::a/128"), "gw-a")
    assert routes.lookup(ipv4_packet("172.20.5.9")) == "gw-b"
    assert routes.lookup(ipv4_packet("172.20.9.9")) == "gw-a"
    assert routes.lookup(ipv4_packet("10.0.0.1")) is None
    assert routes.lookup(ipv6_packet("fd00:2021:1111::a")) == "gw-a"
    assert routes.lookup(b"\x45\x00") is None and routes.lookup(b"") is None
    assert routes.lookup(p2p_control.goodbye()) is None
    assert routes.remove_gateway("gw-b") == [ipaddress.ip_network("172.20.5.0/24")]
    assert routes.lookup(ipv4_packet("172.20.5.9")) == "gw-a"


def test_the_headless_parser_needs_portal_and_token() -> None:
    args = build_headless_parser().parse_args(["--portal", "ws://x:1", "--token", "t", "--resource", "a"])
    assert (args.tun, args.resource, args.port, args.bind) == ("tun-firezone", ["a"], 0, None)
    with pytest.raises(SystemExit):
        build_headless_parser().parse_args(["--portal", "ws://x:1"])


@pytest.fixture
def ip_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    commands: list[list[str]] = []
    monkeypatch.setattr(lab_client, "run_ip", lambda arguments, check=True: commands.append(arguments))

    def no_data_plane(self: HeadlessClient, ipv4: Any, ipv6: Any, relays: object) -> None:
        self.local = ("10.2.0.2", 50000)

    monkeypatch.setattr(HeadlessClient, "start_data_plane", no_data_plane)
    yield commands


@pytest.fixture
async def portal() -> AsyncIterator[DevPortal]:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as running:
        yield running


def emitted(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


async def test_the_client_is_brokered_by_the_dev_portal(
    portal: DevPortal, ip_commands: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    gateway_key = base64.b64encode(os.urandom(32)).decode()
    query = urlencode({"external_id": "gw", "public_key": gateway_key})
    headers = {"X-Authorization": "Bearer gw-token"}
    async with connect(f"{portal.url}/gateway/v2/websocket?{query}", additional_headers=headers) as gateway:
        await gateway.send(json.dumps({"topic": "gateway", "event": "phx_join", "payload": {}, "ref": 0}))
        await portal.wait_for(kind="sent", event="init")

        args = build_headless_parser().parse_args(
            ["--portal", portal.url, "--token", "client-token", "--resource", "res-lan"]
        )
        client = HeadlessClient(args)
        portal_task = asyncio.create_task(client.run_portal())
        try:
            authorization = await portal.wait_for(kind="sent", event="create_authorization")
            assert authorization.payload["client"]["public_key"] == client.public_key_b64
            gateway_id = portal.session().gateway_id
            candidate = "candidate:1 1 udp 2130706431 10.1.0.2 52625 typ host"
            # The gateway's candidates come before its confirmation: the client keeps them for later.
            broadcast = {"client_ids": ["client-1"], "candidates": [candidate]}
            await gateway.send(
                json.dumps({"topic": "gateway", "event": "broadcast_ice_candidates", "payload": broadcast, "ref": 1})
            )
            ref = authorization.payload["ref"]
            await gateway.send(
                json.dumps({"topic": "gateway", "event": "authorization_created", "payload": {"ref": ref}, "ref": 2})
            )
            await portal.wait_for(kind="sent", event="flow_created")
            for _ in range(100):
                if gateway_id in client.flows:
                    break
                await asyncio.sleep(0.02)
            assert client.early_candidates == {gateway_id: [candidate]}
            assert client.routes.lookup(ipv4_packet("172.20.3.4")) == gateway_id
            assert client.routes.lookup(ipv4_packet("100.64.0.10")) == gateway_id
            assert ["route", "replace", "172.20.0.0/16", "dev", "tun-firezone"] in ip_commands

            # A resource the site's gateway is not up for: the failure is reported.
            client.request("res-nope")
            await portal.wait_for(kind="sent", event="flow_creation_failed")
            await asyncio.sleep(0.1)
        finally:
            client.stop(0)
            portal_task.cancel()
            await asyncio.gather(portal_task, return_exceptions=True)
            client.close()

    events = emitted(capsys)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["joined", "flow_created"], events
    joined, created = events[0], events[1]
    assert joined["ipv4"] == "100.93.74.51" and joined["resources"] == ["res-dns", "res-lan"]
    assert created["gateway_id"] == gateway_id and created["flow_seconds"] >= 0
    assert {"event": "flow_creation_failed", "resource_id": "res-nope", "reason": "not_found"} in events


async def test_a_refused_token_is_reported(portal: DevPortal, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_headless_parser().parse_args(["--portal", portal.url, "--token", "wrong"])
    client = HeadlessClient(args)
    await client.run_portal()
    assert client.done.is_set() and client.exit_code == 1
    [failed] = emitted(capsys)
    assert failed["event"] == "failed" and "401" in failed["reason"]


class FakeUdp:
    def __init__(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        self.datagrams = datagrams
        self.sent: list[Any] = []

    def recv_many(self) -> list[tuple[bytes, tuple[str, int]]]:
        found, self.datagrams = self.datagrams, []
        return found

    def send_many(self, transmits: list[Any]) -> None:
        self.sent.extend(transmits)


class FakeTun:
    def __init__(self, packets: list[bytes] | None = None) -> None:
        self.packets = packets or []
        self.written: list[bytes] = []

    def poll_recv_many(self, max: int = 100) -> list[bytes]:
        found, self.packets = self.packets[:max], self.packets[max:]
        return found

    def send_many(self, packets: list[bytes]) -> int:
        self.written.extend(packets)
        return len(packets)

    def write_now(self, packets: list[bytes]) -> None:
        self.written.extend(packets)


async def test_decrypted_packets_go_to_the_tun_and_a_goodbye_closes_the_connection(
    ip_commands: list[list[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = HeadlessClient(build_headless_parser().parse_args(["--portal", "ws://x:1", "--token", "t"]))
    client.initialised = True
    client.resources = {"res-lan": {"id": "res-lan", "type": "cidr", "address": "172.20.0.0/16"}}
    client.on_flow_created(flow_created())
    data_packet = ipv4_packet("100.93.74.51")
    fed: list[list[tuple[bytes, tuple[str, int], tuple[str, int]]]] = []

    def decrypt(datagrams: list[tuple[bytes, tuple[str, int], tuple[str, int]]], now: float) -> list[tuple[str, bytes]]:
        fed.append(datagrams)
        return [("gw-1", data_packet), ("gw-1", p2p_control.goodbye())]

    monkeypatch.setattr(client.node, "handle_input_batch", decrypt)
    closed: list[str] = []
    monkeypatch.setattr(client.node, "close_connection", lambda connection_id, now: closed.append(connection_id))
    tun = FakeTun()
    client.tun = tun  # type: ignore[assignment]
    client.local = ("10.2.0.2", 4444)
    client.socket = FakeUdp([(b"one", ("1.2.3.4", 5)), (b"two", ("1.2.3.4", 5))])  # type: ignore[assignment]

    client.on_udp()

    # One call for the whole batch, each datagram with the socket's local address.
    assert fed == [[(b"one", ("1.2.3.4", 5), ("10.2.0.2", 4444)), (b"two", ("1.2.3.4", 5), ("10.2.0.2", 4444))]]
    assert tun.written == [data_packet]
    assert closed == ["gw-1"] and "gw-1" not in client.flows
    assert client.routes.lookup(ipv4_packet("172.20.0.1")) is None
    assert ["route", "del", "172.20.0.0/16", "dev", "tun-firezone"] in ip_commands
    assert {"event": "closed", "gateway_id": "gw-1", "reason": "goodbye"} in emitted(capsys)
    if client.timer is not None:
        client.timer.cancel()


async def test_tun_packets_go_to_the_gateway_whose_prefix_matches(
    ip_commands: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = HeadlessClient(build_headless_parser().parse_args(["--portal", "ws://x:1", "--token", "t"]))
    client.initialised = True
    client.resources = {"res-lan": {"id": "res-lan", "type": "cidr", "address": "172.20.0.0/16"}}
    client.on_flow_created(flow_created())
    sent: list[tuple[str, list[bytes]]] = []
    monkeypatch.setattr(
        client.node, "encapsulate_batch", lambda gateway_id, packets, now: sent.append((gateway_id, list(packets)))
    )
    to_resource, to_gateway, elsewhere = ipv4_packet("172.20.0.10"), ipv4_packet("100.64.0.10"), ipv4_packet("8.8.8.8")
    client.tun = FakeTun([to_resource, elsewhere, to_gateway])  # type: ignore[assignment]
    client.on_tun()
    assert sent == [("gw-1", [to_resource, to_gateway])]  # one tunnel call for the gateway's packets
    assert client.drops.counts == {"no_route": 1}
    if client.timer is not None:
        client.timer.cancel()
