"""agent/config.py and the CLI's configuration errors (docs/protocol.md §5)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import (
    DEFAULT_HEARTBEAT_INTERVAL,
    GATEWAY_APP_ID,
    TRACE,
    ConfigError,
    LogSpec,
    Secret,
    build_parser,
    derive_id_from_machine_id,
    describe_settings,
    load_settings,
    parse_bool,
    parse_duration,
    parse_log_directives,
    parse_socket_address,
    resolve_firezone_id,
    resolve_token,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"FIREZONE_TOKEN": "tok", "FIREZONE_ID": "b" * 64, "FIREZONE_STATE_DIR": str(tmp_path / "state")}


def test_defaults(env: dict[str, str]) -> None:
    settings = load_settings([], env)
    assert settings.token.reveal() == "tok"
    assert settings.firezone_id == "b" * 64 and settings.firezone_id_source == "env"
    assert settings.api_url == "wss://api.firezone.dev"
    assert settings.log_format == "human"
    assert settings.log_spec == LogSpec(logging.INFO)
    assert settings.max_partition_time == 24 * 3600
    assert settings.num_tun_threads == (1 if os.cpu_count() == 1 else 2)
    assert settings.health_check_addr == ("0.0.0.0", 8080)
    assert settings.heartbeat_interval == DEFAULT_HEARTBEAT_INTERVAL
    assert not settings.flow_logs and not settings.no_inc_buf and not settings.no_telemetry
    assert not settings.no_host_setup and not settings.allow_insecure_portal
    assert settings.name  # hostname


@pytest.mark.parametrize(("flag", "variable"), [("--no-host-setup", "FIREZONE_NO_HOST_SETUP")])
def test_no_host_setup_from_flag_or_environment(env: dict[str, str], flag: str, variable: str) -> None:
    assert load_settings([flag], env).no_host_setup
    assert load_settings([], {**env, variable: "true"}).no_host_setup
    assert not load_settings([], {**env, variable: "false"}).no_host_setup
    with pytest.raises(ConfigError) as caught:
        load_settings([], {**env, variable: "perhaps"})
    assert caught.value.variable == variable


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:8080",
        "ws://127.3.4.5",
        "http://localhost:4000",
        "ws://LOCALHOST.",
        "ws://[::1]:8080",
        "ws://[::ffff:127.0.0.1]:8080",
        "wss://portal.example",
        "https://10.0.0.1",
    ],
)
def test_tls_or_loopback_portal_urls_are_accepted(env: dict[str, str], url: str) -> None:
    assert load_settings([], {**env, "FIREZONE_API_URL": url}).api_url == url


@pytest.mark.parametrize("url", ["ws://10.0.0.1:8080", "http://portal.example", "ws://[2001:db8::1]", "ws://0.0.0.0"])
def test_cleartext_portal_urls_need_the_explicit_flag(env: dict[str, str], url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings([], {**env, "FIREZONE_API_URL": url})
    assert caught.value.variable == "FIREZONE_API_URL"
    assert "\n" not in str(caught.value) and "unencrypted" in str(caught.value)
    assert "FIREZONE_ALLOW_INSECURE_PORTAL" in str(caught.value)
    assert load_settings(["--allow-insecure-portal"], {**env, "FIREZONE_API_URL": url}).allow_insecure_portal
    allowed = {**env, "FIREZONE_API_URL": url, "FIREZONE_ALLOW_INSECURE_PORTAL": "1"}
    assert load_settings([], allowed).api_url == url


def test_every_variable_from_the_environment(env: dict[str, str]) -> None:
    env.update(
        FIREZONE_NAME="gw-eu-1",
        FIREZONE_API_URL="https://portal.example:8443",
        FIREZONE_LOG_FORMAT="json",
        RUST_LOG="warn,agent=debug",
        FIREZONE_MAX_PARTITION_TIME="30d",
        FIREZONE_NUM_TUN_THREADS="4",
        FIREZONE_NO_INC_BUF="true",
        FIREZONE_NO_TELEMETRY="1",
        HEALTH_CHECK_ADDR="[::1]:9090",
        FIREZONE_FLOW_LOGS="true",
        FIREZONE_HEARTBEAT_INTERVAL="0.5",
    )
    settings = load_settings([], env)
    assert settings.name == "gw-eu-1"
    assert settings.api_url == "https://portal.example:8443"
    assert settings.log_format == "json"
    assert settings.log_spec == LogSpec(logging.WARNING, (("agent", logging.DEBUG), ("flow_logs", TRACE)))
    assert settings.max_partition_time == 30 * 86400
    assert settings.num_tun_threads == 4
    assert settings.no_inc_buf and settings.no_telemetry and settings.flow_logs
    assert settings.health_check_addr == ("::1", 9090)
    assert settings.heartbeat_interval == 0.5


def test_flags_override_environment(env: dict[str, str]) -> None:
    env["FIREZONE_NAME"] = "from-env"
    settings = load_settings(
        ["flagtoken", "-n", "from-flag", "-i", "c" * 64, "-m", "5m", "--log-format", "json", "--no-inc-buf"], env
    )
    assert settings.token.reveal() == "flagtoken"
    assert settings.name == "from-flag" and settings.firezone_id == "c" * 64
    assert settings.max_partition_time == 300 and settings.log_format == "json" and settings.no_inc_buf


def test_firezone_log_level_wins_over_rust_log(env: dict[str, str]) -> None:
    env.update(RUST_LOG="error", FIREZONE_LOG_LEVEL="debug")
    assert load_settings([], env).log_spec.default_level == logging.DEBUG


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FIREZONE_LOG_FORMAT", "xml"),
        ("RUST_LOG", "loud"),
        ("FIREZONE_LOG_LEVEL", "agent=shout"),
        ("FIREZONE_MAX_PARTITION_TIME", "5x"),
        ("FIREZONE_MAX_PARTITION_TIME", "5"),
        ("FIREZONE_MAX_PARTITION_TIME", "m5"),
        ("FIREZONE_NUM_TUN_THREADS", "0"),
        ("FIREZONE_NUM_TUN_THREADS", "two"),
        ("FIREZONE_NO_INC_BUF", "maybe"),
        ("FIREZONE_FLOW_LOGS", "2"),
        ("HEALTH_CHECK_ADDR", "localhost:8080"),
        ("HEALTH_CHECK_ADDR", "0.0.0.0"),
        ("HEALTH_CHECK_ADDR", "0.0.0.0:70000"),
        ("FIREZONE_API_URL", "ftp://example.com"),
        ("FIREZONE_API_URL", "wss://"),
        ("FIREZONE_HEARTBEAT_INTERVAL", "-1"),
        ("FIREZONE_HEARTBEAT_INTERVAL", "nan"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str, value: str) -> None:
    env[variable] = value
    with pytest.raises(ConfigError) as caught:
        load_settings([], env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h", 3600), ("30d", 30 * 86400), ("90s", 90), ("1h 30m", 5400), ("2w", 14 * 86400), ("24h", 86400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("info", LogSpec(logging.INFO)),
        ("debug", LogSpec(logging.DEBUG)),
        ("trace", LogSpec(TRACE)),
        ("warn,agent=debug", LogSpec(logging.WARNING, (("agent", logging.DEBUG),))),
        ("firezone_gateway::eventloop=trace", LogSpec(logging.INFO, (("firezone_gateway.eventloop", TRACE),))),
        ("", LogSpec(logging.INFO)),
    ],
)
def test_log_directives(text: str, spec: LogSpec) -> None:
    assert parse_log_directives(text) == spec


def test_bools_and_addresses() -> None:
    assert parse_bool("TRUE") and parse_bool("yes") and not parse_bool("false") and not parse_bool("0")
    assert parse_socket_address("127.0.0.1:0") == ("127.0.0.1", 0)


def test_token_whitespace_is_removed(env: dict[str, str]) -> None:
    assert resolve_token(" a b\n", env).reveal() == "ab"


def test_token_from_a_file_path(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  file-token\n")
    assert resolve_token(None, {"FIREZONE_TOKEN": str(token_file)}).reveal() == "file-token"


def test_token_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "FIREZONE_TOKEN").write_text("cred-token\n")
    assert resolve_token(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).reveal() == "cred-token"


def test_env_token_wins_over_credentials(tmp_path: Path) -> None:
    (tmp_path / "FIREZONE_TOKEN").write_text("cred-token\n")
    assert resolve_token(None, {"FIREZONE_TOKEN": "env", "CREDENTIALS_DIRECTORY": str(tmp_path)}).reveal() == "env"


def test_missing_token_is_a_config_error(env: dict[str, str]) -> None:
    del env["FIREZONE_TOKEN"]
    with pytest.raises(ConfigError) as caught:
        load_settings([], env)
    assert caught.value.variable == "FIREZONE_TOKEN"


def test_secret_never_prints() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret}"
    assert secret == Secret("hunter2") and secret != Secret("other")


def test_settings_repr_hides_token(env: dict[str, str]) -> None:
    env["FIREZONE_TOKEN"] = "very-secret-token"
    assert "very-secret-token" not in repr(load_settings([], env))


def test_help_describes_the_data_plane_settings_as_used() -> None:
    text = " ".join(build_parser().format_help().split())
    for flag, variable in (
        ("--flow-logs", "FIREZONE_FLOW_LOGS"),
        ("--num-tun-threads", "FIREZONE_NUM_TUN_THREADS"),
        ("--no-inc-buf", "FIREZONE_NO_INC_BUF"),
    ):
        start = text.index(flag, text.index("options:"))
        entry = text[start : text.index(f"[{variable}]", start)]
        assert "not used" not in entry, entry


def test_effective_settings_line_lists_every_setting_but_the_token(env: dict[str, str]) -> None:
    env.update(FIREZONE_TOKEN="very-secret-token", FIREZONE_NUM_TUN_THREADS="3", FIREZONE_NO_INC_BUF="true")
    line = describe_settings(load_settings([], env))
    assert "very-secret-token" not in line and "token=" not in line
    assert f"firezone_id={'b' * 64}" in line and "api_url=wss://api.firezone.dev" in line
    assert "num_tun_threads=3" in line and "no_inc_buf=True" in line and "flow_logs=False" in line
    assert "not used" not in line


# --- FIREZONE_ID resolution ---------------------------------------------------------------------------------------


def test_id_explicit_wins(tmp_path: Path) -> None:
    assert resolve_firezone_id("my-id", tmp_path) == ("my-id", "env")


def test_id_from_state_file(tmp_path: Path) -> None:
    (tmp_path / "gateway_id").write_text(json.dumps({"id": "disk-id"}))
    assert resolve_firezone_id(None, tmp_path, tmp_path / "no-machine-id") == ("disk-id", "disk")


def test_id_derived_from_machine_id_is_not_written(tmp_path: Path) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    firezone_id, source = resolve_firezone_id(None, tmp_path / "state", machine_id)
    expected = hmac.new(GATEWAY_APP_ID.encode(), b"0123456789abcdef0123456789abcdef\n", hashlib.sha256).hexdigest()
    assert (firezone_id, source) == (expected, "machine-id")
    assert firezone_id == derive_id_from_machine_id("0123456789abcdef0123456789abcdef\n")
    assert not (tmp_path / "state" / "gateway_id").exists()


def test_id_generated_and_persisted_atomically(tmp_path: Path) -> None:
    state = tmp_path / "state"
    firezone_id, source = resolve_firezone_id(None, state, tmp_path / "no-machine-id")
    assert source == "generated" and len(firezone_id) == 64
    int(firezone_id, 16)
    stored = json.loads((state / "gateway_id").read_text())
    assert stored == {"id": firezone_id}
    assert stat.S_IMODE((state / "gateway_id").stat().st_mode) == 0o640
    assert stat.S_IMODE(state.stat().st_mode) == 0o770
    assert [p.name for p in state.iterdir()] == ["gateway_id"]  # no temp file left
    assert resolve_firezone_id(None, state, tmp_path / "no-machine-id") == (firezone_id, "disk")


def test_corrupt_state_file_falls_through(tmp_path: Path) -> None:
    (tmp_path / "gateway_id").write_text("{not json")
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("x\n")
    assert resolve_firezone_id(None, tmp_path, machine_id)[1] == "machine-id"


NOBODY = 65534


def _exit_code_as_nobody(action: Callable[[], int]) -> int:
    """Runs ``action`` in a forked child that dropped root for ``nobody``: root would write anywhere."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_unwritable_state_dir_is_an_error(tmp_path: Path) -> None:
    # A directory anyone may enter but only its owner may write in; unprivileged, we are not the owner.
    tmp_path.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)

    def attempt() -> int:
        try:
            resolve_firezone_id(None, locked / "state", tmp_path / "no-machine-id")
        except ConfigError as exc:
            return 0 if exc.variable == "FIREZONE_ID" and "rw access" in str(exc) else 2
        return 1

    if os.geteuid() == 0:
        assert _exit_code_as_nobody(attempt) == 0
    else:
        locked.chmod(0o555)
        assert attempt() == 0
    assert not (locked / "state").exists()


def test_an_existing_state_dir_keeps_its_mode(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o750)
    resolve_firezone_id(None, state, tmp_path / "no-machine-id")
    assert stat.S_IMODE(state.stat().st_mode) == 0o750
    assert (state / "gateway_id").is_file()


def test_state_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as caught:
        resolve_firezone_id(None, blocker / "state", tmp_path / "no-machine-id")
    assert caught.value.variable == "FIREZONE_ID"
    assert "rw access" in str(caught.value)


# --- the CLI in a subprocess --------------------------------------------------------------------------------------


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("FIREZONE_", "RUST_LOG", "HEALTH_CHECK"))}
    full_env.pop("CREDENTIALS_DIRECTORY", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "agent.main", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("variable", "value"),
    [("FIREZONE_MAX_PARTITION_TIME", "soon"), ("FIREZONE_LOG_FORMAT", "xml"), ("HEALTH_CHECK_ADDR", "nowhere")],
)
def test_cli_invalid_value_exits_2_with_one_line(env: dict[str, str], variable: str, value: str) -> None:
    env[variable] = value
    result = _run_cli(env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {variable}: ")
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_cli_missing_token_exits_2(env: dict[str, str]) -> None:
    del env["FIREZONE_TOKEN"]
    result = _run_cli(env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: FIREZONE_TOKEN: ")


def test_positional_token_is_found_for_removal() -> None:
    from agent.main import _argv_without_positional_token

    assert _argv_without_positional_token(["-n", "gw", "tok"]) == (["-n", "gw"], "tok")
    assert _argv_without_positional_token(["-n", "tok", "tok"]) == (["-n", "tok"], "tok")
    assert _argv_without_positional_token(["-n", "gw"]) is None
    assert _argv_without_positional_token(["--bogus"]) is None
