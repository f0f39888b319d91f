"""Fault scenarios: the real gateway, the dev portal, coturn and lab clients in namespaces, under loss, restarts and
failures (portal-protocol.md §7). Each reports its setup or recovery time on a ``SCENARIO`` line (``pytest -s``)
and fails on any WARN/ERROR line in the gateway's log that it did not provoke on purpose."""

from __future__ import annotations

import pytest

from lab.world import LabWorld
from tests.scenarios.helpers import SCENARIO_MARKS, assert_no_unprovoked_problems, connect_client, report

pytestmark = [*SCENARIO_MARKS, pytest.mark.timeout(120)]

BLOB_SIZE = 2 * 1024 * 1024
LOSS_PERCENT = 5.0


async def test_relayed_download_with_loss_each_way() -> None:
    """Symmetric NATs on both sides leave only the relays; 5 % of the client link's datagrams vanish each way."""
    async with LabWorld(
        gateway_nat="masquerade random", client_nat="masquerade random", relays=2, blob_size=BLOB_SIZE
    ) as world:
        await world.wait_gateway_joined(timeout=20)
        world.set_loss("natc", LOSS_PERCENT)
        client, established = await connect_client(world)
        assert client.path == "relayed", client.events
        fetched = await world.http_get_sha256("cl", timeout=60)
        assert fetched.get("matches") is True, fetched
        lost = world.lost_datagrams("natc")
        assert lost > 0, "the loss rule dropped nothing"
        report(
            "relayed_download_5pct_loss",
            lost_datagrams=str(lost),
            setup_seconds=established["wall_setup_seconds"],
            download_seconds=fetched["seconds"],
            mbit_per_second=BLOB_SIZE * 8 / fetched["seconds"] / 1e6,
        )
        assert_no_unprovoked_problems(world)
