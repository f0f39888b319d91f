"""agent/portal.py's pure parts: URL, external_id, User-Agent, Retry-After, rejection classification (§1.1/§1.2/§1.8)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
from urllib.parse import parse_qsl, urlsplit

import pytest

from agent.backoff import MAX_RETRY_AFTER
from agent.config import Secret
from agent.main import generate_key_pair
from agent.portal import (
    build_url,
    build_user_agent,
    classify_rejection,
    external_id_for,
    normalise_base_url,
    package_version,
    parse_retry_after,
)
from protocol.errors import FatalReason, PortalError, TransientPortalError

KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="


@pytest.mark.parametrize(
    "uuid_text",
    [
        "5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a",
        "5D4E8A9C-1C1F-4D7C-9A0B-3F3E2C1D0B9A",
        "5d4e8a9c1c1f4d7c9a0b3f3e2c1d0b9a",
        "{5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a}",
        "urn:uuid:5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a",
    ],
)
def test_uuid_ids_are_hashed_as_given(uuid_text: str) -> None:
    assert external_id_for(uuid_text) == hashlib.sha256(uuid_text.encode()).hexdigest()


@pytest.mark.parametrize("other", ["a" * 64, "gateway-1", "5d4e8a9c-1c1f-4d7c-9a0b", ""])
def test_other_ids_are_sent_verbatim(other: str) -> None:
    assert external_id_for(other) == other


def test_url_shape_and_parameter_order() -> None:
    url = build_url("wss://api.firezone.dev", "a" * 64, "gw-eu-1", KEY)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("wss", "api.firezone.dev:443", "/gateway/v2/websocket")
    assert parse_qsl(parts.query) == [("external_id", "a" * 64), ("name", "gw-eu-1"), ("public_key", KEY)]
    assert "public_key=fiAjSBWDgQfD1CFJkTwOf4zg%2B1QhH0eTT%2BoLaVIMpH8%3D" in url


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("wss://api.firezone.dev", ("wss", "api.firezone.dev", 443, "")),
        ("https://api.firezone.dev/", ("wss", "api.firezone.dev", 443, "")),
        ("https://h:8443", ("wss", "h", 8443, "")),
        ("http://h", ("ws", "h", 443, "")),
        ("ws://h:80", ("ws", "h", 443, "")),
        ("ws://127.0.0.1:4000", ("ws", "127.0.0.1", 4000, "")),
        ("WSS://H:443/base/", ("wss", "h", 443, "/base")),
        ("ws://[::1]:4000", ("ws", "::1", 4000, "")),
    ],
)
def test_scheme_and_port_normalisation(api_url: str, expected: tuple[str, str, int, str]) -> None:
    assert normalise_base_url(api_url) == expected


def test_ipv6_hosts_are_bracketed_and_base_path_kept() -> None:
    url = build_url("ws://[::1]:4000/prefix", "x", "n", KEY)
    assert url.startswith("ws://[::1]:4000/prefix/gateway/v2/websocket?external_id=x&name=n&public_key=")


@pytest.mark.parametrize("bad", ["ftp://h", "h:4000", "wss://"])
def test_bad_urls_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        normalise_base_url(bad)


def test_user_agent_format() -> None:
    ua = build_user_agent("1.6.0", os_type="Debian", os_version="12", arch="x86_64", kernel="6.1.0-18-amd64")
    assert ua == "Debian/12 gateway/1.6.0 (x86_64; 6.1.0-18-amd64)"


def test_user_agent_degrades_and_strips_non_ascii() -> None:
    assert (
        build_user_agent("1.6.0", os_type="Débian", os_version="12", arch="", kernel="k")
        == "Dbian/12 gateway/1.6.0 (k)"
    )
    assert build_user_agent("1.6.0", os_type="X", os_version="1", arch="", kernel="") == "X/1 gateway/1.6.0"


def test_user_agent_on_this_machine_carries_our_version() -> None:
    assert package_version() == "1.6.0"
    ua = build_user_agent(package_version())
    assert " gateway/1.6.0 (" in ua and ua.isascii()


def test_retry_after_seconds_and_dates() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 120 ", now) == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0 - 5) == pytest.approx(5.0)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-1", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("9" * 400, now) == parse_retry_after("9" * 5000, now) == MAX_RETRY_AFTER
    assert parse_retry_after("\u0661\u0662", now) is None  # Arabic-Indic digits are not HTTP digits


def _problem(status: int, code: str | None, detail: str) -> bytes:
    body: dict[str, object] = {"title": "t", "status": status, "detail": detail}
    if code:
        body["code"] = code
    return json.dumps(body).encode()


@pytest.mark.parametrize("code", ["invalid_token", "missing_token"])
def test_401_invalid_token_is_fatal(code: str) -> None:
    verdict = classify_rejection(401, {}, _problem(401, code, "The token is invalid"), 0.0)
    assert isinstance(verdict, PortalError) and verdict.reason is FatalReason.INVALID_TOKEN
    assert "The token is invalid" in str(verdict) and code in str(verdict)


def test_401_other_is_authentication_failed() -> None:
    verdict = classify_rejection(401, {}, b"", 0.0)
    assert isinstance(verdict, PortalError) and verdict.reason is FatalReason.AUTHENTICATION_FAILED
    assert "401" in str(verdict)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "invalid_connect_params"),
        (402, "limits_exceeded"),
        (403, "account_disabled"),
        (409, "gateway_already_connected"),
        (429, None),
        (500, "unhandled_connect_error"),
        (503, "rate_limit"),
        (404, None),
    ],
)
def test_everything_but_401_is_retried(status: int, code: str | None) -> None:
    verdict = classify_rejection(status, {}, _problem(status, code, "why"), 0.0)
    assert isinstance(verdict, TransientPortalError)
    assert f"HTTP {status}" in str(verdict) and "why" in str(verdict)


def test_503_carries_retry_after() -> None:
    verdict = classify_rejection(503, {"Retry-After": "1"}, _problem(503, "rate_limit", "slow"), 0.0)
    assert isinstance(verdict, TransientPortalError) and verdict.retry_after == 1.0


def test_detail_is_one_line_and_scrubbed() -> None:
    body = _problem(401, "invalid_token", "bad token abc123\nsecond line")
    verdict = classify_rejection(401, {}, body, 0.0, Secret("abc123"))
    assert "\n" not in str(verdict) and "abc123" not in str(verdict) and "second line" in str(verdict)


def test_garbage_body_still_classifies() -> None:
    assert isinstance(classify_rejection(401, {}, b"\xff\xfe<html>", 0.0), PortalError)
    assert isinstance(classify_rejection(502, {}, b"[1,2", 0.0), TransientPortalError)


def test_key_pair_is_fresh_x25519_with_44_char_base64_public_key() -> None:
    private_a, public_a = generate_key_pair()
    _, public_b = generate_key_pair()
    assert len(public_a) == 44 and len(base64.b64decode(public_a, validate=True)) == 32
    assert public_a != public_b
    assert len(private_a) == 32 and private_a != b"\x00" * 32
