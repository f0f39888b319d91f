"""agent/status.py: the status socket (0600, one JSON document per connection, no takeover of a live socket), the
``firezone-gateway status`` client in text and JSON, and the document a fresh gateway produces."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from agent import main as agent_main
from agent.config import load_settings
from agent.main import Gateway, generate_key_pair
from agent.status import StatusServer, fetch_status, render_text, status_document

DOCUMENT: dict[str, Any] = {
    "version": 1,
    "time": 1_800_000_100.0,
    "gateway": {"name": "gw", "public_key": "k", "tunnel_ipv4": "100.64.0.1", "tunnel_ipv6": "fd00::1"},
    "portal": {"url": "wss://portal", "joined": True, "ready": True, "reconnects": 1},
    "relays": [
        {
            "id": "relay-1",
            "server": "192.0.2.1:3478",
            "allocation": "allocated",
            "rtt_ms": 1.5,
            "srflx": ["198.51.100.2:40000"],
            "relayed": ["192.0.2.1:50000"],
            "expires_in_s": 500.0,
        }
    ],
    "clients": [
        {
            "id": "client-1",
            "ipv4": "100.66.0.2",
            "ipv6": "fd00:2021:1111::2",
            "resources": [{"id": "res-1", "expires_at": 1_800_003_700.0}, {"id": "res-2", "expires_at": None}],
            "connection": {
                "established": True,
                "path": "relayed",
                "relay_id": "relay-1",
                "local": "192.0.2.1:50000",
                "remote": "203.0.113.9:51000",
                "handshakes": 1,
                "last_handshake": 1_800_000_090.0,
                "rx_bytes": 2048,
                "tx_bytes": 3 * 1024 * 1024,
            },
        }
    ],
}


async def _fetch(path: Path) -> dict[str, Any]:
    return await asyncio.to_thread(fetch_status, str(path))


async def test_socket_is_owner_only_and_serves_one_document_per_connection(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    calls = 0

    def document() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {**DOCUMENT, "calls": calls}

    server = StatusServer(str(path), document)
    assert await server.start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert (await _fetch(path))["calls"] == 1
        assert (await _fetch(path))["calls"] == 2  # built afresh for each connection
    finally:
        await server.stop()
    assert not path.exists()


async def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    first = StatusServer(str(path), lambda: {"who": "first"})
    assert await first.start()
    second = StatusServer(str(path), lambda: {"who": "second"})
    try:
        assert not await second.start()
        assert (await _fetch(path))["who"] == "first"
        await second.stop()  # must not remove the first one's socket
        assert path.exists()
    finally:
        await first.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, as a killed gateway leaves it
    third = StatusServer(str(path), lambda: {"who": "third"})
    assert await third.start()
    try:
        assert (await _fetch(path))["who"] == "third"
    finally:
        await third.stop()


async def test_the_directory_is_made_and_an_impossible_path_costs_only_the_socket(tmp_path: Path) -> None:
    made = StatusServer(str(tmp_path / "run" / "status.sock"), lambda: {"ok": True})
    assert await made.start()
    try:
        assert (await _fetch(tmp_path / "run" / "status.sock"))["ok"] is True
    finally:
        await made.stop()
    (tmp_path / "file").write_text("")
    impossible = StatusServer(str(tmp_path / "file" / "status.sock"), lambda: {})
    assert not await impossible.start()
    await impossible.stop()


def test_text_rendering_reads_like_wg_show() -> None:
    text = render_text(DOCUMENT)
    assert "portal: ready (wss://portal), 1 reconnects" in text
    assert "relay: relay-1" in text and "rtt 1.5 ms" in text and "relayed: 192.0.2.1:50000" in text
    assert "client: client-1" in text
    assert "path: relayed via relay-1 (192.0.2.1:50000 -> 203.0.113.9:51000)" in text
    assert "latest handshake: 10 seconds ago" in text
    assert "transfer: 2.00 KiB received, 3.00 MiB sent" in text
    assert "resource: res-1 (expires 2027-01-15 09:01:40 UTC, in 1 hour)" in text
    assert "resource: res-2 (never expires)" in text


async def test_status_subcommand_json_and_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "status.sock"
    server = StatusServer(str(path), lambda: DOCUMENT)
    assert await server.start()
    try:
        assert await asyncio.to_thread(agent_main.main, ["status", "--json", "--socket", str(path)]) == 0
        assert json.loads(capsys.readouterr().out) == DOCUMENT
        monkeypatch.setenv("FIREZONE_STATUS_SOCKET", str(path))
        assert await asyncio.to_thread(agent_main.main, ["status"]) == 0
        assert "client: client-1" in capsys.readouterr().out
    finally:
        await server.stop()
    assert agent_main.main(["status", "--socket", str(path)]) == 1
    assert "no gateway answers" in capsys.readouterr().err


def test_document_of_a_fresh_gateway(tmp_path: Path) -> None:
    settings = load_settings(
        [],
        {
            "FIREZONE_TOKEN": "secret-token",
            "FIREZONE_ID": "a" * 64,
            "FIREZONE_STATE_DIR": str(tmp_path),
            "FIREZONE_API_URL": "ws://127.0.0.1:9",
            "HEALTH_CHECK_ADDR": "127.0.0.1:0",
        },
    )
    gateway = Gateway(settings, *generate_key_pair())
    document = status_document(gateway, wall_now=1_800_000_000.0, now=10.0)
    assert document["portal"]["joined"] is False and document["portal"]["ready"] is False
    assert document["relays"] == [] and document["clients"] == []
    assert document["gateway"]["public_key"] == gateway.public_key_b64
    text = json.dumps(document)
    assert "secret-token" not in text
    render_text(document)
