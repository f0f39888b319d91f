"""Operations against the real gateway in the lab world: ``firezone-gateway status`` (text and ``--json``) shows the
connected lab client with its path and moving byte counts, ``/metrics`` parses with prometheus-client and its counters
move with the traffic, the JSON log stream parses line by line, and one download is one flow record with its bytes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.world import HTTP_PORT, RESOURCE_IP, LabWorld

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("turnserver", "nft", "iperf3")), reason="coturn/nft/iperf3 missing"
    ),
]

BLOB_SIZE = 1024 * 1024


async def _status(socket_path: Path, *options: str) -> str:
    """Runs the status subcommand as an operator would (the module: the installed script may be another build)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.main", "status", "--socket", str(socket_path), *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def _counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _json_lines(output: str) -> list[dict[str, Any]]:
    """Every log line of the gateway's stderr, each one JSON object (anything else fails the test)."""
    lines = [line for line in output.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


async def test_status_metrics_and_flow_logs_follow_a_client(tmp_path: Path) -> None:
    socket_path = tmp_path / "status.sock"
    world = LabWorld(
        gateway_nat="masquerade",
        client_nat="masquerade",
        clients=1,
        resources=("lan-web",),
        blob_size=BLOB_SIZE,
        gateway_env={
            "FIREZONE_STATUS_SOCKET": str(socket_path),
            "FIREZONE_FLOW_LOGS": "true",
            "FIREZONE_LOG_FORMAT": "json",
        },
    )
    async with world:
        await world.wait_gateway_joined(timeout=20)
        gateway = world.need_gateway()
        client_id = world.lab_clients[0].id
        client = await world.start_client(resources=[world.resource_id("lan-web")])
        flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=20)
        assert flow["event"] == "flow_created", (flow, gateway.output()[-2000:])
        await client.wait_event("established", timeout=20)
        for _ in range(50):
            if client.path == "direct":
                break
            await asyncio.sleep(0.1)
        assert client.path == "direct", client.events

        before = json.loads(await _status(socket_path, "--json"))
        [entry] = [c for c in before["clients"] if c["id"] == client_id]
        assert [r["id"] for r in entry["resources"]] == [world.resource_id("lan-web")]
        assert entry["connection"]["path"] == "direct" and entry["connection"]["established"]
        assert before["portal"]["ready"] is True
        assert before["relays"] and before["relays"][0]["allocation"] == "allocated"
        assert before["relays"][0]["rtt_ms"] is not None
        metrics_before = _counters(await world.gateway_metrics())

        fetched = await world.http_get_sha256("cl")
        assert fetched.get("matches") is True, fetched

        after = json.loads(await _status(socket_path, "--json"))
        [moved] = [c for c in after["clients"] if c["id"] == client_id]
        connection = moved["connection"]
        assert connection["tx_bytes"] - entry["connection"]["tx_bytes"] >= BLOB_SIZE
        assert connection["rx_bytes"] > entry["connection"]["rx_bytes"]
        assert connection["last_handshake"] is not None and connection["handshakes"] >= 1
        text = await _status(socket_path)
        assert f"client: {client_id}" in text and "path: direct" in text and "latest handshake:" in text

        metrics_after = _counters(await world.gateway_metrics())

        def moved_by(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return metrics_after[key] - metrics_before.get(key, 0.0)

        assert moved_by("firezone_packets_total", direction="resource_to_client") >= BLOB_SIZE / 1500
        assert moved_by("firezone_packets_total", direction="client_to_resource") > 0
        assert moved_by("firezone_wireguard_bytes_total", direction="tx") >= BLOB_SIZE
        assert moved_by("firezone_datagrams_total", direction="in") > 0
        assert metrics_after[("firezone_connections", (("path", "direct"),))] == 1
        assert metrics_after[("firezone_flows", ())] >= 0
        assert ("process_resident_memory_bytes", ()) in metrics_after

        # The download's TCP connection ends with FINs: its record comes out within the linger and a sweep.
        records: list[dict[str, Any]] = []
        for _ in range(100):
            records = [
                line
                for line in _json_lines(bytes(gateway.stderr).decode())
                if line.get("target") == "flow_logs" and line.get("message") == "flow"
                and line.get("resource_port") == HTTP_PORT
            ]  # fmt: skip
            if records:
                break
            await asyncio.sleep(0.1)
        assert len(records) == 1, records
        [record] = records
        assert record["client_id"] == client_id and record["resource_id"] == world.resource_id("lan-web")
        assert record["protocol"] == "tcp" and record["resource_address"] == RESOURCE_IP
        assert record["client_address"] == world.lab_clients[0].ipv4
        assert record["end_reason"] == "tcp_fin"
        # The body plus HTTP and TCP/IP headers: the blob and at most a few percent more.
        assert BLOB_SIZE < record["bytes_to_client"] < BLOB_SIZE * 1.1, record
        assert 0 < record["bytes_from_client"] < BLOB_SIZE / 10, record
        assert record["flow_start"] <= record["flow_end"]

    # Stopped cleanly: the socket is gone and every line written was one JSON object.
    assert not socket_path.exists()
    _json_lines(bytes(gateway.stderr).decode())
