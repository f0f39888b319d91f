"""The two ways a fuzz target runs.

- :func:`fuzz_main`: coverage-guided with atheris (libFuzzer flags on the command line, e.g. ``-runs=N``,
  ``-max_total_time=S``, a corpus directory that is seeded from the target's ``seeds()`` first).
- :func:`run_mutations`: a counted, deterministic pass with a small byte mutator, needing nothing but the standard
  library; the test suite uses it so a loaded machine changes how long the pass takes, never what it covers.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

TestOneInput = Callable[[bytes], None]

# Values that sit on length, type and range boundaries of the parsed formats.
_INTERESTING_BYTES = (0x00, 0x01, 0x04, 0x06, 0x11, 0x3A, 0x40, 0x45, 0x60, 0x7F, 0x80, 0xFE, 0xFF)


class FuzzFailure(AssertionError):
    """A target raised on one input; the input is kept so the failure can be replayed and turned into a test."""

    def __init__(self, target: str, data: bytes, cause: BaseException) -> None:
        super().__init__(f"{target} failed on input {data.hex()}: {type(cause).__name__}: {cause}")
        self.target = target
        self.data = data


def write_seeds(corpus: Path, seeds: Sequence[bytes]) -> None:
    """Adds each seed to ``corpus`` under a content-derived name (re-running adds nothing twice)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}"
        if not path.exists():
            path.write_bytes(seed)


INSTRUMENTED_PACKAGES = ("dataplane", "protocol")


def fuzz_main(target: str, argv: Sequence[str] | None = None) -> None:
    """Runs ``fuzz.<target>`` under atheris until libFuzzer stops (``-runs``, ``-max_total_time`` or a crash).

    The target is imported afresh with only the project's packages instrumented: instrumenting everything already
    loaded (``atheris.instrument_all``) costs tens of seconds per start and mostly measures the standard library."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    # Targets feed garbage on purpose: the warnings it earns would drown libFuzzer's progress lines.
    logging.disable(logging.CRITICAL)
    for name in list(sys.modules):
        if name.split(".")[0] in INSTRUMENTED_PACKAGES or name == f"fuzz.{target}":
            del sys.modules[name]
    with atheris.instrument_imports(include=list(INSTRUMENTED_PACKAGES)):
        module = importlib.import_module(f"fuzz.{target}")
    args = list(sys.argv if argv is None else argv)
    corpus_dirs = [arg for arg in args[1:] if not arg.startswith("-")]
    if not corpus_dirs:
        # libFuzzer only reads seeds from a directory; without one given, use a throwaway one.
        scratch = tempfile.mkdtemp(prefix="fuzz-corpus-")
        corpus_dirs = [scratch]
        args.append(scratch)
    write_seeds(Path(corpus_dirs[0]), module.seeds())
    max_len = getattr(module, "MAX_INPUT_LENGTH", None)
    if max_len is not None and not any(arg.startswith("-max_len=") for arg in args):
        args.insert(1, f"-max_len={max_len}")
    atheris.Setup(args, module.TestOneInput)
    atheris.Fuzz()


def mutate(data: bytes, rng: random.Random, others: Sequence[bytes]) -> bytes:
    """One to four random edits: bit flips, boundary bytes, inserts, deletes, truncation, duplication, splicing."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        operation = rng.randrange(8)
        position = rng.randrange(len(buf) + 1)
        if operation == 0 and buf:
            index = rng.randrange(len(buf))
            buf[index] ^= 1 << rng.randrange(8)
        elif operation == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice(_INTERESTING_BYTES)
        elif operation == 2:
            buf[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif operation == 3 and buf:
            del buf[position : position + rng.randint(1, 16)]
        elif operation == 4:
            del buf[position:]
        elif operation == 5 and buf:
            start = rng.randrange(len(buf))
            buf[position:position] = buf[start : start + rng.randint(1, 32)]
        elif operation == 6 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            buf[position:] = other[cut:]
        elif buf:
            # A 16-bit big-endian length or type field set to a boundary value.
            index = rng.randrange(len(buf))
            value = rng.choice((0, 1, len(buf), len(buf) - 1, 0x7FFF, 0x8000, 0xFFFF))
            buf[index : index + 2] = (value & 0xFFFF).to_bytes(2, "big")
    return bytes(buf)


def run_mutations(
    target: str, test_one_input: TestOneInput, seeds: Sequence[bytes], iterations: int, seed: int = 0
) -> int:
    """Feeds every seed, then ``iterations`` mutants of them; raises :class:`FuzzFailure` on the first failure.

    Returns the number of inputs run."""
    rng = random.Random(seed)
    inputs_run = 0
    for data in seeds:
        _run_one(target, test_one_input, data)
        inputs_run += 1
    pool = list(seeds) or [b""]
    for _ in range(iterations):
        _run_one(target, test_one_input, mutate(rng.choice(pool), rng, pool))
        inputs_run += 1
    return inputs_run


def _run_one(target: str, test_one_input: TestOneInput, data: bytes) -> None:
    try:
        test_one_input(data)
    except Exception as exc:
        raise FuzzFailure(target, data, exc) from exc


def join_datagrams(datagrams: Sequence[bytes], width: int = 2) -> bytes:
    """The input format of the stateful targets: each datagram behind a ``width``-byte big-endian length."""
    return b"".join(len(d).to_bytes(width, "big") + d for d in datagrams)


def split_datagrams(data: bytes, limit: int = 64, width: int = 2) -> list[bytes]:
    """Inverse of :func:`join_datagrams`; a short last frame keeps what is left, at most ``limit`` frames."""
    out: list[bytes] = []
    offset = 0
    while offset < len(data) and len(out) < limit:
        length = int.from_bytes(data[offset : offset + width], "big")
        out.append(data[offset + width : offset + width + length])
        offset += width + length
    return out
