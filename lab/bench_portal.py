"""``python -m lab.bench_portal``: what the gateway's portal-message handling costs with many clients.

A :class:`~dataplane.gateway.GatewayState` (sans-IO, fake clock, no sockets) gets one relay, then ``--clients`` clients
with ``--resources`` authorizations each through ``create_authorization`` (one connection per client, as the portal
sends them: a Phoenix text frame per message). Then the portal re-sends ``init`` carrying all of those authorizations
(the rejoin after a portal restart, docs/protocol.md §2.1), and the figures are, in milliseconds (best of
``--rounds`` runs: other load on the machine only ever adds time):

* ``create_authorization``: per message, frame to answer (JSON decode, validation, ``GatewayState``);
* ``init decode`` / ``init parse`` / ``init apply``: the JSON frame decoded, validated into :class:`Init`, and applied
  (every held authorization re-synced: kept, expiry updated);
* ``init total``: the three together (the goal: ≤ 1 s for 10,000 authorizations);
* ``init revoke``: an ``init`` with half the authorizations gone (those resources revoked; clients stay);
* ``init cold``: the same big ``init`` to a fresh gateway (no clients yet: nothing to re-sync).

    python -m lab.bench_portal [--clients 1000] [--resources 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from dataplane.gateway import AuthorizationOutcome, GatewayState
from dataplane.io.rng import SeededRng
from lab.bench_node import LOCAL, RELAY, bench_key, relay_binding_answer
from protocol.messages import CreateAuthorization, Init, parse_portal_message

WALL_NOW = 1_800_000_000.0
EXPIRES_AT = int(WALL_NOW) + 14 * 24 * 3600


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _frame(event: str, payload: dict[str, Any]) -> str:
    """A Phoenix V1 push as the portal writes it."""
    return json.dumps({"topic": "gateway", "event": event, "payload": payload, "ref": None})


def _resource(index: int) -> dict[str, Any]:
    return {
        "id": f"resource-{index:04d}",
        "type": "cidr",
        "name": f"network {index}",
        "address": f"172.{16 + index // 256}.{index % 256}.0/24",
        "filters": [{"protocol": "tcp", "port_range_start": 443, "port_range_end": 443}, {"protocol": "icmp"}],
    }


def _client_id(index: int) -> str:
    return f"{index:08x}-0000-4000-8000-{index:012x}"


def authorization_frame(client: int, resource: int) -> str:
    """``create_authorization`` for one client and resource (docs/protocol.md §2.1)."""
    client_id = _client_id(client)
    return _frame(
        "create_authorization",
        {
            "ref": f"ref-{client}-{resource}",
            "resource": _resource(resource),
            "client": {
                "id": client_id,
                "public_key": _b64(bench_key(client_id)[:32]),
                "preshared_key": _b64(hashlib.sha256(client_id.encode()).digest()),
                "ipv4": f"100.{64 + client // 65536}.{client // 256 % 256}.{client % 256}",
                "ipv6": f"fd00:2021:1111::{client // 65536:x}:{client % 65536:x}",
                "version": "1.5.0",
                "device_os_name": "Linux",
                "device_os_version": "6.1",
            },
            "client_ice_credentials": {"username": f"c{client:07d}", "password": "c" * 22},
            "gateway_ice_credentials": {"username": f"g{client:07d}", "password": "g" * 22},
            "expires_at": EXPIRES_AT,
            "flow_logs_ingest_token": None,
        },
    )


def init_frame(clients: int, resources: int, *, keep: Callable[[int, int], bool] = lambda c, r: True) -> str:
    """``init`` with one relay and the authorizations (client, resource) that ``keep`` selects."""
    relay = {
        "id": "relay-1",
        "type": "turn",
        "addr": f"{RELAY[0]}:{RELAY[1]}",
        "username": "1800000000:user",
        "password": "pass",
        "expires_at": EXPIRES_AT,
    }
    authorizations = [
        {"client_id": _client_id(c), "resource_id": f"resource-{r:04d}", "expires_at": EXPIRES_AT}
        for c in range(clients)
        for r in range(resources)
        if keep(c, r)
    ]
    return _frame(
        "init",
        {
            "interface": {"ipv4": "100.64.255.1", "ipv6": "fd00:2021:1111::ff:1"},
            "relays": [relay],
            "authorizations": authorizations,
            "account_slug": "bench",
            "flow_logs": {"api_url": None, "upload_interval_secs": 0, "upload_batch_size": 1000},
            "config": {"ipv4_masquerade_enabled": True, "ipv6_masquerade_enabled": True},
        },
    )


def _parse(frame: str) -> Any:
    decoded = json.loads(frame)
    message = parse_portal_message(decoded["event"], decoded["payload"])
    if isinstance(message, Init | CreateAuthorization):
        return message
    raise SystemExit(f"the benchmark's own {decoded['event']} was refused: {message}")


def fresh_gateway() -> GatewayState:
    state = GatewayState(bench_key("bench-gateway"), rng=SeededRng(1), wall_clock=lambda: WALL_NOW)
    state.set_portal_connected(True)
    return state


def _answer_relay_bindings(state: GatewayState, now: float) -> None:
    while (transmit := state.poll_transmit()) is not None:
        if (answer := relay_binding_answer(transmit)) is not None:
            state.handle_datagrams([(answer, RELAY, LOCAL)], now)


def populated_gateway(clients: int, resources: int) -> tuple[GatewayState, float]:
    """A gateway holding ``clients`` × ``resources`` authorizations; returns it and the seconds per
    ``create_authorization``."""
    state = fresh_gateway()
    state.apply_init(_parse(init_frame(0, 0)), 0.0)
    _answer_relay_bindings(state, 0.01)
    if state.node.relay_rtt("relay-1") is None:
        raise SystemExit("the relay's RTT was not measured; the benchmark cannot create connections")
    frames = [authorization_frame(c, r) for c in range(clients) for r in range(resources)]
    start = time.perf_counter()
    for frame in frames:
        if state.create_authorization(_parse(frame), 0.02) is not AuthorizationOutcome.ACCEPTED:
            raise SystemExit("create_authorization was not accepted")
        while state.poll_outbound() is not None:
            pass
    elapsed = time.perf_counter() - start
    while state.poll_transmit() is not None:
        pass
    return state, elapsed / max(1, len(frames))


def measure(clients: int, resources: int, rounds: int) -> dict[str, float]:
    """Milliseconds: see the module docstring."""
    state, per_authorization = populated_gateway(clients, resources)
    frame = init_frame(clients, resources)
    decode = parse = apply = total = float("inf")
    for round_number in range(rounds):
        now = 1.0 + round_number
        t0 = time.perf_counter()
        decoded = json.loads(frame)
        t1 = time.perf_counter()
        message = parse_portal_message(decoded["event"], decoded["payload"])
        t2 = time.perf_counter()
        assert isinstance(message, Init)
        state.apply_init(message, now)
        t3 = time.perf_counter()
        decode, parse, apply = min(decode, t1 - t0), min(parse, t2 - t1), min(apply, t3 - t2)
        total = min(total, t3 - t0)
    held = sum(len(state.resource_expiries(client)) for client in state.client_ids)
    if held != clients * resources:
        raise SystemExit(f"the init lost authorizations: {held} held, {clients * resources} sent")

    half = init_frame(clients, resources, keep=lambda c, r: r % 2 == 0)
    start = time.perf_counter()
    state.apply_init(_parse(half), 100.0)
    revoke = time.perf_counter() - start

    cold = float("inf")
    for _ in range(rounds):
        fresh = fresh_gateway()
        start = time.perf_counter()
        fresh.apply_init(_parse(frame), 0.0)
        cold = min(cold, time.perf_counter() - start)
    return {
        "create_authorization": per_authorization * 1e3,
        "init_decode": decode * 1e3,
        "init_parse": parse * 1e3,
        "init_apply": apply * 1e3,
        "init_total": total * 1e3,
        "init_revoke": revoke * 1e3,
        "init_cold": cold * 1e3,
        "init_bytes": float(len(frame)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--resources", type=int, default=10, help="authorizations per client")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    figures = measure(args.clients, args.resources, args.rounds)
    print(f"{args.clients} clients × {args.resources} resources = {args.clients * args.resources} authorizations")
    print(f"init frame: {figures.pop('init_bytes') / 1e6:.2f} MB")
    for name, value in figures.items():
        print(f"{name.replace('_', ' '):>22}: {value:9.3f} ms")


if __name__ == "__main__":
    main()
