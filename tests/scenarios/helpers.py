"""Shared pieces of the fault scenarios: a connected lab client, a pinger that measures gaps, and the log check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from lab.loadgen import prometheus_sum as metric
from lab.world import RESOURCE_IP, ClientProcess, LabWorld

__all__ = ["SCENARIO_MARKS", "Pinger", "assert_no_unprovoked_problems", "connect_client", "metric", "report"]

SCENARIO_MARKS = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and TUN"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("turnserver", "nft", "tc", "ping")),
        reason="coturn/nft/tc/ping missing",
    ),
]

_REPLY = re.compile(r"^\[(?P<at>\d+\.\d+)\] \d+ bytes from .* icmp_seq=(?P<seq>\d+)")


async def connect_client(
    world: LabWorld, *, resource: str = "lan", index: int = 0, timeout: float = 30.0
) -> tuple[ClientProcess, dict[str, Any]]:
    """Starts lab client ``index`` asking for ``resource`` and waits until its connection is established."""
    started = time.monotonic()
    client = await world.start_client(index, resources=[world.resource_id(resource)])
    flow = await client.wait_event(("flow_created", "flow_creation_failed"), timeout=timeout)
    assert flow["event"] == "flow_created", flow
    established = await client.wait_event("established", timeout=timeout)
    established["wall_setup_seconds"] = time.monotonic() - started
    return client, established


@dataclass
class Pinger:
    """``ping -D`` from a namespace at a fixed interval; :meth:`stop` returns the reply times (epoch seconds)."""

    world: LabWorld
    namespace: str = "cl"
    host: str = RESOURCE_IP
    interval: float = 0.05
    replies: list[float] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    _process: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None

    async def start(self) -> Pinger:
        argv = ["ping", "-D", "-n", "-i", f"{self.interval:g}", "-W", "1", self.host]
        self._process = await asyncio.create_subprocess_exec(
            *self.world.netns(self.namespace).argv(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            found = _REPLY.match(line.decode(errors="replace"))
            if found:
                self.replies.append(float(found["at"]))
                self.sequences.append(int(found["seq"]))

    async def wait_replies(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` more replies arrived than now."""
        wanted = len(self.replies) + count
        deadline = time.monotonic() + timeout
        while len(self.replies) < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.replies)} ping replies of {wanted} within {timeout} s")
            await asyncio.sleep(self.interval)

    async def stop(self) -> list[float]:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self._process.wait(), 3)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        return self.replies

    def largest_gap(self, after: float | None = None) -> float:
        """The longest silence between consecutive replies (from epoch time ``after`` on), in seconds."""
        times = [t for t in self.replies if after is None or t >= after]
        if after is not None and times:
            previous = [t for t in self.replies if t < after]
            if previous:
                times.insert(0, previous[-1])
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))


def assert_no_unprovoked_problems(world: LabWorld, *, allowed: tuple[str, ...] = (), gateways: int = 1) -> None:
    """No WARN/ERROR line in any gateway's output except the ``allowed`` ones the scenario provokes on purpose."""
    problems = [line for index in range(gateways) for line in world.gateway_problems(index, allowed=allowed)]
    assert not problems, "unprovoked WARN/ERROR lines in the gateway log:\n" + "\n".join(problems[:20])


def report(scenario: str, **figures: float | str | None) -> None:
    """One line per scenario for the note: ``SCENARIO <name> key=value ...`` (seen with ``pytest -s``)."""
    shown = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\nSCENARIO {scenario} {shown}", flush=True)
