"""``python -m lab.load_run``: the Load figures of docs/scenarios.md — N identities at once against the real gateway.

A :class:`lab.world.LabWorld` (masquerading NATs both sides, one relay, the dev portal in this process) gets ``--clients``
load identities; ``--processes`` load generators (:mod:`lab.loadgen`, one event loop each, an equal share of the
identities) start them all at the same moment (or, with ``--arrival-rate``, that many per second, interleaved) and
ping the resource host at ``--rate`` for ``--duration`` s once all have settled. Meanwhile the gateway process is sampled every half second (RSS, open descriptors, CPU seconds).
One JSON object goes to stdout: identities connected (an echo reply received: ICE, WireGuard handshake and one
ping done) and those whose ICE completed, bring-up (first start → last identity ready, over all processes; only when
all connected), setup p50/p99/max from the first ``create_flow`` to ICE up (``ice_seconds``) and to the first echo
reply (``ready_seconds``, over the connected ones), pings answered, the gateway's handshakes answered with a cookie
reply or refused by its rate limit (its drop counters ``cookie_required`` and ``handshake_rate_limited``), its RSS
and descriptors (before and peak), its CPU seconds during bring-up and over the whole run, the portal's and load
generators' CPU seconds, and the load average.

With ``--profile DIR`` the gateway, the load generators and this process (the dev portal) are sampled by py-spy
(``PATH`` or ``PY_SPY``) during bring-up; the hottest frames of each are printed to stderr and the collapsed stacks
are kept in DIR.

    python -m lab.load_run --clients 1000 --processes 2 [--rate 1] [--duration 10] [--profile /tmp/load-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.bench import cpu_seconds, progress
from lab.bench_gateway import py_spy_command, summarize_collapsed, wait_sampler
from lab.loadgen import percentile, process_sample, prometheus_sum, spread
from lab.world import LOAD_CLIENT_TOKEN_PREFIX, RESOURCE_IP, LabWorld

SAMPLE_INTERVAL = 0.5
START_MARGIN = 2.0
"""Seconds from spawning the load generators to their common start (interpreter start-up and key generation)."""
START_MARGIN_PER_IDENTITY = 0.003
HANDSHAKE_DROP_REASONS = ("cookie_required", "handshake_rate_limited")
"""The gateway's drop reasons for handshakes it answered with a cookie reply or refused (its handshake load rule)."""


@dataclass(frozen=True)
class GatewaySample:
    wall: float
    rss_bytes: int
    descriptors: int
    cpu_seconds: float


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _share(clients: int, processes: int, index: int) -> tuple[int, int]:
    """(first identity, count) of load process ``index``."""
    base, extra = divmod(clients, processes)
    first = index * base + min(index, extra)
    return first, base + (1 if index < extra else 0)


def _start_profilers(
    pids: dict[str, int], seconds: float, out_dir: Path
) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
    py_spy = py_spy_command()
    if py_spy is None:
        progress("profile: py-spy not found (PATH or PY_SPY); skipped")
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    samplers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, pid in pids.items():
        path = out_dir / f"load-{name}.txt"
        argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "50"]
        argv += ["--nonblocking", "--format", "raw", "--output", str(path)]
        samplers[name] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), path)
    return samplers


def _report_profiles(samplers: dict[str, tuple[subprocess.Popen[bytes], Path]]) -> None:
    for name, (sampler, path) in samplers.items():
        stderr = wait_sampler(sampler, 60)
        if not path.exists():
            progress(f"profile {name}: py-spy wrote nothing: {stderr.decode(errors='replace')[-300:]}")
            continue
        print(f"\nprofile {name}: {path}\n{summarize_collapsed(path.read_text())}", file=sys.stderr, flush=True)


def _udp_receive_errors(world: LabWorld, role: str) -> int:
    """Datagrams the kernel dropped in ``role``'s namespace because a UDP socket's receive buffer was full."""
    lines = [line.split() for line in world.netns(role).exec(["cat", "/proc/net/snmp"]).splitlines()]
    udp = [fields for fields in lines if fields and fields[0] == "Udp:"]
    if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
        return -1
    return int(udp[1][udp[0].index("RcvbufErrors")])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    async with LabWorld(gateway_nat=args.nat, client_nat=args.nat, load_clients=args.clients, blob_size=4096) as world:
        await world.wait_gateway_joined(timeout=60)
        gateway_pid = world.need_gateway().pid
        rss_before, descriptors_before = process_sample(gateway_pid)
        gateway_cpu_before, portal_cpu_before = cpu_seconds(gateway_pid), _own_cpu_seconds()
        relay_pids = [relay.process.pid for relay in world.coturns if relay.process is not None]
        relay_cpu_before = sum(cpu_seconds(pid) for pid in relay_pids)
        start_at = time.time() + START_MARGIN + START_MARGIN_PER_IDENTITY * args.clients
        loadgens: list[asyncio.subprocess.Process] = []
        for index in range(args.processes):
            first, count = _share(args.clients, args.processes, index)
            argv = [
                sys.executable, "-m", "lab.loadgen", "--portal", world.portal_url,
                "--token-prefix", LOAD_CLIENT_TOKEN_PREFIX, "--first", str(first), "--clients", str(count),
                "--resource", world.resource_id("lan"), "--target", RESOURCE_IP, "--rate", f"{args.rate:g}",
                "--duration", f"{args.duration:g}", "--setup-timeout", f"{args.setup_timeout:g}",
                "--start-at", f"{start_at + _arrival_offset(index, args.arrival_rate):.3f}",
                "--spread", f"{_arrival_spread(args.processes, args.arrival_rate):g}",
            ]  # fmt: skip
            loadgens.append(
                await asyncio.create_subprocess_exec(
                    *world.netns("cl").argv(argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            )
        samplers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        if args.profile is not None:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            pids = {"gateway": gateway_pid, "portal": os.getpid()}
            pids.update({f"loadgen{i}": p.pid for i, p in enumerate(loadgens)})
            await asyncio.sleep(max(0.0, start_at - time.time() - 0.5))
            samplers = _start_profilers(pids, args.profile_seconds, Path(args.profile))
        samples: list[GatewaySample] = []
        loadgen_cpu: dict[int, float] = {}

        async def sample() -> None:
            while True:
                rss, descriptors = process_sample(gateway_pid)
                samples.append(GatewaySample(time.time(), rss, descriptors, cpu_seconds(gateway_pid)))
                for process in loadgens:
                    if process.returncode is None:
                        loadgen_cpu[process.pid] = cpu_seconds(process.pid) or loadgen_cpu.get(process.pid, 0.0)
                await asyncio.sleep(SAMPLE_INTERVAL)

        sampler = asyncio.create_task(sample())
        deadline = START_MARGIN + START_MARGIN_PER_IDENTITY * args.clients + args.setup_timeout + args.duration + 60
        try:
            outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in loadgens)), deadline)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for process in loadgens:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        _report_profiles(samplers)
        metrics = await world.gateway_metrics()
        handshake_drops = {
            reason: int(prometheus_sum(metrics, "firezone_dataplane_drops", reason=reason))
            for reason in HANDSHAKE_DROP_REASONS
        }
        flows = world.need_portal().flows()
        brokering = [f.finished_at - f.requested_at for f in flows if f.state == "created" and f.finished_at]
        timed_out = {f.ref for f in flows if f.state == "failed" and f.reason == "offline" and f.ref is not None}
        answered_late = sum(
            1
            for e in world.need_portal().events(kind="received", event="authorization_created")
            if isinstance(e.payload, dict) and e.payload.get("ref") in timed_out
        )
        pushed = sum(
            1
            for e in world.need_portal().events(kind="sent", event="create_authorization")
            if isinstance(e.payload, dict) and e.payload.get("ref") in timed_out
        )
        if args.logs is not None:
            logs = Path(args.logs)
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "gateway.log").write_text(world.need_gateway().output())
            offline = [f.to_json() for f in flows if f.state == "failed"]
            (logs / "failed-flows.json").write_text(json.dumps(offline, indent=1, default=str))
        flow_states: dict[str, int] = {}
        for flow in flows:
            key = flow.state if flow.reason is None else f"{flow.state}: {flow.reason}"
            if flow.state == "failed" and flow.finished_at is not None:
                key += f" (after {flow.finished_at - flow.requested_at:.0f} s)"
            flow_states[key] = flow_states.get(key, 0) + 1
        gateway_cpu_after, portal_cpu_after = cpu_seconds(gateway_pid), _own_cpu_seconds()
        udp_errors = {role: _udp_receive_errors(world, role) for role in ("gw", "cl", "wan")}
        relay_cpu = sum(cpu_seconds(pid) for pid in relay_pids) - relay_cpu_before
        relay_log = "\n".join(relay.log_text() for relay in world.coturns)
        if args.profile is not None:
            (Path(args.profile) / "relay.log").write_text(relay_log)
        relay_errors = [line for line in relay_log.splitlines() if "error" in line.lower()]
        problems = world.gateway_problems()

    summaries: list[dict[str, Any]] = []
    for stdout, stderr in outputs:
        try:
            summaries.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            summaries.append({"error": stderr.decode(errors="replace")[-2000:]})
    failed = [s for s in summaries if "error" in s]
    if failed:
        return {"error": failed}
    setup, last_up = combine_setup(summaries, args.clients)
    up_samples = [s for s in samples if last_up is None or s.wall <= last_up + SAMPLE_INTERVAL]
    cpu_at_up = up_samples[-1].cpu_seconds if up_samples else gateway_cpu_after
    failures: dict[str, int] = {}
    for s in summaries:
        for reason, count in s["failures"].items():
            failures[reason] = failures.get(reason, 0) + int(count)
    return {
        "clients": args.clients,
        "processes": args.processes,
        "arrival_rate": args.arrival_rate,
        **setup,
        "gateway_handshake_drops": handshake_drops,
        "brokering_seconds": {
            "p50": None if not brokering else round(percentile(brokering, 0.5) or 0.0, 3),
            "p99": None if not brokering else round(percentile(brokering, 0.99) or 0.0, 3),
        },
        "portal_flows": flow_states,
        "offline_flows": {"pushed": pushed, "answered_later": answered_late},
        "pings_answered": sum(int(s["pings_answered"]) for s in summaries),
        "pings_sent": sum(int(s["pings_sent"]) for s in summaries),
        "rtt_p99_ms": max((s["rtt_ms"]["p99"] or 0.0) for s in summaries),
        "failures": failures,
        "loadgen_datagrams": {
            kind: sum(int(s.get("datagrams", {}).get(kind, 0)) for s in summaries)
            for kind in ("to_relays", "to_others", "from_relays", "from_others")
        },
        "portal_retries": sum(int(s["portal_retries"]) for s in summaries),
        "gateway_rss_mib": {
            "before": round(rss_before / 2**20, 1),
            "peak": round(max((s.rss_bytes for s in samples), default=0) / 2**20, 1),
        },
        "gateway_descriptors": {
            "before": descriptors_before,
            "peak": max((s.descriptors for s in samples), default=0),
        },
        "gateway_connections": prometheus_sum(metrics, "firezone_connections"),
        "gateway_cpu_seconds": {
            "bring_up": round(cpu_at_up - gateway_cpu_before, 1),
            "run": round(gateway_cpu_after - gateway_cpu_before, 1),
        },
        "portal_cpu_seconds": round(portal_cpu_after - portal_cpu_before, 1),
        "udp_receive_buffer_errors": udp_errors,
        "relay_cpu_seconds": round(relay_cpu, 1),
        "relay_log_errors": {"lines": len(relay_errors), "first": relay_errors[:3]},
        "loadgen_cpu_seconds": [round(v, 1) for v in loadgen_cpu.values()],
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "gateway_warnings": problems[:10],
    }


def combine_setup(summaries: list[dict[str, Any]], clients: int) -> tuple[dict[str, Any], float | None]:
    """The setup figures over several load processes' summaries (:meth:`lab.loadgen.LoadSummary.to_json`), and the
    unix time the last identity became ready (None when none did).

    ``connected`` counts identities with an answered ping (ICE, WireGuard handshake and one ping done),
    ``ice_connected`` those whose ICE completed; ``ready_seconds`` is over the connected ones; ``bring_up_seconds``
    (first start → last identity ready) only when all ``clients`` connected, ``last_ready_seconds`` whenever any did.
    """
    identities = [identity for s in summaries for identity in s["identities"]]
    ice = [float(i) for i, _ in identities if i is not None]
    ready = [float(r) for _, r in identities if r is not None]
    connected = sum(int(s["connected"]) for s in summaries)
    started = min(float(s["started_at"]) for s in summaries)
    last_up = max((float(s["last_ready_at"]) for s in summaries if s["last_ready_at"] is not None), default=None)
    since_start = None if last_up is None else round(last_up - started, 2)
    return {
        "connected": connected,
        "ice_connected": sum(int(s["ice_connected"]) for s in summaries),
        "bring_up_seconds": since_start if connected == clients else None,
        "last_ready_seconds": since_start,
        "ice_seconds": spread(ice, 3),
        "ready_seconds": spread(ready, 3),
    }, last_up


def _arrival_spread(processes: int, arrival_rate: float) -> float:
    """Seconds between two starts within one load process, so that all processes together start ``arrival_rate``
    identities per second (0: all at once)."""
    return processes / arrival_rate if arrival_rate > 0 else 0.0


def _arrival_offset(index: int, arrival_rate: float) -> float:
    """Process ``index`` starts this much after the first, so that the processes' starts interleave evenly."""
    return index / arrival_rate if arrival_rate > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.load_run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes sharing the identities")
    parser.add_argument("--rate", type=float, default=1.0, help="pings per second per identity")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of pinging once all have settled")
    parser.add_argument("--setup-timeout", type=float, default=90.0)
    parser.add_argument(
        "--arrival-rate",
        type=float,
        default=0.0,
        help="identities started per second over all processes (default 0: all at the same moment)",
    )
    parser.add_argument(
        "--nat",
        default="masquerade",
        choices=("masquerade", "none"),
        help="both routers' NAT: masquerade (srflx candidates come from the relay's BINDING) or none (host pairs)",
    )
    parser.add_argument("--logs", default=None, help="write the gateway's output and the failed flows here")
    parser.add_argument("--profile", default=None, help="py-spy every process during bring-up; stacks go here")
    parser.add_argument("--profile-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or not 1 <= args.processes <= args.clients:
        raise SystemExit("--clients must be ≥ 1 and --processes 1..clients")
    if args.arrival_rate < 0:
        raise SystemExit("--arrival-rate must be ≥ 0")
    summary = asyncio.run(run(args))
    print(json.dumps(summary), flush=True)
    return 0 if summary.get("connected") == args.clients else 1


if __name__ == "__main__":
    raise SystemExit(main())
