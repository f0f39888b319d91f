"""The ``gateway`` row of ``make bench``: the lab's headless client ↔ the real ``firezone-gateway`` ↔ the resource host.

A :class:`lab.world.LabWorld` with plain routing on both routers (NAT mode ``none``: the path is direct and the routers
only forward), one relay (the gateway needs one to accept flows), one client granted the whole resource network. iperf3
runs in the client's namespace against ``iperf3 -s`` on the resource host, through the tunnel; side a is the lab client
process, side b the gateway process, each charged its own CPU time, so the table shows which one saturates.

The client's TUN has MTU 1280 (as Firezone's), so the UDP run uses :data:`GATEWAY_UDP_PAYLOAD`-byte datagrams instead of
the wg pairs' 1300 (which would be fragmented). With ``profile_seconds`` both processes are sampled by py-spy (found on
``PATH`` or through ``PY_SPY``; more options in ``PY_SPY_ARGS``) under iperf3 load in each direction, and the hottest frames are printed and written as
collapsed stacks next to the JSON result.

    python -m lab.bench --only wgo-wgo,gateway [--profile-gateway 8]
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from lab.bench import GATEWAY_ROW, IperfTarget, PairResult, measure_idle_pings, progress, run_iperf, run_plan
from lab.netns import Netns
from lab.world import RESOURCE_IP, LabWorld

GATEWAY_UDP_PAYLOAD = 1200  # fits the client's 1280-byte TUN MTU with room for IPv4 and UDP headers
SETUP_TIMEOUT = 30.0
TOP_FRAMES = 15
PY_SPY_ARGS = "PY_SPY_ARGS"  # more py-spy record options, e.g. "--gil" (only samples holding the GIL: Python work)


def measure_gateway(
    *,
    seconds: int,
    pings: int,
    profile_seconds: float = 0.0,
    profile_dir: Path | None = None,
    client_plain_io: bool = False,
    gateway_env: Mapping[str, str] | None = None,
) -> PairResult:
    """Builds the lab world, measures the row and tears everything down again (also on failure).

    ``client_plain_io``: the lab client without GSO/GRO and TUN offloads (to see what batching it is worth);
    ``gateway_env``: more environment for the gateway, e.g. ``FIREZONE_TUN_READ_OFFLOAD=0`` (shown in the label)."""
    return asyncio.run(
        _measure(
            seconds=seconds,
            pings=pings,
            profile_seconds=profile_seconds,
            profile_dir=profile_dir,
            client_plain_io=client_plain_io,
            gateway_env=dict(gateway_env or {}),
        )
    )


async def _measure(
    *,
    seconds: int,
    pings: int,
    profile_seconds: float,
    profile_dir: Path | None,
    client_plain_io: bool,
    gateway_env: dict[str, str],
) -> PairResult:
    label = "lab client" + (" (plain I/O)" if client_plain_io else "") + " ↔ firezone-gateway"
    if gateway_env:
        label += "(" + ",".join(f"{key}={value}" for key, value in sorted(gateway_env.items())) + ")"
    result = PairResult(GATEWAY_ROW, label, sides=("client", "gateway"))
    try:
        world = LabWorld(
            gateway_nat="none",
            client_nat="none",
            relays=1,
            clients=1,
            resources=("lan",),
            blob_size=4096,
            gateway_log_level="warn",  # logging must not cost throughput while measuring
            gateway_env=gateway_env,
        )
        async with world:
            await world.wait_gateway_joined(timeout=SETUP_TIMEOUT)
            client = await world.start_client(
                resources=[world.resource_id("lan")], extra_args=["--plain-io"] if client_plain_io else []
            )
            established = await client.wait_event("established", timeout=SETUP_TIMEOUT)
            result.label += f" ({established.get('path')})"
            client_ns = world.netns("cl")
            if not await _wait_for_route(client_ns, RESOURCE_IP):
                raise RuntimeError(
                    f"no ping through the tunnel to {RESOURCE_IP} within {SETUP_TIMEOUT} s; client events "
                    f"{[e.get('event') for e in client.events]}, stderr {client.stderr_text()[-300:]!r}"
                )
            progress(f"{result.label}: tunnel up; ping ×{pings}")
            await asyncio.to_thread(measure_idle_pings, result, client_ns, RESOURCE_IP, pings=pings)
            target = IperfTarget(
                client_ns,
                RESOURCE_IP,
                pid_a=client.process.pid,
                pid_b=world.need_gateway().process.pid,
                udp_payload=GATEWAY_UDP_PAYLOAD,
            )
            # In a thread: the dev portal in this process must keep answering heartbeats while iperf3 runs.
            await asyncio.to_thread(run_plan, target, result, seconds=seconds)
            if profile_seconds > 0 and profile_dir is not None:
                await asyncio.to_thread(profile, target, profile_seconds, profile_dir)
    except Exception as exc:  # the other rows' figures must still be printed
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"{result.label}: FAILED: {result.error}")
    return result


async def _wait_for_route(ns: Netns, address: str, timeout: float = SETUP_TIMEOUT) -> bool:
    """``established`` comes before the client has routed the resource: waits for one ping to get through."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = await asyncio.to_thread(
            subprocess.run, ns.argv(["ping", "-c", "1", "-W", "1", address]), capture_output=True, timeout=10
        )
        if proc.returncode == 0:
            return True
        await asyncio.sleep(0.1)
    return False


def py_spy_command() -> str | None:
    return os.environ.get("PY_SPY") or shutil.which("py-spy")


def wait_sampler(sampler: subprocess.Popen[bytes], timeout: float) -> bytes:
    """Waits for a py-spy run to end (killed after ``timeout`` seconds); returns what it wrote to stderr."""
    try:
        _, stderr = sampler.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            sampler.kill()
        _, stderr = sampler.communicate()
    return stderr


def profile(target: IperfTarget, seconds: float, out_dir: Path) -> None:
    """Samples both processes with py-spy while iperf3 pushes one TCP stream each way; prints the hottest frames."""
    py_spy = py_spy_command()
    if py_spy is None:
        progress("profile: py-spy not found (PATH or PY_SPY); skipped")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for direction, reverse in (("upload", False), ("download", True)):
        samplers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for side, pid in (("client", target.pid_a), ("gateway", target.pid_b)):
            if pid is None:
                continue
            path = out_dir / f"profile-{stamp}-{direction}-{side}.txt"
            argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200"]
            argv += [
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(path),
                *shlex.split(os.environ.get(PY_SPY_ARGS, "")),
            ]
            samplers[side] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)
        time.sleep(0.5)  # py-spy attaches before the load starts
        run_iperf(target, f"profile {direction}", seconds=max(1, round(seconds)) + 1, reverse=reverse)
        for side, (sampler, path) in samplers.items():
            stderr = wait_sampler(sampler, seconds + 30)
            if not path.exists():
                progress(f"profile {direction} {side}: py-spy wrote nothing: {stderr.decode(errors='replace')[-300:]}")
                continue
            print(f"\nprofile {direction} ({'client→resource' if not reverse else 'resource→client'}), {side}: {path}")
            print(summarize_collapsed(path.read_text()))


def summarize_collapsed(text: str, top: int = TOP_FRAMES) -> str:
    """The hottest frames of py-spy's collapsed stacks (``frame;frame;... count`` per line): self and total share."""
    self_samples: Counter[str] = Counter()
    total_samples: Counter[str] = Counter()
    all_samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # The thread name leads when py-spy labels threads; only real frames (with a file position) count.
        frames = [frame for frame in frames if "(" in frame]
        if not frames:
            continue
        all_samples += count
        self_samples[frames[-1]] += count
        for frame in set(frames):
            total_samples[frame] += count
    if all_samples == 0:
        return "  (no samples)"
    lines = [f"  {all_samples} samples; self% total% frame"]
    for frame, count in self_samples.most_common(top):
        lines.append(f"  {100 * count / all_samples:5.1f} {100 * total_samples[frame] / all_samples:5.1f}  {frame}")
    return "\n".join(lines)
