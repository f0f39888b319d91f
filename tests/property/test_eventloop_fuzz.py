"""Issue 11 finding 5: whatever valid-shaped pushes the portal sends, the event loop and the gateway state never raise.

Hypothesis builds sequences of portal pushes whose JSON has the right shape but arbitrary values (huge and negative
numbers, odd strings, duplicate ids, unknown fields, missing optional fields) and feeds them to the real
:class:`agent.eventloop.Eventloop` over the real :class:`dataplane.gateway.GatewayState`, with time passing in between.
Anything a model accepts must be usable: no exception may escape (``OverflowError`` from ``float(10**400)`` did).
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.eventloop import Eventloop
from dataplane.gateway import GatewayState
from dataplane.io.rng import SeededRng
from protocol.phoenix import ChannelJoined, PushReceived
from tests.sim.harness import private_key_for

KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
PSK = "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM="

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64, 10**400, -(10**400), 2145916800]),
)
ids = st.one_of(st.sampled_from(["c1", "c2", "r1", "r2", "relay-1", ""]), st.text(max_size=40))
expiry = st.one_of(st.none(), numbers)
ipv4 = st.one_of(st.sampled_from(["100.64.0.2", "100.64.0.3", "0.0.0.0", "255.255.255.255"]), st.ip_addresses(v=4))
ipv6 = st.one_of(st.sampled_from(["fd00:2021:1111::2", "::", "ff02::1"]), st.ip_addresses(v=6))
port_filter = st.fixed_dictionaries(
    {"protocol": st.sampled_from(["tcp", "udp"])},
    optional={"port_range_start": numbers, "port_range_end": numbers},
)
filters = st.lists(st.one_of(port_filter, st.just({"protocol": "icmp"})), max_size=4)
cidr = st.one_of(
    st.sampled_from(["172.20.0.0/16", "10.0.0.0/8", "0.0.0.0/0", "::/0", "fd00::/8", "100.64.0.0/10"]),
    st.builds(lambda ip, n: f"{ip}/{n}", st.ip_addresses(v=4), st.integers(0, 32)),
)
resource = st.one_of(
    st.fixed_dictionaries(
        {"id": ids, "type": st.just("cidr"), "address": cidr, "name": st.text(max_size=10), "filters": filters}
    ),
    st.fixed_dictionaries({"id": ids, "type": st.just("dns"), "address": st.text(max_size=30), "filters": filters}),
    st.fixed_dictionaries({"id": ids, "type": st.just("internet")}),
)
relay = st.fixed_dictionaries(
    {
        "id": ids,
        "type": st.just("turn"),
        "addr": st.sampled_from(["198.51.100.1:3478", "[2001:db8::1]:3478", "127.0.0.1:1", "0.0.0.0:65535"]),
        "username": st.text(max_size=20),
        "password": st.text(max_size=20),
        "expires_at": numbers,
    }
)
candidate = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda prio, ip, port: f"candidate:1 1 udp {prio} {ip} {port} typ host",
        numbers,
        st.ip_addresses(),
        numbers,
    ),
)
credentials = st.fixed_dictionaries({"username": st.text(max_size=8), "password": st.text(max_size=30)})


def _authorization(client_id: str, res: dict[str, Any], v4: Any, v6: Any, exp: Any, creds: Any) -> dict[str, Any]:
    return {
        "ref": "ref",
        "resource": res,
        "client": {"id": client_id, "public_key": KEY, "preshared_key": PSK, "ipv4": str(v4), "ipv6": str(v6)},
        "client_ice_credentials": creds,
        "gateway_ice_credentials": creds,
        "expires_at": exp,
    }


pushes = st.one_of(
    st.tuples(
        st.just("init"),
        st.fixed_dictionaries(
            {
                "interface": st.fixed_dictionaries({"ipv4": ipv4.map(str), "ipv6": ipv6.map(str)}),
                "relays": st.lists(relay, max_size=3),
                "authorizations": st.lists(
                    st.fixed_dictionaries({"client_id": ids, "resource_id": ids, "expires_at": expiry}), max_size=4
                ),
            },
            optional={"flow_logs": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), numbers, max_size=2))},
        ),
    ),
    st.tuples(
        st.just("create_authorization"), st.builds(_authorization, ids, resource, ipv4, ipv6, expiry, credentials)
    ),
    st.tuples(
        st.sampled_from(["ice_candidates", "invalidate_ice_candidates"]),
        st.fixed_dictionaries({"client_id": ids, "candidates": st.lists(candidate, max_size=4)}),
    ),
    st.tuples(st.just("reject_access"), st.fixed_dictionaries({"client_id": ids, "resource_id": ids})),
    st.tuples(st.just("resource_updated"), resource),
    st.tuples(
        st.just("relays_presence"),
        st.fixed_dictionaries(
            {"disconnected_ids": st.lists(ids, max_size=3), "connected": st.lists(relay, max_size=2)}
        ),
    ),
    st.tuples(
        st.just("access_authorization_expiry_updated"),
        st.fixed_dictionaries({"client_id": ids, "resource_id": ids, "expires_at": expiry}),
    ),
)
steps = st.lists(st.tuples(pushes, st.floats(min_value=0.0, max_value=30.0)), min_size=1, max_size=12)


class Sender:
    joined = True

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Any]] = []

    def push(self, event: str, payload: Any) -> bool:
        self.pushed.append((event, payload))
        return True


@settings(max_examples=150)
@given(steps=steps, wall_start=st.sampled_from([1_800_000_000.0, 0.0, 4_102_444_800.0]))
def test_valid_shaped_pushes_never_escape_the_event_loop(
    steps: list[tuple[tuple[str, Any], float]], wall_start: float
) -> None:
    clock = {"mono": 0.0, "wall": wall_start}
    state = GatewayState(private_key_for("fuzz"), rng=SeededRng(7), wall_clock=lambda: clock["wall"])
    sender = Sender()
    loop = Eventloop(sender, state, lambda: clock["mono"])
    loop.handle_channel_event(ChannelJoined())
    for (event, payload), elapsed in steps:
        loop.handle_channel_event(PushReceived(event, payload))
        clock["mono"] += elapsed
        clock["wall"] += elapsed
        state.handle_timeout(clock["mono"])
        loop.flush_outbound()
        while state.poll_transmit() is not None:
            pass
        while state.poll_event() is not None:
            pass
    # Packets for whatever clients exist afterwards are judged without raising either.
    state.handle_tun_packets([bytes(40), b"\x45" + bytes(19), b"\x60" + bytes(39)], clock["mono"])
    state.handle_datagrams(
        [(b"\x01\x00\x00\x00" + bytes(144), ("198.51.100.9", 5000), ("10.0.0.1", 52625))], clock["mono"]
    )
