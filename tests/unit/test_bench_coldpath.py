"""lab.bench_coldpath in miniature: the in-memory hop completes its handshake and times every case."""

from __future__ import annotations

import pytest

from lab.bench_coldpath import Hop, main


def test_a_hop_delivers_each_sealed_packet_once() -> None:
    hop = Hop()
    assert all(hop.receive_microseconds(lambda: None) > 0 for _ in range(5))


def test_every_case_prints_a_figure(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--samples", "3", "--idle", "0.001", "--evict-mib", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines] == [
        "back to back",
        "after 1 ms idle",
        "after evicting 1 MiB (no idle)",
    ]
    assert all("µs" in line for line in lines)
