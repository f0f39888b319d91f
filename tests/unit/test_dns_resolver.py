"""The gateway's domain resolver and DNS forwarder against the lab's DNS server, all on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from ipaddress import ip_address
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from agent.dns_forwarder import DnsForwarder
from dataplane.io.resolver import DomainResolver, parse_hosts
from lab import dns_server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        port = int(udp.getsockname()[1])
        tcp.bind(("127.0.0.1", port))
        return port


@pytest.fixture
async def dns_zone(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    zone = tmp_path / "zone.json"
    zone.write_text(json.dumps({"app.corp.example": {"A": ["172.20.0.10"], "AAAA": ["fd99::10"], "TXT": ["hi"]}}))
    port = free_port()
    server = asyncio.ensure_future(dns_server.serve(["127.0.0.1"], port, str(zone)))
    await asyncio.sleep(0.1)
    yield zone, port
    server.cancel()


def resolver_for(tmp_path: Path, port: int, hosts: str = "") -> DomainResolver:
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "hosts").write_text(hosts)
    return DomainResolver(
        resolv_conf=str(tmp_path / "resolv.conf"), hosts=str(tmp_path / "hosts"), port=port, timeout=2.0
    )


async def test_a_and_aaaa_nxdomain_and_changed_records(tmp_path: Path, dns_zone: tuple[Path, int]) -> None:
    zone, port = dns_zone
    resolver = resolver_for(tmp_path, port)
    assert await resolver.resolve("App.Corp.Example.") == [ip_address("172.20.0.10"), ip_address("fd99::10")]
    assert await resolver.resolve("missing.corp.example") == []
    zone.write_text(json.dumps({"app.corp.example": {"A": ["172.20.0.99"]}}))
    await asyncio.sleep(1.1)  # the records' TTL
    assert await resolver.resolve("app.corp.example") == [ip_address("172.20.0.99")]


async def test_hosts_file_first_and_failure_is_none(tmp_path: Path) -> None:
    resolver = resolver_for(tmp_path, free_port(), hosts="10.0.0.5 db.corp.example db # comment\n::1 db\n")
    assert await resolver.resolve("DB.corp.example") == [ip_address("10.0.0.5")]
    assert await resolver.resolve("db") == [ip_address("10.0.0.5"), ip_address("::1")]
    slow = DomainResolver(
        resolv_conf=str(tmp_path / "resolv.conf"), hosts=str(tmp_path / "hosts"), port=free_port(), timeout=0.3
    )
    assert await slow.resolve("nobody.example") is None
    assert parse_hosts("bad line\n1.2.3.4\n") == {}


async def test_forwarder_answers_txt_over_udp_and_tcp_and_servfails_without_upstream(
    dns_zone: tuple[Path, int],
) -> None:
    _, upstream = dns_zone
    port = free_port()
    forwarder = DnsForwarder([ip_address("127.0.0.1")], ["127.0.0.1"], port=port, upstream_port=upstream)
    await forwarder.start()
    try:
        query = dns.message.make_query("app.corp.example", dns.rdatatype.TXT)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            await loop.sock_connect(udp, ("127.0.0.1", port))
            await loop.sock_sendall(udp, query.to_wire())
            reply = dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(udp, 4096), 5))
        assert reply.id == query.id and reply.answer[0].to_text().endswith('"hi"')
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = query.to_wire()
        writer.write(struct.pack("!H", len(wire)) + wire)
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        tcp_reply = dns.message.from_wire(await reader.readexactly(length))
        writer.close()
        assert tcp_reply.answer[0].to_text().endswith('"hi"')
    finally:
        forwarder.close()
    dead = DnsForwarder(
        [ip_address("127.0.0.1")], ["127.0.0.1"], port=free_port(), upstream_port=free_port(), upstream_timeout=0.3
    )
    failed = dns.message.from_wire(await dead.answer(query.to_wire(), tcp=False) or b"")
    assert failed.rcode() == dns.rcode.SERVFAIL and failed.id == query.id
    assert await dead.answer(b"garbage", tcp=False) is None


async def test_a_failing_lookup_counts_as_no_records(tmp_path: Path) -> None:
    """A nameserver that answers SERVFAIL (here the forwarder with no upstream) yields no records, not a failure:
    the reference answers such a domain Active without addresses; only the timeout is a failure."""
    port = free_port()
    servfailing = DnsForwarder(
        [ip_address("127.0.0.1")], ["127.0.0.1"], port=port, upstream_port=free_port(), upstream_timeout=0.2
    )
    await servfailing.start()
    try:
        resolver = resolver_for(tmp_path, port)
        assert await resolver.resolve("app.corp.example") == []
        assert servfailing.servfails == 2  # A and AAAA
    finally:
        servfailing.close()
