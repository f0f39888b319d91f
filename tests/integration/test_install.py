"""packaging/install-gateway.sh against a scratch root, with a wheel built from this checkout (docs/protocol.md §5,
§6.1): the files it writes, the checksum pin, a re-install, and the installed gateway running the way the systemd
unit runs it (user nobody, CAP_NET_ADMIN only, no write+exec memory, the token as a credential) in a namespace of its
own, answering GET /healthz while it keeps retrying a portal that is not there.

Nothing touches the machine's /etc, /opt or services: the script is told FIREZONE_INSTALL_ROOT, and the gateway runs
inside a network namespace and a private mount namespace (its own /dev/net/tun node and /run)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.netns import Topology

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network and mount namespaces, setpriv)"),
]

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "packaging/install-gateway.sh"
UNIT = REPO / "packaging/firezone-gateway.service"
SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534
CAP_NET_ADMIN_MASK = 1 << 12

TOKEN = "install-test-token-0f1e2d3c4b5a"
HEALTH_PORT = 18080
SETTINGS = {
    "FIREZONE_NAME": 'gw "one" $HOME `id` \\ end',
    # Nothing listens on the discard port inside the namespace: the gateway keeps retrying.
    "FIREZONE_API_URL": "ws://127.0.0.1:9",
    "HEALTH_CHECK_ADDR": f"127.0.0.1:{HEALTH_PORT}",
    "FIREZONE_LOG_FORMAT": "json",
    "FIREZONE_FLOW_LOGS": "true",
    "RUST_LOG": "info",
}

# Runs inside `ip netns exec` + `unshare --mount`: a /dev/net/tun node anyone may open (what udev gives real hosts)
# and a fresh /run with /run/firezone owned by the service user (what RuntimeDirectory= gives it).
PRIVATE_MOUNTS = (
    "mount -t tmpfs -o mode=0755 fz-install-test /dev/net && mknod -m 0666 /dev/net/tun c 10 200 && "
    "mount -t tmpfs -o mode=0755 fz-install-test /run && mkdir -m 0750 /run/firezone && "
    f'chown {NOBODY}:{NOBODY} /run/firezone && exec "$@"'
)
# What MemoryDenyWriteExecute=yes does, through prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), kept across execve.
MEMORY_DENY_WRITE_EXECUTE = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(65, 1, 0, 0, 0)  # Linux >= 6.3; older kernels run without it\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def installer_python() -> str:
    """An interpreter user nobody may run whose packages ABI matches this venv's (the gateway borrows its deps)."""
    if SYSTEM_PYTHON.exists():
        version = subprocess.run(
            [str(SYSTEM_PYTHON), "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True
        ).stdout.split()
        if version == [str(part) for part in sys.version_info[:2]]:
            return str(SYSTEM_PYTHON)
    return sys.executable


def run_install(
    root: Path, wheel: Path, sha256: str | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    environment = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "HOME": str(root),
        "PIP_NO_CACHE_DIR": "1",
        "FIREZONE_INSTALL_ROOT": str(root),
        "FIREZONE_WHEEL": str(wheel),
        "FIREZONE_WHEEL_SHA256": sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "FIREZONE_PYTHON": installer_python(),
        # Offline: the dependencies are not installed into the scratch venv; the running test borrows this venv's.
        "FIREZONE_PIP_ARGS": "--no-index --no-deps",
        **settings,
    }
    return subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], env=environment, capture_output=True, text=True, timeout=300, check=False
    )


def read_env_file(path: Path, names: list[str]) -> dict[str, str]:
    """The values a shell (and systemd's EnvironmentFile=, same quoting) reads from the file."""
    script = 'set -a; . "$1"; shift; for name in "$@"; do printf "%s=%s\\0" "$name" "${!name-}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(path), *names], capture_output=True, text=True, check=True, env={}
    ).stdout
    return dict(entry.split("=", 1) for entry in out.split("\0") if entry)


@pytest.fixture(scope="session")
def gateway_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel per test session, built (python -m build) from a copy of this checkout's sources."""
    source = tmp_path_factory.mktemp("wheel-source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("protocol", "dataplane", "agent", "lab"):
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("firezone_gateway_py-*-py3-none-any.whl")
    return wheel


@pytest.fixture(scope="module")
def installed(gateway_wheel: Path) -> Iterator[Path]:
    """A scratch root the install script has filled; world-traversable so that user nobody can run from it."""
    root = Path(tempfile.mkdtemp(prefix="fz-install-"))
    try:
        root.chmod(0o755)
        proc = run_install(root, gateway_wheel, FIREZONE_TOKEN=TOKEN, **SETTINGS)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "staged under" in proc.stdout
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_install_writes_token_settings_unit_and_venv(installed: Path, gateway_wheel: Path) -> None:
    token = installed / "etc/firezone/gateway-token"
    assert token.read_text(encoding="utf-8").strip() == TOKEN
    assert token.stat().st_mode & 0o777 == 0o400
    env_file = installed / "etc/firezone/gateway-env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert TOKEN not in env_file.read_text(encoding="utf-8")
    unit = installed / "etc/systemd/system/firezone-gateway.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    venv = installed / "opt/firezone/venv"
    assert os.readlink(venv) == f"releases/{hashlib.sha256(gateway_wheel.read_bytes()).hexdigest()}"
    assert os.access(venv / "bin/firezone-gateway", os.X_OK)


def test_settings_reach_the_gateway_unchanged(installed: Path) -> None:
    """Every setting, log format and flow logs included (the reference's unit loses both), read back exactly."""
    values = read_env_file(installed / "etc/firezone/gateway-env", [*SETTINGS, "FIREZONE_ID"])
    firezone_id = values.pop("FIREZONE_ID")
    assert values == SETTINGS
    assert len(firezone_id) == 64 and int(firezone_id, 16) >= 0


def test_installed_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    system_units = Path("/usr/lib/systemd/system")
    if shutil.which("systemd-analyze") is None or not system_units.is_dir():
        pytest.skip("systemd-analyze comes with the systemd Debian package (`make setup`)")
    shutil.copytree(system_units, installed / "usr/lib/systemd/system", symlinks=True, dirs_exist_ok=True)
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={installed}", "firezone-gateway.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_a_second_run_keeps_id_token_and_venv(installed: Path, gateway_wheel: Path) -> None:
    """Re-running without token or id (to change a setting) keeps both, and reuses the wheel's venv."""
    env_file = installed / "etc/firezone/gateway-env"
    first_id = read_env_file(env_file, ["FIREZONE_ID"])["FIREZONE_ID"]
    entry_point = (installed / "opt/firezone/venv").resolve() / "bin/firezone-gateway"
    entry_point_inode = entry_point.stat().st_ino
    proc = run_install(installed, gateway_wheel, **SETTINGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_env_file(env_file, ["FIREZONE_ID"])["FIREZONE_ID"] == first_id
    assert (installed / "etc/firezone/gateway-token").read_text(encoding="utf-8").strip() == TOKEN
    assert entry_point.stat().st_ino == entry_point_inode
    assert len(list((installed / "opt/firezone/releases").iterdir())) == 1


def test_a_wheel_with_another_checksum_is_refused(tmp_path: Path, gateway_wheel: Path) -> None:
    root = tmp_path / "root"
    proc = run_install(root, gateway_wheel, sha256="0" * 64, FIREZONE_TOKEN=TOKEN)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr
    assert not (root / "opt").exists() and not (root / "etc").exists()


def test_installed_gateway_runs_like_the_unit_runs_it(installed: Path, tmp_path: Path) -> None:
    """User nobody, CAP_NET_ADMIN only, no new privileges, MDWE: /healthz answers and the data plane starts."""
    python = installer_python()
    if python != str(SYSTEM_PYTHON):
        pytest.skip(f"needs {SYSTEM_PYTHON} of this venv's Python version (user nobody cannot run {python})")
    settings = read_env_file(installed / "etc/firezone/gateway-env", [*SETTINGS, "FIREZONE_ID"])
    credentials = Path(tempfile.mkdtemp(prefix="fz-credentials-"))
    state = Path(tempfile.mkdtemp(prefix="fz-state-"))
    try:
        for directory in (credentials, state):
            directory.chmod(0o755)
            os.chown(directory, NOBODY, NOBODY)
        shutil.copy(installed / "etc/firezone/gateway-token", credentials / "FIREZONE_TOKEN")
        os.chown(credentials / "FIREZONE_TOKEN", NOBODY, NOBODY)
        environment = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CREDENTIALS_DIRECTORY": str(credentials),
            "FIREZONE_STATE_DIR": str(state),
            "PYTHONDONTWRITEBYTECODE": "1",
            # The dependencies, borrowed from the test venv (the scratch install ran pip offline with --no-deps).
            "PYTHONPATH": next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)),
            **settings,
        }
        command = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_MOUNTS, "sh",
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin",
            python, "-c", MEMORY_DENY_WRITE_EXECUTE, str(installed / "opt/firezone/venv/bin/firezone-gateway"),
        ]  # fmt: skip
        log_path = tmp_path / "gateway.log"
        with Topology("ins") as topology, log_path.open("wb") as log:
            namespace = topology.add_ns("gw")
            gateway = namespace.popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
            assert healthz_answers(namespace.name, gateway, log_path) == 200
            # uid and capabilities of the running gateway, as the unit sets them.
            status = dict(line.split(":\t", 1) for line in Path(f"/proc/{gateway.pid}/status").read_text().splitlines())
            assert status["Uid"].split()[:2] == [str(NOBODY), str(NOBODY)]
            assert int(status["CapEff"], 16) == CAP_NET_ADMIN_MASK
            assert int(status["CapBnd"], 16) == CAP_NET_ADMIN_MASK
            assert status["NoNewPrivs"].strip() == "1"
            # The data plane (TUN, sockets, sysctls, nftables) starts after the health server; a missing privilege
            # would end the process with "error: cannot start the data plane".
            time.sleep(2.0)
            assert gateway.poll() is None, log_path.read_text(errors="replace")
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(timeout=15) == 0, log_path.read_text(errors="replace")
        output = log_path.read_text(errors="replace")
        assert TOKEN not in output
        assert "error:" not in output, output
    finally:
        shutil.rmtree(credentials, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def healthz_answers(netns: str, gateway: subprocess.Popen[bytes], log_path: Path) -> int:
    """Status of GET /healthz from inside the namespace, retried until the gateway listens (30 s at most: a loaded
    machine starts a Python process slowly)."""
    probe = (
        "import sys, urllib.request\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{HEALTH_PORT}/healthz', timeout=2).status)\n"
    )
    deadline = time.monotonic() + 30.0
    while True:
        assert gateway.poll() is None, log_path.read_text(errors="replace")
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, str(SYSTEM_PYTHON), "-c", probe], capture_output=True, text=True, timeout=10
        )
        if proc.returncode == 0:
            return int(proc.stdout.strip())
        assert time.monotonic() < deadline, proc.stderr[-1000:] + log_path.read_text(errors="replace")
        time.sleep(0.3)
