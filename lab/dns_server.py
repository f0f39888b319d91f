"""A tiny authoritative DNS server for the lab's resource host (UDP and TCP), built on dnspython.

``python -m lab.dns_server --bind IP [--bind IP6] --port 53 --zone ZONE.json`` answers from a JSON zone file,
``{"name.example": {"A": ["172.20.0.10"], "AAAA": ["fd99::10"], "TXT": ["hello"]}}``, re-read whenever it changes (so
a test can change records while the server runs). Every record has a TTL of :data:`RECORD_TTL` seconds; a name the
zone lacks is NXDOMAIN; a known name without records of the asked type is an empty NOERROR answer. Prints one
``ready`` line once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

RECORD_TTL = 1
MAX_TCP_CONNECTIONS = 32

logger = logging.getLogger(__name__)

Zone = dict[str, dict[str, list[str]]]


class ZoneFile:
    """The zone, re-read when the file's modification time or size changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._zone: Zone = {}

    def current(self) -> Zone:
        try:
            st = os.stat(self.path)
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, encoding="utf-8") as file:
                    raw: dict[str, Any] = json.load(file)
                self._zone = {name.lower().rstrip("."): records for name, records in raw.items()}
                self._stamp = stamp
            except (OSError, ValueError) as exc:
                logger.warning("bad zone file %s: %s", self.path, exc)
        return self._zone


def answer(zone: Zone, wire: bytes) -> bytes | None:
    """The response to one query (None for what is not a query)."""
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    if query.flags & dns.flags.QR or len(query.question) != 1:
        return None
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name = question.name.to_text().lower().rstrip(".")
    records = zone.get(name)
    if records is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()
    type_name = dns.rdatatype.to_text(question.rdtype)
    values = records.get(type_name, [])
    if values:
        rdatas = [
            dns.rdata.from_text(dns.rdataclass.IN, question.rdtype, f'"{v}"' if type_name == "TXT" else v)
            for v in values
        ]
        response.answer.append(dns.rrset.from_rdata_list(question.name, RECORD_TTL, rdatas))
    return response.to_wire()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, zone: ZoneFile) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(self.zone.current(), data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve(binds: Sequence[str], port: int, zone_path: str) -> None:
    zone = ZoneFile(zone_path)
    loop = asyncio.get_running_loop()
    connections = 0

    async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        if connections >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        connections += 1
        try:
            while True:
                (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 10))
                reply = answer(zone.current(), await asyncio.wait_for(reader.readexactly(length), 10))
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            connections -= 1
            writer.close()

    for bind in binds:
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((bind, port))
        await loop.create_datagram_endpoint(lambda: _Udp(zone), sock=udp)
        await asyncio.start_server(handle_tcp, bind, port, family=family, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.dns_server")
    parser.add_argument("--bind", action="append", required=True)
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--zone", required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.bind, args.port, args.zone))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
