"""Load generator smoke run: 20 client identities from one process connect through the real gateway and ping."""

from __future__ import annotations

from typing import Any

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
            ice_p50_seconds=summary["ice_seconds"]["p50"],
            ready_p50_seconds=summary["ready_seconds"]["p50"],
            ready_p99_seconds=summary["ready_seconds"]["p99"],
            pings=f"{summary['pings_answered']}/{summary['pings_sent']}",
            rtt_p99_ms=summary["rtt_ms"]["p99"],
            gateway_connections=metric(metrics, "firezone_connections"),
            cookie_replies=metric(metrics, "firezone_dataplane_drops", reason="cookie_required"),
        )
        assert summary["connected"] == SMOKE_CLIENTS, summary
        assert_setup_figures_consistent(summary)
        assert summary["pings_answered"] >= 0.9 * summary["pings_sent"], summary
        assert_no_unprovoked_problems(world)


def assert_setup_figures_consistent(summary: dict[str, Any]) -> None:
    """Connected means an answered ping, after ICE: every ready identity had its ICE up first, and the bring-up
    (first start → last ready) covers every identity's ready time."""
    identities = summary["identities"]
    assert len(identities) == summary["clients"], summary
    ready = [r for _, r in identities if r is not None]
    assert summary["connected"] == len(ready) <= summary["clients"], summary
    assert summary["connected"] <= summary["ice_connected"] == sum(1 for i, _ in identities if i is not None)
    for ice, ready_seconds in identities:
        if ready_seconds is not None:
            assert ice is not None and 0 <= ice <= ready_seconds, identities
    assert summary["pings_answered"] >= summary["connected"], summary
    figures = summary["ready_seconds"]
    assert figures["p50"] <= figures["p99"] <= figures["max"] == max(ready), figures
    assert summary["ice_seconds"]["p50"] <= figures["p50"], summary
    assert summary["bring_up_seconds"] is not None and summary["bring_up_seconds"] >= figures["max"], summary
