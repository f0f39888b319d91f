"""A ``firezone-gateway`` process pointed at a dev portal, driven through its CLI/env contract only.

Used by the demo and the integration tests. The gateway gets its own state directory and a free loopback health
port; its stdout/stderr are collected continuously (so pipes never fill) and can be searched afterwards. Given a network
namespace it runs inside it (``ip netns exec``) with its health server on 127.0.0.1:8080 there, and the health
endpoints are then fetched over a socket created inside that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from dataplane.io.netlink import run_in_netns

NETNS_HEALTH_ADDR = ("127.0.0.1", 8080)
"""Where the health server listens when the gateway has a namespace to itself (the reference's default address)."""
HTTP_HEAD_LIMIT = 64 * 1024

# Variables a caller's environment must not leak into the gateway under test.
_GATEWAY_VARIABLES = ("FIREZONE_", "RUST_LOG", "HEALTH_CHECK_ADDR", "CREDENTIALS_DIRECTORY", "OTLP_GRPC_ENDPOINT")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick for an ephemeral bind)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def gateway_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("firezone-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("firezone-gateway")
    return [found] if found else [sys.executable, "-m", "agent.main"]


class GatewayProcess:
    """``await GatewayProcess.start(api_url=..., token=..., state_dir=...)``; always ``await close()`` (or use
    ``async with``), which kills the process if it still runs."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        health_addr: tuple[str, int],
        env: Mapping[str, str],
        netns: str | None = None,
    ) -> None:
        self.process = process
        self.health_addr = health_addr
        self.netns = netns
        self.env = dict(env)
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.started_at = time.monotonic()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._collect(process.stdout, self.stdout)),
            asyncio.ensure_future(self._collect(process.stderr, self.stderr)),
        ]
        self._http: aiohttp.ClientSession | None = None

    @classmethod
    async def start(
        cls,
        *,
        api_url: str,
        token: str,
        state_dir: Path,
        firezone_id: str | None = None,
        name: str = "lab-gateway",
        log_level: str = "info",
        heartbeat_interval: float | None = None,
        extra_env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        netns: str | None = None,
    ) -> GatewayProcess:
        """Starts the gateway; with ``netns`` (a name under /run/netns) inside that namespace."""
        health_addr = NETNS_HEALTH_ADDR if netns is not None else ("127.0.0.1", free_tcp_port())
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GATEWAY_VARIABLES)}
        env.update(
            {
                "FIREZONE_TOKEN": token,
                "FIREZONE_ID": firezone_id if firezone_id is not None else secrets.token_hex(32),
                "FIREZONE_NAME": name,
                "FIREZONE_API_URL": api_url,
                "FIREZONE_LOG_LEVEL": log_level,
                "FIREZONE_STATE_DIR": str(state_dir),
                # Not the host's /run/firezone: a gateway a test kills cannot leave its socket there.
                "FIREZONE_STATUS_SOCKET": str(state_dir / "status.sock"),
                "HEALTH_CHECK_ADDR": f"{health_addr[0]}:{health_addr[1]}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if heartbeat_interval is not None:
            env["FIREZONE_HEARTBEAT_INTERVAL"] = str(heartbeat_interval)
        env.update(extra_env or {})
        command = gateway_command()
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        process = await asyncio.create_subprocess_exec(
            *command,
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process, health_addr, env, netns)

    async def __aenter__(self) -> GatewayProcess:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @staticmethod
    async def _collect(stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(65536):
            into.extend(chunk)

    # ------------------------------------------------------------------ facts

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    @property
    def firezone_id(self) -> str:
        return self.env["FIREZONE_ID"]

    @property
    def health_url(self) -> str:
        return f"http://{self.health_addr[0]}:{self.health_addr[1]}"

    def output(self) -> str:
        """Everything written so far to stdout and stderr."""
        return (bytes(self.stdout) + bytes(self.stderr)).decode(errors="replace")

    def cmdline(self) -> bytes:
        """``/proc/<pid>/cmdline`` while the process runs (its process title as the kernel shows it)."""
        return Path(f"/proc/{self.pid}/cmdline").read_bytes()

    # ------------------------------------------------------------------ health endpoints

    async def _get(self, path: str) -> tuple[int, str]:
        """(status, body); status 0 when nothing answers."""
        if self.netns is not None:
            return await self._get_in_netns(path)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            async with self._http.get(f"{self.health_url}{path}") as response:
                return response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""

    async def _get_in_netns(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """A plain HTTP/1.0 GET over a TCP socket made inside the gateway's namespace (the test process stays outside)."""
        assert self.netns is not None
        sock = run_in_netns(self.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, self.health_addr)
                reader, writer = await asyncio.open_connection(sock=sock, limit=HTTP_HEAD_LIMIT)
                host = f"{self.health_addr[0]}:{self.health_addr[1]}"
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                response = await reader.read()
        except (OSError, TimeoutError):
            return 0, ""
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()
        head, _, body = response.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            return 0, ""
        return int(status_line[1]), body.decode(errors="replace")

    async def readyz(self) -> int:
        return (await self._get("/readyz"))[0]

    async def healthz(self) -> int:
        return (await self._get("/healthz"))[0]

    async def metrics(self) -> str:
        status, body = await self._get("/metrics")
        return body if status == 200 else ""

    async def wait_readyz(self, status: int, timeout: float = 10.0, interval: float = 0.05) -> None:
        """Polls ``/readyz`` until it answers ``status``; raises ``TimeoutError`` (with the output) otherwise."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"the gateway exited ({self.process.returncode}) waiting for /readyz {status}")
            last = await self.readyz()
            if last == status:
                return
            await asyncio.sleep(interval)
        raise TimeoutError(f"/readyz stayed {last}, wanted {status} within {timeout} s")

    async def wait_output(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} did not appear in the gateway's output within {timeout} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ ending

    async def wait_exit(self, timeout: float = 10.0) -> int:
        returncode = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.gather(*self._readers, return_exceptions=True)
        return returncode

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and ``TimeoutError`` if it does not end within ``timeout``)."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            await self.close()
            raise

    async def close(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 10)
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
