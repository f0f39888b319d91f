"""Sequence-numbered UDP flows for the flow-affinity tests: several flows at once (so every TUN queue is busy), each
datagram carrying (flow, seq); the receiver counts datagrams that arrive with a seq not above the last one of their flow.

Paced by acknowledgement, not by the clock: a receiver thread reports the highest seq seen per flow, and the sender
keeps at most ``window`` rounds ahead of the slowest flow. Sending goes on until every flow has delivered ``per_flow``
datagrams (or a round cap or time budget is reached), so a busy machine makes the test slower, never too thin to judge.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

from dataplane.io.netlink import run_in_netns

_HEADER = struct.Struct("!II")
_PADDING = bytes(1000)


@dataclass(frozen=True)
class FlowOrderResult:
    reordered: int
    received_per_flow: list[int]
    rounds_sent: int


class _Receiver:
    """Counts per-flow arrivals and reorderings on its own thread; the sender waits on ``progress``."""

    def __init__(self, sock: socket.socket, flows: int) -> None:
        self.sock = sock
        self.last = [-1] * flows
        self.received = [0] * flows
        self.reordered = 0
        self.last_arrival = time.monotonic()
        self.progress = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flow-order-receiver", daemon=True)

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            if len(data) < _HEADER.size:
                continue
            flow, seq = _HEADER.unpack_from(data)
            if flow >= len(self.last):
                continue
            with self.progress:
                if seq <= self.last[flow]:
                    self.reordered += 1
                else:
                    self.last[flow] = seq
                self.received[flow] += 1
                self.last_arrival = time.monotonic()
                self.progress.notify_all()

    def wait_for_round(self, seq: int, timeout: float) -> None:
        """Until every flow has delivered a datagram of round ``seq`` or later, or ``timeout`` s without progress."""
        with self.progress:
            while min(self.last) < seq:
                if not self.progress.wait(timeout):
                    return  # losses at the tail of a flow: go on rather than stall

    def enough(self, per_flow: int) -> bool:
        with self.progress:
            return min(self.received) >= per_flow


def send_sequenced_flows(
    sender_netns: str,
    receiver_netns: str,
    address: str,
    port: int,
    *,
    flows: int,
    per_flow: int,
    receive_buffer: int,
    idle_timeout: float,
    window: int = 64,
    pause_every: int = 0,
    pause: float = 0.0,
    time_budget: float = 45.0,
) -> FlowOrderResult:
    """Sends rounds of one 1008-byte datagram per flow until each flow has delivered ``per_flow`` datagrams, at most
    ``window`` rounds ahead of the slowest flow's deliveries (and, if ``pause_every``, sleeping ``pause`` s every
    ``pause_every`` rounds). Gives up sending after ``4 * per_flow`` rounds or ``time_budget`` s, then waits until
    nothing arrives for ``idle_timeout`` s."""
    receiver_socket = run_in_netns(receiver_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    senders = [
        run_in_netns(sender_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(flows)
    ]
    receiver = _Receiver(receiver_socket, flows)
    rounds = 0
    try:
        receiver_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        receiver_socket.bind((address, port))
        receiver.thread.start()
        deadline = time.monotonic() + time_budget
        # A round whose acknowledgement does not come within this long was lost at a flow's tail.
        ack_timeout = max(idle_timeout, 0.5)
        while rounds < 4 * per_flow and not receiver.enough(per_flow) and time.monotonic() < deadline:
            if rounds >= window:
                receiver.wait_for_round(rounds - window, ack_timeout)
            for flow, sender in enumerate(senders):
                sender.sendto(_HEADER.pack(flow, rounds) + _PADDING, (address, port))
            rounds += 1
            if pause_every and rounds % pause_every == 0:
                time.sleep(pause)
        while time.monotonic() - receiver.last_arrival < idle_timeout:
            time.sleep(idle_timeout / 4)
    finally:
        receiver.stop.set()
        if receiver.thread.is_alive():
            receiver.thread.join()
        receiver_socket.close()
        for sender in senders:
            sender.close()
    with receiver.progress:
        return FlowOrderResult(receiver.reordered, list(receiver.received), rounds)
