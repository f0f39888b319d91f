"""dataplane.native: which implementation runs, FIREZONE_NATIVE=0, and the C calls letting other threads run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from dataplane import native, native_fallback

try:
    from dataplane import _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None  # type: ignore[assignment]

needs_extension = pytest.mark.skipif(
    _native is None, reason="dataplane._native is not built (no C compiler/OpenSSL headers): pure-Python mode only"
)

_PROBE = (
    "import logging; logging.basicConfig(level=logging.DEBUG, format='%(name)s %(message)s');"
    "from dataplane import native; print('NATIVE', native.NATIVE)"
)


def _probe(environment_value: str | None, *, without_extension: bool = False) -> tuple[bool, str]:
    env = {key: value for key, value in os.environ.items() if key != "FIREZONE_NATIVE"}
    if environment_value is not None:
        env["FIREZONE_NATIVE"] = environment_value
    # A None entry in sys.modules makes the import fail as if the extension had not been built.
    probe = ("import sys; sys.modules['dataplane._native'] = None;" if without_extension else "") + _PROBE
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=60
    )
    return "NATIVE True" in result.stdout, result.stderr


@needs_extension
def test_firezone_native_0_selects_the_pure_python_twin_and_says_so() -> None:
    used_native, log = _probe("0")
    assert not used_native
    assert [line for line in log.splitlines() if line.startswith("dataplane.native")] == [
        "dataplane.native data plane: FIREZONE_NATIVE=0: pure-Python hot path"
    ]


def test_without_the_extension_the_pure_python_twin_runs_and_says_why() -> None:
    used_native, log = _probe(None, without_extension=True)
    assert not used_native
    lines = [line for line in log.splitlines() if line.startswith("dataplane.native")]
    assert len(lines) == 1
    assert "not built" in lines[0] and "pure-Python hot path" in lines[0]


@needs_extension
def test_the_extension_is_used_by_default_when_built() -> None:
    used_native, log = _probe(None)
    assert used_native
    assert "C hot path" in log


def test_the_selected_functions_come_from_one_implementation() -> None:
    module = native.implementation
    assert module is (native_fallback if not native.NATIVE else _native)
    assert native.seal_batch is module.seal_batch
    assert native.open_batch is module.open_batch
    assert native.ones_complement_sum is module.ones_complement_sum


@needs_extension
def test_open_batch_lets_other_threads_run() -> None:
    assert _native is not None
    # Unauthenticated 64 KiB messages still cost a full decryption each: tens of milliseconds for the batch.
    messages = [bytes(65536)] * 400
    started = threading.Event()
    results: list[list[bytes | None]] = []

    def work() -> None:
        started.set()
        results.append(_native.open_batch(bytes(32), messages))

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    spins = 0
    while worker.is_alive():
        spins += 1
    worker.join()
    assert results == [[None] * len(messages)]
    # With the GIL held for the whole call this loop could hardly run at all.
    assert spins > 1000


def test_the_extension_is_built_where_make_setup_installed_its_build_tools() -> None:
    """A silent build failure must not quietly turn every gateway pure-Python: with gcc and the OpenSSL headers present
    (what `make setup` installs), the optional extension has to be there."""
    import shutil
    import sysconfig

    headers = os.path.exists("/usr/include/openssl/evp.h") and os.path.exists(
        os.path.join(sysconfig.get_paths()["include"], "Python.h")
    )
    if shutil.which("gcc") is None or not headers or os.environ.get("FIREZONE_BUILD_NATIVE") == "0":
        pytest.skip("no build tools here: the pure-Python mode is expected")
    assert _native is not None, "gcc and the headers are installed but dataplane._native was not built"
