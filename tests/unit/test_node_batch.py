"""Node.handle_input_batch is handle_input for many datagrams: same packets, drops, transmits, events and later state.

A gateway Node with three client connections is built once (two clients have answered handshakes whose keypairs the
gateway has not seen used yet, the third has not handshaken) and copied for every example. Hypothesis then picks a
sequence from a pool of datagrams -- transport runs, keepalives, authenticated-but-invalid inner packets, replays,
handshake initiations (new and repeated), unknown receiver indices, short and garbage datagrams, other sources -- and
the sequence goes into one copy one datagram at a time and into the other as one batch. Both copies must then agree
on everything observable, also after their timers ran.
"""

from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.base import Address
from dataplane.ice.candidate import Candidate
from dataplane.io.rng import SeededRng
from dataplane.node import IceCredentials, Node
from dataplane.wireguard.constants import DEFAULT_MTU
from dataplane.wireguard.crypto import public_key
from dataplane.wireguard.tunn import IndexTable, Tunn
from tests.sim.harness import private_key_for
from tests.sim.nat import PORT_RESTRICTED_CONE
from tests.sim.world import build_world, ipv4_udp

CLIENT_CREDS = IceCredentials("cccc", "c" * 22)
GATEWAY_CREDS = IceCredentials("gggg", "g" * 22)
WALL_EPOCH = 1_800_000_000.0


@dataclass(frozen=True)
class _Base:
    node: Node
    now: float
    local: Address
    pool: tuple[tuple[bytes, Address], ...]  # (datagram, source)


def _client_tunn(name: str, gateway: Node, now: float, wall_offset: float = 0.0) -> Tunn:
    rng = SeededRng(len(name) * 7919 + int(wall_offset))
    return Tunn(
        private_key_for(name), gateway.public_key, None, IndexTable(rng), rng, lambda: WALL_EPOCH + now + wall_offset
    )


def _drain(node: Node) -> list[Any]:
    out: list[Any] = []
    while (transmit := node.poll_transmit()) is not None:
        out.append(transmit)
    return out


def _data_messages(client: Tunn, now: float, count: int, tag: str) -> list[bytes]:
    for index in range(count):
        client.encapsulate(ipv4_udp("100.64.0.9", "172.20.0.1", f"{tag}-{index}".encode()), now)
    return client.drain_transmits()


@functools.cache
def _base() -> _Base:
    world = build_world(PORT_RESTRICTED_CONE, relays=1, seed=5)
    node = world.gateway.node
    now = world.net.now
    sources: dict[str, Address] = {}
    for number, name in enumerate(("client-1", "client-2", "client-3")):
        assert node.upsert_connection(
            name,
            remote_public_key=public_key(private_key_for(name)),
            preshared_key=None,
            local_credentials=GATEWAY_CREDS,
            remote_credentials=IceCredentials(f"cc{number}c", "c" * 22),
            now=now,
        )
        sources[name] = ("203.0.113.77", 40000 + number)
        node.add_remote_candidate(name, Candidate.host(sources[name]), now)
    local = next(pair.local.address for pair in node._connections["client-1"].agent.pairs)
    while node.poll_event() is not None:
        pass
    _drain(node)
    pool: list[tuple[bytes, Address]] = []
    for name in ("client-1", "client-2"):
        client = _client_tunn(name, node, now)
        client.send_keepalive(now)
        (initiation,) = client.drain_transmits()
        assert node.handle_input(initiation, sources[name], local, now) is None
        (response,) = [t.payload for t in _drain(node) if t.payload[0] == 2]
        client.decapsulate(response, now)
        client.drain_transmits()  # the staged keepalive: kept out, so the gateway's keypair stays unconfirmed
        src = sources[name]
        pool += [(message, src) for message in _data_messages(client, now, 6, name)]
        client.send_keepalive(now)
        pool += [(message, src) for message in client.drain_transmits()]
        client.mtu = 0  # an authenticated message whose plaintext is no IP packet
        client.encapsulate(b"\x45\x00", now)
        client.mtu = DEFAULT_MTU
        pool += [(message, src) for message in client.drain_transmits()]
        pool.append((pool[-3][0], ("198.51.100.1", 40000)))  # the same message from elsewhere
    # Handshakes that happen during the sequence: client-3's first, and client-1 handshaking again.
    for name, offset in (("client-3", 0.0), ("client-1", 5.0)):
        client = _client_tunn(name, node, now, wall_offset=offset)
        client.send_keepalive(now)
        pool += [(message, sources[name]) for message in client.drain_transmits()]
    transport = pool[0][0]
    pool += [
        (b"\x04\x00\x00\x00\xff\xff\xff\xff" + transport[8:], sources["client-1"]),  # unknown receiver index
        (transport[:20], sources["client-1"]),  # too short
        (transport[:-1] + bytes([transport[-1] ^ 1]), sources["client-1"]),  # fails to authenticate
        (b"\x05garbage", sources["client-2"]),
        (b"", sources["client-2"]),
    ]
    return _Base(node, now, local, tuple(pool))


_SHARED: dict[int, object] = {}


def _share(aead: ChaCha20Poly1305) -> tuple[Any, tuple[int]]:
    _SHARED[id(aead)] = aead
    return _SHARED.__getitem__, (id(aead),)


@contextlib.contextmanager
def _aeads_shared_by_copies() -> Iterator[None]:
    """An AEAD object cannot be copied but never changes after construction: both copies may use the same one."""
    copyreg.dispatch_table[ChaCha20Poly1305] = _share
    try:
        yield
    finally:
        del copyreg.dispatch_table[ChaCha20Poly1305]


def _two_copies(node: Node) -> tuple[Node, Node]:
    with _aeads_shared_by_copies():
        copies = copy.deepcopy(node), copy.deepcopy(node)
    for copied in copies:  # the node finds a connection by id(tunnel), which a copy changes
        copied._by_tunnel = {id(conn.tunnel): conn for conn in copied._connections.values()}
    return copies


def _observe(node: Node) -> dict[str, Any]:
    conns = node._connections
    return {
        "drops": dict(node.drops.counts),
        "transmits": _drain(node),
        "events": [event for event in iter(node.poll_event, None)],
        "timeout": node.poll_timeout(),
        "connections": node.connections,
        "tunnel_drops": {cid: dict(conn.tunnel.drops.counts) for cid, conn in conns.items()},
        "timers": {
            cid: {
                slot: getattr(conn.tunnel._timers, slot)
                for slot in type(conn.tunnel._timers).__slots__
                if slot != "rng"
            }
            for cid, conn in conns.items()
        },
        "data_path": {cid: conn.data_path for cid, conn in conns.items()},
        "agents": {
            cid: (conn.agent.idle, conn.agent._last_activity, conn.agent.poll_timeout()) for cid, conn in conns.items()
        },
        "rx": node.wireguard_bytes(),
    }


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_batch_gives_what_the_same_datagrams_one_by_one_give(data: st.DataObject) -> None:
    base = _base()
    pool = base.pool
    # Runs: a pool entry repeated (replays inside a run) or a slice of consecutive messages of one client.
    piece = st.one_of(
        st.tuples(st.integers(0, len(pool) - 1), st.integers(1, 3), st.just(False)),
        st.tuples(st.integers(0, len(pool) - 1), st.integers(1, 6), st.just(True)),
    )
    pieces = data.draw(st.lists(piece, max_size=12))
    sequence: list[tuple[bytes, Address, Address]] = []
    for start, length, consecutive in pieces:
        if consecutive:
            sequence += [(message, src, base.local) for message, src in pool[start : start + length]]
        else:
            message, src = pool[start]
            sequence += [(message, src, base.local)] * length
    one_by_one, batched = _two_copies(base.node)
    now = base.now + data.draw(st.sampled_from([0.0, 0.5, 40.0]))
    if now > base.now + 1.0:  # later, where the agents went idle
        one_by_one.handle_timeout(now)
        batched.handle_timeout(now)
        _observe(one_by_one)
        _observe(batched)
    expected = [r for r in (one_by_one.handle_input(d, s, local, now) for d, s, local in sequence) if r is not None]
    assert batched.handle_input_batch(sequence, now) == expected
    assert _observe(batched) == _observe(one_by_one)
    for later in (1.0, 10.5, 11.0, 21.5, 30.0, 125.0, 200.0):
        batched.handle_timeout(now + later)
        one_by_one.handle_timeout(now + later)
        assert _observe(batched) == _observe(one_by_one)


def test_a_run_of_transport_messages_comes_out_in_order() -> None:
    base = _base()
    node, _ = _two_copies(base.node)
    run = [(message, src, base.local) for message, src in base.pool[:6]]
    packets = node.handle_input_batch(run, base.now)
    assert [cid for cid, _ in packets] == ["client-1"] * 6
    assert [packet[28:] for _, packet in packets] == [f"client-1-{index}".encode() for index in range(6)]
