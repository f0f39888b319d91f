"""The load generator's parts: the echo packets it makes and matches, its figures, the soak's plot, and an identity's
portal link against the dev portal on loopback."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from scapy.layers.inet import ICMP, IP

from dataplane.node import DropReason
from lab.client import FlowGrant
from lab.load_run import HANDSHAKE_DROP_REASONS, combine_setup
from lab.loadgen import (
    READY_PING_INTERVAL,
    IdentityTimes,
    LoadClient,
    LoadGenerator,
    LoadSummary,
    SoakSample,
    _Grant,
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


def identity_for_test(portal_url: str = "ws://127.0.0.1:9") -> tuple[LoadGenerator, LoadClient]:
    """An identity whose portal link is never opened: its data-plane bookkeeping is driven by hand."""
    arguments = ["--portal", portal_url, "--token-prefix", "t", "--resource", "r", "--target", "172.20.0.10"]
    generator = LoadGenerator(build_parser().parse_args([*arguments, "--bind", "127.0.0.1"]))
    identity = LoadClient(0, "t0", generator)
    generator.clients, generator.unsettled = [identity], 1
    identity.tunnel_ipv4 = SOURCE
    identity.grant = _Grant(cast(FlowGrant, SimpleNamespace(gateway_id="gateway")))
    return generator, identity


def reply_to(identity: LoadClient, sequence: int) -> bytes:
    return bytes(IP(src="172.20.0.10", dst="100.66.0.1") / ICMP(type=0, id=identity.identifier, seq=sequence) / b"x")


async def test_an_identity_is_ready_at_its_first_echo_reply_not_at_ice() -> None:
    generator, identity = identity_for_test()
    try:
        identity.requested_at = identity.now() - 2.0
        identity.on_established()  # ICE up: the first ping goes out, and is asked again each second until answered
        assert identity.pings_sent == 1 and identity.ready_at is None and generator.unsettled == 1
        assert identity.ping_timer is not None
        assert identity.ping_timer.when() - identity.now() <= READY_PING_INTERVAL
        identity.on_packet(reply_to(identity, 9), identity.now())  # a sequence never sent: not an answer
        assert identity.ready_at is None
        identity.fail("portal: LinkHiccuped")  # ICE is up: the portal's loss does not end it
        assert identity.failure is None
        identity.on_packet(reply_to(identity, 0), identity.now())
        assert identity.ready_at is not None and generator.unsettled == 0 and len(identity.rtts) == 1
        assert identity.ping_timer is None  # answered: no more bring-up pings
        identity.fail_tunnel("connection closed")  # after ready: it stays connected and settles only once
        assert identity.failure is None and generator.unsettled == 0
        times = identity.times()
        assert times.ice_seconds is not None and times.ready_seconds is not None
        assert 2.0 <= times.ice_seconds <= times.ready_seconds
    finally:
        identity.close()


async def test_a_tunnel_failure_before_the_first_reply_settles_the_identity_as_failed() -> None:
    generator, identity = identity_for_test()
    try:
        identity.requested_at = identity.now()
        identity.on_established()
        identity.fail_tunnel("connection failed: all candidate pairs failed")
        assert identity.failure is not None and generator.unsettled == 0
        assert identity.times().ready_seconds is None and identity.times().ice_seconds is not None
        pending = identity.ping_timer
        assert pending is not None
        pending.cancel()
        identity.send_ping()  # the bring-up ping that was due: a failed identity sends no more
        assert identity.pings_sent == 1 and identity.ping_timer is None
    finally:
        identity.close()


def test_the_summary_counts_connected_by_answered_ping() -> None:
    summary = LoadSummary(
        clients=3,
        identities=[IdentityTimes(0.5, 0.7), IdentityTimes(0.6, None), IdentityTimes(None, None)],
        bring_up_seconds=None,
        pings_sent=4,
        pings_answered=1,
        rtt_seconds=[0.2],
        failures=Counter({"no echo reply": 1, "not established in time": 1}),
        portal_retries=0,
    )
    figures = summary.to_json()
    assert (figures["connected"], figures["ice_connected"]) == (1, 2)
    assert figures["ice_seconds"] == {"p50": 0.5, "p99": 0.6, "max": 0.6}
    assert figures["ready_seconds"] == {"p50": 0.7, "p99": 0.7, "max": 0.7}
    assert figures["identities"] == [[0.5, 0.7], [0.6, None], [None, None]]


def test_load_run_combines_the_processes_setup_figures() -> None:
    def process(
        identities: list[list[float | None]], started_at: float, last_ready_at: float | None
    ) -> dict[str, object]:
        ready = sum(1 for _, r in identities if r is not None)
        ice = sum(1 for i, _ in identities if i is not None)
        return {"identities": identities, "connected": ready, "ice_connected": ice, "started_at": started_at,
                "last_ready_at": last_ready_at}  # fmt: skip

    both_up = [process([[0.1, 0.3], [0.2, 0.4]], 100.0, 100.5), process([[0.3, 1.5]], 100.2, 101.7)]
    figures, last_up = combine_setup(both_up, clients=3)
    assert last_up == 101.7
    assert (figures["connected"], figures["ice_connected"]) == (3, 3)
    assert figures["bring_up_seconds"] == figures["last_ready_seconds"] == 1.7
    assert figures["ready_seconds"] == {"p50": 0.4, "p99": 1.5, "max": 1.5}
    assert figures["ice_seconds"]["max"] == 0.3

    one_short = [process([[0.1, 0.3], [0.2, None]], 100.0, 100.5), process([[None, None]], 100.2, None)]
    figures, last_up = combine_setup(one_short, clients=3)
    assert (figures["connected"], figures["ice_connected"], last_up) == (1, 2, 100.5)
    assert figures["bring_up_seconds"] is None and figures["last_ready_seconds"] == 0.5
    assert figures["ready_seconds"]["max"] == 0.3


def test_load_run_reads_the_gateways_handshake_drop_reasons() -> None:
    # The names the gateway's Node counts its cookie replies and rate-limited handshakes under (a rename there would
    # make the run report 0 for ever).
    assert set(HANDSHAKE_DROP_REASONS) == {DropReason.COOKIE_REQUIRED.value, DropReason.HANDSHAKE_RATE_LIMITED.value}
