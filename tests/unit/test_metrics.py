"""agent/metrics.py: the prometheus-client registry behind /metrics parses, moves with the gateway, keeps bounded labels."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.config import load_settings
from agent.flowlog import FlowTracker
from agent.main import Gateway, generate_key_pair
from dataplane.gateway import GatewayDropReason
from dataplane.node import DropReason as NodeDropReason
from protocol.phoenix import PushReceived


def _gateway(tmp_path: Path) -> Gateway:
    settings = load_settings(
        [],
        {
            "FIREZONE_TOKEN": "t",
            "FIREZONE_ID": "a" * 64,
            "FIREZONE_STATE_DIR": str(tmp_path),
            "FIREZONE_API_URL": "ws://127.0.0.1:9",
            "HEALTH_CHECK_ADDR": "127.0.0.1:0",
        },
    )
    return Gateway(settings, *generate_key_pair())


def _samples(text: str) -> dict[str, list[Sample]]:
    """Every sample by family name, parsed with prometheus-client's own parser (raises on malformed text)."""
    return {family.name: list(family.samples) for family in text_string_to_metric_families(text)}


def _value(samples: dict[str, list[Sample]], family: str, sample: str, **labels: str) -> float:
    matches = [s.value for s in samples[family] if s.name == sample and s.labels == labels]
    assert len(matches) == 1, (family, sample, labels, samples[family])
    return matches[0]


def test_metrics_parse_and_cover_the_documented_families(tmp_path: Path) -> None:
    samples = _samples(_gateway(tmp_path).metrics())
    for family in (
        "firezone_gateway_up",
        "firezone_portal_ready",
        "firezone_portal_reconnects",
        "firezone_portal_messages_received",
        "firezone_portal_drops",
        "firezone_clients",
        "firezone_dns_nat_sessions",
        "firezone_relays",
        "firezone_relay_allocations",
        "firezone_connections",
        "firezone_handshakes",
        "firezone_wireguard_bytes",
        "firezone_packets",
        "firezone_datagrams",
        "firezone_dataplane_drops",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections",
    ):
        assert family in samples, family
    assert _value(samples, "firezone_connections", "firezone_connections", path="direct") == 0
    assert _value(samples, "firezone_connections", "firezone_connections", path="relayed") == 0
    assert _value(samples, "firezone_relay_allocations", "firezone_relay_allocations", state="allocated") == 0
    assert _value(samples, "firezone_wireguard_bytes", "firezone_wireguard_bytes_total", direction="rx") == 0
    assert "firezone_flows" not in samples  # flow logs are off


def test_counters_move_with_the_gateway(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    before = _samples(gateway.metrics())
    gateway.link.stats.reconnects += 2
    gateway.link.stats.received["init"] += 1
    gateway.eventloop.handle_channel_event(PushReceived("unknown_thing", {}))
    gateway.dataplane.packets_to_tun += 7
    gateway.dataplane.packets_from_tun += 5
    gateway.dataplane.datagrams_in += 3
    gateway.state.drops.drop(GatewayDropReason.NO_PEER_FOR_ADDRESS, 4)
    gateway.state.node.drops.drop(NodeDropReason.UNRECOGNISED)
    gateway.state.node.handshakes_completed += 1
    after = _samples(gateway.metrics())

    def moved(family: str, sample: str, **labels: str) -> float:
        was = [s.value for s in before[family] if s.name == sample and s.labels == labels]
        return _value(after, family, sample, **labels) - (was[0] if was else 0)

    assert moved("firezone_portal_reconnects", "firezone_portal_reconnects_total") == 2
    assert moved("firezone_portal_messages_received", "firezone_portal_messages_received_total", event="init") == 1
    assert moved("firezone_portal_drops", "firezone_portal_drops_total", layer="messages", reason="unknown_event") == 1
    assert moved("firezone_packets", "firezone_packets_total", direction="client_to_resource") == 7
    assert moved("firezone_packets", "firezone_packets_total", direction="resource_to_client") == 5
    assert moved("firezone_datagrams", "firezone_datagrams_total", direction="in") == 3
    drops = "firezone_dataplane_drops"
    assert moved(drops, f"{drops}_total", layer="gateway", reason="no_peer_for_address") == 4
    assert moved(drops, f"{drops}_total", layer="node", reason="unrecognised") == 1
    assert moved("firezone_handshakes", "firezone_handshakes_total") == 1


def test_flow_metrics_appear_with_flow_logs(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    gateway.flow_logs.tracker = FlowTracker(lambda record: None)
    samples = _samples(gateway.metrics())
    assert _value(samples, "firezone_flows", "firezone_flows") == 0
    assert _value(samples, "firezone_flow_records", "firezone_flow_records_total") == 0


def test_label_values_come_from_fixed_sets(tmp_path: Path) -> None:
    """Events a portal invents are counted as "other": the exposition does not grow with them."""
    gateway = _gateway(tmp_path)
    for index in range(50):
        gateway.link.stats.received["other"] += 1
        gateway.eventloop.handle_channel_event(PushReceived(f"invented_{index}", {}))
    samples = _samples(gateway.metrics())
    events = {s.labels["event"] for s in samples["firezone_portal_messages_received"] if "event" in s.labels}
    assert events == {"other"}
    for family in samples.values():
        for sample in family:
            assert "client" not in " ".join(sample.labels), sample


async def test_metrics_endpoint_serves_the_registry(tmp_path: Path) -> None:
    gateway = _gateway(tmp_path)
    async with TestClient(TestServer(gateway.health.app)) as client:
        response = await client.get("/metrics")
        body = await response.text()
    assert response.status == 200
    assert _value(_samples(body), "firezone_gateway_up", "firezone_gateway_up") == 1
