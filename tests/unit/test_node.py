"""dataplane/node.py on its own: API contract, demultiplexing, relay sampling, garbage handling.

Whole-connection behaviour (direct/relayed paths, migration, roaming, consent) is in tests/sim/test_scenarios.py.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import stun
from dataplane.ice.agent import MAX_REMOTE_CANDIDATES
from dataplane.ice.candidate import Candidate
from dataplane.io.rng import SeededRng
from dataplane.node import (
    MAX_RELAYS,
    CandidateGathered,
    CandidateInvalidated,
    ConnectionClosed,
    DropReason,
    IceCredentials,
    Node,
    NodeEvent,
    NodeRole,
    NoRelays,
    RelayConfig,
)
from dataplane.wireguard.constants import DEFAULT_MTU
from dataplane.wireguard.crypto import public_key
from dataplane.wireguard.tunn import DropReason as TunnDropReason
from dataplane.wireguard.tunn import IndexTable, Tunn
from tests.sim.harness import private_key_for
from tests.sim.nat import PORT_RESTRICTED_CONE
from tests.sim.world import GATEWAY_ID, build_world, ipv4_udp

LOCAL = ("10.0.0.1", 52625)
CLIENT_CREDS = IceCredentials("cccc", "c" * 22)
GATEWAY_CREDS = IceCredentials("gggg", "g" * 22)


def _node(role: NodeRole = NodeRole.GATEWAY, seed: int = 0) -> Node:
    return Node(role, private_key_for(f"node-{seed}"), rng=SeededRng(seed), wall_clock=lambda: 1_800_000_000.0)


def _events(node: Node) -> list[NodeEvent]:
    out: list[NodeEvent] = []
    while (event := node.poll_event()) is not None:
        out.append(event)
    return out


def _upsert(node: Node, cid: str = "client-1", key_seed: str = "peer", now: float = 0.0) -> bool:
    return node.upsert_connection(
        cid,
        remote_public_key=private_key_for(key_seed)[::-1],
        preshared_key=bytes(32),
        local_credentials=GATEWAY_CREDS,
        remote_credentials=CLIENT_CREDS,
        now=now,
    )


def test_private_key_must_have_32_bytes():
    with pytest.raises(ValueError):
        Node(NodeRole.GATEWAY, b"short", rng=SeededRng(0), wall_clock=lambda: 0.0)


def test_new_connection_without_a_measured_relay_is_refused_with_no_relays():
    node = _node()
    assert _upsert(node) is False
    assert _events(node) == [NoRelays()]
    assert node.connection("client-1") is None


def test_relay_without_answer_yet_does_not_count_as_measured():
    node = _node()
    node.update_relays([], [RelayConfig("r1", (("198.51.100.10", 3478),), "u", "p")], 0.0)
    transmit = node.poll_transmit()
    assert transmit is not None and transmit.dst == ("198.51.100.10", 3478) and stun.is_stun(transmit.payload)
    assert _upsert(node) is False
    assert NoRelays() in _events(node)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([("198.51.100.10", 3478), ("198.51.100.99", 4000), ("::1", 3478)]))
def test_garbage_never_raises_and_is_counted(data, src):
    node = _node()
    node.update_relays([], [RelayConfig("r1", (("198.51.100.10", 3478),), "u", "p")], 0.0)
    _events(node)
    assert node.handle_input(data, src, LOCAL, 1.0) is None


def test_each_kind_of_unroutable_datagram_has_its_drop_reason():
    node = _node()
    node.handle_input(b"", ("198.51.100.99", 4000), LOCAL, 0.0)
    node.handle_input(b"\xff" * 40, ("198.51.100.99", 4000), LOCAL, 0.0)
    transport = struct.pack("<IIQ", 4, 0x12345678, 0) + bytes(32)
    node.handle_input(transport, ("198.51.100.99", 4000), LOCAL, 0.0)
    initiation = struct.pack("<II", 1, 7) + bytes(140)
    node.handle_input(initiation, ("198.51.100.99", 4000), LOCAL, 0.0)
    request = stun.StunMessage.request(stun.Method.BINDING, os.urandom(12)).add_username("nobody:home")
    node.handle_input(stun.encode(request), ("198.51.100.99", 4000), LOCAL, 0.0)
    assert node.drops[DropReason.EMPTY] == 1
    assert node.drops[DropReason.UNRECOGNISED] == 1
    assert node.drops[DropReason.WIREGUARD_NO_CONNECTION] == 2
    assert node.drops[DropReason.STUN_NO_CONNECTION] == 1


def test_encapsulate_for_an_unknown_connection_is_counted():
    node = _node()
    node.encapsulate("nobody", b"\x45" + bytes(19), 0.0)
    assert node.drops[DropReason.NO_CONNECTION] == 1
    assert node.poll_transmit() is None


def _measured_world(relays: int = 2, seed: int = 0):
    world = build_world(PORT_RESTRICTED_CONE, relays=relays, seed=seed)
    return world, world.gateway.node


def test_upsert_with_a_measured_relay_gathers_host_srflx_and_one_relays_candidates():
    world, node = _measured_world()
    assert all(node.relay_rtt(rid) is not None for rid in node.relay_ids)
    assert _upsert(node, now=world.net.now)
    gathered = [e.candidate for e in _events(node) if isinstance(e, CandidateGathered)]
    kinds = sorted(c.kind.value for c in gathered)
    assert kinds == ["host", "relay", "srflx"]  # one srflx for both relays (same mapping), one sampled relay
    assert node.connection("client-1").relay_id in node.relay_ids


def test_a_gateway_drops_traffic_for_a_connection_that_is_not_ready_instead_of_buffering():
    world, node = _measured_world()
    now = world.net.now
    assert _upsert(node, now=now)
    _events(node)
    while node.poll_transmit() is not None:  # candidate-gathering traffic, not ours to inspect here
        pass
    for _ in range(3):
        node.encapsulate("client-1", b"\x45" + bytes(19), now)
    assert node.drops[DropReason.CONNECTION_NOT_READY] == 3
    assert node.poll_transmit() is None
    # Nothing was held: time passing (ICE retries aside) never releases those packets or starts a handshake.
    node.handle_timeout(now + 30.0)
    sent = []
    while (transmit := node.poll_transmit()) is not None:
        sent.append(transmit.payload)
    assert not any(len(payload) >= 4 and payload[0] in (1, 4) and payload[1:4] == bytes(3) for payload in sent)


def test_upsert_identical_connection_reannounces_and_changed_one_replaces():
    world, node = _measured_world()
    now = world.net.now
    assert _upsert(node, now=now)
    first = [e for e in _events(node) if isinstance(e, CandidateGathered)]
    assert _upsert(node, now=now)
    again = _events(node)
    assert not any(isinstance(e, ConnectionClosed) for e in again)
    assert [e for e in again if isinstance(e, CandidateGathered)] == first
    assert _upsert(node, key_seed="other-key", now=now)
    replaced = _events(node)
    assert ConnectionClosed("client-1") in replaced
    assert node.connection("client-1") is not None


def test_close_connection_emits_closed_once():
    world, node = _measured_world()
    assert _upsert(node, now=world.net.now)
    _events(node)
    node.close_connection("client-1", world.net.now)
    node.close_connection("client-1", world.net.now)
    assert _events(node) == [ConnectionClosed("client-1")]


def test_relay_sampling_excludes_rtt_outliers_and_spreads_over_the_rest():
    world, node = _measured_world(relays=3)
    # Make relay-2 an outlier: its measured RTT is far above the others'.
    node._relays["relay-2"].allocation.rtt = 5.0
    chosen = {node._sample_relay() for _ in range(200)}
    assert chosen == {"relay-0", "relay-1"}


def test_removing_the_sampled_relay_moves_the_connection_to_another():
    world, node = _measured_world(relays=2)
    assert _upsert(node, now=world.net.now)
    used = node.connection("client-1").relay_id
    _events(node)
    node.update_relays([used], [], world.net.now)
    events = _events(node)
    assert node.connection("client-1").relay_id not in (None, used)
    invalidated = [e.candidate for e in events if isinstance(e, CandidateInvalidated)]
    gathered = [e.candidate for e in events if isinstance(e, CandidateGathered)]
    assert [c.kind.value for c in invalidated] == ["relay"]
    assert [c.kind.value for c in gathered] == ["relay"]


def test_client_role_is_ice_controlling():
    world = build_world(PORT_RESTRICTED_CONE, seed=1)
    client = world.add_client(PORT_RESTRICTED_CONE)
    world.net.run_for(2.0)
    world.connect(client)
    assert client.peer.node._connections[GATEWAY_ID].agent.controlling
    assert not world.gateway.node._connections[client.client_id].agent.controlling


def test_transport_plaintext_of_one_to_three_bytes_is_dropped_by_the_node() -> None:
    world = build_world(PORT_RESTRICTED_CONE, seed=1)
    client = world.add_client(PORT_RESTRICTED_CONE)
    world.net.run_for(2.0)
    world.connect(client)
    world.net.run_for(3.0)
    packet = ipv4_udp(client.tunnel_ip, "100.64.0.1", b"first")
    client.peer.send_packet(GATEWAY_ID, packet)
    world.net.run_for(1.0)
    assert (client.client_id, packet) in world.gateway.received
    gateway_node = world.gateway.node
    messages = _short_plaintexts(client.peer.node._connections[GATEWAY_ID].tunnel, world.net.now)
    # Fed straight in, as the gateway's receive loop would: nothing raises, each is counted by the tunnel.
    tunnel = gateway_node._connections[client.client_id].tunnel
    before = tunnel.drops[TunnDropReason.INVALID_INNER_PACKET]
    selected = gateway_node._connections[client.client_id].selected
    assert selected is not None
    local, src = selected[0].address, selected[1].address
    for message in messages:
        assert gateway_node.handle_input(message, src, local, world.net.now) is None
    assert tunnel.drops[TunnDropReason.INVALID_INNER_PACKET] == before + 3


def _short_plaintexts(sender: Tunn, now: float) -> list[bytes]:
    sender.mtu = 0  # no padding: the plaintext is exactly what was encapsulated
    for plaintext in (b"\x45", b"\x45\x00", b"\x60\x00\x00"):
        sender.encapsulate(plaintext, now)
    sender.mtu = DEFAULT_MTU
    return sender.drain_transmits()


def test_closing_connections_empties_every_lookup_table() -> None:
    world, node = _measured_world()
    now = world.net.now
    for index in range(3):
        assert _upsert(node, cid=f"client-{index}", key_seed=f"peer-{index}", now=now)
        node.add_remote_candidate(f"client-{index}", f"candidate:1 1 udp 2130706431 10.9.0.{index} 4000 typ host", now)
    assert len(node._agents) > 0 and len(node._by_agent) == 3
    for index in range(3):
        node.close_connection(f"client-{index}", now)
    assert len(node._agents) == 0
    assert not node._by_agent and not node._by_ufrags and not node._by_selected


# -- handshake flood protection --------------------------------------------------------------------------------------


def _gateway_with_a_client_tunnel(seed: int = 0) -> tuple[Node, Tunn, tuple[str, int], tuple[str, int], float]:
    """A gateway Node with one connection whose ICE agent has a pair to ``src``, and the client's Tunn."""
    world, node = _measured_world(seed=seed)
    now = world.net.now
    client_key = private_key_for("flood-client")
    node.upsert_connection(
        "client-1",
        remote_public_key=public_key(client_key),
        preshared_key=None,
        local_credentials=GATEWAY_CREDS,
        remote_credentials=CLIENT_CREDS,
        now=now,
    )
    src = ("203.0.113.77", 40000)
    node.add_remote_candidate("client-1", Candidate.host(src), now)
    local = next(pair.local.address for pair in node._connections["client-1"].agent.pairs)
    _events(node)
    while node.poll_transmit() is not None:
        pass
    rng = SeededRng(99)
    client = Tunn(client_key, node.public_key, None, IndexTable(rng), rng, lambda: 1_800_000_000.0 + now)
    return node, client, src, local, now


def _handshake_transmits(node: Node) -> list[bytes]:
    out = []
    while (transmit := node.poll_transmit()) is not None:
        if transmit.payload[:1] in (b"\x02", b"\x03"):
            out.append(transmit.payload)
    return out


def test_under_load_an_initiation_without_mac2_gets_only_a_cookie_reply_then_succeeds_with_it() -> None:
    node, client, src, local, now = _gateway_with_a_client_tunnel()
    node.handshake_load.force = True
    client.send_keepalive(now)
    (initiation,) = client.drain_transmits()
    assert node.handle_input(initiation, src, local, now) is None
    assert node.drops[DropReason.COOKIE_REQUIRED] == 1
    (cookie_reply,) = _handshake_transmits(node)
    assert cookie_reply[0] == 3
    info = node.connection("client-1")
    assert info is not None and info.handshakes == 0
    client.decapsulate(cookie_reply, now)
    client.handle_timeout(now + 10.0)  # the retry carries mac2 now
    (retry,) = client.drain_transmits()
    node.handle_input(retry, src, local, now + 10.0)
    (response,) = _handshake_transmits(node)
    assert response[0] == 2
    assert node.drops[DropReason.COOKIE_REQUIRED] == 1


def test_under_load_valid_mac2_still_passes_a_per_source_rate_limit() -> None:
    node, client, src, local, now = _gateway_with_a_client_tunnel()
    node.handshake_load.force = True
    client.send_keepalive(now)
    node.handle_input(client.drain_transmits()[0], src, local, now)
    client.decapsulate(_handshake_transmits(node)[0], now)
    client.handle_timeout(now + 10.0)
    (retry,) = client.drain_transmits()
    for _ in range(10):  # replays of a valid message: the limiter acts before any Curve25519 work
        node.handle_input(retry, src, local, now + 10.0)
    assert node.drops[DropReason.HANDSHAKE_RATE_LIMITED] == 5  # burst 5, then 20/s


def test_a_handshake_burst_the_gateway_keeps_up_with_gets_no_cookie_when_it_sees_its_queue() -> None:
    node, client, src, local, now = _gateway_with_a_client_tunnel()
    load = node.handshake_load
    load.needs_backlog = True
    for _ in range(load.threshold + 1):  # a burst over Firezone's 100 per second
        load.count(now)
    client.send_keepalive(now)
    (initiation,) = client.drain_transmits()
    node.handle_input(initiation, src, local, now)
    assert [message[0] for message in _handshake_transmits(node)] == [2]  # a response, no cookie
    assert node.drops[DropReason.COOKIE_REQUIRED] == 0
    load.note_backlog(16 * 1024 * 1024, 32 * 1024 * 1024, now)  # the receive queue backs up: now it is load
    client.handle_timeout(now + 10.0)
    client.send_keepalive(now + 10.0)
    for message in client.drain_transmits():
        if message[0] == 1:
            node.handle_input(message, src, local, now + 0.5)
    assert node.drops[DropReason.COOKIE_REQUIRED] == 1


def test_handshake_load_is_shared_across_connections() -> None:
    world = build_world(PORT_RESTRICTED_CONE, seed=3)
    world.gateway.node.handshake_load.threshold = 1
    clients = [world.add_client(PORT_RESTRICTED_CONE, seed=index) for index in range(3)]
    world.net.run_for(2.0)
    for client in clients:
        world.connect(client)
    world.net.run_for(30.0)
    gateway = world.gateway.node
    assert gateway.drops[DropReason.COOKIE_REQUIRED] >= 1  # three clients' handshakes in one second: under load
    for client in clients:  # each retried with the cookie and got through
        info = gateway.connection(client.client_id)
        assert info is not None and info.handshakes >= 1


def test_handshake_with_a_bad_mac1_or_length_is_dropped_before_any_work() -> None:
    node, client, src, local, now = _gateway_with_a_client_tunnel()
    client.send_keepalive(now)
    (initiation,) = client.drain_transmits()
    node.handle_input(initiation[:-40] + bytes(40), src, local, now)
    node.handle_input(initiation[:100], src, local, now)
    assert node.drops[DropReason.HANDSHAKE_BAD_MAC1] == 1
    assert node.drops[DropReason.HANDSHAKE_BAD_LENGTH] == 1
    assert not _handshake_transmits(node)


def test_remote_candidates_per_connection_are_bounded() -> None:
    world, node = _measured_world()
    now = world.net.now
    assert _upsert(node, now=now)
    for index in range(300):
        node.add_remote_candidate("client-1", Candidate.host((f"10.7.{index // 250}.{index % 250 + 1}", 9000)), now)
    assert len(node._connections["client-1"].remote_candidates) == MAX_REMOTE_CANDIDATES
    assert node.drops[DropReason.TOO_MANY_CANDIDATES] == 300 - MAX_REMOTE_CANDIDATES


def test_encapsulate_batch_keeps_order_and_has_session_tells_when_packets_would_be_sent() -> None:
    world = build_world(PORT_RESTRICTED_CONE, seed=2)
    client = world.add_client(PORT_RESTRICTED_CONE)
    world.net.run_for(2.0)
    gateway = world.gateway.node
    assert not gateway.has_session(client.client_id)  # unknown connection
    world.connect(client)
    assert not gateway.has_session(client.client_id)
    world.net.run_for(3.0)
    up = ipv4_udp(client.tunnel_ip, "100.64.0.1", b"up")
    client.peer.send_packet(GATEWAY_ID, up)
    world.net.run_for(1.0)
    assert (client.client_id, up) in world.gateway.received
    assert gateway.has_session(client.client_id)
    info = gateway.connection(client.client_id)
    assert info is not None and info.has_session
    downs = [ipv4_udp("100.64.0.1", client.tunnel_ip, f"down-{index}".encode()) for index in range(5)]
    gateway.encapsulate_batch(client.client_id, downs, world.net.now)
    world.gateway.flush(world.net.now)
    world.net.run_for(1.0)
    assert [packet for _, packet in client.peer.received] == downs
    gateway.encapsulate_batch("nobody", downs, world.net.now)
    assert gateway.drops[DropReason.NO_CONNECTION] == 5


def test_relays_from_the_portal_are_bounded() -> None:
    node = _node()
    configs = [RelayConfig(f"r{index}", ((f"198.51.100.{index + 1}", 3478),), "u", "p") for index in range(100)]
    node.update_relays([], configs, 0.0)
    assert len(node.relay_ids) == MAX_RELAYS


def test_a_second_answer_to_a_finished_check_is_counted_as_late_not_as_foreign_stun() -> None:
    world, node = _measured_world()
    now = world.net.now
    assert _upsert(node, now=now)
    _events(node)
    while node.poll_transmit() is not None:
        pass
    client = ("192.0.2.77", 40000)
    node.add_remote_candidate("client-1", Candidate.host(client), now)
    check = None
    for step in range(1, 40):
        node.handle_timeout(now + step * 0.05)
        while (transmit := node.poll_transmit()) is not None:
            if transmit.dst == client and stun.is_stun(transmit.payload):
                check = transmit
        if check is not None:
            break
    assert check is not None and check.src is not None
    response = stun.decode(check.payload).success_response()
    response.add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, check.src)
    answer = stun.encode(response, integrity_key=stun.short_term_key(CLIENT_CREDS.password))
    later = now + 2.0
    node.handle_input(answer, client, check.src, later)
    assert node.drops[DropReason.STUN_LATE_RESPONSE] == 0 and node.drops[DropReason.STUN_NO_CONNECTION] == 0
    node.handle_input(answer, client, check.src, later + 0.01)  # the same answer again (a retransmitted check's)
    assert node.drops[DropReason.STUN_LATE_RESPONSE] == 1
    assert node.drops[DropReason.STUN_NO_CONNECTION] == 0
    unknown = stun.StunMessage.request(stun.Method.BINDING, os.urandom(12)).success_response()
    node.handle_input(stun.encode(unknown), client, check.src, later + 0.02)
    assert node.drops[DropReason.STUN_NO_CONNECTION] == 1  # an answer to nothing we ever sent stays foreign


def test_a_connectivity_check_is_decoded_once_and_answered(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Node decodes a request to find the agent by USERNAME and hands the decoded message on (no second decode).
    world, node = _measured_world()
    now = world.net.now
    assert _upsert(node, now=now)
    _events(node)
    while node.poll_transmit() is not None:
        pass
    client = ("192.0.2.77", 40000)
    request = stun.StunMessage.request(stun.Method.BINDING, bytes(range(12)))
    request.add_username(f"{GATEWAY_CREDS.username}:{CLIENT_CREDS.username}")
    request.add_priority(0x6E0001FF).add_ice_controlling(7)
    data = stun.encode(request, integrity_key=stun.short_term_key(GATEWAY_CREDS.password))
    decodes: list[bytes] = []
    real_decode = stun.decode

    def counting_decode(payload: bytes) -> stun.StunMessage:
        decodes.append(payload)
        return real_decode(payload)

    monkeypatch.setattr(stun, "decode", counting_decode)
    node.handle_input(data, client, LOCAL, now + 0.01)
    answers = []
    while (transmit := node.poll_transmit()) is not None:
        if transmit.dst == client and stun.is_stun(transmit.payload):
            answers.append(real_decode(transmit.payload))
    assert decodes == [data]
    assert [(a.message_class, a.transaction_id) for a in answers] == [
        (stun.MessageClass.SUCCESS, request.transaction_id)
    ]
    assert answers[0].xor_address(stun.Attr.XOR_MAPPED_ADDRESS) == client
