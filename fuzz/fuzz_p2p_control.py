"""The peer-to-peer control codec: control packets decrypted from a client and their JSON event bodies.

Invariants: ``parse`` and the body parsers return None for anything malformed and never raise; a parsed
``assigned_ips``/``domain_status`` body re-encodes to a packet that parses back to the same value.
"""

from __future__ import annotations

import ipaddress

from dataplane import p2p_control
from fuzz.harness import fuzz_main


def seeds() -> list[bytes]:
    ipv4 = [ipaddress.ip_address(f"100.96.0.{n}") for n in range(1, 5)]
    ipv6 = [ipaddress.ip_address(f"fd00:2021:1111:8000::{n}") for n in range(1, 5)]
    return [
        p2p_control.assigned_ips("c7793628-0000-4000-8000-000000000001", "example.com", ipv4),
        p2p_control.assigned_ips("c7793628-0000-4000-8000-000000000002", "*.corp.example", ipv4 + ipv6),
        p2p_control.domain_status("c7793628-0000-4000-8000-000000000001", "example.com", True),
        p2p_control.domain_status("c7793628-0000-4000-8000-000000000001", "example.com", False),
        p2p_control.goodbye(),
    ]


def _check_body(body: bytes) -> None:
    assigned = p2p_control.parse_assigned_ips(body)
    if assigned is not None:
        try:
            again = p2p_control.assigned_ips(assigned.resource, assigned.domain, assigned.proxy_ips)
        except p2p_control.ControlMessageTooLarge:
            pass
        else:
            message = p2p_control.parse(again)
            if message is None or p2p_control.parse_assigned_ips(message.body) != assigned:
                raise AssertionError("assigned_ips does not round-trip")
    status = p2p_control.parse_domain_status(body)
    if status is not None:
        try:
            again = p2p_control.domain_status(status.resource, status.domain, status.active)
        except p2p_control.ControlMessageTooLarge:
            return
        message = p2p_control.parse(again)
        if message is None or p2p_control.parse_domain_status(message.body) != status:
            raise AssertionError("domain_status does not round-trip")


def TestOneInput(data: bytes) -> None:
    p2p_control.is_control_packet(data)
    message = p2p_control.parse(data)
    if message is not None:
        _check_body(message.body)
    # The body parsers also see the raw input, so JSON mutations need not first keep the packet header intact.
    _check_body(data)


if __name__ == "__main__":
    fuzz_main("fuzz_p2p_control")
