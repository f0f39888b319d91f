"""The gateway's data-plane driver: TUN device, UDP sockets, host setup and one timer around :class:`GatewayState`.

Everything runs on the agent's asyncio loop (like the reference's single-threaded runtime), batch by batch: a readable
UDP socket yields up to 64 datagrams (GRO-split) that go through the state in one call, and the packets for the TUN are
merged and written right there, on the loop (:meth:`Tun.write_now <dataplane.io.tun.Tun.write_now>`: a hand-off to the
TUN writer threads costs more than the write, and a lone packet such as a ping goes straight to the device); a TUN wake-up
yields up to 128 packets (TSO-split by the TUN reader threads), and the resulting datagrams leave as GSO runs per
destination. No packet is handed to asyncio on its own. The single timer is re-armed to
``GatewayState.poll_timeout()`` after every input.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from agent.dns_forwarder import DnsForwarder
from agent.looptimer import DeadlineTimer
from dataplane.base import Address
from dataplane.gateway import GatewayState, ResolveDomain, TunnelAddressesChanged
from dataplane.io import netlink
from dataplane.io.hostsetup import HostSetup
from dataplane.io.resolver import DomainResolver
from dataplane.io.tun import Tun
from dataplane.io.udp import FIREZONE_MARK, DualStackSockets, UdpSocket, bind_dual_stack
from dataplane.node import TransmitRun

logger = logging.getLogger(__name__)

TUN_NAME = "tun-firezone"
TUN_MTU = 1280
TUN_BATCH = 128
UDP_BATCH = 64
SHUTDOWN_FLUSH = 1.0  # §5: flush the goodbyes for at most a second


@dataclass(frozen=True, slots=True)
class DataPlaneOptions:
    tun_name: str = TUN_NAME
    tun_queues: int = 1
    port: int = 52625
    increase_buffers: bool = True
    host_setup: bool = True
    mark: int | None = FIREZONE_MARK
    dns_forwarder: bool = True  # §3.5: listen on <tunnel ip>:53535 once the tunnel addresses are known


class DataPlane:
    """Owns the TUN device, the sockets and the host setup; feeds :class:`GatewayState` and flushes its output."""

    def __init__(
        self,
        state: GatewayState,
        options: DataPlaneOptions,
        *,
        on_portal_output: Callable[[], None] = lambda: None,
        on_fatal: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.state = state
        self.options = options
        self._on_portal_output = on_portal_output
        self._on_fatal = on_fatal
        self.failure: str | None = None
        self.tun: Tun | None = None
        self.sockets: DualStackSockets | None = None
        self.host_setup: HostSetup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: DeadlineTimer | None = None
        self.resolver = DomainResolver()
        self.dns_forwarder: DnsForwarder | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.packets_to_tun = 0
        self.packets_from_tun = 0
        self.datagrams_in = 0
        self.datagrams_out = 0

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Creates the TUN device and the sockets and applies the host setup; raises OSError with nothing left."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._timer = DeadlineTimer(loop, self.state.poll_timeout, self._on_timer)
        options = self.options
        try:
            self.tun = Tun.create(options.tun_name, queues=options.tun_queues)
            self.sockets = bind_dual_stack(
                options.port,
                mark=options.mark,
                increase_buffers=options.increase_buffers,
                local_addresses=True,
            )
            if options.host_setup:
                self.host_setup = HostSetup(options.tun_name)
                self.host_setup.apply()
        except BaseException:
            self.close()
            raise
        for udp in self.sockets.sockets():
            loop.add_reader(udp.fileno(), self._on_udp_readable, udp)
        # Handshake bursts count as load only while the receive queue backs up (docs/protocol.md §4.2): possible
        # when the kernel reports the queue.
        self.state.node.handshake_load.needs_backlog = all(
            udp.receive_queue() is not None for udp in self.sockets.sockets()
        )
        loop.add_reader(self.tun.wakeup_fd, self._on_tun_readable)
        ports = ", ".join(f"{s.local_address[0]}:{s.local_address[1]}" for s in self.sockets.sockets())
        logger.info("data plane started", extra={"tun": options.tun_name, "udp": ports, "queues": options.tun_queues})
        self.flush()

    async def shut_down(self) -> None:
        """Says goodbye to every client, lets the datagrams leave (at most a second), then closes everything."""
        loop = asyncio.get_running_loop()
        self.state.shut_down(loop.time())
        self.flush()
        deadline = loop.time() + SHUTDOWN_FLUSH
        while self.tun is not None and self.tun.pending_outbound() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.close()

    def close(self) -> None:
        loop = self._loop
        for task in list(self._background):
            task.cancel()
        if self.dns_forwarder is not None:
            self.dns_forwarder.close()
            self.dns_forwarder = None
        if self._timer is not None:
            self._timer.cancel()
        if self.sockets is not None:
            for udp in self.sockets.sockets():
                if loop is not None:
                    loop.remove_reader(udp.fileno())
            self.sockets.close()
            self.sockets = None
        if self.tun is not None:
            if loop is not None:
                loop.remove_reader(self.tun.wakeup_fd)
            self.tun.close()  # the device (and its addresses and routes) goes with its last descriptor
            self.tun = None
            try:
                netlink.remove_tunnel_routes(self.options.tun_name)  # the routing rules outlive the device
            except OSError as exc:
                logger.warning("could not remove the tunnel routing rules: %s", exc)
        if self.host_setup is not None:
            try:
                self.host_setup.undo()
            except Exception as exc:  # a failed undo must not hide why we are stopping
                logger.warning("could not undo the host setup: %s", exc)
            self.host_setup = None

    # -- inputs ---------------------------------------------------------------------------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _on_udp_readable(self, udp: UdpSocket) -> None:
        datagrams = udp.recv_many_local(UDP_BATCH)
        if not datagrams:
            return
        self.datagrams_in += len(datagrams)
        now = self._now()
        if len(datagrams) >= UDP_BATCH:  # a short batch emptied the queue: nothing waits behind it
            queue = udp.receive_queue()
            if queue is not None:
                self.state.node.handshake_load.note_backlog(*queue, now)
        packets = self.state.handle_datagrams(datagrams, now)
        if packets and self.tun is not None:
            self.packets_to_tun += len(packets)
            self.tun.write_now(packets)  # on this thread: a writer-thread hand-off costs more than the write
        self.flush()

    def _on_tun_readable(self) -> None:
        if self.tun is None:
            return
        if self.tun.failure is not None and self.failure is None:
            self.failure = f"TUN device {self.options.tun_name}: {self.tun.failure}"
            self._on_fatal(self.failure)
        packets = self.tun.poll_recv_many(TUN_BATCH)
        if packets:
            self.packets_from_tun += len(packets)
            self.state.handle_tun_packets(packets, self._now())
        self.flush()

    def _on_timer(self, now: float) -> None:
        self.state.handle_timeout(now)
        self.flush()

    # -- outputs --------------------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Sends the state's datagrams, applies its events, passes portal output on and re-arms the timer."""
        self._send_transmits()
        while (event := self.state.poll_event()) is not None:
            if isinstance(event, TunnelAddressesChanged):
                self._configure_tunnel(event)
            elif isinstance(event, ResolveDomain):
                self._in_background(self._resolve(event))
        self._on_portal_output()
        self._arm_timer()

    def _send_transmits(self) -> None:
        """Sends the state's datagrams in order: each run to one destination (a sealed batch arrives as one
        TransmitRun, and lone datagrams in a row to one destination are joined) as GSO batches."""
        entries = self.state.drain_transmits()
        if not entries:
            return
        sockets = self.sockets
        if sockets is None:
            return
        run_dst: Address | None = None
        run: list[bytes] = []
        for entry in entries:
            if isinstance(entry, TransmitRun):
                dst, payloads = entry.dst, entry.payloads
            else:
                dst, payloads = entry.dst, [entry.payload]
            if dst == run_dst:
                run += payloads
                continue
            if run_dst is not None:
                self._send_run(sockets, run_dst, run)
            run_dst, run = dst, payloads
        if run_dst is not None:
            self._send_run(sockets, run_dst, run)

    def _send_run(self, sockets: DualStackSockets, dst: Address, payloads: list[bytes]) -> None:
        udp = sockets.v6 if ":" in dst[0] else sockets.v4
        if udp is None:
            logger.debug("no socket for %d datagrams of that family", len(payloads))
            return
        self.datagrams_out += len(payloads)
        udp.send_batch(dst, payloads)

    def _configure_tunnel(self, event: TunnelAddressesChanged) -> None:
        try:
            netlink.configure_tunnel_interface(self.options.tun_name, str(event.ipv4), str(event.ipv6), mtu=TUN_MTU)
        except OSError as exc:
            logger.error("could not configure %s: %s", self.options.tun_name, exc)
            return
        logger.info("tunnel interface configured", extra={"ipv4": str(event.ipv4), "ipv6": str(event.ipv6)})
        if self.options.dns_forwarder:
            self._in_background(self._restart_dns_forwarder(event))

    # -- DNS resources (docs/protocol.md §3.4, §3.5) -----------------------------------------------------------

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve(self, request: ResolveDomain) -> None:
        try:
            addresses = await self.resolver.resolve(request.domain)
        except Exception as exc:  # every request must be answered, or it would hold a pending slot forever
            logger.warning("resolving %s raised: %r", request.domain, exc)
            addresses = None
        if self._loop is None or self.tun is None:
            return  # closed meanwhile
        self.state.handle_domain_resolved(request, addresses, self._now())
        self.flush()

    async def _restart_dns_forwarder(self, event: TunnelAddressesChanged) -> None:
        if self.dns_forwarder is not None:
            self.dns_forwarder.close()
            self.dns_forwarder = None
        forwarder = DnsForwarder([event.ipv4, event.ipv6])
        try:
            await forwarder.start()
        except OSError as exc:
            logger.error("could not start the DNS forwarder: %s", exc)
            return
        self.dns_forwarder = forwarder

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.arm()
