"""The demo's check runner (with a stand-in world) and the ``firezone-lab portal`` command."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp
import pytest

from lab.cli import main
from lab.demo import Check, DemoContext, DemoError, run
from lab.portal import DEFAULT_CONFIG

pytestmark = pytest.mark.timeout(60)


class StandInWorld:
    """Records whether the demo built and tore down its world; the real one needs root and namespaces."""

    def __init__(self, fail_on_enter: bool = False) -> None:
        self.fail_on_enter = fail_on_enter
        self.entered = self.exited = False

    async def __aenter__(self) -> StandInWorld:
        if self.fail_on_enter:
            raise RuntimeError("no namespaces today")
        self.entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited = True


async def _passes(ctx: DemoContext) -> str:
    assert isinstance(ctx.world, StandInWorld) and ctx.world.entered
    return "fine"


async def _fails(ctx: DemoContext) -> str:
    raise DemoError("this check is broken on purpose")


async def _never(ctx: DemoContext) -> str:
    raise AssertionError("a check whose prerequisite failed must not run")


async def test_failed_checks_are_counted_dependents_skipped_and_the_world_torn_down() -> None:
    world = StandInWorld()
    lines: list[str] = []
    checks = [Check("first", _passes), Check("second", _fails), Check("third", _never, needs=("second",))]
    code = await run(checks, make_world=lambda: world, write=lines.append)
    assert code == 1
    assert "[1/3] ok      first: fine" in lines
    assert "[2/3] FAILED  second: this check is broken on purpose" in lines
    assert "[3/3] skipped third: needs second" in lines
    assert lines[-1] == "demo: 1/3 checks passed"
    assert world.exited


async def test_all_checks_passing_pass_the_demo() -> None:
    lines: list[str] = []
    code = await run([Check("a", _passes), Check("b", _passes)], make_world=StandInWorld, write=lines.append)
    assert code == 0, lines
    assert lines[-1] == "demo: 2/2 checks passed"


async def test_a_slow_check_fails_by_its_timeout() -> None:
    async def slow(ctx: DemoContext) -> str:
        await asyncio.sleep(5)
        return "too late"

    lines: list[str] = []
    code = await run([Check("slow", slow, timeout=0.05)], make_world=StandInWorld, write=lines.append)
    assert code == 1
    assert "[1/1] FAILED  slow: timed out after 0.05 s" in lines


async def test_a_world_that_cannot_be_built_fails_every_check() -> None:
    lines: list[str] = []
    code = await run([Check("a", _never)], make_world=lambda: StandInWorld(fail_on_enter=True), write=lines.append)
    assert code == 1
    assert "setup FAILED: no namespaces today" in lines and lines[-1] == "demo: 0/1 checks passed"


async def test_interrupting_the_demo_tears_the_world_down() -> None:
    world = StandInWorld()
    lines: list[str] = []
    started = asyncio.Event()

    async def endless(ctx: DemoContext) -> str:
        started.set()
        await asyncio.sleep(60)
        return "never"

    demo = asyncio.ensure_future(
        run([Check("endless", endless, timeout=120)], make_world=lambda: world, write=lines.append)
    )
    await started.wait()
    demo.cancel()
    assert await demo == 130
    assert world.exited and lines[-1] == "demo: 0/1 checks passed"


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
