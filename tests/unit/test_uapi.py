"""The UAPI text protocol (wireguard-go device/uapi.go, wg ipc-uapi.h) over a real in-memory Device."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.io.rng import SeededRng
from dataplane.wireguard.device import Device
from dataplane.wireguard.uapi import (
    MAX_LINE_LENGTH,
    Uapi,
    format_endpoint,
    parse_allowed_ip,
    parse_endpoint,
)

WALL = 1_700_000_000.25
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
KEY_C = bytes(range(64, 96))
PSK = bytes([7] * 32)
ZERO = bytes(32)


def make_uapi(**kwargs) -> Uapi:
    device = Device(rng=SeededRng(1), wall_clock=lambda: WALL)
    return Uapi(device, **kwargs)


def get_pairs(uapi: Uapi) -> list[tuple[str, str]]:
    reply = uapi.request("get=1\n\n", 0.0)
    assert reply.endswith("\n\n")
    return [tuple(line.split("=", 1)) for line in reply[:-2].split("\n")]  # type: ignore[misc]


def set_ok(uapi: Uapi, *lines: str, now: float = 0.0) -> None:
    reply = uapi.request("set=1\n" + "".join(line + "\n" for line in lines) + "\n", now)
    assert reply == "errno=0\n\n"


def set_errno(uapi: Uapi, *lines: str) -> int:
    reply = uapi.request("set=1\n" + "".join(line + "\n" for line in lines) + "\n", 0.0)
    assert reply.startswith("errno=") and reply.endswith("\n\n")
    return int(reply[len("errno=") : -2])


# -- value parsers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:51820", ("192.0.2.1", 51820)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("[::ffff:192.0.2.1]:1", ("::ffff:192.0.2.1", 1)),
        ("10.0.0.1:0", ("10.0.0.1", 0)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[2001:DB8:0:0::1]:7", ("2001:db8::1", 7)),
    ],
)
def test_endpoint_parses_like_netip_parse_addr_port(text, expected) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "192.0.2.1",
        "192.0.2.1:",
        "192.0.2.1:65536",
        "192.0.2.1:+5",
        "192.0.2.1: 5",
        "2001:db8::1:443",  # IPv6 needs brackets
        "[192.0.2.1]:5",  # brackets only for IPv6
        "[2001:db8::1:443",
        "example.com:51820",  # no name resolution in the UAPI
        "[fe80::1%eth0]:5",
        "010.0.0.1:5",
        "",
    ],
)
def test_endpoint_rejects_what_netip_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


@pytest.mark.parametrize(
    "endpoint", [("192.0.2.1", 51820), ("2001:db8::1", 443), ("::ffff:192.0.2.1", 1), ("fd00::", 65535)]
)
def test_endpoint_formats_back_to_what_it_parses(endpoint) -> None:
    assert parse_endpoint(format_endpoint(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits masked, as wireguard-go's trie stores it
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("fd00::1/64", "fd00::/64"),
        ("::/0", "::/0"),
        ("192.0.2.1/32", "192.0.2.1/32"),
    ],
)
def test_allowed_ip_parses_and_masks(text, expected) -> None:
    assert parse_allowed_ip(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "text", ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/08", "10.0.0.0/255.0.0.0"]
)
def test_allowed_ip_rejects_bad_prefixes(text) -> None:
    with pytest.raises(ValueError):
        parse_allowed_ip(text)


# -- get ----------------------------------------------------------------------------------------------------------


def test_get_on_an_empty_device_reports_only_errno() -> None:
    assert make_uapi().request("get=1\n\n", 0.0) == "errno=0\n\n"


def test_get_reports_device_and_peer_fields_in_wireguard_go_order() -> None:
    uapi = make_uapi()
    set_ok(
        uapi,
        f"private_key={KEY_A.hex()}",
        "listen_port=51820",
        "fwmark=51",
        f"public_key={KEY_B.hex()}",
        f"preshared_key={PSK.hex()}",
        "endpoint=[2001:db8::2]:51821",
        "persistent_keepalive_interval=25",
        "allowed_ip=10.0.0.2/32",
        "allowed_ip=fd00::/64",
    )
    assert get_pairs(uapi) == [
        ("private_key", KEY_A.hex()),
        ("listen_port", "51820"),
        ("fwmark", "51"),
        ("public_key", KEY_B.hex()),
        ("preshared_key", PSK.hex()),
        ("protocol_version", "1"),
        ("endpoint", "[2001:db8::2]:51821"),
        ("last_handshake_time_sec", "0"),
        ("last_handshake_time_nsec", "0"),
        # Turning persistent keepalive on makes the peer initiate a handshake at once; its bytes count as sent.
        ("tx_bytes", str(uapi.device.peers[KEY_B].tx_bytes)),
        ("rx_bytes", "0"),
        ("persistent_keepalive_interval", "25"),
        ("allowed_ip", "10.0.0.2/32"),
        ("allowed_ip", "fd00::/64"),
        ("errno", "0"),
    ]


def test_get_reports_a_zero_preshared_key_and_no_endpoint_for_a_bare_peer() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}")
    pairs = dict(get_pairs(uapi))
    assert pairs["preshared_key"] == ZERO.hex()
    assert pairs["persistent_keepalive_interval"] == "0"
    assert "endpoint" not in pairs and "allowed_ip" not in pairs


def _ipv4_packet(source: str, destination: str, payload: bytes = b"hello") -> bytes:
    total = 20 + len(payload)
    header = bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, 17, 0, 0])
    return header + ipaddress.ip_address(source).packed + ipaddress.ip_address(destination).packed + payload


def test_get_reports_a_real_handshake_time_and_transfer_counters() -> None:
    """Two devices configured only through the UAPI handshake in memory; `get` reports it like wireguard-go."""
    device_a = Device(rng=SeededRng(1), wall_clock=lambda: 1_700_000_123.5)
    device_b = Device(rng=SeededRng(2), wall_clock=lambda: 1_700_000_124.0)
    initiator, responder = Uapi(device_a), Uapi(device_b)
    set_ok(initiator, f"private_key={KEY_A.hex()}")
    set_ok(responder, f"private_key={KEY_B.hex()}")
    assert initiator.device.public_key is not None and responder.device.public_key is not None
    set_ok(
        initiator,
        f"public_key={responder.device.public_key.hex()}",
        "endpoint=192.0.2.2:51820",
        "allowed_ip=10.0.0.2/32",
    )
    set_ok(responder, f"public_key={initiator.device.public_key.hex()}", "allowed_ip=10.0.0.1/32")

    device_a.send_packets([_ipv4_packet("10.0.0.1", "10.0.0.2")], 0.0)
    for now in (0.01, 0.02, 0.03, 0.04):
        for transmit in device_a.drain_transmits():
            device_b.receive_datagrams([(transmit.payload, ("192.0.2.1", 51820))], now)
        for transmit in device_b.drain_transmits():
            device_a.receive_datagrams([(transmit.payload, ("192.0.2.2", 51820))], now)
    assert device_b.drain_packets() == [_ipv4_packet("10.0.0.1", "10.0.0.2")]

    sent = dict(get_pairs(initiator))
    assert (sent["last_handshake_time_sec"], sent["last_handshake_time_nsec"]) == ("1700000123", "500000000")
    received = dict(get_pairs(responder))
    assert (received["last_handshake_time_sec"], received["last_handshake_time_nsec"]) == ("1700000124", "0")
    # The responder learnt the initiator's endpoint from the authenticated handshake (roaming).
    assert received["endpoint"] == "192.0.2.1:51820"
    assert int(sent["tx_bytes"]) > 0 and int(sent["rx_bytes"]) > 0
    assert int(received["rx_bytes"]) > 0


def test_get_with_trailing_characters_is_einval_and_then_the_connection_closes() -> None:
    session = make_uapi().open_session()
    session.receive_data(b"get=1\nx\n", 0.0)
    assert session.data_to_send() == b"errno=-22\n\n"
    assert session.closed


# -- set: device keys ---------------------------------------------------------------------------------------------


def test_private_key_sets_the_public_key_and_zero_clears_it() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"private_key={KEY_A.hex().upper()}")  # Go hex decoding takes upper case too
    assert uapi.device.private_key == KEY_A
    assert uapi.device.public_key is not None and len(uapi.device.public_key) == 32
    set_ok(uapi, f"private_key={ZERO.hex()}")
    assert uapi.device.private_key is None
    assert "private_key" not in dict(get_pairs(uapi))


def test_listen_port_goes_to_the_driver_which_reports_the_bound_port() -> None:
    asked: list[int] = []

    def bind(port: int) -> int:
        asked.append(port)
        return 40000 if port == 0 else port

    uapi = make_uapi(listen_port=1234, on_listen_port=bind)
    assert dict(get_pairs(uapi))["listen_port"] == "1234"
    set_ok(uapi, "listen_port=0")
    set_ok(uapi, "listen_port=51820")
    assert asked == [0, 51820]
    assert dict(get_pairs(uapi))["listen_port"] == "51820"


def test_a_port_the_driver_cannot_bind_is_eaddrinuse() -> None:
    def bind(port: int) -> int:
        raise OSError(98, "Address already in use")

    uapi = make_uapi(listen_port=51820, on_listen_port=bind)
    assert set_errno(uapi, "listen_port=53") == -98
    assert uapi.listen_port == 51820


def test_fwmark_goes_to_the_driver_only_when_it_changes() -> None:
    marks: list[int] = []
    uapi = make_uapi(on_fwmark=marks.append)
    set_ok(uapi, "fwmark=0")
    set_ok(uapi, "fwmark=4294967295")
    set_ok(uapi, "fwmark=4294967295")
    assert marks == [4294967295]
    assert dict(get_pairs(uapi))["fwmark"] == "4294967295"


def test_replace_peers_removes_every_peer_before_the_new_ones() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}", f"public_key={KEY_C.hex()}")
    set_ok(uapi, "replace_peers=true", f"public_key={KEY_C.hex()}", "allowed_ip=10.0.0.3/32")
    assert set(uapi.device.peers) == {KEY_C}


@pytest.mark.parametrize(
    "line",
    [
        "private_key=00",
        "private_key=" + "zz" * 32,
        "private_key=" + "00" * 33,
        "listen_port=65536",
        "listen_port=-1",
        "listen_port=",
        "listen_port=0x10",
        "fwmark=4294967296",
        "replace_peers=false",
        "replace_peers=1",
        "bogus_key=1",
        "public_key=" + "00" * 31,
        "protocol_version=1",  # a peer key, not a device key
    ],
)
def test_invalid_device_lines_are_einval(line) -> None:
    assert set_errno(make_uapi(), line) == -22


def test_a_line_without_equals_is_eproto() -> None:
    assert set_errno(make_uapi(), "private_key") == -71


# -- set: peer keys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "preshared_key=1234",
        "endpoint=2001:db8::1:5",
        "endpoint=example.com:5",
        "persistent_keepalive_interval=65536",
        "replace_allowed_ips=yes",
        "allowed_ip=10.0.0.1",
        "allowed_ip=10.0.0.0/40",
        "protocol_version=2",
        "update_only=false",
        "remove=1",
        "listen_port=5",  # a device key, not a peer key
        "nonsense=1",
    ],
)
def test_invalid_peer_lines_are_einval(line) -> None:
    assert set_errno(make_uapi(), f"public_key={KEY_B.hex()}", line) == -22


def test_lines_before_an_error_stay_applied_and_the_rest_is_skipped() -> None:
    uapi = make_uapi()
    session = uapi.open_session()
    session.receive_data(
        f"set=1\nprivate_key={KEY_A.hex()}\nlisten_port=x\npublic_key={KEY_B.hex()}\n\nget=1\n\n".encode(), 0.0
    )
    reply = session.data_to_send().decode()
    assert reply.startswith("errno=-22\n\n")
    assert uapi.device.private_key == KEY_A
    assert KEY_B not in uapi.device.peers
    # The connection stays usable: the get after the failed set was answered.
    assert reply.endswith("errno=0\n\n") and f"private_key={KEY_A.hex()}" in reply


def test_update_only_does_not_create_but_updates_an_existing_peer() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}", "update_only=true", "allowed_ip=10.0.0.2/32")
    assert uapi.device.peers == {}
    set_ok(uapi, f"public_key={KEY_C.hex()}")
    set_ok(uapi, f"public_key={KEY_C.hex()}", "update_only=true", "endpoint=192.0.2.3:1")
    assert uapi.device.peers[KEY_C].endpoint == ("192.0.2.3", 1)


def test_remove_deletes_the_peer_and_ignores_its_later_lines() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}", "allowed_ip=10.0.0.2/32")
    set_ok(uapi, f"public_key={KEY_B.hex()}", "remove=true", "endpoint=192.0.2.3:1", "allowed_ip=10.0.0.9/32")
    assert KEY_B not in uapi.device.peers


def test_a_peer_with_the_devices_own_public_key_is_ignored() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"private_key={KEY_A.hex()}")
    own = uapi.device.public_key
    assert own is not None
    set_ok(uapi, f"public_key={own.hex()}", "allowed_ip=10.0.0.1/32", "endpoint=192.0.2.1:5")
    assert uapi.device.peers == {}


def test_allowed_ips_accumulate_replace_and_remove_individually() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}", "allowed_ip=10.0.0.2/32", "allowed_ip=10.1.0.0/16")
    set_ok(uapi, f"public_key={KEY_B.hex()}", "allowed_ip=10.2.0.0/16")
    assert {str(n) for n in uapi.device.peers[KEY_B].allowed_ips} == {"10.0.0.2/32", "10.1.0.0/16", "10.2.0.0/16"}
    set_ok(uapi, f"public_key={KEY_B.hex()}", "allowed_ip=-10.1.0.0/16")
    assert {str(n) for n in uapi.device.peers[KEY_B].allowed_ips} == {"10.0.0.2/32", "10.2.0.0/16"}
    set_ok(uapi, f"public_key={KEY_B.hex()}", "replace_allowed_ips=true", "allowed_ip=fd00::2/128")
    assert {str(n) for n in uapi.device.peers[KEY_B].allowed_ips} == {"fd00::2/128"}


def test_peer_values_can_be_updated_and_cleared() -> None:
    uapi = make_uapi()
    set_ok(uapi, f"public_key={KEY_B.hex()}", f"preshared_key={PSK.hex()}", "persistent_keepalive_interval=25")
    set_ok(uapi, f"public_key={KEY_B.hex()}", f"preshared_key={ZERO.hex()}", "persistent_keepalive_interval=0")
    pairs = dict(get_pairs(uapi))
    assert pairs["preshared_key"] == ZERO.hex()
    assert pairs["persistent_keepalive_interval"] == "0"


# -- framing ------------------------------------------------------------------------------------------------------


def test_an_unknown_operation_closes_the_connection_without_a_reply() -> None:
    uapi = make_uapi()
    session = uapi.open_session()
    session.receive_data(b"delete=1\n\n", 0.0)
    assert session.closed and session.data_to_send() == b""
    assert uapi.drops["invalid_operation"] == 1


def test_an_endless_line_closes_the_connection() -> None:
    session = make_uapi().open_session()
    session.receive_data(b"set=1\n" + b"a" * (MAX_LINE_LENGTH + 1), 0.0)
    assert session.closed


def test_requests_may_arrive_byte_by_byte_and_back_to_back() -> None:
    uapi = make_uapi()
    session = uapi.open_session()
    # The operation line must be exact, but set lines may end in CRLF (Go's bufio.ScanLines drops the CR).
    stream = f"set=1\nprivate_key={KEY_A.hex()}\r\n\r\nget=1\n\nset=1\nfwmark=3\n\n".encode()
    for index in range(len(stream)):
        session.receive_data(stream[index : index + 1], 0.0)
    reply = session.data_to_send().decode()
    assert reply.startswith("errno=0\n\n")
    assert f"private_key={KEY_A.hex()}\n" in reply
    assert reply.endswith("errno=0\n\nerrno=0\n\n")
    assert uapi.fwmark == 3


def test_a_wg_setconf_style_session_round_trips_through_get() -> None:
    """What `wg setconf` sends for a two-peer config, then what `wg showconf` reads back."""
    uapi = make_uapi(on_listen_port=lambda port: port)
    request = "\n".join(
        [
            "set=1",
            f"private_key={KEY_A.hex()}",
            "listen_port=51820",
            "replace_peers=true",
            f"public_key={KEY_B.hex()}",
            f"preshared_key={PSK.hex()}",
            "endpoint=192.0.2.2:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.2/32",
            f"public_key={KEY_C.hex()}",
            "endpoint=[2001:db8::3]:51820",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.3/32",
            "allowed_ip=fd00::3/128",
            "",
            "",
        ]
    )
    assert uapi.request(request, 0.0) == "errno=0\n\n"
    pairs = get_pairs(uapi)
    peers: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for key, value in pairs:
        if key == "public_key":
            current = peers.setdefault(value, {})
        elif current is not None:
            current.setdefault(key, []).append(value)
    assert peers[KEY_B.hex()]["endpoint"] == ["192.0.2.2:51820"]
    assert peers[KEY_B.hex()]["preshared_key"] == [PSK.hex()]
    assert peers[KEY_B.hex()]["persistent_keepalive_interval"] == ["25"]
    assert peers[KEY_B.hex()]["allowed_ip"] == ["10.0.0.2/32"]
    assert peers[KEY_C.hex()]["endpoint"] == ["[2001:db8::3]:51820"]
    assert sorted(peers[KEY_C.hex()]["allowed_ip"]) == ["10.0.0.3/32", "fd00::3/128"]
    # Applying the same config again (wg setconf twice) leaves the same state.
    assert uapi.request(request, 1.0) == "errno=0\n\n"
    assert get_pairs(uapi) == pairs


# -- properties ---------------------------------------------------------------------------------------------------


_keys = st.binary(min_size=32, max_size=32)
_networks = st.one_of(
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False), st.ip_addresses(v=6), st.integers(0, 128)),
)


def _not_ipv4_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)


_endpoints = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).filter(_not_ipv4_mapped).map(str), st.integers(0, 65535)),
)
_peers = st.fixed_dictionaries(
    {
        "preshared_key": st.none() | _keys,
        "endpoint": st.none() | _endpoints,
        "keepalive": st.integers(0, 65535),
        "allowed_ips": st.lists(_networks, max_size=4),
    }
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_keys, _peers, max_size=4))
def test_any_configuration_set_comes_back_from_get(config) -> None:
    uapi = make_uapi()
    # With a private key set, only the device's own public key would be ignored; without one, the zero key would.
    lines = [f"private_key={KEY_A.hex()}", "replace_peers=true"]
    for public_key, peer in config.items():
        lines.append(f"public_key={public_key.hex()}")
        if peer["preshared_key"] is not None:
            lines.append(f"preshared_key={peer['preshared_key'].hex()}")
        if peer["endpoint"] is not None:
            lines.append(f"endpoint={format_endpoint(peer['endpoint'])}")
        lines.append(f"persistent_keepalive_interval={peer['keepalive']}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network}" for network in peer["allowed_ips"])
    set_ok(uapi, *lines)

    reported: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for key, value in get_pairs(uapi):
        if key == "public_key":
            current = reported.setdefault(value, {})
        elif current is not None:
            current.setdefault(key, []).append(value)
    assert set(reported) == {key.hex() for key in config}
    # The last peer to claim a prefix owns it (wireguard-go's trie semantics).
    owner = {}
    for public_key, peer in config.items():
        for network in peer["allowed_ips"]:
            owner[network] = public_key
    for public_key, peer in config.items():
        fields = reported[public_key.hex()]
        psk = peer["preshared_key"] or ZERO
        assert fields["preshared_key"] == [psk.hex()]
        if peer["endpoint"] is None:
            assert "endpoint" not in fields
        else:
            assert [parse_endpoint(e) for e in fields["endpoint"]] == [peer["endpoint"]]
        assert fields["persistent_keepalive_interval"] == [str(peer["keepalive"])]
        expected = {network for network, owned_by in owner.items() if owned_by == public_key}
        assert {parse_allowed_ip(n) for n in fields.get("allowed_ip", [])} == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=200) | st.sampled_from([b"set=1\n", b"get=1\n", b"\n", b"public_key=" + b"ab" * 32 + b"\n"]),
        max_size=20,
    )
)
def test_arbitrary_bytes_never_raise_and_replies_stay_well_formed(chunks) -> None:
    uapi = make_uapi()
    session = uapi.open_session()
    for chunk in chunks:
        session.receive_data(chunk, 0.0)
    reply = session.data_to_send().decode()
    # Every reply ends with an errno line and a blank line.
    for block in filter(None, reply.split("\n\n")):
        assert block.splitlines()[-1].startswith("errno=")
