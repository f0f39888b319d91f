"""Relay credential schemes: Firezone's (vectors from firezone/firezone auth.rs) and coturn's TURN REST API."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

import pytest

from dataplane import stun
from lab.relay import coturn_credentials, firezone_password, firezone_username
from tests.vectors import load_vectors

VECTORS = load_vectors("firezone-relay-credentials.json")
CURRENT = [v for v in VECTORS["password_vectors"] if v["status"] == "current"]
SUPERSEDED = [v for v in VECTORS["password_vectors"] if v["status"] == "superseded"]


@pytest.mark.parametrize("vector", CURRENT, ids=lambda v: v["name"])
def test_firezone_password_vectors(vector: dict[str, Any]) -> None:
    assert vector["relay_secret"].encode().hex() == vector["relay_secret_bytes_hex"]
    assert firezone_username(vector["expiry_unix"], vector["salt"]) == vector["username"]
    assert firezone_password(vector["relay_secret"], vector["expiry_unix"], vector["salt"]) == vector["password"]


def test_superseded_raw_secret_scheme_is_not_reproduced() -> None:
    (old,) = SUPERSEDED
    first = CURRENT[0]
    assert firezone_password(first["relay_secret"], first["expiry_unix"], first["salt"]) != old["password"]


def test_portal_protocol_example_password() -> None:
    # docs/protocol.md §4.5 test vector.
    password = firezone_password("1cab293a-4032-46f4-862a-40e5d174b0d2", 1685984278, "uvdgKvS9GXYZ_vmv")
    assert password == "6xUIoZ+QvxKhRasLifwfRkMXl+ETLJUsFkHlXjlHAkg"


def test_long_term_key_of_the_computed_example() -> None:
    example = VECTORS["computed_message_integrity_example"]
    password = firezone_password(example["relay_secret"], example["expiry_unix"], example["salt"])
    assert password == example["password"]
    key = stun.long_term_key(example["username"], example["realm"], password)
    assert key.hex() == example["long_term_key_hex"]


def test_coturn_rest_credentials() -> None:
    username, password = coturn_credentials("s3cret", 1700000000, "gw")
    assert username == "1700000000:gw"
    expected = base64.b64encode(hmac.new(b"s3cret", b"1700000000:gw", hashlib.sha1).digest()).decode()
    assert password == expected
    assert password.endswith("=")  # coturn keeps the base64 padding, unlike Firezone
