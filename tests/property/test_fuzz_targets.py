"""The short fuzzing pass of ``make test``: every target in fuzz/ on its seeds plus a counted number of mutants.

Iterations are counted, never timed, so a loaded machine only makes the pass slower. The in-process pass uses the
deterministic byte mutator (same inputs every run); the atheris pass is coverage-guided with a fixed libFuzzer seed
and run count. ``make fuzz`` runs each target for longer.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz import TARGETS
from fuzz.harness import join_datagrams, mutate, run_mutations, split_datagrams

ROOT = Path(__file__).resolve().parents[2]
IN_PROCESS_MUTANTS = 300
ATHERIS_RUNS = 500


@pytest.mark.parametrize("target", TARGETS)
def test_seeds_and_mutants_never_fail(target: str) -> None:
    module = importlib.import_module(f"fuzz.{target}")
    seeds = module.seeds()
    assert seeds, "a target needs a seed corpus"
    assert (
        run_mutations(target, module.TestOneInput, seeds, IN_PROCESS_MUTANTS, seed=11)
        == len(seeds) + IN_PROCESS_MUTANTS
    )


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
@pytest.mark.parametrize("target", TARGETS)
def test_coverage_guided_short_run(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            target,
            f"-runs={ATHERIS_RUNS}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Done {ATHERIS_RUNS} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_datagram_framing_round_trips() -> None:
    datagrams = [b"", b"a", bytes(300)]
    assert split_datagrams(join_datagrams(datagrams)) == datagrams
    assert split_datagrams(b"\x00\x05ab") == [b"ab"]  # a short last frame keeps what is left
    assert len(split_datagrams(join_datagrams([b"x"] * 100), limit=8)) == 8


def test_mutator_is_deterministic() -> None:
    first = [mutate(b"seed bytes", random.Random(3), [b"other"]) for _ in range(5)]
    again = [mutate(b"seed bytes", random.Random(3), [b"other"]) for _ in range(5)]
    assert first == again
