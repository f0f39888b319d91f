"""Flow affinity end to end: a firezone-wg pair with 2 TUN queues never reorders the packets of one flow.

Sequence-numbered UDP streams (several flows at once, so both queues are busy) go through the tunnel; every flow's
sequence numbers must arrive strictly increasing (losses are allowed, reordering is not). The sender is paced by what
arrived and keeps sending until every flow delivered enough, so a loaded machine slows the test down instead of
starving it.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest

from lab.netns import Topology
from tests.integration.helpers_flow_order import send_sequenced_flows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_MISSING = [m for m in ("agent.wg", "lab.wg", "dataplane.wireguard.device") if importlib.util.find_spec(m) is None]


def _send_and_check(topo: Topology, implementation_a: str, implementation_b: str) -> None:
    from lab.wg import WgPair

    flows, per_flow, port = 8, 2500, 5400
    env = {"FIREZONE_NUM_TUN_THREADS": "2", "LOG_LEVEL": "error"}
    with tempfile.TemporaryDirectory(prefix="fz-flow-order-") as tmp:
        pair = WgPair.create(topo, implementation_a, implementation_b, log_dir=Path(tmp), env_a=env, env_b=env)  # type: ignore[arg-type]
        pair.a.ping(pair.b.tunnel_ip, count=2, interval=0.2)
        result = send_sequenced_flows(
            pair.a.ns.name,
            pair.b.ns.name,
            pair.b.tunnel_ip,
            port,
            flows=flows,
            per_flow=per_flow,
            # Up to window x flows datagrams in flight: enough to keep both queues busy, few enough not to overflow.
            window=64,
            receive_buffer=16 << 20,
            idle_timeout=2.0,
        )
        assert result.reordered == 0, f"{result.reordered} datagrams out of order"
        assert min(result.received_per_flow) > per_flow // 4, (
            f"too few datagrams arrived to judge order in {result.rounds_sent} rounds: {result.received_per_flow}"
        )


@pytest.mark.skipif(bool(_MISSING), reason=f"the firezone-wg daemon is not available yet (missing: {_MISSING})")
def test_firezone_wg_pair_with_two_queues_keeps_flow_order() -> None:
    with Topology("fo") as topo:
        _send_and_check(topo, "firezone-wg", "firezone-wg")


@pytest.mark.skipif(bool(_MISSING), reason=f"the firezone-wg daemon is not available yet (missing: {_MISSING})")
def test_wireguard_go_to_firezone_wg_with_two_queues_keeps_flow_order() -> None:
    with Topology("fo") as topo:
        _send_and_check(topo, "wireguard-go", "firezone-wg")
