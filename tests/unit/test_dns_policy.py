"""ClientPolicy's part in DNS resources (docs/protocol.md §3.4): proxy IPs routed to the DNS resource that assigned
them, with its filters, for as long as the client holds it."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import pytest
from scapy.layers.inet import TCP, UDP

from dataplane import policy as policy_module
from dataplane.policy import PolicyDropReason as R
from protocol.messages import DnsResource
from tests.unit.test_policy import INTERNET, NOW, cidr, in4, out4, out6, policy, refused, tcp

DNS = DnsResource.model_validate(
    {"id": "d1", "type": "dns", "address": "*.corp.example", "filters": [tcp(443).model_dump()]}
)
PROXY4, PROXY6 = "100.96.0.5", "fd00:2021:1111:8000::5"


def test_routed_proxy_ips_follow_the_dns_resource_and_its_filters() -> None:
    p = policy()
    p.grant(DNS, None)
    assert p.from_client(out4(PROXY4, TCP(dport=443)), NOW).reason is R.NOT_AUTHORIZED
    assert p.route_proxy_addresses("d1", [ip_address(PROXY4), ip_address(PROXY6)])
    assert p.from_client(out4(PROXY4, TCP(dport=443)), NOW).resource_id == "d1"
    assert p.from_client(out6(PROXY6, TCP(dport=443)), NOW).resource_id == "d1"
    refused(p.from_client(out4(PROXY4, TCP(dport=22)), NOW), R.FILTERED)
    refused(p.from_client(out4("100.96.0.6", TCP(dport=443)), NOW), R.NOT_AUTHORIZED)
    assert p.to_client(in4(PROXY4, TCP(sport=443)), NOW).resource_id == "d1"
    # Revoked: the routes go with the grant; granted again: nothing is routed until the gateway routes it again.
    p.revoke("d1")
    refused(p.from_client(out4(PROXY4, TCP(dport=443)), NOW), R.NOT_AUTHORIZED)
    p.grant(DNS, None)
    refused(p.from_client(out4(PROXY4, TCP(dport=443)), NOW), R.NOT_AUTHORIZED)
    p.route_proxy_addresses("d1", [ip_address(PROXY4)])
    assert p.from_client(out4(PROXY4, TCP(dport=443)), NOW).allowed
    p.clear_proxy_addresses()
    refused(p.from_client(out4(PROXY4, TCP(dport=443)), NOW), R.NOT_AUTHORIZED)


def test_a_proxy_ip_covered_by_another_grant_but_never_assigned_is_untranslated() -> None:
    p = policy()
    p.grant(INTERNET, None)
    p.grant(cidr("r1", "100.96.0.0/11"), None)
    p.grant(DNS, None)
    p.route_proxy_addresses("d1", [ip_address(PROXY4)])
    assert p.from_client(out4(PROXY4, TCP(dport=443)), NOW).allowed
    refused(p.from_client(out4("100.96.0.9", UDP(dport=53)), NOW), R.DNS_PROXY_UNTRANSLATED)


def test_only_dns_resources_take_proxy_routes_and_they_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    p = policy()
    p.grant(cidr("r1", "10.0.0.0/8"), None)
    assert not p.route_proxy_addresses("r1", [ip_address(PROXY4)])
    assert not p.route_proxy_addresses("missing", [ip_address(PROXY4)])
    monkeypatch.setattr(policy_module, "MAX_PROXY_ROUTES_PER_CLIENT", 4)
    p.grant(DNS, None)
    proxies = [IPv4Address(f"100.96.0.{i}") for i in range(1, 6)]
    assert p.route_proxy_addresses("d1", proxies[:4])
    assert p.route_proxy_addresses("d1", proxies[:4])  # the same ones again: nothing new
    assert not p.route_proxy_addresses("d1", proxies[4:])
    refused(p.from_client(out4(str(proxies[4]), TCP(dport=443)), NOW), R.NOT_AUTHORIZED)
