"""lab.bench_threads in miniature: every implementation and batch call prints its rounds and a median."""

from __future__ import annotations

import re

import pytest

from dataplane import native
from lab.bench_threads import main


def test_every_measurement_prints_its_rounds_and_a_median(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--seconds", "0.05", "--rounds", "2", "--threads", "2", "--pure"])
    lines = capsys.readouterr().out.splitlines()
    labels = (["C"] if native.NATIVE else []) + ["pure Python"]
    expected = [f"{label} {name}" for label in labels for name in ("seal_batch", "open_batch")]
    assert [line.split(":")[0] for line in lines] == [name for name in expected for _ in range(3)]
    assert all(line.endswith("×") or line.endswith("with 2 threads") for line in lines)
    figures = [re.search(r"1 thread (\d+) kpps, 2 threads (\d+) kpps", line) for line in lines if "kpps" in line]
    assert len(figures) == 2 * len(expected)
    assert all(match is not None and int(match[1]) > 0 and int(match[2]) > 0 for match in figures)


@pytest.mark.parametrize("argv", [["--threads", "1"], ["--rounds", "0"], ["--seconds", "0"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(argv)
