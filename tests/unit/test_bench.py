"""lab.bench's table, row selection and CPU accounting, and lab.bench_gateway's profile summary (no namespaces)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dataplane.io.osthread import set_os_thread_name
from lab.bench import (
    GATEWAY_ROW,
    REFERENCE,
    InterleavedScaling,
    Measurement,
    PairResult,
    cpu_seconds,
    format_interleaved,
    format_ping_gaps,
    format_scaling,
    format_table,
    format_threads,
    host_cpu_times,
    host_share,
    main,
    thread_cpu_seconds,
)
from lab.bench_gateway import summarize_collapsed


def _row(key: str, label: str, mbit: float, sides: tuple[str, str] = ("a", "b")) -> PairResult:
    measurement = Measurement("tcp1 a→b", mbit_per_s=mbit, bytes=10**9, retransmits=0, cpu_s_per_gb=20.0)
    measurement.cpu_a_busy, measurement.cpu_b_busy, measurement.host_busy = 0.5, 0.97, 0.99
    return PairResult(key, label, rtt_avg_ms=2.0, rtt_max_ms=3.0, sides=sides, measurements=[measurement])


def test_the_gateway_row_gets_ratios_to_the_reference_and_names_its_sides() -> None:
    table = format_table(
        [
            _row(REFERENCE, "wireguard-go ↔ wireguard-go", 1000.0),
            _row(GATEWAY_ROW, "lab client ↔ firezone-gateway", 250.0, ("client", "gateway")),
        ]
    ).splitlines()
    assert table[0] == "pair | ping idle avg/max ms | ping under tcp1 a→b avg/max ms | tcp1 a→b"
    assert "(a 50% b 97% host 99%)" in table[2]
    gateway = table[3]
    assert gateway.startswith("lab client ↔ firezone-gateway | 2.000/3.000 (1.00×) | -")
    assert "250 Mbit/s retr 0 cpu 20.0 s/GB (client 50% gateway 97% host 99%) [0.25×, cpu 1.00×]" in gateway


def test_without_the_reference_there_are_no_ratios() -> None:
    table = format_table([_row(GATEWAY_ROW, "lab client ↔ firezone-gateway", 250.0, ("client", "gateway"))])
    assert "×" not in table


def test_a_failed_row_keeps_its_place() -> None:
    table = format_table([_row(REFERENCE, "wgo", 1.0), PairResult(GATEWAY_ROW, "gw", error="RuntimeError: no ping")])
    assert table.splitlines()[-1] == "gw | FAILED: RuntimeError: no ping"


@pytest.mark.parametrize(
    "argv",
    [["--only", "nope"], ["--only", "wgo-wgo,nope"], ["--only", ","], ["--only", "gateway", "--gateway-env", "X"]],
)
def test_bad_arguments_are_refused_before_anything_runs(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


def test_cpu_figures_come_from_proc() -> None:
    busy, total = host_cpu_times()
    assert 0 < busy <= total
    assert cpu_seconds(1) >= 0.0
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_thread_cpu_comes_from_proc_by_kernel_name_with_the_main_thread_as_main() -> None:
    done = threading.Event()

    def spin() -> None:
        set_os_thread_name("bench-spin")
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass
        done.wait()

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        seconds = thread_cpu_seconds(os.getpid())
        for _ in range(100):
            if "bench-spin" in seconds:
                break
            threading.Event().wait(0.01)
            seconds = thread_cpu_seconds(os.getpid())
    finally:
        done.set()
        thread.join()
    assert "main" in seconds and "bench-spin" in seconds
    assert thread_cpu_seconds(2**22 + 12345) == {}


def test_the_thread_summary_shows_each_sides_threads_and_the_host() -> None:
    row = _row("fz2-fz2", "firezone-wg(q2) pair", 500.0)
    tcp4 = Measurement("tcp4 a→b", mbit_per_s=600.0, bytes=10**9, host_busy=0.98)
    tcp4.threads_a, tcp4.threads_b = {"main": 0.05, "tun-rx0": 0.3, "tun-rx1": 0.28}, {"main": 0.41}
    row.measurements.append(tcp4)
    text = format_threads([row, _row("wgo-wgo", "wireguard-go pair", 500.0)])
    assert text.splitlines() == [
        "threads' share of one core during tcp4 a→b:",
        "firezone-wg(q2) pair (host 98%): a: main 5% tun-rx0 30% tun-rx1 28%; b: main 41%",
    ]


def test_profile_summary_ranks_frames_by_self_samples() -> None:
    collapsed = "\n".join(
        [
            'process 1:"python";run (agent/main.py:10);send (dataplane/io/udp.py:300) 6',
            'process 1:"python";run (agent/main.py:10);seal (dataplane/wireguard/tunn.py:400) 3',
            'process 1:"python";run (agent/main.py:10) 1',
            "garbage line",
        ]
    )
    lines = summarize_collapsed(collapsed, top=2).splitlines()
    assert lines[0].strip() == "10 samples; self% total% frame"
    assert lines[1].split() == ["60.0", "60.0", "send", "(dataplane/io/udp.py:300)"]
    assert lines[2].split() == ["30.0", "30.0", "seal", "(dataplane/wireguard/tunn.py:400)"]
    assert len(lines) == 3
    assert summarize_collapsed("") == "  (no samples)"


def test_loaded_ping_cpu_and_queue_scaling_are_ratios_within_the_run() -> None:
    reference = _row(REFERENCE, "wgo", 1000.0)
    reference.rtt_loaded_avg_ms, reference.rtt_loaded_max_ms = 4.0, 8.0
    one = _row("fz1-fz1", "fz q1", 200.0)
    two = _row("fz2-fz2", "fz q2", 500.0)
    two.rtt_loaded_avg_ms, two.rtt_loaded_max_ms = 6.0, 9.0
    two.measurements[0].cpu_s_per_gb = 10.0
    for row, mbit in ((one, 100.0), (two, 170.0)):
        row.measurements.append(Measurement("tcp4 a→b", mbit_per_s=mbit, bytes=10**9))
    table = format_table([reference, one, two]).splitlines()
    assert table[4].startswith("fz q2 | 2.000/3.000 (1.00×) | 6.000/9.000 (1.50×) | 500 Mbit/s")
    assert "[0.50×, cpu 0.50×]" in table[4]
    assert format_scaling([reference, one, two]) == "2 queues / 1 queue (native, fz2-fz2 / fz1-fz1): tcp4 a→b 1.70×"
    assert format_scaling([reference, two]) == ""


def test_interleaved_scaling_reports_the_median_ratio_and_every_round() -> None:
    measured = InterleavedScaling("fz1-fz1", "fz2-fz2", "native", 5, {"tcp4 a→b": [1.5, 2.0, float("nan"), 1.1]})
    failed = InterleavedScaling("fz1py-fz1py", "fz2py-fz2py", "pure Python", 5, error="RuntimeError: no ping")
    assert format_interleaved([measured, failed]).splitlines() == [
        "2 queues / 1 queue interleaved (native, fz2-fz2 / fz1-fz1, 5 s runs): tcp4 a→b median 1.50× "
        "(1.50, 2.00, nan, 1.10)",
        "2 queues / 1 queue interleaved (pure Python, fz2py-fz2py / fz1py-fz1py, 5 s runs): "
        "FAILED: RuntimeError: no ping",
    ]


def test_idle_ping_by_gap_is_a_ratio_to_the_reference_at_the_same_gap() -> None:
    reference = _row(REFERENCE, "wgo", 1000.0)
    reference.rtt_by_gap_ms = {"50": 0.5, "2": 0.25, "10": 0.4}
    row = _row("fz1-fz1", "fz q1", 2000.0)
    row.rtt_by_gap_ms = {"2": 0.3, "10": 0.8, "50": 1.0}
    unmeasured = _row("fz2-fz2", "fz q2", 2000.0)
    failed = PairResult("gateway", "gateway", error="RuntimeError: no ping", rtt_by_gap_ms={"2": 1.0})
    assert format_ping_gaps([reference, row, unmeasured, failed]).splitlines() == [
        "idle ping avg ms by gap between pings, wgo: 2 ms 0.250, 10 ms 0.400, 50 ms 0.500",
        "idle ping avg ms by gap between pings, fz q1: 2 ms 0.300 (1.20×), 10 ms 0.800 (2.00×), 50 ms 1.000 (2.00×)",
    ]
    assert (
        format_ping_gaps([row]) == "idle ping avg ms by gap between pings, fz q1: 2 ms 0.300, 10 ms 0.800, 50 ms 1.000"
    )


def test_a_host_share_below_the_tunnel_processes_own_is_not_reported() -> None:
    # 2 CPUs, 5 s: the tunnel processes used 2.2 CPU seconds, 22 % of the machine.
    assert host_share(900, 1000, 2.2, 5.0, cpus=2) == 0.9
    assert host_share(200, 1000, 2.2, 5.0, cpus=2) == 0.2  # within 10 % of their own share: rounding, kept
    assert host_share(9, 1000, 2.2, 5.0, cpus=2) is None
    assert host_share(0, 0, 2.2, 5.0, cpus=2) is None
    assert host_share(500, 1000, 0.0, 0.0, cpus=2) is None
