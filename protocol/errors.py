"""Error types of the portal link (design.md §5).

Two axes: *who* broke the protocol (``LocalProtocolError``: our own misuse of an API; ``RemoteProtocolError``: the peer
sent something we cannot accept) and *what happens next* (``PortalError``: fatal, the process exits 1;
``TransientPortalError``: the link is retried with backoff, docs/protocol.md §1.7/§1.8).
"""

from __future__ import annotations

import enum


class LocalProtocolError(Exception):
    """The caller used a state machine wrongly (e.g. connecting a failed channel). Always a bug on our side."""


class RemoteProtocolError(Exception):
    """The peer sent something that violates the protocol. Drivers log it and treat the link as broken."""


class FatalReason(enum.Enum):
    INVALID_TOKEN = "invalid_token"
    AUTHENTICATION_FAILED = "authentication_failed"
    JOIN_REJECTED = "join_rejected"
    MAX_RETRIES_REACHED = "max_retries_reached"


class PortalError(Exception):
    """A fatal portal error: the gateway must stop and exit 1 with this one-line message."""

    def __init__(self, reason: FatalReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class TransientPortalError(Exception):
    """A failure that is retried with backoff; ``retry_after`` (seconds) overrides the computed delay when set."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
