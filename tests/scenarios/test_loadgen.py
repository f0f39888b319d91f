"""Load generator smoke run: 20 client identities from one process connect through the real gateway and ping."""

from __future__ import annotations

import pytest

from lab.world import LabWorld
from tests.scenarios.helpers import SCENARIO_MARKS, assert_no_unprovoked_problems, metric, report

pytestmark = [*SCENARIO_MARKS, pytest.mark.timeout(180)]

SMOKE_CLIENTS = 20


async def test_twenty_identities_connect_and_ping() -> None:
    async with LabWorld(
        gateway_nat="masquerade", client_nat="masquerade", load_clients=SMOKE_CLIENTS, blob_size=4096
    ) as world:
        await world.wait_gateway_joined(timeout=20)
        summary = await world.run_loadgen(SMOKE_CLIENTS, rate=2.0, duration=3.0, setup_timeout=60.0)
        assert "error" not in summary, summary
        metrics = await world.gateway_metrics()
        report(
            "loadgen_smoke",
            clients=str(summary["clients"]),
            connected=str(summary["connected"]),
            bring_up_seconds=summary["bring_up_seconds"],
            setup_p50_seconds=summary["setup_seconds"]["p50"],
            setup_p99_seconds=summary["setup_seconds"]["p99"],
            pings=f"{summary['pings_answered']}/{summary['pings_sent']}",
            rtt_p99_ms=summary["rtt_ms"]["p99"],
            gateway_connections=metric(metrics, "firezone_connections"),
        )
        assert summary["connected"] == SMOKE_CLIENTS, summary
        assert summary["answered_by_every_client"], summary
        assert summary["pings_answered"] >= 0.9 * summary["pings_sent"], summary
        assert_no_unprovoked_problems(world)
