"""``firezone-gateway``: configuration → health server → data plane → portal link → event loop (docs/protocol.md §5).

Exit codes: 0 clean shutdown (SIGTERM/SIGINT), 1 fatal portal error, 2 bad configuration. Errors are one line
``error: ...`` on stderr; logs go to stderr too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from agent.config import ConfigError, Settings, build_parser, describe_settings, load_settings
from agent.datapath import DataPlane, DataPlaneOptions
from agent.eventloop import Eventloop
from agent.flowlog import FlowLogDriver, FlowTracker
from agent.health import HealthServer, raise_nofile_limit
from agent.logs import RedactingFilter, configure_logging
from agent.metrics import build_registry, render
from agent.portal import PortalLink
from agent.status import StatusServer, status_document, status_main, status_socket_path
from dataplane.gateway import GatewayState
from dataplane.io.hostsetup import HostSetupError
from dataplane.io.rng import SystemRng
from protocol.errors import PortalError
from protocol.phoenix import ChannelEvent

logger = logging.getLogger("agent.main")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2


def generate_key_pair() -> tuple[bytes, str]:
    """A fresh X25519 WireGuard key pair per process start, never persisted: the raw private key and the public key as
    44-char base64."""
    private_key = X25519PrivateKey.generate()
    public_raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    private_raw = private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return private_raw, base64.b64encode(public_raw).decode()


class Gateway:
    """The running agent: one portal link, the event loop over the gateway state, the data plane, the health server."""

    def __init__(self, settings: Settings, private_key: bytes, public_key_b64: str) -> None:
        self.settings = settings
        self.public_key_b64 = public_key_b64
        self.link = PortalLink(
            api_url=settings.api_url,
            firezone_id=settings.firezone_id,
            name=settings.name,
            public_key_b64=public_key_b64,
            token=settings.token,
            rng=SystemRng(),
            wall_clock=time.time,
            heartbeat_interval=settings.heartbeat_interval,
            max_partition_time=settings.max_partition_time,
        )
        self.state = GatewayState(private_key, rng=SystemRng(), wall_clock=time.time)
        self.eventloop = Eventloop(self.link, self.state, time.monotonic)
        self.dataplane = DataPlane(
            self.state,
            DataPlaneOptions(
                tun_queues=settings.num_tun_threads,
                increase_buffers=not settings.no_inc_buf,
                host_setup=not settings.no_host_setup,
            ),
            on_portal_output=self.eventloop.flush_outbound,
            on_fatal=self._on_dataplane_failure,
        )
        host, port = settings.health_check_addr
        self.health = HealthServer(host, port, ready=self.ready, metrics=self.metrics)
        self.flow_logs = FlowLogDriver(self.state, enabled_by_setting=settings.flow_logs, wall_clock=time.time)
        self.status = StatusServer(status_socket_path(), self.status_document)
        self._metrics_registry = build_registry(self)

    def ready(self) -> bool:
        return self.link.joined and self.eventloop.init_applied

    @property
    def flow_tracker(self) -> FlowTracker | None:
        """The flow table while flow logs are on (setting or the portal's ``init.flow_logs``), else None."""
        return self.flow_logs.tracker

    def metrics(self) -> str:
        return render(self._metrics_registry)

    def status_document(self) -> dict[str, Any]:
        return status_document(self, wall_now=time.time(), now=time.monotonic())

    def _on_channel_event(self, event: ChannelEvent) -> None:
        self.eventloop.handle_channel_event(event)
        # Portal input changes the data plane too (relays to allocate, candidates to check, a goodbye to send):
        # send what it produced and re-arm its timer.
        self.dataplane.flush()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        soft, hard = raise_nofile_limit()
        logger.debug("open file limit %d (hard %d)", soft, hard)
        await self.health.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_shutdown, signum)
        try:
            self.dataplane.start()
        except (OSError, HostSetupError) as exc:
            await self.health.stop()
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"error: cannot start the data plane: {detail}", file=sys.stderr, flush=True)
            return EXIT_FATAL
        await self.status.start()
        self.flow_logs.start()
        logger.debug("effective settings: %s", describe_settings(self.settings))
        logger.info(
            "starting gateway",
            extra={"firezone_id_source": self.settings.firezone_id_source, "gateway_name": self.settings.name},
        )
        try:
            await self.link.run(self._on_channel_event)
        except PortalError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_FATAL
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.dataplane.shut_down()
            await self.flow_logs.stop()
            await self.status.stop()
            await self.health.stop()
        if self.dataplane.failure is not None:
            print(f"error: {self.dataplane.failure}", file=sys.stderr, flush=True)
            return EXIT_FATAL
        logger.info("shut down cleanly")
        return EXIT_OK

    def _on_dataplane_failure(self, reason: str) -> None:
        """The data plane cannot go on (a TUN thread died): stop, so the exit code tells the supervisor to restart us."""
        logger.error("data plane failed: %s; stopping", reason)
        self.link.stop()

    def _request_shutdown(self, signum: int) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)
        self.link.stop()


def _argv_without_positional_token(args: list[str]) -> tuple[list[str], str] | None:
    """If TOKEN was given on the command line: the arguments without it, and the token. Else None."""
    parser = build_parser()

    def parsed_token(candidate: list[str]) -> str | None:
        # A dry run: help and usage errors are printed once, by the real parse in main().
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                token: str | None = parser.parse_args(candidate).token
            except SystemExit:
                raise LookupError from None
        return token

    try:
        token = parsed_token(args)
    except LookupError:
        return None
    if not token:
        return None
    for index, value in enumerate(args):
        if value != token:
            continue
        rest = args[:index] + args[index + 1 :]
        try:
            if parsed_token(rest) is None:
                return rest, token
        except LookupError:
            continue
    return None


def _move_positional_token_out_of_argv() -> None:
    """/proc/<pid>/cmdline is world-readable; the environment is not. Re-exec with the token moved to FIREZONE_TOKEN."""
    found = _argv_without_positional_token(sys.argv[1:])
    if found is None:
        return
    rest, token = found
    env = dict(os.environ, FIREZONE_TOKEN=token)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "agent.main", *rest], env)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["status"]:
        return status_main(arguments[1:])
    if argv is None:
        _move_positional_token_out_of_argv()
    try:
        settings = load_settings(argv, os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    redactor: RedactingFilter = configure_logging(
        settings.log_format, settings.log_spec, secrets=[settings.token.reveal()]
    )
    del redactor
    private_key, public_key_b64 = generate_key_pair()
    gateway = Gateway(settings, private_key, public_key_b64)
    try:
        return asyncio.run(gateway.run())
    except OSError as exc:
        # E.g. the health port is taken: nothing else can work either.
        print(f"error: {exc.__class__.__name__}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return EXIT_FATAL
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
