"""Mutation testing of the sans-IO cores, one module at a time, with a score per module (``make mutate``).

mutmut 3 mutates every file under its source paths that ``only_mutate`` matches and runs the tests that cover each
mutated function. To keep one module's run short and its results separate, each module gets a scratch copy of the
repository under ``build/mutation/<module>/`` whose pyproject narrows ``[tool.mutmut]`` to that module and to the
tests that exercise it; results stay there, so re-running a module only re-tests what changed.

Score = killed / judged (judged = mutants - skipped - not run), where a timeout or a type-check failure counts as
killed (the mutant was detected) and "no tests" counts against the score (nothing would notice the change). A module
whose full run would take hours can be estimated from a random sample (``--sample N``, repeatable: each call judges N
more); a partial score then shows its 95 % interval, which holds for random samples only (a full run interrupted part
way has judged the file's first functions, not a random part).

    .venv/bin/python tools/mutation_report.py                     # every module, smallest first
    .venv/bin/python tools/mutation_report.py dataplane/p2p_control.py --max-children 1
    .venv/bin/python tools/mutation_report.py --report-only       # print the table from earlier runs
    .venv/bin/python tools/mutation_report.py --retest-survivors dataplane/p2p_control.py   # after adding tests
    .venv/bin/python tools/mutation_report.py --sample 300 dataplane/wireguard/device.py     # an estimate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK_DIR = ROOT / "build" / "mutation"
COPIED = ("dataplane", "protocol", "agent", "lab", "fuzz", "tests")
SKIPPED_IN_COPY = shutil.ignore_patterns("node_modules", "__pycache__", ".hypothesis", "*.pyc")

_FUZZ_PASS = "tests/property/test_fuzz_targets.py::test_seeds_and_mutants_never_fail"
_KILLERS = "tests/unit/test_parser_mutation_killers.py"
_WG_TESTS = [
    "tests/unit/test_wg_vectors.py",
    "tests/unit/test_wg_tunn.py",
    "tests/unit/test_wg_device.py",
    "tests/unit/test_wg_cookie.py",
    "tests/unit/test_wg_timers.py",
    "tests/property/test_wg_properties.py",
    "tests/property/test_wg_stateful.py",
    "tests/unit/test_wg_mutation_killers.py",
]
# The batched seal/open paths (firezone-wg's threads, the C twin) and the Node's shared handshake-load state.
_WG_BATCH_TESTS = [
    "tests/unit/test_wg_split_paths.py",
    "tests/property/test_native_equivalence.py",
    "tests/unit/test_node.py",
    "tests/unit/test_node_batch.py",
]
_ICE_TESTS = ["tests/unit/test_ice_agent.py", "tests/unit/test_candidate.py", "tests/property/test_ice_property.py"]
_ICE_TESTS += ["tests/property/test_candidate_property.py"]

# The tests that exercise each module (integration tests need root and real peers: never part of a mutation run).
MODULE_TESTS: dict[str, list[str]] = {
    "dataplane/p2p_control.py": [
        "tests/unit/test_dns_control.py",
        "tests/sim/test_gateway_state.py",
        _FUZZ_PASS,
        _KILLERS,
    ],
    "dataplane/wireguard/messages.py": [*_WG_TESTS, _FUZZ_PASS, _KILLERS],
    "dataplane/wireguard/uapi.py": ["tests/unit/test_uapi.py", _FUZZ_PASS, _KILLERS],
    "dataplane/wireguard/replay.py": [*_WG_TESTS, _KILLERS, "tests/unit/test_replay_accept.py"],
    "dataplane/wireguard/allowedips.py": _WG_TESTS,
    "dataplane/wireguard/cookie.py": _WG_TESTS,
    "dataplane/wireguard/ratelimit.py": [*_WG_TESTS, _KILLERS],
    "dataplane/wireguard/session.py": [*_WG_TESTS, _KILLERS],
    "dataplane/wireguard/timers.py": _WG_TESTS,
    "dataplane/wireguard/crypto.py": _WG_TESTS,
    "dataplane/wireguard/noise.py": _WG_TESTS,
    "dataplane/wireguard/tunn.py": [*_WG_TESTS, *_WG_BATCH_TESTS, "tests/unit/test_wg_tunn_mutation_killers.py"],
    "dataplane/wireguard/device.py": [
        *_WG_TESTS,
        *_WG_BATCH_TESTS,
        "tests/unit/test_mutation_killers.py",
        "tests/unit/test_wg_device_mutation_killers.py",
    ],
    "dataplane/ice/timing.py": [*_ICE_TESTS, _KILLERS],
    "dataplane/ice/candidate.py": [*_ICE_TESTS, "tests/unit/test_candidate_mutation_killers.py"],
    "dataplane/ice/agent.py": [
        *_ICE_TESTS,
        "tests/unit/test_mutation_killers.py",
        "tests/unit/test_ice_agent_mutation_killers.py",
    ],
    "dataplane/stun.py": [
        "tests/unit/test_stun.py",
        "tests/unit/test_stun_transaction.py",
        "tests/unit/test_turn_credentials.py",
        "tests/property/test_stun_property.py",
        "tests/property/test_stun_turn_inputs.py",
        "tests/unit/test_stun_mutation_killers.py",
        _FUZZ_PASS,
        _KILLERS,
    ],
    "dataplane/turn.py": [
        "tests/unit/test_turn.py",
        "tests/property/test_stun_turn_inputs.py",
        "tests/sim/test_relay.py",
        "tests/unit/test_turn_mutation_killers.py",
        _FUZZ_PASS,
        _KILLERS,
    ],
    "dataplane/packet.py": [
        "tests/unit/test_packet.py",
        "tests/unit/test_mutation_killers.py",
        "tests/property/test_packet_property.py",
        "tests/property/test_packet_scapy.py",
        "tests/unit/test_packet_mutation_killers.py",
        "tests/property/test_native_packet.py",  # the C twin as a second oracle
        _FUZZ_PASS,
        _KILLERS,
    ],
    "protocol/messages.py": [
        "tests/unit/test_messages.py",
        "tests/property/test_messages_fuzz.py",
        "tests/unit/test_protocol_mutation_killers.py",
        _FUZZ_PASS,
        _KILLERS,
    ],
    "protocol/phoenix.py": [
        "tests/unit/test_phoenix.py",
        "tests/unit/test_protocol_mutation_killers.py",
        _FUZZ_PASS,
        _KILLERS,
    ],
    "protocol/errors.py": [
        "tests/unit/test_portal_errors.py",
        "tests/unit/test_phoenix.py",
        "tests/unit/test_portal_dial.py",
    ],
}

# mutmut's exit-code classes (mutmut/stats.py); anything else is "suspicious".
_KILLED_CODES = {1, 3}
_DETECTED_CODES = {36, 37, 24, -24, 152, 255}  # timeout / caught by the type checker
_SURVIVED_CODES = {0}
_NO_TESTS_CODES = {5, 33}
_SKIPPED_CODES = {34}


@dataclass
class Score:
    module: str
    mutants: int = 0
    killed: int = 0
    survived: int = 0
    no_tests: int = 0
    skipped: int = 0
    other: int = 0
    pending: int = 0  # not run yet (a run in progress, or outside a --sample)

    @property
    def judged(self) -> int:
        return self.mutants - self.skipped - self.pending

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.judged if self.judged else 100.0

    @property
    def margin(self) -> float:
        """Half-width of a 95 % interval when only a random part of the mutants was judged (0 when all were)."""
        if not self.pending or not self.judged:
            return 0.0
        share = self.killed / self.judged
        finite = (self.mutants - self.judged) / max(self.mutants - 1, 1)  # finite-population correction
        return 100.0 * 1.96 * math.sqrt(share * (1 - share) / self.judged * finite)


def scratch_dir(module: str) -> Path:
    return WORK_DIR / re.sub(r"[^A-Za-z0-9]+", "_", module.removesuffix(".py"))


def prepare(module: str) -> Path:
    """A copy of the sources and tests with ``[tool.mutmut]`` narrowed to ``module``; earlier results are kept."""
    scratch = scratch_dir(module)
    scratch.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        target = scratch / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / name, target, ignore=SKIPPED_IN_COPY)
    # mutmut copies the unmutated files into mutants/ once; a compiled extension copied then goes stale when the C
    # API changes, so the current build replaces it on every run.
    mutated_tree = scratch / "mutants" / "dataplane"
    if mutated_tree.is_dir():
        for extension in (ROOT / "dataplane").glob("_native*.so"):
            shutil.copy2(extension, mutated_tree / extension.name)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = pyproject.get("tool", {}).get("mutmut", {})
    settings = {
        **base,
        "source_paths": ["dataplane", "protocol"],
        "only_mutate": [module],
        "also_copy": ["agent", "lab", "fuzz"],
        "pytest_add_cli_args_test_selection": MODULE_TESTS[module],
    }
    lines = ["[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    # Keep pytest's settings (asyncio mode, markers, timeout) so the tests behave as in the real tree.
    pytest_section = _section(ROOT / "pyproject.toml", "tool.pytest.ini_options")
    (scratch / "pyproject.toml").write_text("\n".join(lines) + "\n\n" + pytest_section)
    return scratch


def _section(path: Path, name: str) -> str:
    text = path.read_text()
    start = text.index(f"[{name}]")
    following = re.search(r"^\[", text[start + 1 :], re.MULTILINE)
    return text[start : start + 1 + following.start()] if following else text[start:]


def run(
    module: str, max_children: int, timeout: float, *, retest_survivors: bool = False, sample: int = 0, seed: int = 0
) -> Path:
    """One mutmut run over ``module``; with ``retest_survivors`` only the mutants that survived last time run again
    (after adding tests: fresh tests are copied in, every other verdict is kept); with ``sample`` only that many
    mutants drawn at random (``seed``) from those not judged yet, for an estimate when a full run takes hours."""
    if retest_survivors:
        names = survivors(module)
        if not names:
            return prepare(module)
        return _mutmut(module, names, max_children, timeout)
    if sample:
        if not _meta_path(module).exists():
            # The first mutant of each function: mutmut generates every mutant (their names land in the meta) and
            # collects the test coverage once, at a small cost.
            _mutmut(module, [module.removesuffix(".py").replace("/", ".") + ".*__mutmut_1"], max_children, timeout)
        pending = sorted(name for name, code in _exit_codes(module).items() if code is None)
        names = random.Random(seed).sample(pending, min(sample, len(pending)))
        if not names:
            return scratch_dir(module)
        return _mutmut(module, names, max_children, timeout)
    return _mutmut(module, [], max_children, timeout)


def _mutmut(module: str, names: list[str], max_children: int, timeout: float) -> Path:
    scratch = prepare(module)
    backup = scratch / "verdicts-before-run.json"
    if backup.exists():  # a run over named mutants was interrupted before it could put the forgotten verdicts back
        _restore_verdicts(module, json.loads(backup.read_text()))
    earlier = _exit_codes(module)
    if names:
        backup.write_text(json.dumps(earlier))
    mutmut = Path(sys.executable).with_name("mutmut")
    log = scratch / "mutmut.log"
    with log.open("w") as output:
        subprocess.run(
            [str(mutmut), "run", "--max-children", str(max_children), *names],
            cwd=scratch,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FIREZONE_HYPOTHESIS_PROFILE": "mutation"},
            timeout=timeout,
            check=False,
        )
    if names:
        _restore_verdicts(module, earlier)
        backup.unlink()
    return scratch


def _restore_verdicts(module: str, earlier: dict[str, int | None]) -> None:
    """mutmut forgets the verdicts of mutants it did not re-run when tests changed; added tests cannot revive a killed
    mutant, so those verdicts still hold (and a survivor is re-run by --retest-survivors)."""
    meta_path = _meta_path(module)
    if not meta_path.exists():
        return
    meta = json.loads(meta_path.read_text())
    codes = meta.get("exit_code_by_key", {})
    for name, code in codes.items():
        if code is None and earlier.get(name) is not None:
            codes[name] = earlier[name]
    meta_path.write_text(json.dumps(meta))


def _meta_path(module: str) -> Path:
    return scratch_dir(module) / "mutants" / f"{module}.meta"


def _exit_codes(module: str) -> dict[str, int | None]:
    meta = _meta_path(module)
    if not meta.exists():
        return {}
    codes: dict[str, int | None] = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return codes


def score(module: str) -> Score | None:
    if not _meta_path(module).exists():
        return None
    exit_codes = _exit_codes(module)
    result = Score(module, mutants=len(exit_codes))
    for code in exit_codes.values():
        if code in _KILLED_CODES or code in _DETECTED_CODES:
            result.killed += 1
        elif code in _SURVIVED_CODES:
            result.survived += 1
        elif code in _NO_TESTS_CODES:
            result.no_tests += 1
        elif code in _SKIPPED_CODES:
            result.skipped += 1
        elif code is None:
            result.pending += 1
        else:
            result.other += 1
    return result


def survivors(module: str) -> list[str]:
    return sorted(
        name for name, code in _exit_codes(module).items() if code in _SURVIVED_CODES or code in _NO_TESTS_CODES
    )


def print_table(scores: list[Score], target: float) -> None:
    print(
        f"{'module':36} {'mutants':>8} {'not run':>8} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6}"
        f" {'score':>7}"
    )
    for s in scores:
        flag = "" if s.percent >= target else "  < target"
        margin = f" ± {s.margin:.1f} (partial)" if s.margin else ""
        print(
            f"{s.module:36} {s.mutants:8} {s.pending:8} {s.killed:7} {s.survived:9} {s.no_tests:9} {s.other:6}"
            f" {s.percent:6.1f}%{margin}{flag}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module paths (default: all, smallest first)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per module before giving up")
    parser.add_argument("--report-only", action="store_true", help="print scores from earlier runs, run nothing")
    parser.add_argument("--survivors", action="store_true", help="also list surviving mutant names")
    parser.add_argument(
        "--retest-survivors", action="store_true", help="re-run only the mutants that survived the last run"
    )
    parser.add_argument(
        "--sample", type=int, default=0, help="judge only this many more mutants, drawn at random (an estimate)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of --sample")
    parser.add_argument("--target", type=float, default=90.0, help="score to flag modules below (default 90)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULE_TESTS]
    if unknown:
        parser.error(f"no test selection for {unknown}; known: {', '.join(sorted(MODULE_TESTS))}")
    modules = args.modules or sorted(MODULE_TESTS, key=lambda m: (ROOT / m).stat().st_size)
    scores: list[Score] = []
    for module in modules:
        if not args.report_only:
            print(f"mutating {module} ...", flush=True)
            run(
                module,
                args.max_children,
                args.timeout,
                retest_survivors=args.retest_survivors,
                sample=args.sample,
                seed=args.seed,
            )
        result = score(module)
        if result is not None:
            scores.append(result)
            if args.survivors:
                for name in survivors(module):
                    print(f"  survived: {name}")
    print_table(scores, args.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
