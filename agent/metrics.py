"""``/metrics``: a prometheus-client registry whose collector reads the live gateway objects at scrape time.

Nothing on the hot path calls into this module: the data plane keeps plain integer counters (and the tunnels their
byte counts), and :class:`GatewayCollector` turns them into metric families only when Prometheus asks. Label values
come from fixed sets (paths, directions, drop-reason enums, the portal event names of ``agent.portal``), never from
client or resource ids, so a scrape stays the same size however many clients connect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from dataplane.node import Path
from dataplane.turn import AllocationState

if TYPE_CHECKING:
    from agent.main import Gateway

NO_PATH = "none"  # a connection whose ICE agent has not selected a pair yet


def _counter(
    name: str, help_text: str, labels: Iterable[str], samples: Iterable[tuple[Iterable[str], float]]
) -> Metric:
    family = CounterMetricFamily(name, help_text, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _gauge(name: str, help_text: str, labels: Iterable[str], samples: Iterable[tuple[Iterable[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _by_reason(layer: str, counts: Mapping[str, int]) -> list[tuple[tuple[str, str], float]]:
    return [((layer, reason), count) for reason, count in sorted(counts.items())]


class GatewayCollector(Collector):
    """Every gateway metric family, built from the running :class:`~agent.main.Gateway` on each scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        yield from self._portal()
        yield from self._peers()
        yield from self._dataplane()

    def _portal(self) -> Iterator[Metric]:
        gateway = self._gateway
        link = gateway.link
        stats = link.stats
        yield _gauge("firezone_gateway_up", "1 while the event loop runs.", (), [((), 1)])
        yield _gauge("firezone_portal_joined", "1 while joined to the portal.", (), [((), int(link.joined))])
        yield _gauge("firezone_portal_ready", "1 when joined and init applied.", (), [((), int(gateway.ready()))])
        yield _counter(
            "firezone_portal_connect_attempts", "WebSocket connect attempts.", (), [((), stats.connect_attempts)]
        )
        yield _counter(
            "firezone_portal_reconnects", "Connect attempts after a first join.", (), [((), stats.reconnects)]
        )
        yield _counter("firezone_portal_joins", "Successful channel joins.", (), [((), stats.joins)])
        yield _counter(
            "firezone_portal_messages_received",
            "Portal pushes by event.",
            ("event",),
            [((event,), count) for event, count in sorted(stats.received.items())],
        )
        yield _counter(
            "firezone_portal_messages_sent",
            "Frames sent to the portal by event.",
            ("event",),
            [((event,), count) for event, count in sorted(stats.sent.items())],
        )
        drops = _by_reason("phoenix", link.channel.drops.counts) + _by_reason(
            "messages", gateway.eventloop.drops.counts
        )
        yield _counter("firezone_portal_drops", "Portal input dropped, by reason.", ("layer", "reason"), drops)

    def _peers(self) -> Iterator[Metric]:
        state = self._gateway.state
        node = state.node
        yield _gauge("firezone_clients", "Clients with at least one authorization.", (), [((), len(state.client_ids))])
        yield _gauge(
            "firezone_dns_nat_sessions",
            "Sessions in the DNS-resource NAT tables (proxy IP to resource address), over all clients.",
            (),
            [((), state.dns_nat_sessions)],
        )
        relays = node.relays
        measured = sum(1 for relay in relays if relay.rtt is not None)
        yield _gauge(
            "firezone_relays",
            "Relays from the portal, by whether a BINDING answer measured their RTT (only those serve new clients).",
            ("state",),
            [(("measured",), measured), (("unmeasured",), len(relays) - measured)],
        )
        allocations = dict.fromkeys((s.value for s in AllocationState), 0)
        for relay in relays:
            allocations[relay.state] = allocations.get(relay.state, 0) + 1
        yield _gauge(
            "firezone_relay_allocations",
            "TURN allocations, one per relay, by state.",
            ("state",),
            [((name,), count) for name, count in allocations.items()],
        )
        rtts = [relay.rtt for relay in relays if relay.rtt is not None]
        if rtts:
            yield _gauge("firezone_relay_rtt_min_seconds", "The best measured relay RTT.", (), [((), min(rtts))])
        by_path = {path.value: 0 for path in Path} | {NO_PATH: 0}
        for info in node.connections.values():
            by_path[info.path.value if info.path is not None else NO_PATH] += 1
        yield _gauge(
            "firezone_connections",
            "Client connections by path (none: ICE has not selected a pair yet).",
            ("path",),
            [((path,), count) for path, count in by_path.items()],
        )
        yield _counter(
            "firezone_connections_established",
            "Connections whose ICE agent selected a first pair.",
            (),
            [((), state.established_connections)],
        )
        yield _counter("firezone_handshakes", "WireGuard handshakes completed.", (), [((), node.handshakes_completed)])
        received, sent = node.wireguard_bytes()
        yield _counter(
            "firezone_wireguard_bytes",
            "WireGuard datagram bytes exchanged with clients (rx: from clients, tx: to clients).",
            ("direction",),
            [(("rx",), received), (("tx",), sent)],
        )

    def _dataplane(self) -> Iterator[Metric]:
        gateway = self._gateway
        dp = gateway.dataplane
        yield _counter(
            "firezone_packets",
            "IP packets through the data plane, by direction.",
            ("direction",),
            [(("client_to_resource",), dp.packets_to_tun), (("resource_to_client",), dp.packets_from_tun)],
        )
        yield _counter(
            "firezone_datagrams",
            "UDP datagrams, by direction.",
            ("direction",),
            [(("in",), dp.datagrams_in), (("out",), dp.datagrams_out)],
        )
        drops = _by_reason("gateway", gateway.state.drops.counts) + _by_reason("node", gateway.state.node.drops.counts)
        tun = dp.tun
        if tun is not None:
            drops += _by_reason("tun", tun.drops.counts)
            tun_stats = tun.stats()
            yield _counter(
                "firezone_tun_frames",
                "TUN device reads (rx) and writes (tx); offloads carry several packets per frame.",
                ("direction",),
                [(("rx",), tun_stats.rx_frames), (("tx",), tun_stats.tx_frames)],
            )
            yield _gauge(
                "firezone_tun_queue_depth",
                "Packets accepted for the TUN device and not yet written.",
                ("direction",),
                [(("outbound",), tun.pending_outbound())],
            )
        if dp.sockets is not None:
            for udp in dp.sockets.sockets():
                drops += _by_reason("udp", udp.drops.counts)
        yield _counter("firezone_dataplane_drops", "Packets dropped, by layer and reason.", ("layer", "reason"), drops)
        flows = gateway.flow_tracker
        if flows is not None:
            yield _gauge("firezone_flows", "Flows tracked for the flow log.", (), [((), len(flows))])
            yield _counter("firezone_flow_records", "Flow records written.", (), [((), flows.records_written)])
            yield _counter(
                "firezone_flow_table_full", "Flows not tracked: the table was full.", (), [((), flows.untracked)]
            )


def build_registry(gateway: Gateway, *, process_metrics: bool = True) -> CollectorRegistry:
    """A registry of its own (not the global default, so tests can build several gateways in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> str:
    """The Prometheus text exposition (format 0.0.4) of everything in ``registry``."""
    return generate_latest(registry).decode()
