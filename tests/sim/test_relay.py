"""The in-sim relay against a hand-driven STUN client: BINDING, the 401 dance, ALLOCATE, CHANNEL-BIND, ChannelData."""

from __future__ import annotations

import struct

from dataplane import stun
from tests.sim.nat import PORT_RESTRICTED_CONE, NatBox
from tests.sim.net import SimNetwork
from tests.sim.relay import REALM, SimRelay, firezone_password, mint_credentials


class RawClient:
    def __init__(self, net: SimNetwork, host, local):
        self.net = net
        self.host = host
        self.local = local
        self.inbox: list[tuple[bytes, tuple[str, int]]] = []
        host.bind(local[1], lambda data, src, _local, _now: self.inbox.append((data, src)))
        self._tid = 0

    def request(self, relay: tuple[str, int], msg: stun.StunMessage, key: bytes | None = None) -> stun.StunMessage:
        self.inbox.clear()
        self.host.send(self.local, relay, stun.encode(msg, integrity_key=key))
        self.net.run_for(1.0)
        assert len(self.inbox) == 1
        data, _ = self.inbox.pop()
        msg = stun.decode(data)
        if key is not None and msg.message_class == stun.MessageClass.SUCCESS:
            assert stun.check_integrity(data, key)
        return msg

    def tid(self) -> bytes:
        self._tid += 1
        return self._tid.to_bytes(12, "big")

    def authenticated(self, method: int, username: str, nonce: str) -> stun.StunMessage:
        """A request carrying the long-term credential attributes (the caller adds the rest and the key)."""
        return stun.StunMessage.request(method, self.tid()).add_username(username).add_realm(REALM).add_nonce(nonce)


def _world():
    net = SimNetwork(seed=1)
    relay_host = net.add_host("relay", ["198.51.100.50", "2001:db8::50"])
    relay = SimRelay(net, relay_host)
    inside = net.add_nat(NatBox("nat", "203.0.113.7", PORT_RESTRICTED_CONE))
    client_host = net.add_host("client", ["10.1.0.2"], realm=inside)
    peer_host = net.add_host("peer", ["198.51.100.60"])
    return (
        net,
        relay,
        RawClient(net, client_host, ("10.1.0.2", 40000)),
        RawClient(net, peer_host, ("198.51.100.60", 5555)),
    )


def test_firezone_password_vector():
    # docs/protocol.md §4.5 test vector
    assert (
        firezone_password(1685984278, "1cab293a-4032-46f4-862a-40e5d174b0d2", "uvdgKvS9GXYZ_vmv")
        == "6xUIoZ+QvxKhRasLifwfRkMXl+ETLJUsFkHlXjlHAkg"
    )


def test_binding_reports_the_nat_mapped_address():
    _, relay, client, _ = _world()
    response = client.request(relay.addresses[0], stun.StunMessage.request(stun.Method.BINDING, client.tid()))
    assert response.message_class == stun.MessageClass.SUCCESS
    assert response.xor_address(stun.Attr.XOR_MAPPED_ADDRESS) == ("203.0.113.7", 40000)


def test_allocate_channel_bind_and_channel_data_both_ways():
    net, relay, client, peer = _world()
    username, password = mint_credentials(relay.secret, "c2VjcmV0LWtleQ==")
    server = relay.addresses[0]

    first = client.request(
        server, stun.StunMessage.request(stun.Method.ALLOCATE, client.tid()).add_requested_transport()
    )
    assert first.error_code() is not None and first.error_code()[0] == 401
    assert first.realm() == REALM
    nonce = first.nonce()
    assert nonce

    key = stun.long_term_key(username, REALM, password)

    wrong = client.request(
        server, client.authenticated(stun.Method.ALLOCATE, username, nonce).add_requested_transport(), key=b"wrong" * 4
    )
    assert wrong.error_code()[0] == 401

    allocate = (
        client.authenticated(stun.Method.ALLOCATE, username, nonce)
        .add_requested_transport()
        .add_additional_address_family()
    )
    ok = client.request(server, allocate, key=key)
    assert ok.message_class == stun.MessageClass.SUCCESS, ok.error_code()
    relayed = ok.xor_addresses(stun.Attr.XOR_RELAYED_ADDRESS)
    assert [r[0] for r in relayed] == ["198.51.100.50", "2001:db8::50"]
    assert ok.lifetime() == 600

    # No channel yet: the peer cannot reach the client.
    peer.host.send(peer.local, relayed[0], b"too early")
    net.run_for(1.0)
    assert client.inbox == []

    bind = (
        client.authenticated(stun.Method.CHANNEL_BIND, username, nonce)
        .add_channel_number(0x4001)
        .add_xor_address(stun.Attr.XOR_PEER_ADDRESS, peer.local)
    )
    assert client.request(server, bind, key=key).message_class == stun.MessageClass.SUCCESS

    client.host.send(client.local, server, struct.pack("!HH", 0x4001, 5) + b"hello")
    net.run_for(1.0)
    assert peer.inbox == [(b"hello", relayed[0])]

    peer.host.send(peer.local, relayed[0], b"back")
    net.run_for(1.0)
    assert client.inbox == [(struct.pack("!HH", 0x4001, 4) + b"back", server)]

    refresh = client.request(
        server, client.authenticated(stun.Method.REFRESH, username, nonce).add_lifetime(0), key=key
    )
    assert refresh.message_class == stun.MessageClass.SUCCESS
    assert relay.allocations == 0


def test_stale_nonce_is_answered_with_438():
    net, relay, client, _ = _world()
    relay.nonce_lifetime = 5.0
    username, password = mint_credentials(relay.secret, "a2V5")
    key = stun.long_term_key(username, REALM, password)
    server = relay.addresses[0]
    nonce = client.request(server, stun.StunMessage.request(stun.Method.ALLOCATE, client.tid())).nonce()
    net.run_for(10.0)
    msg = client.authenticated(stun.Method.ALLOCATE, username, nonce).add_requested_transport()
    response = client.request(server, msg, key=key)
    assert response.error_code()[0] == 438
    assert response.nonce() != nonce


def test_expired_username_is_rejected():
    _, relay, client, _ = _world()
    username, password = mint_credentials(relay.secret, "a2V5", expiry=1_000)
    key = stun.long_term_key(username, REALM, password)
    server = relay.addresses[0]
    nonce = client.request(server, stun.StunMessage.request(stun.Method.ALLOCATE, client.tid())).nonce()
    msg = client.authenticated(stun.Method.ALLOCATE, username, nonce).add_requested_transport()
    assert client.request(server, msg, key=key).error_code()[0] == 401
