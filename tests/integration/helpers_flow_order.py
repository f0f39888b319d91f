"""Sequence-numbered UDP flows for the flow-affinity tests: several flows at once (so every TUN queue is busy), each
datagram carrying (flow, seq); the receiver counts datagrams that arrive with a seq not above the last one of their flow.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

from dataplane.io.netlink import run_in_netns

_HEADER = struct.Struct("!II")


@dataclass(frozen=True)
class FlowOrderResult:
    reordered: int
    received_per_flow: list[int]


def send_sequenced_flows(
    sender_netns: str,
    receiver_netns: str,
    address: str,
    port: int,
    *,
    flows: int,
    per_flow: int,
    pause_every: int,
    pause: float,
    receive_buffer: int,
    idle_timeout: float,
) -> FlowOrderResult:
    """Sends ``per_flow`` rounds of one 1008-byte datagram per flow (pausing ``pause`` s every ``pause_every``
    rounds), then receives until nothing arrives for ``idle_timeout`` s."""
    receiver = run_in_netns(receiver_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    senders = [
        run_in_netns(sender_netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(flows)
    ]
    try:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        receiver.bind((address, port))
        padding = bytes(1000)
        for seq in range(per_flow):
            for flow, sender in enumerate(senders):
                sender.sendto(_HEADER.pack(flow, seq) + padding, (address, port))
            if seq % pause_every == 0:
                time.sleep(pause)
        last = [-1] * flows
        received = [0] * flows
        reordered = 0
        receiver.settimeout(idle_timeout)
        try:
            while True:
                flow, seq = _HEADER.unpack_from(receiver.recv(2048))
                if seq <= last[flow]:
                    reordered += 1
                last[flow] = seq
                received[flow] += 1
        except TimeoutError:
            pass
    finally:
        receiver.close()
        for sender in senders:
            sender.close()
    return FlowOrderResult(reordered, received)
