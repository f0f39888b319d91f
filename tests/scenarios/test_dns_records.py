"""Scenario: a DNS resource whose records change while traffic flows (docs/protocol.md §3.4).

The real gateway, the dev portal and a lab client in namespaces. The client reaches ``app.lab.example`` (the lab's DNS
resource) through a proxy IP; the resource host's DNS server answers the resource host's address (TTL 1 s). Mid-flow
the name moves to a second address of the resource host, where a second HTTP server serves a different blob.

What the gateway does, as the reference does: it resolves a domain only when the client sends ``assigned_ips`` (the
client sends it on every local DNS query of the name), through a resolver whose cache honours the records' TTL. A
resolution that returns other addresses re-points the proxy IPs for *new* NAT sessions only; a session (keyed by the
client's source port or echo id and the proxy IP) keeps the address it was created with until it ends. So:

* the download and the ping that were running when the records changed go on to the old address, uninterrupted;
* a new connection reaches the new address once the client queried the name again after the gateway's cached answer
  expired (the TTL); the time from the change to the first new connection that reached the new address is reported.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from lab.resource import blob_sha256
from lab.world import DNS_NAME, HTTP_PORT, RESOURCE_IP, ClientProcess, LabWorld
from tests.scenarios.helpers import SCENARIO_MARKS, Pinger, assert_no_unprovoked_problems, report

pytestmark = [*SCENARIO_MARKS, pytest.mark.timeout(90)]

NEW_RESOURCE_IP = "172.20.0.11"
"""The second address of the resource host the name moves to."""
OLD_BLOB_SIZE = 2 * 1024 * 1024
NEW_BLOB_SIZE = 4096
SHAPED_MBIT = 4.0
"""The resource host's send rate: the 2 MiB download lasts about 4 s, long enough to span the change."""
SWITCH_TIMEOUT = 15.0
"""How long new connections may keep reaching the old address after the change (a few TTLs is plenty)."""
COUNTERS_TABLE = "dns_records_scenario"
_NAT_SET_UP = re.compile(r"DNS resource NAT set up .*addresses=(?P<addresses>\[[^\]]*\])")


def served_digest(size: int) -> str:
    """The SHA-256 of what an HTTP server of the lab answers for ``/blob.sha256`` when it serves ``size`` bytes: it
    tells the two servers apart."""
    return hashlib.sha256(blob_sha256(size).encode() + b"\n").hexdigest()


async def query_name(client: ClientProcess, resource_id: str) -> dict[str, Any]:
    """An application's DNS query of the name: the client (re)sends ``assigned_ips``, the gateway resolves and answers
    ``domain_status``."""
    since = len(client.events)
    client.send({"resolve": DNS_NAME, "resource": resource_id})
    status: dict[str, Any] = await client.wait_event(
        "domain_status", timeout=20, since=since, where=lambda e: e.get("domain") == DNS_NAME
    )
    return status


def count_echo_requests(world: LabWorld) -> None:
    """nftables counters in the resource host: ICMP echo requests arriving for each of its two addresses."""
    res = world.ns["res"]
    res.exec(["nft", "add", "table", "ip", COUNTERS_TABLE])
    res.exec(["nft", "add", "chain", "ip", COUNTERS_TABLE, "in", "{ type filter hook input priority 0 ; }"])
    for address in (RESOURCE_IP, NEW_RESOURCE_IP):
        res.exec(["nft", "add", "rule", "ip", COUNTERS_TABLE, "in", "ip", "daddr", address, "icmp", "type",
                  "echo-request", "counter"])  # fmt: skip


def echo_requests(world: LabWorld) -> dict[str, int]:
    listing = json.loads(world.ns["res"].exec(["nft", "-j", "list", "table", "ip", COUNTERS_TABLE]))
    found: dict[str, int] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        address = next(e["match"]["right"] for e in rule["expr"] if "match" in e)
        found[address] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return found


async def start_second_server(world: LabWorld) -> None:
    """The resource host's second address, with its own HTTP server (a different blob)."""
    res = world.ns["res"]
    interface = res.exec(["ip", "-o", "-4", "addr", "show", "to", RESOURCE_IP]).split()[1]
    res.exec(["ip", "addr", "add", f"{NEW_RESOURCE_IP}/24", "dev", interface])
    server = res.popen(
        [sys.executable, "-m", "lab.resource", "serve", "--bind",
         NEW_RESOURCE_IP, "--port", str(HTTP_PORT), "--size", str(NEW_BLOB_SIZE)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert server.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 10)
    assert line.strip() == b"ready", line


def nat_setups(world: LabWorld) -> list[list[str]]:
    """The addresses of every ``DNS resource NAT set up`` the gateway logged, in order."""
    return [
        ast.literal_eval(found["addresses"])
        for line in world.need_gateway().output().splitlines()
        if (found := _NAT_SET_UP.search(line)) is not None
    ]


async def test_dns_records_change_mid_flow() -> None:
    async with LabWorld(resources=("dns",), blob_size=OLD_BLOB_SIZE) as world:
        resource_id = world.resource_id("dns")
        await world.wait_gateway_joined(timeout=20)
        await start_second_server(world)
        count_echo_requests(world)
        client = await world.start_client(resources=[resource_id])
        flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=30)
        if flow["event"] != "flow_created":
            portal_log = [(e.kind, e.event, e.conn_id, e.detail) for e in world.need_portal().events()]
            raise AssertionError(f"{flow}\nportal: {portal_log}\ngateway: {world.need_gateway().output()[-3000:]}")
        await client.wait_event("established", timeout=30)

        status = await query_name(client, resource_id)
        assert status["status"] == "Active", status
        proxy4 = status["proxy_ips"][0]
        probe_url = f"http://{proxy4}:{HTTP_PORT}/blob.sha256"
        old_server, new_server = served_digest(OLD_BLOB_SIZE), served_digest(NEW_BLOB_SIZE)
        before = await world.http_get_sha256("cl", probe_url)
        assert before.get("sha256") == old_server, before

        world.shape_resource(SHAPED_MBIT)
        pinger = await Pinger(world, host=proxy4).start()
        try:
            await pinger.wait_replies(5)
            download = asyncio.ensure_future(world.http_get_sha256("cl", f"http://{proxy4}:{HTTP_PORT}/blob"))
            await asyncio.sleep(0.5)  # the download's connection is set up and under way
            # A query just before the change: the gateway's resolver caches the old answer for its full TTL.
            assert (await query_name(client, resource_id))["status"] == "Active"
            setups_before = len(nat_setups(world))
            changed_at_epoch, changed_at = time.time(), time.monotonic()
            world.set_dns_records(DNS_NAME, a=[NEW_RESOURCE_IP])

            # The application keeps looking the name up and opening new connections until one reaches the new address.
            queries, switched_after = 0, None
            while time.monotonic() - changed_at < SWITCH_TIMEOUT:
                queries += 1
                assert (await query_name(client, resource_id))["status"] == "Active"
                probe_started = time.monotonic()
                probe = await world.http_get_sha256("cl", probe_url)
                assert probe.get("sha256") in (old_server, new_server), probe
                if probe["sha256"] == new_server:
                    switched_after = probe_started - changed_at
                    break
            assert switched_after is not None, f"new connections still reach {RESOURCE_IP} after {SWITCH_TIMEOUT} s"
            download_running = not download.done()
            fetched = await download
            await pinger.wait_replies(10)
            echo_after = echo_requests(world)
        finally:
            await pinger.stop()
        world.shape_resource(None)

        assert fetched.get("matches") is True, fetched
        assert download_running, "the download ended before new connections moved: make it longer"
        # The ping's NAT session (one echo id) still goes to the old address; nothing ever pinged the new one.
        assert echo_after.get(NEW_RESOURCE_IP) == 0, echo_after
        assert echo_after.get(RESOURCE_IP, 0) > 0, echo_after
        setups = nat_setups(world)[setups_before:]
        assert setups and setups[-1] == [NEW_RESOURCE_IP], setups
        report(
            "dns_records_change",
            new_connections_after_seconds=switched_after,
            queries=str(queries),
            resolutions_after_change=",".join("+".join(s) for s in setups),
            download_intact=str(fetched.get("matches")),
            ping_gap_seconds=pinger.largest_gap(after=changed_at_epoch),
            echo_requests=json.dumps(echo_after),
        )
        assert_no_unprovoked_problems(world)
