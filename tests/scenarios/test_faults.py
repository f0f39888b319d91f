"""Fault scenarios: the real gateway, the dev portal, coturn and lab clients in namespaces, under loss, restarts and
failures (docs/protocol.md §7). Each reports its setup or recovery time on a ``SCENARIO`` line (``pytest -s``)
and fails on any WARN/ERROR line in the gateway's log that it did not provoke on purpose."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest

from lab.world import RELAY_IPS, RESOURCE_IP, ClientProcess, LabWorld, NatMode
from tests.scenarios.helpers import (
    SCENARIO_MARKS,
    Pinger,
    assert_no_unprovoked_problems,
    connect_client,
    metric,
    report,
)

pytestmark = [*SCENARIO_MARKS, pytest.mark.timeout(120)]

GATEWAY_PORT = 52625
"""The gateway's WireGuard/ICE UDP port (its default)."""

BLOB_SIZE = 2 * 1024 * 1024
LOSS_PERCENT = 5.0


@pytest.mark.parametrize(
    ("name", "nat", "loss_percent", "path"),
    [
        # Port-preserving NATs both sides: hole punching gives a direct path.
        ("direct_download", "masquerade", 0.0, "direct"),
        # Symmetric NATs on both sides leave only the relays.
        ("relayed_download", "masquerade random", 0.0, "relayed"),
        # The same, with 5 % of the client link's datagrams vanishing each way.
        ("relayed_download_5pct_loss", "masquerade random", LOSS_PERCENT, "relayed"),
    ],
)
async def test_download(name: str, nat: NatMode, loss_percent: float, path: str) -> None:
    """A 2 MiB download through the gateway arrives intact over the path the NATs allow."""
    async with LabWorld(gateway_nat=nat, client_nat=nat, relays=2, blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        if loss_percent:
            world.set_loss("natc", loss_percent)
        client, established = await connect_client(world)
        assert client.path == path, client.events
        fetched = await world.http_get_sha256("cl", timeout=60)
        assert fetched.get("matches") is True, fetched
        lost = world.lost_datagrams("natc") if loss_percent else 0
        if loss_percent:
            assert lost > 0, "the loss rule dropped nothing"
        report(
            name,
            lost_datagrams=str(lost),
            setup_seconds=established["wall_setup_seconds"],
            download_seconds=fetched["seconds"],
            mbit_per_second=BLOB_SIZE * 8 / fetched["seconds"] / 1e6,
        )
        assert_no_unprovoked_problems(world)


SHAPED_MBIT = 4.0
"""The resource host's send rate in the mid-download scenarios: a 2 MiB download then lasts about 4 s."""


async def test_portal_restart_mid_download() -> None:
    """The portal stops (every gateway and client socket closed with 1001) and listens again 1 s later while a
    download and a ping run: both go on through the tunnel, the download finishes intact, the gateway and the client
    rejoin, and nobody asks for the flow again (the client's connection and authorization stay as they were)."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        client, _ = await connect_client(world)
        world.shape_resource(SHAPED_MBIT)
        pinger = await Pinger(world).start()
        portal = world.need_portal()
        try:
            download = asyncio.ensure_future(world.http_get_sha256("cl", timeout=60))
            await pinger.wait_replies(10)
            events_before, seq_before = len(client.events), portal.next_seq
            restarted_at = time.time()
            started = time.monotonic()
            await world.restart_portal(downtime=1.0)
            rejoined = await world.wait_gateway_joined(timeout=30, since=seq_before)
            gateway_rejoin_seconds = time.monotonic() - started
            client_rejoined = await client.wait_event("portal_rejoined", timeout=30, since=events_before)
            client_rejoin_seconds = time.monotonic() - started
            assert not download.done(), "the download ended before the portal came back: make it longer"
            replies_before = len(pinger.replies)
            await pinger.wait_replies(5)  # the ping still goes on after both rejoined
            fetched = await download
        finally:
            await pinger.stop()
        assert fetched.get("matches") is True, fetched
        assert client.running, client.events[events_before:]
        # The new init carries the brokered authorization, so the gateway's re-sync keeps it.
        listed = {(a["client_id"], a["resource_id"]) for a in rejoined.payload["authorizations"]}
        assert (world.lab_clients[0].id, world.resource_id("lan")) in listed, listed
        later = [e["event"] for e in client.events[events_before:]]
        assert "portal_lost" in later, later
        assert not {"flow_created", "closed", "failed", "established"} & set(later), later
        asked_again = [
            e
            for e in portal.events(since=seq_before)
            if e.event in ("authorize_flow", "create_authorization", "create_flow")
        ]
        assert not asked_again, asked_again
        report(
            "portal_restart_mid_download",
            gateway_rejoin_seconds=gateway_rejoin_seconds,
            client_rejoin_seconds=client_rejoin_seconds,
            client_down_seconds=float(client_rejoined["down_seconds"]),
            ping_gap_seconds=pinger.largest_gap(after=restarted_at),
            pings_during_restart=str(len([t for t in pinger.replies[:replies_before] if t >= restarted_at])),
            download_seconds=fetched["seconds"],
        )
        assert_no_unprovoked_problems(world, allowed=("portal link down",))


def on_path(event: dict[str, Any]) -> set[str]:
    """The addresses an ``established``/``path_changed`` event's pair uses."""
    return {event["local"][0], event["remote"][0]}


def relay_in_use(client: ClientProcess) -> int:
    """The index of the relay the client's current path goes through (its own relayed candidate, else the
    gateway's)."""
    current = [e for e in client.events if e.get("event") in ("established", "path_changed")][-1]
    for address in (current["local"][0], current["remote"][0]):
        if address in RELAY_IPS:
            return RELAY_IPS.index(address)
    raise AssertionError(f"no relay address in {current}")


@pytest.mark.parametrize(
    "fault",
    ["killed_announced", pytest.param("killed_silent", marks=pytest.mark.full_suite), "presence_removed"],
)
async def test_relay_in_use_goes_away(fault: str) -> None:
    """The relay carrying a relayed connection goes away: the connection moves to the other relay without a new
    WireGuard handshake (the session keys stay valid); the gap in a 20 Hz ping is the recovery time.

    ``killed_announced``: coturn dies and the portal pushes ``relays_presence`` right away, as the real portal does
    when the relay's portal socket dies with it. ``killed_silent``: nobody tells the peers; the client's ICE agent
    notices that the selected pair went silent, probes every pair and nominates one that answers, or offers another
    relay's candidates if none does (a few seconds, not RFC 7675's 30 s consent timeout; the 20 s limit below tells
    the two apart). ``presence_removed``: coturn lives on, but the portal's ``relays_presence`` says it left."""
    async with LabWorld(
        gateway_nat="masquerade random", client_nat="masquerade random", relays=2, blob_size=BLOB_SIZE
    ) as world:
        await world.wait_gateway_joined(timeout=20)
        client, _ = await connect_client(world)
        assert client.path == "relayed", client.events
        pinger = await Pinger(world).start()
        try:
            await pinger.wait_replies(5)
            handshakes = metric(await world.gateway_metrics(), "firezone_handshakes")
            assert handshakes >= 1, "the gateway's handshake counter is missing"
            events_before = len(client.events)
            gone = relay_in_use(client)
            gone_at = time.time()
            if fault == "presence_removed":
                await world.announce_relays_gone([gone])
            else:
                await world.kill_relay(gone, announce=fault == "killed_announced")
            await client.wait_event(
                "path_changed", since=events_before, timeout=20, where=lambda e: RELAY_IPS[gone] not in on_path(e)
            )
            moved_seconds = time.time() - gone_at
            await pinger.wait_replies(20, timeout=30)
        finally:
            await pinger.stop()
        after = metric(await world.gateway_metrics(), "firezone_handshakes")
        fetched = await world.http_get_sha256("cl", timeout=30)
        assert fetched.get("matches") is True, fetched
        report(
            f"relay_{fault}",
            relay=RELAY_IPS[gone],
            moved_seconds=moved_seconds,
            ping_gap_seconds=pinger.largest_gap(after=gone_at),
            new_handshakes=str(int(after - handshakes)),
        )
        assert after == handshakes, "a new WireGuard handshake although the keys were still valid"
        assert_no_unprovoked_problems(world)


async def test_gateway_restarted() -> None:
    """SIGTERM, then a new gateway process with the same id (and a new key): the client hears goodbye, asks again,
    and traffic resumes over a new connection; the gap is from the SIGTERM to the first ping reply after it."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        client, _ = await connect_client(world)
        pinger = await Pinger(world).start()
        portal = world.need_portal()
        try:
            await pinger.wait_replies(5)
            events_before, seq_before = len(client.events), portal.next_seq
            stopped_at = time.time()
            await world.restart_gateway()
            await client.wait_event("closed", since=events_before, timeout=15)
            await world.wait_gateway_joined(timeout=30, since=seq_before)
            client.request(world.resource_id("lan"))
            await client.wait_event("established", since=events_before, timeout=30)
            await pinger.wait_replies(5, timeout=20)
        finally:
            await pinger.stop()
        fetched = await world.http_get_sha256("cl", timeout=30)
        assert fetched.get("matches") is True, fetched
        report("gateway_restarted", ping_gap_seconds=pinger.largest_gap(after=stopped_at))
        assert_no_unprovoked_problems(world)


async def test_two_gateways_one_killed() -> None:
    """Two gateways serve the site; the one serving the client stops (SIGTERM: it says goodbye). The client asks
    again and the portal brokers the other gateway; the gap is from the stop to the first ping reply after it."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", gateways=2, blob_size=BLOB_SIZE) as world:
        await world.launch_gateway(1)
        await world.wait_gateway_joined(timeout=20, index=0)
        await world.wait_gateway_joined(timeout=20, index=1)
        client, _ = await connect_client(world)
        serving_id = client.of("flow_created")[-1]["gateway_id"]
        external_ids = {s.gateway_id: s.external_id for s in world.need_portal().sessions}
        serving = 0 if external_ids[serving_id] == world.need_gateway(0).firezone_id else 1
        other = 1 - serving
        pinger = await Pinger(world).start()
        try:
            await pinger.wait_replies(5)
            events_before = len(client.events)
            stopped_at = time.time()
            await world.stop_gateway(serving)
            await client.wait_event("closed", since=events_before, timeout=15)
            client.request(world.resource_id("lan"))
            flow = await client.wait_event("flow_created", since=events_before, timeout=20)
            assert flow["gateway_id"] != serving_id, flow
            await client.wait_event("established", since=events_before, timeout=20)
            await pinger.wait_replies(5, timeout=20)
        finally:
            await pinger.stop()
        fetched = await world.http_get_sha256("cl", timeout=30)
        assert fetched.get("matches") is True, fetched
        report(
            "two_gateways_one_stopped",
            ping_gap_seconds=pinger.largest_gap(after=stopped_at),
            served_by=f"gateway {other}",
        )
        assert_no_unprovoked_problems(world, gateways=2)


@pytest.mark.full_suite
async def test_client_roams() -> None:
    """The client's NAT forgets its mappings mid-flow (each UDP flow reappears from a new port): traffic resumes
    over the same session, without a new WireGuard handshake; the gap is from the rebinding to the first ping reply
    after it. The lab client does not know it moved: its ICE agent notices that the selected pair went silent and
    nominates the pair that still answers (its socket to the gateway's relayed candidate, which the gateway sees from
    a new, peer-reflexive address) within seconds; 20 s (less than RFC 7675's 30 s consent timeout) is the limit."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        client, _ = await connect_client(world)
        pinger = await Pinger(world).start()
        try:
            await pinger.wait_replies(5)
            handshakes = metric(await world.gateway_metrics(), "firezone_handshakes")
            assert handshakes >= 1, "the gateway's handshake counter is missing"
            events_before = len(client.events)
            moved_at = time.time()
            world.rebind_nat("natc")
            await pinger.wait_replies(20, timeout=20)
        finally:
            await pinger.stop()
        after = metric(await world.gateway_metrics(), "firezone_handshakes")
        fetched = await world.http_get_sha256("cl", timeout=30)
        assert fetched.get("matches") is True, fetched
        report(
            "client_roams",
            ping_gap_seconds=pinger.largest_gap(after=moved_at),
            new_handshakes=str(int(after - handshakes)),
            client_events=",".join(e["event"] for e in client.events[events_before:]),
        )
        assert not {"closed", "failed"} & {e["event"] for e in client.events[events_before:]}, client.events
        assert after == handshakes, "a new WireGuard handshake although the session was kept"
        assert_no_unprovoked_problems(world)


FLOOD_COUNT = 10_000
FLOOD_RATE = 2_000.0


async def test_handshake_flood_during_download() -> None:
    """Forged WireGuard handshake initiations (valid MAC1) hit the gateway's port at 2,000/s while a download runs:
    the download finishes intact, and a client that connects during the flood still gets through (the gateway
    answers the flood with cookie replies under load)."""
    async with LabWorld(gateway_nat="none", client_nat="masquerade", clients=2, blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        await connect_client(world)
        world.shape_resource(SHAPED_MBIT)
        gateway_key = world.need_portal().session().public_key
        flood_argv = [
            sys.executable, "-m", "lab.wg", "flood", f"10.1.0.2:{GATEWAY_PORT}", gateway_key,
            *(f"--source=172.31.1.254:{40000 + n}" for n in range(8)),
            f"--count={FLOOD_COUNT}", f"--rate={FLOOD_RATE:g}",
        ]  # fmt: skip
        download = asyncio.ensure_future(world.http_get_sha256("cl", timeout=60))
        flood = asyncio.ensure_future(world.exec_in("wan", flood_argv, timeout=60))
        started = time.monotonic()
        second, established = await connect_client(world, index=1)
        second_setup = time.monotonic() - started
        flood_running = not flood.done()
        fetched = await download
        flooded = await flood
        result = flooded.json()
        assert fetched.get("matches") is True, fetched
        assert (await world.ping("cl2", RESOURCE_IP, count=2)).returncode == 0
        # Initiations from an address no ICE pair knows never reach WireGuard: one lookup, one counted drop.
        dropped = metric(await world.gateway_metrics(), "firezone_dataplane_drops", reason="wireguard_no_connection")
        report(
            "handshake_flood",
            flood_dropped_unmatched=str(int(dropped)),
            download_seconds=fetched["seconds"],
            second_client_setup_seconds=second_setup,
            flood_running_at_setup=str(flood_running),
            flood=json.dumps(result),
        )
        assert flood_running, "the flood ended before the second client connected: make it longer"
        assert isinstance(result, dict) and result["sent"] == FLOOD_COUNT, flooded
        assert dropped >= 0.9 * FLOOD_COUNT, f"only {dropped} of the flood's datagrams reached the gateway"
        assert_no_unprovoked_problems(world)


@pytest.mark.parametrize("ending", ["reject_access", "expiry"])
async def test_access_ends_mid_flow(ending: str) -> None:
    """The portal withdraws the client's only resource mid-flow (``reject_access``), or shortens its authorization
    through a new ``init`` so that it expires two seconds later: the gateway stops forwarding and closes the
    connection with a goodbye. The time is from the portal's push to the client's ``closed`` event."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", blob_size=BLOB_SIZE) as world:
        await world.wait_gateway_joined(timeout=20)
        client, _ = await connect_client(world)
        portal = world.need_portal()
        client_id, resource_id = world.lab_clients[0].id, world.resource_id("lan")
        # The very first packets after "established" may still be dropped (connection_not_ready): any reply will do.
        assert (await world.ping("cl", RESOURCE_IP, count=3)).returncode == 0
        events_before = len(client.events)
        pushed_at = time.monotonic()
        if ending == "reject_access":
            await portal.reject_access(client_id, resource_id)
        else:
            (flow,) = portal.flows(client=client_id, state="created")
            assert flow.authorization is not None
            flow.authorization["expires_at"] = int(time.time()) + 2
            await portal.push_init()
        closed = await client.wait_event("closed", since=events_before, timeout=20)
        closed_seconds = time.monotonic() - pushed_at
        assert closed["reason"] == "goodbye", closed
        assert (await world.ping("cl", RESOURCE_IP, count=1, wait=1.0)).returncode != 0
        report(f"access_ends_{ending}", closed_seconds=closed_seconds)
        assert_no_unprovoked_problems(world)


FIRST_PACKET_ATTEMPTS = 5


async def test_first_packet_after_established_is_answered() -> None:
    """A client that sends one ping the moment its connection is established gets the reply, every time: the
    gateway never drops the answer to a packet it has just accepted from that client. Five fresh connections (a new
    client key each time, so the gateway replaces the connection)."""
    async with LabWorld(gateway_nat="masquerade", client_nat="masquerade", blob_size=4096) as world:
        await world.wait_gateway_joined(timeout=20)
        unanswered = 0
        for _ in range(FIRST_PACKET_ATTEMPTS):
            client, _ = await connect_client(world)
            if (await world.ping("cl", RESOURCE_IP, count=1, wait=2.0)).returncode != 0:
                unanswered += 1
            await client.quit()
            world.client_processes.remove(client)
        metrics = await world.gateway_metrics()
        not_ready = metric(metrics, "firezone_dataplane_drops", reason="connection_not_ready")
        report("first_packet", unanswered=f"{unanswered}/{FIRST_PACKET_ATTEMPTS}", not_ready_drops=not_ready)
        assert unanswered == 0 and not_ready == 0, f"{unanswered} first pings unanswered, {not_ready} drops"
