"""The demo's step runner and the ``firezone-lab portal`` command (the gateway itself is covered in integration)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import pytest

from lab.cli import main
from lab.demo import DemoContext, DemoError, run, start_portal
from lab.portal import DEFAULT_CONFIG, load_config

pytestmark = pytest.mark.timeout(60)


async def test_a_failing_step_fails_the_demo_and_everything_is_shut_down(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[DemoContext] = []

    async def broken(ctx: DemoContext) -> str:
        seen.append(ctx)
        raise DemoError("this step is broken on purpose")

    async def never(ctx: DemoContext) -> str:
        raise AssertionError("steps after a failure must not run")

    code = await run(
        load_config(DEFAULT_CONFIG), steps=[("portal", start_portal), ("broken", broken), ("never", never)]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "[2/3] FAILED  broken: this step is broken on purpose" in out and "demo FAILED" in out
    assert seen and seen[0].portal is not None and not seen[0].portal.running
    assert not seen[0].workdir.exists()


async def test_passing_steps_pass_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    async def admin_answers(ctx: DemoContext) -> str:
        gateways = await ctx.admin("GET", "/gateways")
        return f"{len(gateways['gateways'])} gateways"

    code = await run(load_config(DEFAULT_CONFIG), steps=[("portal", start_portal), ("admin", admin_answers)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[2/2] ok      admin: 0 gateways" in out and "demo passed" in out


async def test_firezone_lab_portal_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lab.cli",
        "--log-level",
        "warning",
        "portal",
        "--config",
        str(DEFAULT_CONFIG),
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        assert "FIREZONE_API_URL=ws://127.0.0.1:" in line, line
        admin_url = line.split("admin: ")[1].strip()
        async with aiohttp.ClientSession() as http, http.get(f"{admin_url}/faults") as response:
            assert response.status == 200
            assert json.loads(await response.text())["answer_heartbeats"] is True
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", ":80"])
def test_firezone_lab_rejects_a_bad_listen_address(listen: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["portal", "--listen", listen])
    assert exited.value.code == 2
    assert "--listen" in capsys.readouterr().err


def test_firezone_lab_rejects_an_unknown_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    # An unknown level used to reach logging.basicConfig and end in a traceback.
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "chatty", "portal"])
    assert exited.value.code == 2
    assert "--log-level" in capsys.readouterr().err
