"""DNS resources through the real gateway process (docs/protocol.md §3.4, §3.5).

The lab client assigns proxy IPs for a name of the lab's DNS resource and announces them with ``assigned_ips``; the
gateway resolves the name through the resource host's DNS server (its namespace's resolv.conf points there), answers
``domain_status`` and NATs the proxy IPs to the real address, for TCP and UDP. The forwarder on the gateway's tunnel
address answers what the client does not synthesize (TXT) over UDP and TCP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from typing import Any

import pytest

from lab.world import DNS_NAME, DNS_TXT, GATEWAY_TUNNEL_IPS, HTTP_PORT, RESOURCE_IP, LabWorld

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("turnserver", "nft", "iperf3")), reason="coturn/nft/iperf3 missing"
    ),
]

BLOB_SIZE = 64 * 1024
SECOND_RESOURCE_IP = "172.20.0.11"

# Run inside a namespace: one DNS query with dnspython; prints {"answer": [...], "source": ..., "rcode": ...}.
_QUERY = """
import json, sys
import dns.message, dns.query, dns.rdatatype
name, rdtype, server, port, transport = sys.argv[1:6]
query = dns.message.make_query(name, dns.rdatatype.from_text(rdtype))
try:
    if transport == "tcp":
        reply = dns.query.tcp(query, server, port=int(port), timeout=5)
    else:
        reply = dns.query.udp(query, server, port=int(port), timeout=5)
except Exception as exc:
    print(json.dumps({"error": repr(exc)}))
    sys.exit(0)
print(json.dumps({"rcode": reply.rcode(), "answer": [r.to_text() for rrset in reply.answer for r in rrset]}))
"""


async def dns_query(
    world: LabWorld, ns: str, name: str, rdtype: str, server: str, port: int, transport: str
) -> dict[str, Any]:
    result = await world.exec_in(ns, [sys.executable, "-c", _QUERY, name, rdtype, server, str(port), transport])
    found = result.json()
    return found if isinstance(found, dict) else {"error": result.stderr[-300:]}


async def resolve(client: Any, resource_id: str, domain: str) -> dict[str, Any]:
    since = len(client.events)
    client.send({"resolve": domain, "resource": resource_id})
    event: dict[str, Any] = await client.wait_event(
        "domain_status", timeout=20, since=since, where=lambda e: e.get("domain") == domain
    )
    return event


async def test_dns_resource_through_the_gateway() -> None:
    async with LabWorld(resources=("lan-web", "dns"), clients=1, relays=1, blob_size=BLOB_SIZE) as world:
        dns_id = world.resource_id("dns")
        await world.wait_gateway_joined(timeout=20)
        client = await world.start_client(resources=[dns_id])
        flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=30)
        assert flow["event"] == "flow_created", flow
        await client.wait_event("established", timeout=30)

        # assigned_ips for a name the resource host's DNS server answers → Active.
        status = await resolve(client, dns_id, DNS_NAME)
        assert status["status"] == "Active", status
        proxy4 = status["proxy_ips"][0]

        # TCP through the proxy IP reaches the real address; by name through the client's hosts file too.
        fetched = await world.http_get_sha256("cl", f"http://{proxy4}:{HTTP_PORT}/blob")
        assert fetched.get("matches") is True, fetched
        world.write_netns_etc("cl", "hosts", f"{proxy4} {DNS_NAME}\n")
        by_name = await world.http_get_sha256("cl", f"http://{DNS_NAME}:{HTTP_PORT}/blob")
        assert by_name.get("matches") is True, by_name

        # UDP: a DNS query to the resource host through the proxy IP; dnspython insists the answer comes from the
        # address it asked (the proxy IP), so the reply was translated back.
        udp = await dns_query(world, "cl", DNS_NAME, "A", proxy4, 53, "udp")
        assert udp.get("answer") == [RESOURCE_IP], udp

        # The forwarder on the gateway's tunnel address answers TXT over UDP and TCP.
        for transport in ("udp", "tcp"):
            txt = await dns_query(world, "cl", DNS_NAME, "TXT", GATEWAY_TUNNEL_IPS[0], 53535, transport)
            assert txt.get("answer") == [json.dumps(DNS_TXT)], (transport, txt)

        # A name outside the resource's pattern → Inactive.
        refused = await resolve(client, dns_id, "app.other.example")
        assert refused["status"] == "Inactive", refused

        # Records that change are picked up on the next assigned_ips: the name moves to a second address of the
        # resource host where nothing listens on port 80, so a new connection is refused there.
        interface = world.ns["res"].exec(["ip", "-o", "-4", "addr", "show", "to", RESOURCE_IP]).split()[1]
        world.ns["res"].exec(["ip", "addr", "add", f"{SECOND_RESOURCE_IP}/24", "dev", interface])
        world.set_dns_records(DNS_NAME, a=[SECOND_RESOURCE_IP])
        await asyncio.sleep(1.5)  # the records' TTL, so the gateway's cache lets go of the old answer
        assert (await resolve(client, dns_id, DNS_NAME))["status"] == "Active"
        probe = await world.probe_tcp("cl", proxy4, HTTP_PORT)
        assert probe["outcome"] == "refused", probe
