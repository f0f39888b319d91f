"""The load generator's parts: the echo packets it makes and matches, its figures, the soak's plot, and an identity's
portal link against the dev portal on loopback."""

from __future__ import annotations

import asyncio
import struct
import zlib
from pathlib import Path

from scapy.layers.inet import ICMP, IP

from lab.loadgen import (
    LoadClient,
    LoadGenerator,
    SoakSample,
    build_parser,
    echo_request,
    parse_echo_reply,
    percentile,
    plot_samples,
    prometheus_sum,
)
from lab.portal import DevPortal
from tests.unit.test_lab_client import CONFIG

SOURCE, TARGET = bytes([100, 66, 0, 1]), bytes([172, 20, 0, 10])


def test_echo_request_is_what_scapy_builds() -> None:
    packet = echo_request(SOURCE, TARGET, identifier=7, sequence=3)
    parsed = IP(packet)
    assert (parsed.src, parsed.dst, parsed[ICMP].type, parsed[ICMP].id, parsed[ICMP].seq) == (
        "100.66.0.1",
        "172.20.0.10",
        8,
        7,
        3,
    )
    del parsed.chksum, parsed[ICMP].chksum  # scapy recomputes both: they must equal ours
    assert bytes(IP(bytes(parsed))) == packet


def test_only_echo_replies_are_matched() -> None:
    reply = bytes(IP(src="172.20.0.10", dst="100.66.0.1") / ICMP(type=0, id=7, seq=3) / b"x")
    assert parse_echo_reply(reply) == (7, 3)
    assert parse_echo_reply(echo_request(SOURCE, TARGET, 7, 3)) is None  # a request
    assert parse_echo_reply(bytes(IP() / ICMP(type=3, code=13))) is None
    assert parse_echo_reply(b"\x45\x00") is None
    assert parse_echo_reply(bytes(60)) is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0


def test_prometheus_sum_matches_labels_and_counter_suffix() -> None:
    text = (
        "# HELP firezone_dataplane_drops_total Packets dropped.\n"
        'firezone_dataplane_drops_total{layer="node",reason="a"} 3.0\n'
        'firezone_dataplane_drops_total{layer="gateway",reason="b"} 4.0\n'
        "firezone_connections 2\n"
        "firezone_connections_established_total 9\n"
    )
    assert prometheus_sum(text, "firezone_dataplane_drops") == 7.0
    assert prometheus_sum(text, "firezone_dataplane_drops", layer="node") == 3.0
    assert prometheus_sum(text, "firezone_connections") == 2.0
    assert prometheus_sum(text, "firezone_missing") == 0.0


def test_the_plot_is_a_valid_png(tmp_path: Path) -> None:
    samples = [
        SoakSample(seconds=10.0 * i, rss_bytes=(60 + i) * 2**20, open_descriptors=25, connections=float(i), drops=0.0,
                   event="portal restart" if i == 3 else "")
        for i in range(7)
    ]  # fmt: skip
    path = tmp_path / "soak.png"
    plot_samples(samples, str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack_from("!II", data, 16)
    length = struct.unpack_from("!I", data, 33)[0]
    assert data[37:41] == b"IDAT"
    raw = zlib.decompress(data[41 : 41 + length])
    assert len(raw) == height * (1 + width * 3)


async def test_a_connected_identity_rejoins_a_restarted_portal() -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        arguments = ["--portal", portal.url, "--token-prefix", "client-token", "--resource", "res-lan"]
        generator = LoadGenerator(
            build_parser().parse_args([*arguments, "--target", "172.20.0.10", "--bind", "127.0.0.1"])
        )
        identity = LoadClient(0, "client-token", generator)
        identity.established_at = 0.0  # as if its connection were up: losing the portal must not end it
        link = asyncio.create_task(identity.run_portal())
        try:
            await portal.wait_for(kind="sent", event="init", client="client-1")
            restarted_at = portal.next_seq
            await portal.stop()
            await asyncio.sleep(0.3)
            await portal.start()
            await portal.wait_for(since=restarted_at, kind="sent", event="init", client="client-1", timeout=15)
            assert identity.portal_joins == 2 and identity.portal_retries >= 1 and identity.failure is None
        finally:
            generator.stopping = True
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
            identity.close()
