"""Flow logs: one record per flow (client, resource, 5-tuple, bytes and packets each way, start and end) written to the
log stream under the ``flow_logs`` logger.

Enabled by ``FIREZONE_FLOW_LOGS`` or by the portal's ``init.flow_logs`` (docs/protocol.md §2.1). While disabled the
gateway state has no observer and the data path pays nothing. While enabled, :class:`FlowTracker` is called once per
packet the policy allowed (client → resource and resource → client) and keeps one small record per 5-tuple in a single
table of at most ``max_flows`` entries; packets of a flow that does not fit are counted (``untracked``) but not logged.

A flow ends when it was idle for ``idle_timeout``, a TCP RST passed, both sides sent a TCP FIN (after ``fin_linger``,
so the last ACKs still count), its client went away, or the gateway stops. :meth:`FlowTracker.sweep` runs about once a
second from the agent (:class:`FlowLogDriver`).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataplane.gateway import GatewayState

logger = logging.getLogger("flow_logs")

MAX_FLOWS = 65_536
IDLE_TIMEOUT = 30.0  # seconds without a packet either way
FIN_LINGER = 2.0  # after both FINs: the final ACKs arrive within this
SWEEP_INTERVAL = 1.0

_TCP, _UDP, _ICMP, _ICMPV6 = 6, 17, 1, 58
_PROTOCOL_NAMES = {_TCP: "tcp", _UDP: "udp", _ICMP: "icmp", _ICMPV6: "icmpv6"}
_TCP_FIN, _TCP_RST = 0x01, 0x04
_ENDING_FLAGS = _TCP_FIN | _TCP_RST
_PORTS = struct.Struct("!HH")

# (client id, protocol, client address, client port, resource address, resource port); addresses packed.
FlowKey = tuple[str, int, bytes, int, bytes, int]


@dataclass(frozen=True, slots=True)
class FlowRecord:
    client_id: str
    resource_id: str | None  # None for traffic to the gateway's own tunnel address
    protocol: str
    client_address: str
    client_port: int
    resource_address: str
    resource_port: int
    bytes_from_client: int  # IP bytes, headers included
    bytes_to_client: int
    packets_from_client: int
    packets_to_client: int
    start: float  # unix seconds
    end: float
    end_reason: str  # idle | tcp_fin | tcp_rst | client_gone | shutdown


class _Flow:
    __slots__ = (
        "resource_id",
        "start",
        "last",
        "bytes_from_client",
        "bytes_to_client",
        "packets_from_client",
        "packets_to_client",
        "fin_from_client",
        "fin_to_client",
        "closing_since",
        "reset",
    )

    def __init__(self, resource_id: str | None, now: float) -> None:
        self.resource_id = resource_id
        self.start = self.last = now
        self.bytes_from_client = self.bytes_to_client = 0
        self.packets_from_client = self.packets_to_client = 0
        self.fin_from_client = self.fin_to_client = False
        self.closing_since: float | None = None
        self.reset = False


def _five_tuple(packet: bytes) -> tuple[int, bytes, int, bytes, int, int] | None:
    """(protocol, source, source port, destination, destination port, TCP flags) of an IP packet; ports are 0 for
    protocols without them and for non-first fragments. None when the header is cut short."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        header_length = (packet[0] & 0x0F) * 4
        protocol = packet[9]
        source, destination = packet[12:16], packet[16:20]
        first_fragment = not (packet[6] & 0x1F or packet[7])
    elif version == 6 and len(packet) >= 40:
        header_length = 40
        protocol = packet[6]  # extension headers are rare on this path: such packets count under their next-header
        source, destination = packet[8:24], packet[24:40]
        first_fragment = True
    else:
        return None
    source_port = destination_port = flags = 0
    if first_fragment and protocol in (_TCP, _UDP) and len(packet) >= header_length + 4:
        source_port, destination_port = _PORTS.unpack_from(packet, header_length)
        if protocol == _TCP and len(packet) >= header_length + 14:
            flags = packet[header_length + 13] & _ENDING_FLAGS  # only these change what the tracker does
    return protocol, source, source_port, destination, destination_port, flags


class FlowTracker:
    """The bounded flow table (see the module docstring); ``sink`` receives every finished flow."""

    def __init__(
        self,
        sink: Callable[[FlowRecord], None],
        *,
        max_flows: int = MAX_FLOWS,
        idle_timeout: float = IDLE_TIMEOUT,
        fin_linger: float = FIN_LINGER,
    ) -> None:
        self._sink = sink
        self._max_flows = max_flows
        self._idle_timeout = idle_timeout
        self._fin_linger = fin_linger
        self._flows: dict[FlowKey, _Flow] = {}
        self.records_written = 0
        self.untracked = 0  # packets of flows that found the table full

    def __len__(self) -> int:
        return len(self._flows)

    # -- per packet (the gateway state calls these for allowed packets only) -----------------------------------------

    def from_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None:
        parsed = _five_tuple(packet)
        if parsed is None:
            return
        protocol, source, source_port, destination, destination_port, flags = parsed
        flow = self._flow(
            (client_id, protocol, source, source_port, destination, destination_port), resource_id, wall_now
        )
        if flow is None:
            return
        flow.bytes_from_client += len(packet)
        flow.packets_from_client += 1
        flow.last = wall_now
        if flags:
            self._tcp_flags(flow, flags, from_client=True, wall_now=wall_now)

    def to_client(self, client_id: str, resource_id: str | None, packet: bytes, wall_now: float) -> None:
        parsed = _five_tuple(packet)
        if parsed is None:
            return
        protocol, source, source_port, destination, destination_port, flags = parsed
        flow = self._flow(
            (client_id, protocol, destination, destination_port, source, source_port), resource_id, wall_now
        )
        if flow is None:
            return
        flow.bytes_to_client += len(packet)
        flow.packets_to_client += 1
        flow.last = wall_now
        if flags:
            self._tcp_flags(flow, flags, from_client=False, wall_now=wall_now)

    def _flow(self, key: FlowKey, resource_id: str | None, wall_now: float) -> _Flow | None:
        flow = self._flows.get(key)
        if flow is not None:
            if flow.resource_id is None:
                flow.resource_id = resource_id
            return flow
        if len(self._flows) >= self._max_flows:
            self.untracked += 1
            return None
        flow = self._flows[key] = _Flow(resource_id, wall_now)
        return flow

    @staticmethod
    def _tcp_flags(flow: _Flow, flags: int, *, from_client: bool, wall_now: float) -> None:
        if flags & _TCP_RST:
            flow.reset = True
            flow.closing_since = wall_now
        if flags & _TCP_FIN:
            if from_client:
                flow.fin_from_client = True
            else:
                flow.fin_to_client = True
            if flow.fin_from_client and flow.fin_to_client and flow.closing_since is None:
                flow.closing_since = wall_now

    # -- ending flows ---------------------------------------------------------------------------------------------

    def sweep(self, wall_now: float, live_clients: frozenset[str] | set[str] | None = None) -> int:
        """Ends the flows that are idle, closed (FIN/RST) or whose client is no longer in ``live_clients``."""
        ended: list[tuple[FlowKey, str]] = []
        for key, flow in self._flows.items():
            if live_clients is not None and key[0] not in live_clients:
                ended.append((key, "client_gone"))
            elif flow.reset:
                ended.append((key, "tcp_rst"))
            elif flow.closing_since is not None and wall_now - flow.closing_since >= self._fin_linger:
                ended.append((key, "tcp_fin"))
            elif wall_now - flow.last >= self._idle_timeout:
                ended.append((key, "idle"))
        for key, reason in ended:
            self._end(key, reason, wall_now)
        return len(ended)

    def close_all(self, wall_now: float, reason: str = "shutdown") -> None:
        for key in list(self._flows):
            self._end(key, reason, wall_now)

    def _end(self, key: FlowKey, reason: str, wall_now: float) -> None:
        flow = self._flows.pop(key)
        client_id, protocol, client_address, client_port, resource_address, resource_port = key
        end = flow.last if reason in ("idle", "tcp_fin", "tcp_rst") else wall_now
        record = FlowRecord(
            client_id=client_id,
            resource_id=flow.resource_id,
            protocol=_PROTOCOL_NAMES.get(protocol, str(protocol)),
            client_address=str(ipaddress.ip_address(client_address)),
            client_port=client_port,
            resource_address=str(ipaddress.ip_address(resource_address)),
            resource_port=resource_port,
            bytes_from_client=flow.bytes_from_client,
            bytes_to_client=flow.bytes_to_client,
            packets_from_client=flow.packets_from_client,
            packets_to_client=flow.packets_to_client,
            start=flow.start,
            end=end,
            end_reason=reason,
        )
        self.records_written += 1
        try:
            self._sink(record)
        except Exception:  # a broken sink must not take the data path down
            logger.exception("flow record sink failed")


def _rfc3339(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_flow_record(record: FlowRecord) -> None:
    """The default sink: one INFO line on the ``flow_logs`` logger with every field flattened (JSON logs keep them
    as fields)."""
    logger.info(
        "flow",
        extra={
            "client_id": record.client_id,
            "resource_id": record.resource_id,
            "protocol": record.protocol,
            "client_address": record.client_address,
            "client_port": record.client_port,
            "resource_address": record.resource_address,
            "resource_port": record.resource_port,
            "bytes_from_client": record.bytes_from_client,
            "bytes_to_client": record.bytes_to_client,
            "packets_from_client": record.packets_from_client,
            "packets_to_client": record.packets_to_client,
            "flow_start": _rfc3339(record.start),
            "flow_end": _rfc3339(record.end),
            "end_reason": record.end_reason,
        },
    )


class FlowLogDriver:
    """Attaches a :class:`FlowTracker` to the gateway state once flow logs are wanted (setting, or the portal's
    ``init.flow_logs``) and sweeps it every :data:`SWEEP_INTERVAL`; on stop, every open flow is written."""

    def __init__(
        self,
        state: GatewayState,
        *,
        enabled_by_setting: bool,
        wall_clock: Callable[[], float],
        sink: Callable[[FlowRecord], None] = log_flow_record,
    ) -> None:
        self._state = state
        self._enabled_by_setting = enabled_by_setting
        self._wall_clock = wall_clock
        self._sink = sink
        self.tracker: FlowTracker | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def wanted(self) -> bool:
        """The setting, or the portal's init enabling uploads (the reference tracks flows only for those)."""
        portal = self._state.flow_logs
        return self._enabled_by_setting or (
            portal is not None and portal.api_url is not None and portal.upload_interval_secs > 0
        )

    def tick(self) -> None:
        if self.tracker is None and self.wanted:
            self.tracker = FlowTracker(self._sink)
            self._state.flow_observer = self.tracker
            logger.info("flow logs enabled", extra={"by": "setting" if self._enabled_by_setting else "portal"})
        if self.tracker is not None:
            self.tracker.sweep(self._wall_clock(), self._state.client_ids)

    def start(self) -> None:
        self.tick()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flow-log-sweep")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.tick()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self.tracker is not None:
            self._state.flow_observer = None
            self.tracker.close_all(self._wall_clock())
