"""``make bench``: WireGuard implementation pairs through the same two-namespace topology, measured in one run.

Pairs (A = iperf3 client side, B = server side), each over its own fresh pair of namespaces joined by one veth and
configured with the stock ``wg`` tool (see :mod:`lab.wg`): wireguard-go↔wireguard-go (the reference),
wireguard-go↔firezone-wg, firezone-wg↔firezone-wg with 1 and 2 TUN queues (``FIREZONE_NUM_TUN_THREADS``), both with
the C hot path and pure Python (``FIREZONE_NATIVE=0``, rows ``…py``), and with 2 queues but without read-side TSO
(``FIREZONE_TUN_READ_OFFLOAD=0``: the kernel segments, writes are still merged).
The ``gateway`` row is the product's own path: the lab's headless client ↔ the real ``firezone-gateway`` process ↔ the
resource host, through a lab world with plain routing (see :mod:`lab.bench_gateway`).

For each: ping RTT at idle (also with pings 2 and 10 ms apart instead of 50: a short gap keeps both processes warm,
so it shows the packet path's length without the cost of waking up cold) and under load (pinging while the ``tcp1
a→b`` stream runs), iperf3 TCP with 1 and 4 streams in both directions (retransmits), UDP at a fixed rate (loss,
out-of-order datagrams), and CPU seconds per GB of the two tunnel processes together (utime+stime from
/proc/<pid>/stat), with each side's share of one core during the run (``a`` = the iperf3 client's side, ``b`` = the
server's; ~100% means that side saturates) and how busy the whole machine was (``host``: all cores; near 100% means
CPU, not either process, is the limit). Prints a table with the ratios to the reference measured in the same run
(throughput ``[N×]``, CPU per GB ``cpu N×``, RTT ``(N×)``), then the idle RTT by gap between pings, the queue
scaling (2 queues over 1, per direction and path), then each tunnel process's threads' share of one core during
``tcp4 a→b`` (by their kernel names: which thread, if any, is the bottleneck), and writes JSON under
``bench-results/`` (per-thread shares for every run).

    python -m lab.bench [--quick] [--seconds N] [--only wgo-wgo,wgo-fz2,fz1-fz1,fz2-fz2,fz1py-fz1py,fz2py-fz2py,
        fz2r-fz2r,gateway] [--scaling-rounds N] [--output DIR]
        [--gateway-env NAME=VALUE ...] [--client-plain-io] [--profile-gateway SECONDS]

``--only`` picks rows (ratios need ``wgo-wgo`` among them): ``make bench BENCH_ARGS="--only wgo-wgo,gateway --quick"``.
``--scaling-rounds N`` also measures the queue scaling with both pairs up and their tcp4 runs taking turns, N rounds:
on a machine shared with other work, rows measured minutes apart can differ by 2× for reasons of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.netns import Netns
from lab.wg import Implementation, WgInterface, WgPair, ping_rtt_ms, wg_topology

IPERF_PORT = 5201
UDP_PAYLOAD = 1300  # fits the 1420-byte tunnel MTU
GATEWAY_ROW = "gateway"  # measured through a lab world by lab.bench_gateway, not a wg pair
UDP_RATE = "400M"  # fixed for every pair: above what the reference carries, so loss shows who keeps up


@dataclass(frozen=True)
class PairSpec:
    key: str
    a: Implementation
    b: Implementation
    queues: int  # FIREZONE_NUM_TUN_THREADS for the firezone-wg side(s)
    read_offload: bool = True  # FIREZONE_TUN_READ_OFFLOAD: TSO/USO super-packets split in Python on read
    native: bool = True  # False: FIREZONE_NATIVE=0, the pure-Python hot path

    @property
    def label(self) -> str:
        def side(impl: Implementation) -> str:
            if impl == "wireguard-go":
                return "wireguard-go"
            options = ("" if self.read_offload else ",no-rx-tso") + ("" if self.native else ",py")
            return f"firezone-wg(q{self.queues}{options})"

        return f"{side(self.a)} ↔ {side(self.b)}"


PAIRS: dict[str, PairSpec] = {
    spec.key: spec
    for spec in (
        PairSpec("wgo-wgo", "wireguard-go", "wireguard-go", 1),
        PairSpec("wgo-fz2", "wireguard-go", "firezone-wg", 2),
        PairSpec("fz1-fz1", "firezone-wg", "firezone-wg", 1),
        PairSpec("fz2-fz2", "firezone-wg", "firezone-wg", 2),
        PairSpec("fz1py-fz1py", "firezone-wg", "firezone-wg", 1, native=False),
        PairSpec("fz2py-fz2py", "firezone-wg", "firezone-wg", 2, native=False),
        PairSpec("fz2r-fz2r", "firezone-wg", "firezone-wg", 2, read_offload=False),
    )
}
REFERENCE = "wgo-wgo"
# Queue scaling: (1-queue row, 2-queue row, what differs) compared in the summary under the table.
QUEUE_SCALING = (("fz1-fz1", "fz2-fz2", "native"), ("fz1py-fz1py", "fz2py-fz2py", "pure Python"))
SCALING_MEASUREMENTS = ("tcp4 a→b", "tcp4 b→a")
LOADED_PING_DURING = "tcp1 a→b"  # the iperf3 run that the ping under load rides on
IDLE_PING_GAP = 0.05  # seconds between the idle pings of the table
# Also pinged at these gaps: how much of the idle RTT is the processes waking up cold (caches refilled after the
# CPU idled or ran other work) rather than the length of their packet path, which is what a short gap shows.
SHORTER_PING_GAPS = (0.002, 0.01)
SHORTER_GAP_PINGS = 100
LOADED_PING_INTERVAL = 0.2


@dataclass
class Measurement:
    name: str  # e.g. "tcp1 a→b"
    mbit_per_s: float = math.nan
    bytes: int = 0
    retransmits: int | None = None
    lost_percent: float | None = None
    out_of_order: int | None = None
    packets: int | None = None
    cpu_s_per_gb: float | None = None  # both tunnel processes together
    cpu_a_busy: float | None = None  # the iperf3 client side's process: CPU seconds per wall second of the run
    cpu_b_busy: float | None = None  # the iperf3 server side's process
    cpu_a_s_per_gb: float | None = None  # each side's own CPU seconds per GB (in the JSON only)
    cpu_b_s_per_gb: float | None = None
    host_busy: float | None = None  # all CPUs of the machine (iperf3, kernel, other load): 1.0 = every core busy
    threads_a: dict[str, float] = field(default_factory=dict)  # side a's threads (kernel names): share of one core
    threads_b: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PairResult:
    key: str
    label: str
    sides: tuple[str, str] = ("a", "b")  # what the a and b columns of the CPU figures are
    rtt_avg_ms: float = math.nan
    rtt_max_ms: float = math.nan
    ping_lost: int = 0
    rtt_loaded_avg_ms: float = math.nan  # while the LOADED_PING_DURING stream runs
    rtt_loaded_max_ms: float = math.nan
    ping_loaded_lost: int = 0
    rtt_by_gap_ms: dict[str, float] = field(default_factory=dict)  # gap between pings (ms, e.g. "2") → avg RTT ms
    measurements: list[Measurement] = field(default_factory=list)
    error: str | None = None


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _stat_cpu_seconds(stat: str) -> float:
    """utime + stime, in seconds, from the text of a /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat file."""
    # Fields after "(comm)": state is index 0, so utime (field 14) is index 11 and stime index 12.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _stat_cpu_seconds(f.read())
    except OSError:
        return 0.0


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime per thread of a process, keyed by the thread's kernel name (the main thread as ``main``; threads
    of one name summed), in seconds; empty if the process is gone."""
    seconds: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return seconds
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue  # ended meanwhile
        name = "main" if tid == str(pid) else text[text.index("(") + 1 : text.rindex(")")]
        seconds[name] = seconds.get(name, 0.0) + _stat_cpu_seconds(text)
    return seconds


def _thread_shares(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Each thread's CPU seconds per wall second between two samples (threads under 1 % left out)."""
    shares = {name: (value - before.get(name, 0.0)) / wall for name, value in after.items()}
    return {name: round(share, 3) for name, share in sorted(shares.items()) if share >= 0.01}


@dataclass(frozen=True)
class IperfTarget:
    """Where iperf3 runs and what it measures: the client's namespace, the server's address, and the pids of the two
    tunnel processes (side a, side b) whose CPU time is charged to the run."""

    client: Netns
    server_ip: str
    pid_a: int | None
    pid_b: int | None
    udp_payload: int = UDP_PAYLOAD


def host_cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat's ``cpu`` line (idle and iowait are idle)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    total = sum(values[:8])  # guest time is already counted in user time
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return total - idle, total


def _pair_target(pair: WgPair) -> IperfTarget:
    pids = [iface.process.pid if iface.process is not None else None for iface in (pair.a, pair.b)]
    return IperfTarget(pair.a.ns, pair.b.tunnel_ip, pids[0], pids[1])


def run_iperf(
    target: IperfTarget,
    name: str,
    *,
    seconds: int,
    reverse: bool = False,
    streams: int = 1,
    udp_rate: str | None = None,
) -> Measurement:
    argv = ["iperf3", "-c", target.server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "--json"]
    argv += ["--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    if streams > 1:
        argv += ["-P", str(streams)]
    if udp_rate is not None:
        argv += ["-u", "-b", udp_rate, "-l", str(target.udp_payload)]

    def cpu(pid: int | None) -> float:
        return cpu_seconds(pid) if pid is not None else 0.0

    def threads(pid: int | None) -> dict[str, float]:
        return thread_cpu_seconds(pid) if pid is not None else {}

    cpu_a_before, cpu_b_before = cpu(target.pid_a), cpu(target.pid_b)
    threads_a_before, threads_b_before = threads(target.pid_a), threads(target.pid_b)
    host_busy_before, host_total_before = host_cpu_times()
    started = time.monotonic()
    proc = subprocess.run(target.client.argv(argv), capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - started
    cpu_a, cpu_b = cpu(target.pid_a) - cpu_a_before, cpu(target.pid_b) - cpu_b_before
    threads_a_after, threads_b_after = threads(target.pid_a), threads(target.pid_b)
    host_busy_after, host_total_after = host_cpu_times()
    result = Measurement(name)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result.error = (proc.stderr or proc.stdout).strip()[:200] or f"iperf3 exited {proc.returncode}"
        return result
    if "error" in report:
        result.error = str(report["error"])[:200]
        return result
    end = report["end"]
    if udp_rate is None:
        received = end["sum_received"]
        result.mbit_per_s = float(received["bits_per_second"]) / 1e6
        result.bytes = int(received["bytes"])
        result.retransmits = end.get("sum_sent", {}).get("retransmits")
    else:
        summary = end["sum"]
        result.mbit_per_s = float(summary["bits_per_second"]) / 1e6
        result.bytes = int(summary["bytes"])
        result.lost_percent = float(summary.get("lost_percent", math.nan))
        # "sum" is the sender's rate; what came through is what counts.
        result.mbit_per_s *= 1 - result.lost_percent / 100
        result.packets = summary.get("packets")
        result.out_of_order = _udp_out_of_order(report)
    if result.bytes > 0:
        gigabytes = result.bytes / 1e9
        result.cpu_s_per_gb = (cpu_a + cpu_b) / gigabytes
        result.cpu_a_s_per_gb = cpu_a / gigabytes if target.pid_a is not None else None
        result.cpu_b_s_per_gb = cpu_b / gigabytes if target.pid_b is not None else None
    if wall > 0:
        # iperf3's own connect and teardown are in the wall time: a saturated side shows slightly under 100%.
        result.cpu_a_busy = cpu_a / wall if target.pid_a is not None else None
        result.cpu_b_busy = cpu_b / wall if target.pid_b is not None else None
        result.threads_a = _thread_shares(threads_a_before, threads_a_after, wall)
        result.threads_b = _thread_shares(threads_b_before, threads_b_after, wall)
    result.host_busy = host_share(
        host_busy_after - host_busy_before, host_total_after - host_total_before, cpu_a + cpu_b, wall
    )
    return result


def host_share(busy: int, total: int, tunnel_cpu_seconds: float, wall: float, cpus: int | None = None) -> float | None:
    """The machine's busy share from /proc/stat deltas, or None when it cannot be right: below what the two tunnel
    processes alone used. On this project's VM the idle count in /proc/stat sometimes jumps ahead (one 5 s UDP run read
    1 % busy while the tunnel processes used 22 % of a core each), so the figure is checked against their own."""
    if total <= 0 or wall <= 0:
        return None
    share = busy / total
    own = tunnel_cpu_seconds / (wall * (cpus or os.cpu_count() or 1))
    return None if share < 0.9 * own else share


def _udp_out_of_order(report: dict[str, object]) -> int | None:
    """iperf3 reports out-of-order datagrams per stream (receiver side) in ``end.streams[].udp.out_of_order``."""
    end = report.get("end")
    if not isinstance(end, dict):
        return None
    total: int | None = None
    summary = end.get("sum")
    if isinstance(summary, dict) and "out_of_order" in summary:
        return int(summary["out_of_order"])
    for stream in end.get("streams", []):
        udp = stream.get("udp", {}) if isinstance(stream, dict) else {}
        if "out_of_order" in udp:
            total = (total or 0) + int(udp["out_of_order"])
    return total


@contextlib.contextmanager
def _pair(spec: PairSpec, log_dir: Path) -> Iterator[WgPair]:
    # wg_topology: a daemon that had to be killed leaves its UAPI socket behind; it is removed at the end.
    with wg_topology("bn") as topo:
        # Quiet daemons: logging must not cost throughput while measuring.
        env = {
            "LOG_LEVEL": "error",
            "FIREZONE_NUM_TUN_THREADS": str(spec.queues),
            "FIREZONE_TUN_READ_OFFLOAD": "1" if spec.read_offload else "0",
            "FIREZONE_NATIVE": "1" if spec.native else "0",
        }
        pair = WgPair.create(topo, spec.a, spec.b, log_dir=log_dir, env_a=env, env_b=env)
        _wait_for_tunnel(pair.a, pair.b.tunnel_ip)
        pair.b.ns.popen(
            ["iperf3", "-s", "-B", pair.b.tunnel_ip, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        yield pair


def _wait_for_tunnel(a: WgInterface, address: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(a.ns.argv(["ping", "-c", "1", "-W", "1", address]), capture_output=True, timeout=10)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no ping through the tunnel to {address} after {timeout} s")
        time.sleep(0.1)  # a ping that fails at once (no route yet) must not turn this into a busy loop


IPERF_PLAN: tuple[tuple[str, dict[str, object]], ...] = (
    ("tcp1 a→b", {}),
    ("tcp1 b→a", {"reverse": True}),
    ("tcp4 a→b", {"streams": 4}),
    ("tcp4 b→a", {"streams": 4, "reverse": True}),
    ("udp a→b", {"udp_rate": UDP_RATE}),
)


def _ping_while(target: IperfTarget, result: PairResult, seconds: int) -> threading.Thread:
    """Starts pinging the server through the tunnel from 0.5 s into an iperf3 run until just before its end, in a
    thread; the RTT lands in ``result.rtt_loaded_*``."""
    count = max(3, int((seconds - 1.0) / LOADED_PING_INTERVAL))

    def ping() -> None:
        time.sleep(0.5)  # past iperf3's connect, into the stream
        result.rtt_loaded_avg_ms, result.rtt_loaded_max_ms, result.ping_loaded_lost = ping_rtt_ms(
            target.client, target.server_ip, count=count, interval=LOADED_PING_INTERVAL
        )

    thread = threading.Thread(target=ping, name="bench-loaded-ping", daemon=True)
    thread.start()
    return thread


def run_plan(target: IperfTarget, result: PairResult, *, seconds: int) -> None:
    """Runs every iperf3 measurement of :data:`IPERF_PLAN` against ``target``, appending to ``result``; pings under
    load during :data:`LOADED_PING_DURING`."""
    for name, kwargs in IPERF_PLAN:
        progress(f"{result.label}: iperf3 {name} ({seconds} s)")
        pinger = _ping_while(target, result, seconds) if name == LOADED_PING_DURING else None
        measurement = run_iperf(target, name, seconds=seconds, **kwargs)  # type: ignore[arg-type]
        if pinger is not None:
            pinger.join()
        if measurement.error is not None:
            # iperf3's control connection rides the tunnel and can be reset under overload: one retry.
            progress(f"{result.label}: {name} failed ({measurement.error[:60]}); retrying once")
            time.sleep(1.0)
            measurement = run_iperf(target, name, seconds=seconds, **kwargs)  # type: ignore[arg-type]
        result.measurements.append(measurement)
        progress(f"{result.label}: {name}: {_cell(measurement, result.sides)}")


def measure_idle_pings(result: PairResult, ns: Netns, address: str, *, pings: int) -> None:
    """The idle ping (:data:`IDLE_PING_GAP` apart), then at each of :data:`SHORTER_PING_GAPS`, with enough pings there
    that the first, cold one weighs little in the average."""
    result.rtt_avg_ms, result.rtt_max_ms, result.ping_lost = ping_rtt_ms(
        ns, address, count=pings, interval=IDLE_PING_GAP
    )
    result.rtt_by_gap_ms[f"{IDLE_PING_GAP * 1000:g}"] = result.rtt_avg_ms
    for gap in SHORTER_PING_GAPS:
        count = max(pings, SHORTER_GAP_PINGS)
        result.rtt_by_gap_ms[f"{gap * 1000:g}"] = ping_rtt_ms(ns, address, count=count, interval=gap)[0]


def measure_pair(spec: PairSpec, *, seconds: int, pings: int, log_dir: Path) -> PairResult:
    result = PairResult(spec.key, spec.label)
    try:
        with _pair(spec, log_dir) as pair:
            progress(f"{spec.label}: tunnel up; ping ×{pings}")
            measure_idle_pings(result, pair.a.ns, pair.b.tunnel_ip, pings=pings)
            run_plan(_pair_target(pair), result, seconds=seconds)
    except Exception as exc:  # one broken implementation must not hide the others' figures
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"{spec.label}: FAILED: {result.error}")
    return result


def _cell(m: Measurement, sides: tuple[str, str] = ("a", "b")) -> str:
    if m.error is not None:
        return f"error: {m.error[:40]}"
    text = f"{m.mbit_per_s:.0f} Mbit/s"
    if m.retransmits is not None:
        text += f" retr {m.retransmits}"
    if m.lost_percent is not None:
        text += f" loss {m.lost_percent:.2f}% ooo {m.out_of_order}"
    if m.cpu_s_per_gb is not None:
        text += f" cpu {m.cpu_s_per_gb:.1f} s/GB"
    busy = [
        f"{side} {share * 100:.0f}%"
        for side, share in zip(sides, (m.cpu_a_busy, m.cpu_b_busy), strict=True)
        if share is not None
    ]
    if m.host_busy is not None:
        busy.append(f"host {m.host_busy * 100:.0f}%")
    if busy:
        text += f" ({' '.join(busy)})"
    return text


def _ping_cell(avg: float, peak: float, reference: float | None) -> str:
    if math.isnan(avg):
        return "-"
    text = f"{avg:.3f}/{peak:.3f}"
    if reference is not None and reference > 0 and not math.isnan(reference):
        text += f" ({avg / reference:.2f}×)"
    return text


def _ratio_suffix(m: Measurement, ref: Measurement | None) -> str:
    """`` [throughput×, cpu cpu×]`` relative to the reference's same measurement."""
    if ref is None or ref.error is not None or m.error is not None:
        return ""
    parts = []
    if ref.mbit_per_s > 0:
        parts.append(f"{m.mbit_per_s / ref.mbit_per_s:.2f}×")
    if m.cpu_s_per_gb is not None and ref.cpu_s_per_gb:
        parts.append(f"cpu {m.cpu_s_per_gb / ref.cpu_s_per_gb:.2f}×")
    return f" [{', '.join(parts)}]" if parts else ""


def format_table(results: list[PairResult]) -> str:
    reference = next((r for r in results if r.key == REFERENCE and r.error is None), None)
    ref_by_name = {m.name: m for m in reference.measurements} if reference else {}
    names = [m.name for m in (reference or (results[0] if results else PairResult("", ""))).measurements] or [
        "tcp1 a→b",
        "tcp1 b→a",
        "tcp4 a→b",
        "tcp4 b→a",
        "udp a→b",
    ]
    lines = []
    header = ["pair", "ping idle avg/max ms", f"ping under {LOADED_PING_DURING} avg/max ms", *names]
    lines.append(" | ".join(header))
    lines.append(" | ".join("---" for _ in header))
    for result in results:
        if result.error is not None:
            lines.append(f"{result.label} | FAILED: {result.error}")
            continue
        is_reference = result is reference
        cells = [
            result.label,
            _ping_cell(
                result.rtt_avg_ms, result.rtt_max_ms, None if is_reference or not reference else reference.rtt_avg_ms
            ),
            _ping_cell(
                result.rtt_loaded_avg_ms,
                result.rtt_loaded_max_ms,
                None if is_reference or not reference else reference.rtt_loaded_avg_ms,
            ),
        ]
        by_name = {m.name: m for m in result.measurements}
        for name in names:
            m = by_name.get(name)
            if m is None:
                cells.append("-")
                continue
            cell = _cell(m, result.sides)
            if not is_reference:
                cell += _ratio_suffix(m, ref_by_name.get(name))
            cells.append(cell)
        lines.append(" | ".join(cells))
    return "\n".join(lines)


@dataclass
class InterleavedScaling:
    """2 queues over 1 measured in alternation: both pairs stay up and their runs take turns, so a change in the
    machine's other load hits both sides of each ratio alike (rows measured one after the other do not cancel it)."""

    one: str  # row keys
    two: str
    what: str
    seconds: int
    ratios: dict[str, list[float]] = field(default_factory=dict)  # measurement name → two/one per round
    error: str | None = None


def measure_interleaved_scaling(
    one: str, two: str, what: str, *, rounds: int, seconds: int, log_dir: Path
) -> InterleavedScaling:
    result = InterleavedScaling(one, two, what, seconds)
    try:
        with _pair(PAIRS[one], log_dir) as pair_one, _pair(PAIRS[two], log_dir) as pair_two:
            targets = {one: _pair_target(pair_one), two: _pair_target(pair_two)}
            kwargs_by_name = dict(IPERF_PLAN)
            for round_number in range(rounds):
                # Alternate who goes first, so a steady drift in the load favours neither.
                order = (one, two) if round_number % 2 == 0 else (two, one)
                for name in SCALING_MEASUREMENTS:
                    mbit: dict[str, float] = {}
                    for key in order:
                        options: dict[str, Any] = kwargs_by_name[name]
                        measured = run_iperf(targets[key], name, seconds=seconds, **options)
                        if measured.error is not None:  # as in run_plan: one retry after a reset control connection
                            time.sleep(1.0)
                            measured = run_iperf(targets[key], name, seconds=seconds, **options)
                        mbit[key] = measured.mbit_per_s if measured.error is None else math.nan
                    if mbit[one] > 0:
                        result.ratios.setdefault(name, []).append(mbit[two] / mbit[one])
                    progress(
                        f"scaling {what} round {round_number + 1}: {name}: {mbit[two]:.0f} / {mbit[one]:.0f} Mbit/s"
                    )
    except Exception as exc:  # the rows' figures stand without this
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        progress(f"scaling {what}: FAILED: {result.error}")
    return result


def format_interleaved(results: list[InterleavedScaling]) -> str:
    lines = []
    for result in results:
        prefix = f"2 queues / 1 queue interleaved ({result.what}, {result.two} / {result.one}, {result.seconds} s runs)"
        if result.error is not None:
            lines.append(f"{prefix}: FAILED: {result.error}")
            continue
        parts = []
        for name, ratios in result.ratios.items():
            valid = [r for r in ratios if not math.isnan(r)]
            if valid:
                rounds = ", ".join(f"{r:.2f}" for r in ratios)
                parts.append(f"{name} median {statistics.median(valid):.2f}× ({rounds})")
        lines.append(f"{prefix}: {'; '.join(parts) if parts else 'no figures'}")
    return "\n".join(lines)


def format_ping_gaps(results: list[PairResult]) -> str:
    """One line per row: the average idle RTT by the gap between pings, with the ratio to the reference's."""
    reference = next((r for r in results if r.key == REFERENCE and r.error is None), None)
    lines = []
    for result in results:
        if result.error is not None or not result.rtt_by_gap_ms:
            continue
        parts = []
        for gap, rtt in sorted(result.rtt_by_gap_ms.items(), key=lambda item: float(item[0])):
            part = f"{gap} ms {rtt:.3f}"
            base = reference.rtt_by_gap_ms.get(gap) if reference is not None and result is not reference else None
            if base is not None and base > 0 and not math.isnan(rtt):
                part += f" ({rtt / base:.2f}×)"
            parts.append(part)
        lines.append(f"idle ping avg ms by gap between pings, {result.label}: {', '.join(parts)}")
    return "\n".join(lines)


def format_scaling(results: list[PairResult]) -> str:
    """One line per 1-queue/2-queue pair of rows present: throughput with 2 queues over 1, per measurement."""
    by_key = {r.key: r for r in results if r.error is None}
    lines = []
    for one, two, what in QUEUE_SCALING:
        if one not in by_key or two not in by_key:
            continue
        single = {m.name: m for m in by_key[one].measurements if m.error is None}
        double = {m.name: m for m in by_key[two].measurements if m.error is None}
        ratios = [
            f"{name} {double[name].mbit_per_s / single[name].mbit_per_s:.2f}×"
            for name in SCALING_MEASUREMENTS
            if name in single and name in double and single[name].mbit_per_s > 0
        ]
        if ratios:
            lines.append(f"2 queues / 1 queue ({what}, {two} / {one}): {', '.join(ratios)}")
    return "\n".join(lines)


THREADS_SHOWN = "tcp4 a→b"
"""The measurement whose per-thread CPU the summary prints (the one the queue scaling is judged on)."""


def format_threads(results: list[PairResult]) -> str:
    """Per row, each tunnel process's threads' share of one core during the ``THREADS_SHOWN`` run, with how busy the
    whole machine was: a thread near 100 % is the bottleneck; none near it while the host is, and CPU is."""
    lines = []
    for result in results:
        m = next((m for m in result.measurements if m.name == THREADS_SHOWN and m.error is None), None)
        if m is None or not (m.threads_a or m.threads_b):
            continue
        sides = [
            f"{side}: " + " ".join(f"{name} {share * 100:.0f}%" for name, share in threads.items())
            for side, threads in zip(result.sides, (m.threads_a, m.threads_b), strict=True)
            if threads
        ]
        host = f" (host {m.host_busy * 100:.0f}%)" if m.host_busy is not None else ""
        lines.append(f"{result.label}{host}: {'; '.join(sides)}")
    return f"threads' share of one core during {THREADS_SHOWN}:\n" + "\n".join(lines) if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s per iperf3 run, 10 pings")
    parser.add_argument("--seconds", type=int, default=None, help="seconds per iperf3 run (default 10, quick 3)")
    parser.add_argument("--pings", type=int, default=None)
    rows = [*PAIRS, GATEWAY_ROW]
    parser.add_argument(
        "--only",
        "--pairs",
        dest="rows",
        default=",".join(rows),
        help=f"comma-separated rows to measure, in this order (default all): {','.join(rows)}; ratios need {REFERENCE}",
    )
    parser.add_argument(
        "--profile-gateway",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="gateway row: also sample the gateway and the lab client with py-spy for SECONDS under iperf3 load",
    )
    parser.add_argument(
        "--client-plain-io",
        action="store_true",
        help="gateway row: the lab client without GSO/GRO and TUN offloads",
    )
    parser.add_argument(
        "--gateway-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="gateway row: extra environment for firezone-gateway, e.g. FIREZONE_TUN_READ_OFFLOAD=0 (repeatable)",
    )
    parser.add_argument(
        "--scaling-rounds",
        metavar="N",
        type=int,
        default=0,
        help="also run tcp4 on the 1- and 2-queue pairs of the selected rows in alternation, N rounds (robust to other "
        "load on the machine)",
    )
    parser.add_argument("--output", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("lab.bench needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    seconds = args.seconds or (3 if args.quick else 10)
    pings = args.pings or (10 if args.quick else 30)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in rows]
    if unknown or not keys:
        parser.error(f"unknown rows {unknown}; choose from {rows}")
    gateway_env: dict[str, str] = {}
    for item in args.gateway_env:
        name, equals, value = item.partition("=")
        if not equals or not name:
            parser.error(f"--gateway-env takes NAME=VALUE, not {item!r}")
        gateway_env[name] = value
    started = datetime.datetime.now(datetime.UTC)
    results: list[PairResult] = []
    with tempfile.TemporaryDirectory(prefix="fz-bench-") as tmp:
        for key in keys:
            progress(f"row {key}: starting")
            if key == GATEWAY_ROW:
                # Imported here: the lab world pulls in the dev portal, which the wg pairs do not need.
                from lab.bench_gateway import measure_gateway

                profile_dir = Path(args.output) if args.profile_gateway > 0 else None
                results.append(
                    measure_gateway(
                        seconds=seconds,
                        pings=pings,
                        profile_seconds=args.profile_gateway,
                        profile_dir=profile_dir,
                        client_plain_io=args.client_plain_io,
                        gateway_env=gateway_env,
                    )
                )
            else:
                results.append(measure_pair(PAIRS[key], seconds=seconds, pings=pings, log_dir=Path(tmp)))
        interleaved = [
            measure_interleaved_scaling(one, two, what, rounds=args.scaling_rounds, seconds=seconds, log_dir=Path(tmp))
            for one, two, what in QUEUE_SCALING
            if args.scaling_rounds > 0 and one in keys and two in keys
        ]
    table = format_table(results)
    gaps = format_ping_gaps(results)
    if gaps:
        table += "\n\n" + gaps
    scaling = "\n".join(part for part in (format_scaling(results), format_interleaved(interleaved)) if part)
    if scaling:
        table += "\n\n" + scaling
    threads = format_threads(results)
    if threads:
        table += "\n\n" + threads
    print(table)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    payload = {
        "started": started.isoformat(),
        "command": " ".join(["python -m lab.bench", *(argv if argv is not None else sys.argv[1:])]),
        "seconds_per_run": seconds,
        "pings": pings,
        "reference": REFERENCE,
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "results": [asdict(r) for r in results],
        "interleaved_scaling": [asdict(r) for r in interleaved],
        "table": table,
    }
    out_path.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    print(f"\nJSON: {out_path}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    # Run the copy importable as lab.bench, the one lab.bench_gateway's results are made of.
    from lab import bench

    sys.exit(bench.main())
