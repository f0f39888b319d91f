"""The dev portal's derived values: relay credentials (known-answer vectors), ICE credentials, PSK, refs, config checks."""

from __future__ import annotations

import base64
import hashlib
import json
import string
from typing import Any

import pytest

from lab.portal import DEFAULT_CONFIG, load_config
from lab.portal.config import (
    RELAY_CREDENTIALS_EXPIRY,
    PortalConfig,
    SigningKey,
    gateway_version_from_user_agent,
    ice_credentials,
    is_valid_public_key,
    preshared_key,
    relay_credentials,
    relay_password,
    relay_salt,
)
from tests.vectors import load_vectors

GATEWAY_KEY = "fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8="
CLIENT_KEY = "BzPiNE9qszKczZcZzGsyieLYeJ2EQfkfdibls/l3beM="


def _vectors() -> dict[str, Any]:
    return load_vectors("firezone-relay-credentials.json")


def _current_password_vectors() -> list[dict[str, Any]]:
    return [v for v in _vectors()["password_vectors"] if v["status"] == "current"]


@pytest.mark.parametrize("vector", _current_password_vectors(), ids=lambda v: v["name"])
def test_relay_password_matches_firezone_vectors(vector: dict[str, Any]) -> None:
    password = relay_password(vector["expiry_unix"], vector["relay_secret"], vector["salt"])
    assert password == vector["password"]
    assert f"{vector['expiry_unix']}:{vector['salt']}" == vector["username"]


def test_relay_password_hashes_the_secret_string_not_its_hex_bytes() -> None:
    superseded = next(v for v in _vectors()["password_vectors"] if v["status"] == "superseded")
    # The secret of the superseded vector is the same 64 hex characters; the current scheme hashes them as text.
    as_text = bytes.fromhex(superseded["relay_secret_bytes_hex"]).hex()
    assert relay_password(superseded["expiry_unix"], as_text, superseded["salt"]) != superseded["password"]


def test_relay_credentials_salt_is_the_hash_of_the_gateway_key() -> None:
    username, password = relay_credentials(GATEWAY_KEY, "secret")
    expected_salt = base64.b64encode(hashlib.sha256(GATEWAY_KEY.encode()).digest()).decode().rstrip("=")
    assert relay_salt(GATEWAY_KEY) == expected_salt
    assert username == f"{RELAY_CREDENTIALS_EXPIRY}:{expected_salt}"
    assert "=" not in password and "=" not in username
    assert password == relay_password(RELAY_CREDENTIALS_EXPIRY, "secret", expected_salt)
    assert relay_credentials(CLIENT_KEY, "secret") != (username, password)


def test_ice_credentials_follow_the_portal_split() -> None:
    client, gateway = ice_credentials("c-id", CLIENT_KEY, "g-id", GATEWAY_KEY)
    seed = f"c-id:{CLIENT_KEY}:g-id:{GATEWAY_KEY}".encode()
    full = base64.b32encode(hashlib.sha256(seed).digest()).decode().rstrip("=").lower()
    assert len(full) == 52
    assert client == {"username": full[:4], "password": full[4:26]}
    assert gateway == {"username": full[26:30], "password": full[30:52]}
    alphabet = set(string.ascii_lowercase + "234567")
    assert all(set(v) <= alphabet for creds in (client, gateway) for v in creds.values())
    assert ice_credentials("c-id", CLIENT_KEY, "g-id", CLIENT_KEY) != (client, gateway)


def test_preshared_key_is_pbkdf2_of_both_bases() -> None:
    psk = preshared_key("c", b"client-base", CLIENT_KEY, "g", b"gateway-base", GATEWAY_KEY)
    salt = f"WG_PSK|C_ID:c|G_ID:g|C_PK:{CLIENT_KEY}|G_PK:{GATEWAY_KEY}".encode()
    expected = hashlib.pbkdf2_hmac("sha256", b"client-basegateway-base", salt, 1, 32)
    assert base64.b64decode(psk) == expected
    assert preshared_key("c", b"client-base", CLIENT_KEY, "g", b"other", GATEWAY_KEY) != psk


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (GATEWAY_KEY, True),
        (GATEWAY_KEY.rstrip("="), False),
        (GATEWAY_KEY[:-2] + "!=", False),
        (base64.b64encode(bytes(33)).decode()[:44], False),
        ("", False),
    ],
)
def test_public_key_validation(value: str, valid: bool) -> None:
    assert is_valid_public_key(value) is valid


@pytest.mark.parametrize(
    ("user_agent", "version"),
    [
        ("Debian/12 gateway/1.6.2 (x86_64; 6.1.0-18-amd64)", "1.6.2"),
        ("Ubuntu/24.04 gateway/1.5.0", "1.5.0"),
        ("Mac OS/15.5 connlib/1.6.0 (arm64)", None),
        ("", None),
    ],
)
def test_version_comes_from_the_user_agent_gateway_token(user_agent: str, version: str | None) -> None:
    assert gateway_version_from_user_agent(user_agent) == version


def test_signed_refs_verify_and_tampering_is_detected() -> None:
    key = SigningKey("one")
    ref = key.sign_ref({"client_id": "c"})
    assert ref.startswith("SFMyNTY.")
    assert key.verify_ref(ref)
    assert not SigningKey("two").verify_ref(ref)
    assert not key.verify_ref(ref[:-2] + ("AA" if not ref.endswith("AA") else "BB"))
    assert not key.verify_ref("not-a-ref")
    header, body, mac = key.jwt({"uploads_enabled": False}).split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}


def test_the_shipped_dev_config_is_valid() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.gateways and config.resources and config.clients and config.relays
    assert {r.type for r in config.resources} == {"cidr", "dns", "internet"}


def _minimal(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "sites": [{"id": "s1"}],
        "gateways": [{"token": "t", "site_id": "s1"}],
        "resources": [{"id": "r1", "type": "cidr", "address": "10.0.0.0/8", "site_id": "s1"}],
        "clients": [{"id": "c1", "public_key": CLIENT_KEY, "ipv4": "100.96.0.1", "ipv6": "fd00:2021:1111::1"}],
    }
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "overrides",
    [
        {"gateways": [{"token": "t", "site_id": "nope"}]},
        {"gateways": [{"token": "t", "site_id": "s1", "ipv4": "10.0.0.1"}]},
        {"gateways": [{"token": "t", "site_id": "s1", "ipv6": "fd00:2021:1112::1"}]},
        {"resources": [{"id": "r1", "type": "cidr", "address": "not-a-cidr"}]},
        {"resources": [{"id": "r1", "type": "dns"}]},
        {"authorizations": [{"client_id": "ghost", "resource_id": "r1"}]},
        {"clients": [{"id": "c1", "public_key": "short", "ipv4": "100.96.0.1", "ipv6": "fd00:2021:1111::1"}]},
        {"unknown_key": 1},
    ],
)
def test_invalid_configs_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PortalConfig.model_validate(_minimal(**overrides))


def test_token_lookup_prefers_the_pinned_entry_then_the_site_token() -> None:
    config = PortalConfig.model_validate(
        _minimal(
            gateways=[
                {"token": "site", "site_id": "s1"},
                {"token": "pinned", "site_id": "s1", "external_id": "gw-a", "id": "fixed-id"},
            ]
        )
    )
    site_entry = config.find_gateway("site", "anything")
    assert site_entry is not None and site_entry.external_id is None
    pinned = config.find_gateway("pinned", "gw-a")
    assert pinned is not None and config.gateway_device_id(pinned, "gw-a") == "fixed-id"
    assert config.find_gateway("wrong", "gw-a") is None
    assert config.gateway_device_id(site_entry, "a") != config.gateway_device_id(site_entry, "b")
    assert config.gateway_device_id(site_entry, "a") == config.gateway_device_id(site_entry, "a")


def test_relay_entries_repeat_the_id_per_address_and_cap_at_two_relays() -> None:
    config = PortalConfig.model_validate(
        _minimal(
            relays=[
                {"id": "r-1", "addrs": ["192.0.2.1:3478", "[2001:db8::1]:3478"]},
                {"id": "r-2", "addrs": ["192.0.2.2:3478"]},
                {"id": "r-3", "addrs": ["192.0.2.3:3478"]},
                {"id": "stun", "type": "stun", "addrs": ["192.0.2.4:3478"]},
            ]
        )
    )
    entries = config.relay_entries(GATEWAY_KEY)
    assert [(e["id"], e["addr"]) for e in entries] == [
        ("r-1", "192.0.2.1:3478"),
        ("r-1", "[2001:db8::1]:3478"),
        ("r-2", "192.0.2.2:3478"),
    ]
    username, password = relay_credentials(GATEWAY_KEY, config.relay_secret)
    assert all(e["username"] == username and e["password"] == password for e in entries)
    assert all(e["expires_at"] == RELAY_CREDENTIALS_EXPIRY and e["type"] == "turn" for e in entries)
    assert config.relay_entries(GATEWAY_KEY, ["stun"]) == [{"id": "stun", "type": "stun", "addr": "192.0.2.4:3478"}]


def test_init_authorizations_skip_expired_pairs_and_other_sites() -> None:
    config = PortalConfig.model_validate(
        _minimal(
            sites=[{"id": "s1"}, {"id": "s2"}],
            resources=[
                {"id": "r1", "type": "cidr", "address": "10.0.0.0/8", "site_id": "s1"},
                {"id": "r2", "type": "dns", "address": "*.corp", "site_id": "s2"},
                {"id": "r3", "type": "internet"},
            ],
            authorizations=[
                {"client_id": "c1", "resource_id": "r1", "expires_at": 2000},
                {"client_id": "c1", "resource_id": "r1", "expires_at": 500},
                {"client_id": "c1", "resource_id": "r2", "expires_at": None},
                {"client_id": "c1", "resource_id": "r3", "expires_at": None},
            ],
        )
    )
    assert config.authorizations_for_site("s1", now_unix=1000) == [
        {"client_id": "c1", "resource_id": "r1", "expires_at": 2000},
        {"client_id": "c1", "resource_id": "r3", "expires_at": None},
    ]


def test_resource_payloads_have_the_gateway_shape() -> None:
    config = PortalConfig.model_validate(
        _minimal(
            resources=[
                {
                    "id": "r1",
                    "type": "cidr",
                    "name": "n",
                    "address": "10.0.0.0/8",
                    "filters": [
                        {"protocol": "tcp", "port_range_start": 80, "port_range_end": 443},
                        {"protocol": "udp"},
                    ],
                },
                {"id": "r2", "type": "internet", "name": "Internet"},
            ]
        )
    )
    assert config.resource("r1").to_payload() == {
        "id": "r1",
        "type": "cidr",
        "name": "n",
        "address": "10.0.0.0/8",
        "filters": [{"protocol": "tcp", "port_range_start": 80, "port_range_end": 443}, {"protocol": "udp"}],
    }
    assert config.resource("r2").to_payload() == {"id": "r2", "type": "internet"}


def test_relay_password_matches_the_spec_example() -> None:
    # docs/protocol.md §4.5 quotes this vector in the text itself, independently of tests/vectors.
    password = relay_password(1685984278, "1cab293a-4032-46f4-862a-40e5d174b0d2", "uvdgKvS9GXYZ_vmv")
    assert password == "6xUIoZ+QvxKhRasLifwfRkMXl+ETLJUsFkHlXjlHAkg"
