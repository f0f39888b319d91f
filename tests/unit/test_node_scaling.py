"""The Node's per-call work does not grow with its connections or its relay's channels (a gateway holds ~1,000).

Work is counted (deadline look-ups, candidates built), never timed: performance figures belong to lab.load_run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dataplane import stun, turn
from dataplane.base import Address
from dataplane.ice import agent as ice
from dataplane.ice.candidate import Candidate
from dataplane.node import CandidateGathered, IceCredentials, Node
from dataplane.wireguard import tunn as wg
from tests.sim.harness import private_key_for
from tests.sim.nat import PORT_RESTRICTED_CONE
from tests.sim.world import build_world

GATEWAY_CREDS = IceCredentials("gggg", "g" * 22)


def _upsert(node: Node, i: int, now: float) -> None:
    assert node.upsert_connection(
        f"client-{i}",
        remote_public_key=private_key_for(f"peer-{i}")[::-1],
        preshared_key=bytes(32),
        local_credentials=GATEWAY_CREDS,
        remote_credentials=IceCredentials(f"c{i:04d}", "c" * 22),
        now=now,
    )


def _counting(monkeypatch: pytest.MonkeyPatch, calls: list[int], owner: Any, name: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)


@contextmanager
def _timer_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls = [0]
    for owner, name in (
        (stun.Transaction, "poll_timeout"),
        (stun.Transaction, "handle_timeout"),
        (turn._Channel, "expires_at"),
        (turn._Channel, "refresh_at"),
        (ice.IceAgent, "poll_timeout"),
        (ice.IceAgent, "handle_timeout"),
        (wg.Tunn, "poll_timeout"),
        (wg.Tunn, "handle_timeout"),
    ):
        _counting(monkeypatch, calls, owner, name)
    yield calls
    monkeypatch.undo()


def _gateway_with(connections: int) -> tuple[Node, float]:
    world = build_world(PORT_RESTRICTED_CONE, relays=1)
    node = world.gateway.node
    now = world.net.now
    for i in range(connections):
        _upsert(node, i, now)
    # One channel per client, as the gateway's relayed pairs create them (bound, so each has timers of its own).
    allocation = next(iter(node._relays.values())).allocation
    for i in range(connections):
        allocation.bind_channel((f"192.0.2.{i % 250 + 1}", 20000 + i), now)
    while allocation.poll_transmit() is not None:
        pass
    return node, now


def test_poll_and_handle_timeout_work_does_not_grow_with_connections_and_channels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = []
    for connections in (10, 300):
        node, now = _gateway_with(connections)
        deadline = node.poll_timeout()
        assert deadline is not None and deadline > now  # nothing due: each call only peeks at the heaps
        with _timer_lookups(monkeypatch) as calls:
            for _ in range(50):
                node.poll_timeout()
                node.handle_timeout(now)
        work.append(calls[0])
    small, large = work
    assert large <= small + 20, work  # a walk over connections or channels would cost 30x as much


def test_upsert_builds_candidates_once_not_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build_world(PORT_RESTRICTED_CONE, relays=2)
    node = world.gateway.node
    calls = [0]
    for name in ("host", "server_reflexive", "relayed"):
        _counting(monkeypatch, calls, Candidate, name)
    gathered: dict[str, set[Candidate]] = {}
    for i in range(200):
        _upsert(node, i, world.net.now)
    while (event := node.poll_event()) is not None:
        if isinstance(event, CandidateGathered):
            gathered.setdefault(event.connection_id, set()).add(event.candidate)
    assert calls[0] <= 10, calls  # host + srflx + each relay's relayed, not 3 per connection
    assert len(gathered) == 200
    assert all(sorted(c.kind.value for c in cands) == ["host", "relay", "srflx"] for cands in gathered.values())


def test_cached_candidates_follow_a_changed_relay_address() -> None:
    world = build_world(PORT_RESTRICTED_CONE, relays=1)
    node = world.gateway.node
    _upsert(node, 0, world.net.now)
    relay = next(iter(node._relays.values()))
    before = {c for c, _ in relay.candidates(include_relayed=True)}
    moved: Address = ("198.51.100.99", 50999)
    relay.relayed = {moved}
    after = {c for c, _ in relay.candidates(include_relayed=True)}
    assert before != after
    assert any(c.address == moved for c in after)


def test_the_static_key_is_loaded_once_not_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    world = build_world(PORT_RESTRICTED_CONE, relays=1)
    node = world.gateway.node
    loads = [0]
    _counting(monkeypatch, loads, X25519PrivateKey, "from_private_bytes")
    for i in range(20):
        _upsert(node, i, world.net.now)
    assert loads[0] == 0
    assert all(node.connection(f"client-{i}") is not None for i in range(20))
