"""Configuration of ``firezone-gateway``: flags and environment variables → frozen :class:`Settings` (spec §5).

Precedence per setting: command-line flag, then environment variable, then default. Every invalid value raises
:class:`ConfigError` naming the variable; ``agent.main`` prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

DEFAULT_API_URL = "wss://api.firezone.dev"
DEFAULT_STATE_DIR = "/var/lib/firezone"
DEFAULT_HEALTH_CHECK_ADDR = "0.0.0.0:8080"
DEFAULT_MAX_PARTITION_TIME = "24h"
DEFAULT_HEARTBEAT_INTERVAL = 10.0
GATEWAY_APP_ID = "753b38f9f96947ef8083802d5909a372"
GATEWAY_ID_FILE = "gateway_id"
MACHINE_ID_PATH = Path("/etc/machine-id")
TOKEN_CREDENTIAL_NAME = "FIREZONE_TOKEN"

# Python has no TRACE level; tracing's `trace` maps to a level below DEBUG so it still filters separately.
TRACE = 5
_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}
_DURATION_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "m": 60.0,
    "min": 60.0,
    "mins": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hrs": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
    "w": 604800.0,
    "week": 604800.0,
    "weeks": 604800.0,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """An invalid or missing setting; ``str()`` is the one-line message (without the ``error:`` prefix)."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class Secret:
    """A string that never prints itself: repr/str/format show a placeholder; ``reveal()`` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('<redacted>')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))


@dataclass(frozen=True, slots=True)
class LogSpec:
    """Parsed log directives: a default level plus per-logger levels (``warn,agent=debug``)."""

    default_level: int
    targets: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    token: Secret = field(repr=False)
    firezone_id: str
    firezone_id_source: str
    name: str
    api_url: str
    log_format: str
    log_spec: LogSpec
    flow_logs: bool
    max_partition_time: float
    num_tun_threads: int
    no_inc_buf: bool
    no_telemetry: bool
    health_check_addr: tuple[str, int]
    heartbeat_interval: float
    state_dir: Path
    # ws:// or http:// to a host other than loopback: the token would travel in cleartext, so only on request.
    allow_insecure_portal: bool = False
    # Leave sysctls, IP forwarding and masquerading to the operator.
    no_host_setup: bool = False


# --- value parsers (pure, each raises ValueError with a human message) ----------------------------------------------


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_duration(text: str) -> float:
    """Human durations as the reference accepts them: ``5m``, ``1h``, ``30d``, ``1h 30m``, ``90s``."""
    compact = text.strip()
    if not compact:
        raise ValueError("empty duration")
    total = 0.0
    position = 0
    for match in re.finditer(r"\s*(\d+)\s*([a-z]+)\s*", compact):
        if match.start() != position:
            break
        unit = _DURATION_UNITS.get(match.group(2))
        if unit is None:
            raise ValueError(f"unknown time unit {match.group(2)!r} in {text!r} (use s, m, h, d or w)")
        total += int(match.group(1)) * unit
        position = match.end()
    if position != len(compact):
        raise ValueError(f"not a duration like 5m, 1h or 30d: {text!r}")
    return total


def parse_log_directives(text: str) -> LogSpec:
    """``info``, ``debug``, ``warn,agent=debug``, ``firezone_gateway=trace``; targets are logger names."""
    default = logging.INFO
    targets: list[tuple[str, int]] = []
    for raw in text.split(","):
        directive = raw.strip()
        if not directive:
            continue
        target, sep, level_text = directive.partition("=")
        if not sep:
            level_text, target = target, ""
        level = _LEVELS.get(level_text.strip().lower())
        if level is None:
            raise ValueError(f"unknown log level {level_text.strip()!r} in {text!r}")
        target = target.strip()
        if not sep:
            default = level
        elif not target or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:]*", target):
            raise ValueError(f"bad log target {target!r} in {text!r}")
        else:
            # Rust paths use "::"; Python logger names use ".".
            targets.append((target.replace("::", "."), level))
    return LogSpec(default, tuple(targets))


def parse_socket_address(text: str) -> tuple[str, int]:
    """``0.0.0.0:8080`` or ``[::]:8080``: an IP literal and a port, like Rust's SocketAddr."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected IP:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
    else:
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"expected IP:PORT (IPv6 in brackets), got {text!r}") from None
    return (str(ip), int(port_text))


def validate_api_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in ("ws", "wss", "http", "https"):
        raise ValueError(f"scheme must be ws, wss, http or https, got {text!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    return text.strip()


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``: names and addresses that never leave the machine."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_portal_url_is_private(api_url: str, allow_insecure: bool) -> None:
    """Refuse a cleartext (ws/http) portal URL unless it points at loopback or ``allow_insecure`` is set.

    The token travels in a request header: over ws:// anyone on the path can read it."""
    parts = urlsplit(api_url.strip())
    if parts.scheme.lower() not in ("ws", "http") or allow_insecure or is_loopback_host(parts.hostname or ""):
        return
    raise ValueError(
        f"{parts.scheme}:// would send the token unencrypted to {parts.hostname}; use wss:// or https://, "
        "or set FIREZONE_ALLOW_INSECURE_PORTAL=true (--allow-insecure-portal)"
    )


def parse_positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a positive number of seconds, got {text!r}")
    return value


def parse_thread_count(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 64:
        raise ValueError(f"must be between 1 and 64, got {value}")
    return value


# --- token and id -------------------------------------------------------------------------------------------------


def resolve_token(cli_value: str | None, env: Mapping[str, str]) -> Secret:
    """Positional/``FIREZONE_TOKEN`` (a file path to it also works), else ``$CREDENTIALS_DIRECTORY/FIREZONE_TOKEN``."""
    raw = cli_value if cli_value else env.get("FIREZONE_TOKEN", "")
    source = "FIREZONE_TOKEN"
    if raw and "/" in raw and Path(raw).is_file():
        raw = _read_text(Path(raw), "FIREZONE_TOKEN")
    if not raw.strip() and env.get("CREDENTIALS_DIRECTORY"):
        credential = Path(env["CREDENTIALS_DIRECTORY"]) / TOKEN_CREDENTIAL_NAME
        source = "CREDENTIALS_DIRECTORY"
        if credential.is_file():
            raw = _read_text(credential, source)
    token = "".join(raw.split())
    if not token:
        raise ConfigError(source, "no token: pass it as TOKEN, in FIREZONE_TOKEN, or as a systemd credential")
    return Secret(token)


def _read_text(path: Path, variable: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.__class__.__name__}") from None


def derive_id_from_machine_id(machine_id: str) -> str:
    """hex(HMAC-SHA256(key=GATEWAY_APP_ID, msg=/etc/machine-id contents as read, newline included))."""
    return hmac.new(GATEWAY_APP_ID.encode(), machine_id.encode(), hashlib.sha256).hexdigest()


def resolve_firezone_id(
    explicit: str | None, state_dir: Path, machine_id_path: Path = MACHINE_ID_PATH
) -> tuple[str, str]:
    """§5 resolution order; returns (id, source). Raises ConfigError when none works."""
    if explicit:
        return explicit, "env"
    id_file = state_dir / GATEWAY_ID_FILE
    try:
        stored = json.loads(id_file.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and isinstance(stored.get("id"), str) and stored["id"]:
            return stored["id"], "disk"
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    try:
        return derive_id_from_machine_id(machine_id_path.read_text(encoding="utf-8")), "machine-id"
    except (OSError, UnicodeDecodeError):
        pass
    generated = hashlib.sha256(str(uuid.uuid4()).encode()).hexdigest()
    try:
        write_id_atomically(id_file, generated)
    except OSError as exc:
        raise ConfigError(
            "FIREZONE_ID",
            f"cannot persist a generated id ({exc.strerror}); provide it through the env variable "
            f"or rw access to {state_dir}/",
        ) from None
    return generated, "generated"


def write_id_atomically(id_file: Path, firezone_id: str) -> None:
    # Only a directory made here gets our mode: an operator's existing state directory keeps the mode they chose.
    if not id_file.parent.is_dir():
        id_file.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(id_file.parent, 0o770)
    fd, temp_name = tempfile.mkstemp(dir=id_file.parent, prefix=".gateway_id.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"id": firezone_id}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o640)
        os.replace(temp_name, id_file)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def default_name() -> str:
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    return host or str(uuid.uuid4())


def default_num_tun_threads() -> int:
    return 1 if (os.cpu_count() or 1) == 1 else 2


# --- command line -------------------------------------------------------------------------------------------------


def describe_settings(settings: Settings) -> str:
    """One line of the effective settings for a start-up debug log; never the token."""
    shown: list[str] = []
    for name in Settings.__dataclass_fields__:
        if name == "token":
            continue
        value = getattr(settings, name)
        text = f"{name}={value}"
        shown.append(text)
    return ", ".join(shown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firezone-gateway",
        description="Firezone-compatible Gateway. Every flag also reads the environment variable named in its help.",
    )
    hidden = argparse.SUPPRESS
    parser.add_argument("token", nargs="?", metavar="TOKEN", help="portal token [FIREZONE_TOKEN]")
    parser.add_argument("-i", "--firezone-id", help="gateway identity [FIREZONE_ID]")
    parser.add_argument("-n", "--firezone-name", help="display name [FIREZONE_NAME]")
    parser.add_argument("-u", "--api-url", help=hidden)
    parser.add_argument("--log-format", help="human or json [FIREZONE_LOG_FORMAT]")
    parser.add_argument("--log-level", help="log directives, e.g. info or warn,agent=debug [FIREZONE_LOG_LEVEL]")
    parser.add_argument(
        "--flow-logs",
        action="store_const",
        const="true",
        help="track flows and log one record per flow even if the portal disabled uploads [FIREZONE_FLOW_LOGS]",
    )
    parser.add_argument(
        "-m", "--max-partition-time", help="reconnect budget, e.g. 5m, 1h, 30d [FIREZONE_MAX_PARTITION_TIME]"
    )
    parser.add_argument(
        "--num-tun-threads",
        help="TUN queues (IFF_MULTI_QUEUE), one reader and one writer thread each [FIREZONE_NUM_TUN_THREADS]",
    )
    parser.add_argument(
        "--no-inc-buf",
        action="store_const",
        const="true",
        help="do not ask for 16 MiB receive / 2 MiB send socket buffers beyond the host's limits [FIREZONE_NO_INC_BUF]",
    )
    parser.add_argument(
        "--no-telemetry",
        action="store_const",
        const="true",
        help="accepted for compatibility; no telemetry is ever sent [FIREZONE_NO_TELEMETRY]",
    )
    parser.add_argument(
        "--no-host-setup",
        action="store_const",
        const="true",
        help="leave sysctls, forwarding and masquerade to the operator [FIREZONE_NO_HOST_SETUP]",
    )
    parser.add_argument(
        "--allow-insecure-portal",
        action="store_const",
        const="true",
        help="allow a ws:// or http:// portal URL to a non-loopback host (token in cleartext) "
        "[FIREZONE_ALLOW_INSECURE_PORTAL]",
    )
    parser.add_argument("--health-check-addr", help=hidden)
    parser.add_argument("--heartbeat-interval", help=hidden)
    return parser


def load_settings(argv: Sequence[str] | None, env: Mapping[str, str]) -> Settings:
    args = build_parser().parse_args(argv)

    def pick(flag_value: str | None, variable: str, default: str | None = None) -> str | None:
        if flag_value is not None:
            return flag_value
        value = env.get(variable)
        return value if value not in (None, "") else default

    def checked(variable: str, text: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise ConfigError(variable, str(exc)) from None

    def setting(flag_value: str | None, variable: str, parse: Callable[[str], T], default: T) -> T:
        """The flag, else the variable, parsed; ``default`` (already a value) when neither is set."""
        text = pick(flag_value, variable)
        return default if text is None else checked(variable, text, parse)

    log_format = (pick(args.log_format, "FIREZONE_LOG_FORMAT", "human") or "human").strip().lower()
    if log_format not in ("human", "json"):
        raise ConfigError("FIREZONE_LOG_FORMAT", f"expected human or json, got {log_format!r}")

    log_variable = "FIREZONE_LOG_LEVEL" if pick(args.log_level, "FIREZONE_LOG_LEVEL") else "RUST_LOG"
    log_text = pick(args.log_level, "FIREZONE_LOG_LEVEL") or env.get("RUST_LOG") or "info"
    log_spec = checked(log_variable, log_text, parse_log_directives)

    flow_logs = setting(args.flow_logs, "FIREZONE_FLOW_LOGS", parse_bool, False)
    if flow_logs:
        log_spec = LogSpec(log_spec.default_level, (*log_spec.targets, ("flow_logs", TRACE)))

    state_dir = Path(env.get("FIREZONE_STATE_DIR") or DEFAULT_STATE_DIR)
    api_url = setting(args.api_url, "FIREZONE_API_URL", validate_api_url, DEFAULT_API_URL)
    allow_insecure_portal = setting(args.allow_insecure_portal, "FIREZONE_ALLOW_INSECURE_PORTAL", parse_bool, False)
    checked("FIREZONE_API_URL", api_url, lambda url: check_portal_url_is_private(url, allow_insecure_portal))
    no_host_setup = setting(args.no_host_setup, "FIREZONE_NO_HOST_SETUP", parse_bool, False)
    max_partition = setting(
        args.max_partition_time,
        "FIREZONE_MAX_PARTITION_TIME",
        parse_duration,
        parse_duration(DEFAULT_MAX_PARTITION_TIME),
    )
    num_tun_threads = setting(
        args.num_tun_threads, "FIREZONE_NUM_TUN_THREADS", parse_thread_count, default_num_tun_threads()
    )
    no_inc_buf = setting(args.no_inc_buf, "FIREZONE_NO_INC_BUF", parse_bool, False)
    no_telemetry = setting(args.no_telemetry, "FIREZONE_NO_TELEMETRY", parse_bool, False)
    health_addr = setting(
        args.health_check_addr,
        "HEALTH_CHECK_ADDR",
        parse_socket_address,
        parse_socket_address(DEFAULT_HEALTH_CHECK_ADDR),
    )
    heartbeat = setting(
        args.heartbeat_interval, "FIREZONE_HEARTBEAT_INTERVAL", parse_positive_float, DEFAULT_HEARTBEAT_INTERVAL
    )
    name = (pick(args.firezone_name, "FIREZONE_NAME") or "").strip() or default_name()
    token = resolve_token(args.token, env)
    firezone_id, id_source = resolve_firezone_id((pick(args.firezone_id, "FIREZONE_ID") or "").strip(), state_dir)

    return Settings(
        token=token,
        firezone_id=firezone_id,
        firezone_id_source=id_source,
        name=name,
        api_url=api_url,
        log_format=log_format,
        log_spec=log_spec,
        flow_logs=flow_logs,
        max_partition_time=max_partition,
        num_tun_threads=num_tun_threads,
        no_inc_buf=no_inc_buf,
        no_telemetry=no_telemetry,
        health_check_addr=health_addr,
        heartbeat_interval=heartbeat,
        state_dir=state_dir,
        allow_insecure_portal=allow_insecure_portal,
        no_host_setup=no_host_setup,
    )
