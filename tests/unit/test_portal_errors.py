"""The portal link's error types carry what the agent prints and how it retries (docs/protocol.md §1.7/§1.8)."""

from __future__ import annotations

import pytest

from protocol.errors import FatalReason, PortalError, TransientPortalError


@pytest.mark.parametrize("reason", list(FatalReason))
def test_fatal_error_message_is_reason_then_detail(reason: FatalReason) -> None:
    error = PortalError(reason, "token expired")
    assert str(error) == f"{reason.value}: token expired"
    assert error.reason is reason
    assert error.detail == "token expired"


def test_fatal_error_without_detail_is_just_the_reason() -> None:
    error = PortalError(FatalReason.INVALID_TOKEN, "")
    assert str(error) == "invalid_token"
    assert error.detail == ""
    assert error.reason is FatalReason.INVALID_TOKEN


def test_fatal_reasons_are_the_wire_names() -> None:
    assert [r.value for r in FatalReason] == [
        "invalid_token",
        "authentication_failed",
        "join_rejected",
        "max_retries_reached",
    ]


def test_transient_error_keeps_message_and_retry_after() -> None:
    error = TransientPortalError("503 from the portal", retry_after=7.5)
    assert str(error) == "503 from the portal"
    assert error.retry_after == 7.5
    assert TransientPortalError("reset").retry_after is None
