"""agent/flowlog.py: per-flow byte accounting (both directions into one record), the ends of a flow (idle, FIN, RST,
client gone, shutdown), the table bound, the driver's enabling rule, and flow records as JSON log lines."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import struct
from collections.abc import Iterator

import pytest

from agent.config import LogSpec
from agent.flowlog import FlowLogDriver, FlowRecord, FlowTracker, log_flow_record
from agent.logs import configure_logging
from dataplane.gateway import GatewayState
from dataplane.io.rng import SeededRng
from protocol.messages import FlowLogsConfig

CLIENT, RESOURCE = "100.66.0.2", "10.0.0.5"
CLIENT6, RESOURCE6 = "fd00:2021:1111::2", "fd00:10::5"
SYN, FIN_ACK, ACK, RST = 0x02, 0x11, 0x10, 0x04


def ipv4(src: str, dst: str, protocol: int, payload: bytes) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        protocol,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    header = struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
    return header + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload


def tcp(sport: int, dport: int, flags: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0) + data


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


@pytest.fixture
def records() -> list[FlowRecord]:
    return []


@pytest.fixture
def tracker(records: list[FlowRecord]) -> FlowTracker:
    return FlowTracker(records.append, max_flows=4, idle_timeout=30.0, fin_linger=2.0)


def test_a_udp_exchange_is_one_record_with_bytes_each_way(tracker: FlowTracker, records: list[FlowRecord]) -> None:
    request = ipv4(CLIENT, RESOURCE, 17, udp(40000, 53, b"q" * 30))
    answer = ipv4(RESOURCE, CLIENT, 17, udp(53, 40000, b"a" * 100))
    tracker.from_client("c1", "r1", request, 1000.0)
    tracker.to_client("c1", "r1", answer, 1000.5)
    tracker.from_client("c1", "r1", request, 1001.0)
    assert len(tracker) == 1
    assert tracker.sweep(1020.0) == 0  # not idle long enough
    assert tracker.sweep(1031.0) == 1
    [record] = records
    assert (record.client_id, record.resource_id, record.protocol) == ("c1", "r1", "udp")
    assert (record.client_address, record.client_port, record.resource_address, record.resource_port) == (
        CLIENT,
        40000,
        RESOURCE,
        53,
    )
    assert record.bytes_from_client == 2 * len(request) and record.packets_from_client == 2
    assert record.bytes_to_client == len(answer) and record.packets_to_client == 1
    assert (record.start, record.end, record.end_reason) == (1000.0, 1001.0, "idle")
    assert len(tracker) == 0 and tracker.records_written == 1


def test_tcp_ends_after_both_fins_and_the_linger(tracker: FlowTracker, records: list[FlowRecord]) -> None:
    tracker.from_client("c1", "r1", ipv6(CLIENT6, RESOURCE6, 6, tcp(41000, 443, SYN)), 10.0)
    tracker.to_client("c1", "r1", ipv6(RESOURCE6, CLIENT6, 6, tcp(443, 41000, FIN_ACK, b"x" * 500)), 11.0)
    assert tracker.sweep(20.0) == 0  # one FIN is a half-close
    tracker.from_client("c1", "r1", ipv6(CLIENT6, RESOURCE6, 6, tcp(41000, 443, FIN_ACK)), 12.0)
    tracker.to_client("c1", "r1", ipv6(RESOURCE6, CLIENT6, 6, tcp(443, 41000, ACK)), 12.1)
    assert tracker.sweep(13.0) == 0  # lingering for the last ACKs
    assert tracker.sweep(14.5) == 1
    [record] = records
    assert record.end_reason == "tcp_fin" and record.protocol == "tcp"
    assert record.packets_from_client == 2 and record.packets_to_client == 2
    assert record.bytes_to_client == 2 * (40 + 20) + 500
    assert record.client_address == CLIENT6 and record.resource_port == 443


def test_rst_client_gone_and_shutdown_end_flows(tracker: FlowTracker, records: list[FlowRecord]) -> None:
    tracker.from_client("c1", "r1", ipv4(CLIENT, RESOURCE, 6, tcp(1, 80, SYN)), 1.0)
    tracker.to_client("c1", "r1", ipv4(RESOURCE, CLIENT, 6, tcp(80, 1, RST)), 1.1)
    tracker.from_client("c2", "r1", ipv4("100.66.0.3", RESOURCE, 17, udp(5, 6, b"")), 1.0)
    tracker.from_client("c3", "r1", ipv4("100.66.0.4", RESOURCE, 1, b"\x08\x00" + b"\x00" * 6), 1.0)
    tracker.sweep(2.0, live_clients={"c1", "c3"})
    assert sorted((r.client_id, r.end_reason) for r in records) == [("c1", "tcp_rst"), ("c2", "client_gone")]
    tracker.close_all(3.0)
    assert records[-1].client_id == "c3" and records[-1].end_reason == "shutdown" and records[-1].protocol == "icmp"
    assert records[-1].end == 3.0


def test_the_table_is_bounded(tracker: FlowTracker, records: list[FlowRecord]) -> None:
    for port in range(10):
        tracker.from_client("c1", "r1", ipv4(CLIENT, RESOURCE, 17, udp(port, 9, b"")), 1.0)
    assert len(tracker) == 4 and tracker.untracked == 6
    tracker.from_client("c1", "r1", b"\x45\x00", 1.0)  # cut short: ignored
    tracker.from_client("c1", "r1", b"", 1.0)
    assert len(tracker) == 4


@pytest.mark.allow_error_logs
def test_a_failing_sink_does_not_raise(records: list[FlowRecord]) -> None:
    def sink(record: FlowRecord) -> None:
        raise RuntimeError("disk full")

    tracker = FlowTracker(sink)
    tracker.from_client("c1", None, ipv4(CLIENT, RESOURCE, 17, udp(1, 2, b"")), 1.0)
    tracker.close_all(2.0)
    assert tracker.records_written == 1


def _state() -> GatewayState:
    return GatewayState(bytes(range(32)), rng=SeededRng(1), wall_clock=lambda: 1000.0)


def test_driver_enables_on_the_setting_or_portal_uploads() -> None:
    state = _state()
    driver = FlowLogDriver(state, enabled_by_setting=False, wall_clock=lambda: 1000.0)
    driver.tick()
    assert driver.tracker is None and state.flow_observer is None
    state.flow_logs = FlowLogsConfig(api_url=None, upload_interval_secs=0)  # the portal has uploads off
    driver.tick()
    assert driver.tracker is None
    state.flow_logs = FlowLogsConfig(api_url="https://flows.example", upload_interval_secs=60)
    driver.tick()
    assert driver.tracker is not None and state.flow_observer is driver.tracker
    on_by_setting = FlowLogDriver(_state(), enabled_by_setting=True, wall_clock=lambda: 1000.0)
    on_by_setting.tick()
    assert on_by_setting.tracker is not None


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_flow_records_are_json_log_lines_with_flat_fields(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", LogSpec(logging.INFO), stream=stream)
    tracker = FlowTracker(log_flow_record)
    tracker.from_client("c1", "r1", ipv4(CLIENT, RESOURCE, 17, udp(40000, 53, b"q" * 30)), 1_800_000_000.0)
    tracker.to_client("c1", "r1", ipv4(RESOURCE, CLIENT, 17, udp(53, 40000, b"a" * 10)), 1_800_000_000.25)
    tracker.close_all(1_800_000_001.0)
    logging.getLogger("agent.test").info("after")
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    flow = next(e for e in entries if e["target"] == "flow_logs")
    assert flow["message"] == "flow" and flow["level"] == "INFO"
    assert flow["client_id"] == "c1" and flow["resource_id"] == "r1" and flow["protocol"] == "udp"
    assert flow["bytes_from_client"] == 58 and flow["bytes_to_client"] == 38
    assert flow["client_address"] == CLIENT and flow["resource_port"] == 53
    assert flow["flow_start"] == "2027-01-15T08:00:00.000Z" and flow["flow_end"] == "2027-01-15T08:00:01.000Z"
    assert entries[-1]["message"] == "after"


def test_json_log_lines_flatten_mapping_fields(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", LogSpec(logging.INFO), stream=stream)
    logging.getLogger("agent.test").info(
        "line one\nline two", extra={"relay": {"id": "r1", "rtt": {"ms": 1.5}}, "level": "not the level"}
    )
    [entry] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["message"] == "line one\nline two" and entry["level"] == "INFO"
    assert entry["relay.id"] == "r1" and entry["relay.rtt.ms"] == 1.5 and "relay" not in entry
