"""Tests that kill mutants ``make mutate`` found surviving in the network parsers (tools/mutation_report.py).

Each pins a boundary or an error message the rest of the suite left loose: a mutant that moves the boundary by one
byte, reads the type field big-endian, or drops the reason from a parse error now fails a test.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import struct
from typing import Any

import pytest

from dataplane import p2p_control
from dataplane.ice.timing import StunTiming
from dataplane.io.rng import SeededRng
from dataplane.wireguard import messages
from dataplane.wireguard.constants import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_HEADER_SIZE,
    MESSAGE_TRANSPORT_MIN_SIZE,
)
from dataplane.wireguard.device import Device
from dataplane.wireguard.noise import SessionKeys
from dataplane.wireguard.ratelimit import RateLimiter
from dataplane.wireguard.replay import ReplayFilter
from dataplane.wireguard.session import Keypair
from dataplane.wireguard.uapi import MAX_LINE_LENGTH, Uapi, parse_allowed_ip, parse_endpoint

# --- dataplane/wireguard/messages.py ---------------------------------------------------------------------------------


def test_message_type_reads_exactly_four_little_endian_bytes() -> None:
    assert messages.message_type(b"\x01\x00\x00\x00") == 1
    assert messages.message_type(b"\x04\x00\x00\x00\xff\xff") == 4
    assert messages.message_type(b"\x00\x00\x00\x01") == 1 << 24


@pytest.mark.parametrize("data", [b"", b"\x04", b"\x04\x00\x00"])
def test_message_type_of_a_short_datagram_says_why(data: bytes) -> None:
    with pytest.raises(messages.MessageParseError, match="^shorter than a message type$"):
        messages.message_type(data)


def test_the_smallest_transport_message_is_a_keepalive() -> None:
    keepalive = struct.pack("<IIQ", MESSAGE_TRANSPORT, 7, 9) + bytes(16)
    assert len(keepalive) == MESSAGE_TRANSPORT_MIN_SIZE
    assert messages.parse(keepalive) == messages.Transport(7, 9, bytes(16))
    with pytest.raises(messages.MessageParseError, match="^transport message of 31 bytes$"):
        messages.parse(keepalive[:-1])


@pytest.mark.parametrize(
    ("kind", "size", "reason"),
    [
        (MESSAGE_INITIATION, 147, "^initiation of 147 bytes$"),
        (MESSAGE_RESPONSE, 93, "^response of 93 bytes$"),
        (MESSAGE_COOKIE_REPLY, 63, "^cookie reply of 63 bytes$"),
        (5, 148, "^unknown message type 0x5$"),
    ],
)
def test_parse_errors_name_the_message_and_its_size(kind: int, size: int, reason: str) -> None:
    with pytest.raises(messages.MessageParseError, match=reason):
        messages.parse(struct.pack("<I", kind) + bytes(size - 4))


# --- dataplane/p2p_control.py ----------------------------------------------------------------------------------------

PROXY_IPS = [ipaddress.ip_address(f"100.96.0.{n}") for n in range(1, 5)]


def test_control_packet_layout_is_exact() -> None:
    packet = p2p_control.build(2, b"xy")
    # version 6, payload 10 bytes, next header 0xFF, hop limit 0, :: -> ::, event byte then seven zero bytes.
    assert packet == bytes.fromhex("60000000000aff00") + bytes(32) + bytes.fromhex("0200000000000000") + b"xy"


def test_event_type_is_one_byte() -> None:
    assert p2p_control.parse(p2p_control.build(0xFF)) == p2p_control.ControlMessage(0xFF, b"")
    for event in (0x100, -1):
        with pytest.raises(ValueError, match="^an event type is one byte$"):
            p2p_control.build(event)


def test_too_large_a_control_message_says_so() -> None:
    with pytest.raises(p2p_control.ControlMessageTooLarge, match="does not fit the tunnel MTU"):
        p2p_control.build(0, bytes(p2p_control.MAX_PACKET_SIZE))


def test_assigned_ips_refuses_other_counts_and_encodes_compact_json() -> None:
    with pytest.raises(ValueError, match="^assigned_ips carries exactly 4 or 8 proxy IPs$"):
        p2p_control.assigned_ips("r", "d", PROXY_IPS[:3])
    message = p2p_control.parse(p2p_control.assigned_ips("r", "d", PROXY_IPS))
    assert message is not None
    ips = ",".join(f'"{ip}"' for ip in PROXY_IPS)
    assert message.body == f'{{"resource":"r","domain":"d","proxy_ips":[{ips}]}}'.encode()


@pytest.mark.parametrize(("active", "status"), [(True, "Active"), (False, "Inactive")])
def test_domain_status_encodes_compact_json(active: bool, status: str) -> None:
    message = p2p_control.parse(p2p_control.domain_status("r", "d", active))
    assert message is not None
    assert message.body == f'{{"resource":"r","domain":"d","status":"{status}"}}'.encode()


def test_only_the_reserved_next_header_marks_a_control_packet() -> None:
    packet = bytearray(p2p_control.build(0))
    assert p2p_control.is_control_packet(bytes(packet[:40]))  # the bare header is enough to recognise one
    packet[6] = 17  # UDP between unspecified addresses is still not a control packet
    assert not p2p_control.is_control_packet(bytes(packet))
    assert p2p_control.parse(bytes(packet)) is None


def test_a_body_cut_short_is_not_parsed() -> None:
    assert p2p_control.parse(p2p_control.build(0, b"body")[:-1]) is None


def _assigned(resource: object, domain: object, proxy_ips: object) -> bytes:
    return json.dumps({"resource": resource, "domain": domain, "proxy_ips": proxy_ips}).encode()


def test_assigned_ips_needs_a_list_of_addresses() -> None:
    as_dict = {str(ip): 0 for ip in PROXY_IPS}  # iterating it would yield four valid addresses
    assert p2p_control.parse_assigned_ips(_assigned("r", "d", as_dict)) is None


@pytest.mark.parametrize(
    ("resource", "domain", "accepted"),
    [
        ("r" * p2p_control.MAX_RESOURCE_ID_LENGTH, "d", True),
        ("r" * (p2p_control.MAX_RESOURCE_ID_LENGTH + 1), "d", False),
        ("r", "d" * p2p_control.MAX_DOMAIN_LENGTH, True),
        ("r", "d" * (p2p_control.MAX_DOMAIN_LENGTH + 1), False),
    ],
)
def test_assigned_ips_name_length_limits(resource: str, domain: str, accepted: bool) -> None:
    parsed = p2p_control.parse_assigned_ips(_assigned(resource, domain, [str(ip) for ip in PROXY_IPS]))
    assert (parsed is not None) is accepted


def test_domain_status_needs_a_string_resource() -> None:
    body = json.dumps({"resource": 1, "domain": "d", "status": "Active"}).encode()
    assert p2p_control.parse_domain_status(body) is None


# --- dataplane/wireguard/uapi.py -------------------------------------------------------------------------------------
# A refused `set` line is answered with an errno only; the reason goes to the log at warning level, where an operator
# reads it. These tests pin both.

KEY_A = bytes(range(32)).hex()
KEY_B = bytes(range(32, 64)).hex()


def _uapi() -> Uapi:
    return Uapi(Device(rng=SeededRng(1), wall_clock=lambda: 1_700_000_000.0))


def _set(uapi: Uapi, *lines: str) -> str:
    return uapi.request("set=1\n" + "".join(line + "\n" for line in lines) + "\n", 0.0)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.uapi" and r.levelname == "WARNING"]


@pytest.mark.parametrize(
    ("lines", "errno", "reason"),
    [
        (["private_key=00"], -22, "failed to set private_key: key must be 64 hex characters"),
        (["private_key=" + "zz" * 32], -22, "failed to set private_key: invalid hex"),
        (["public_key=00"], -22, "failed to set peer public key: key must be 64 hex characters"),
        (["listen_port=65536"], -22, "failed to parse listen_port: '65536'"),
        (["fwmark=4294967296"], -22, "failed to parse fwmark: '4294967296'"),
        (["fwmark=1=2"], -22, "failed to parse fwmark: '1=2'"),
        (["replace_peers=false"], -22, "failed to set replace_peers, invalid value: 'false'"),
        (["bogus=1"], -22, "invalid UAPI device key: 'bogus'"),
        (["no equals sign"], -71, "failed to parse line 'no equals sign'"),
        ([f"public_key={KEY_B}", "update_only=1"], -22, "failed to set update only, invalid value: '1'"),
        ([f"public_key={KEY_B}", "remove=yes"], -22, "failed to set remove, invalid value: 'yes'"),
        (
            [f"public_key={KEY_B}", "preshared_key=00"],
            -22,
            "failed to set preshared key: key must be 64 hex characters",
        ),
        (
            [f"public_key={KEY_B}", "persistent_keepalive_interval=65536"],
            -22,
            "failed to parse persistent keepalive interval: '65536'",
        ),
        (
            [f"public_key={KEY_B}", "replace_allowed_ips=no"],
            -22,
            "failed to set replace allowed ips, invalid value: 'no'",
        ),
        ([f"public_key={KEY_B}", "protocol_version=2"], -22, "invalid protocol version: '2'"),
        ([f"public_key={KEY_B}", "bogus=1"], -22, "invalid UAPI peer key: 'bogus'"),
    ],
)
def test_refused_set_lines_answer_an_errno_and_log_why(
    caplog: pytest.LogCaptureFixture, lines: list[str], errno: int, reason: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        assert _set(_uapi(), *lines) == f"errno={errno}\n\n"
    assert _warnings(caplog) == [f"UAPI: {reason} (errno={errno})"]


def test_protocol_version_1_is_accepted_for_a_peer() -> None:
    assert _set(_uapi(), f"public_key={KEY_B}", "protocol_version=1") == "errno=0\n\n"


def test_a_prefix_without_bits_is_refused_as_a_prefix() -> None:
    with pytest.raises(ValueError, match="^invalid prefix: '10.0.0.1/'$"):
        parse_allowed_ip("10.0.0.1/")


def test_a_value_the_device_refuses_is_an_errno_and_the_rest_of_the_set_is_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class RefusingDevice(Device):
        def upsert_peer(self, public_key: bytes, now: float, **changes: Any) -> Any:
            if changes.get("allowed_ips"):
                raise ValueError("allowed-IPs table full")
            return super().upsert_peer(public_key, now, **changes)

    uapi = Uapi(RefusingDevice(rng=SeededRng(1), wall_clock=lambda: 0.0))
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        reply = _set(uapi, f"public_key={KEY_B}", "allowed_ip=10.0.0.0/8", "listen_port=7")
    assert reply == "errno=-22\n\n"
    assert _warnings(caplog) == ["UAPI: invalid value: allowed-IPs table full (errno=-22)"]
    assert uapi.listen_port == 0


def test_only_an_empty_or_cr_line_ends_a_skipped_set() -> None:
    uapi = _uapi()
    # After the refused line everything up to the blank line is skipped, including a " " or "X" line and a get.
    reply = uapi.request("set=1\nbogus=1\n \nX\nget=1\n\n", 0.0)
    assert reply == "errno=-22\n\n"
    # A line of just CR ends it (a client writing CRLF), so the get after it is answered.
    assert uapi.request("set=1\nbogus=1\n\r\nget=1\n\n", 0.0) == "errno=-22\n\nerrno=0\n\n"


def test_trailing_characters_after_get_cost_exactly_one_byte(caplog: pytest.LogCaptureFixture) -> None:
    uapi = _uapi()
    _set(uapi, "listen_port=5")
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        reply = uapi.request("get=1\nxget=1\n\n", 0.0)
    assert reply == "errno=-22\n\nlisten_port=5\nerrno=0\n\n"
    assert _warnings(caplog) == ["UAPI: trailing characters in UAPI get (errno=-22)"]


def test_an_unknown_operation_closes_the_session_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    session = _uapi().open_session()
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        session.receive_data(b"x" * 100 + b"\n", 0.0)
    assert session.closed is True
    assert _warnings(caplog) == [f"UAPI: invalid UAPI operation: {b'x' * 64!r}; closing the connection"]


def test_line_length_limit_is_inclusive(caplog: pytest.LogCaptureFixture) -> None:
    session = _uapi().open_session()
    session.receive_data(b"s" * MAX_LINE_LENGTH, 0.0)
    assert session.closed is False
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        session.receive_data(b"s", 0.0)
    assert session.closed is True
    assert _warnings(caplog) == ["UAPI: line too long; closing the connection"]


def test_end_of_input_closes_the_session() -> None:
    session = _uapi().open_session()
    session.receive_eof(0.0)
    assert session.closed is True


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("192.0.2.1", "^not an ip:port: '192.0.2.1'$"),
        ("[2001:db8::1:51820", "^unclosed bracket: '\\[2001:db8::1:51820'$"),
        ("2001:db8::1:51820", "square brackets are required for IPv6 and only allowed for IPv6"),
        ("192.0.2.1:65536", "^invalid port: '192.0.2.1:65536'$"),
        ("[fe80::1%eth0]:1", "^IPv6 zones are not supported$"),
    ],
)
def test_endpoint_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_endpoint(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.0/8/8", "^invalid prefix: '10.0.0.0/8/8'$"),
        ("10.0.0.0/33", "^prefix length out of range: '10.0.0.0/33'$"),
    ],
)
def test_allowed_ip_errors_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_allowed_ip(text)


def test_endpoint_and_allowed_ip_failures_are_logged_with_the_value(caplog: pytest.LogCaptureFixture) -> None:
    uapi = _uapi()
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        assert _set(uapi, f"public_key={KEY_B}", "endpoint=192.0.2.1") == "errno=-22\n\n"
        assert _set(uapi, f"public_key={KEY_B}", "allowed_ip=10.0.0.0/33") == "errno=-22\n\n"
    assert _warnings(caplog) == [
        "UAPI: failed to set endpoint '192.0.2.1': not an ip:port: '192.0.2.1' (errno=-22)",
        "UAPI: failed to set allowed ip: prefix length out of range: '10.0.0.0/33' (errno=-22)",
    ]


def test_long_values_are_cut_to_64_characters_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    long_key = "k" * 100
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        _set(_uapi(), f"{long_key}=1")
        _set(_uapi(), "x" * 100)
        _set(_uapi(), f"public_key={KEY_B}", f"{long_key}=1")
        _set(_uapi(), f"public_key={KEY_B}", "protocol_version=" + "9" * 100)
        _set(_uapi(), f"public_key={KEY_B}", "endpoint=" + "e" * 100)
    cut_key, cut_x, cut_9, cut_e = "k" * 64, "x" * 64, "9" * 64, "e" * 64
    assert _warnings(caplog) == [
        f"UAPI: invalid UAPI device key: '{cut_key}' (errno=-22)",
        f"UAPI: failed to parse line '{cut_x}' (errno=-71)",
        f"UAPI: invalid UAPI peer key: '{cut_key}' (errno=-22)",
        f"UAPI: invalid protocol version: '{cut_9}' (errno=-22)",
        f"UAPI: failed to set endpoint '{cut_e}': not an ip:port: '{'e' * 100}' (errno=-22)",
    ]


def test_socket_failures_answer_eaddrinuse_and_log_why(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(_: int) -> int:
        raise OSError("address in use")

    def refuse_mark(_: int) -> None:
        raise OSError("not permitted")

    uapi = Uapi(Device(rng=SeededRng(1), wall_clock=lambda: 0.0), on_listen_port=refuse, on_fwmark=refuse_mark)
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        assert _set(uapi, "listen_port=1") == "errno=-98\n\n"
        assert _set(uapi, "fwmark=1") == "errno=-98\n\n"
    assert _warnings(caplog) == [
        "UAPI: failed to set listen_port: address in use (errno=-98)",
        "UAPI: failed to update fwmark: not permitted (errno=-98)",
    ]


def test_a_peer_the_device_cannot_create_is_an_errno(caplog: pytest.LogCaptureFixture) -> None:
    class FullDevice(Device):
        def upsert_peer(self, public_key: bytes, now: float, **changes: Any) -> Any:
            raise ValueError("too many peers")

    uapi = Uapi(FullDevice(rng=SeededRng(1), wall_clock=lambda: 0.0))
    with caplog.at_level(logging.WARNING, logger="dataplane.wireguard.uapi"):
        assert _set(uapi, f"public_key={KEY_B}") == "errno=-22\n\n"
    assert _warnings(caplog) == ["UAPI: failed to create new peer: too many peers (errno=-22)"]


def test_applied_changes_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dataplane.wireguard.uapi"):
        reply = _set(
            _uapi(),
            f"private_key={KEY_A}",
            "listen_port=51820",
            "replace_peers=true",
            f"public_key={KEY_B}",
            "remove=true",
        )
    assert reply == "errno=0\n\n"
    debug = [r.getMessage() for r in caplog.records if r.name == "dataplane.wireguard.uapi" and r.levelname == "DEBUG"]
    assert debug == [
        "UAPI: updating private key",
        "UAPI: updating listen port to 51820",
        "UAPI: removing all peers",
        f"UAPI: peer {KEY_B[:16]} created",
        f"UAPI: peer {KEY_B[:16]} removed",
    ]


# --- dataplane/ice/timing.py -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_retransmits", "initial_rto", "max_rto"), [(0, 1.0, 1.0), (1, 0.0, 1.0), (1, -1.0, 1.0), (1, 2.0, 1.0)]
)
def test_inconsistent_stun_timing_is_refused(max_retransmits: int, initial_rto: float, max_rto: float) -> None:
    with pytest.raises(ValueError, match="^inconsistent STUN timing StunTiming"):
        StunTiming(max_retransmits, initial_rto, max_rto)


def test_the_tightest_consistent_stun_timing_is_accepted() -> None:
    assert StunTiming(1, 1.0, 1.0).timeout == 1.0


def test_resend_delay_doubles_from_the_first_transmission_up_to_the_caps() -> None:
    timing = StunTiming(3, 1.0, 1000.0)
    assert [timing.resend_delay(k) for k in range(-1, 7)] == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert StunTiming(3, 1.0, 5.0).resend_delay(4) == 5.0
    huge = StunTiming(100, 1.0, 2.0**100)
    assert huge.resend_delay(63) == 2.0**62
    assert huge.resend_delay(90) == 2.0**62  # the shift stops at 62 however many retransmits are allowed


# --- dataplane/wireguard/session.py (Keypair.seal: the datapath batches natively; this is the reference path) --------


def _keypair_pair() -> tuple[Keypair, Keypair]:
    a_to_b, b_to_a = bytes([1]) * 32, bytes([2]) * 32
    sender = Keypair(SessionKeys(a_to_b, b_to_a, 1, 2, True), 0.0)
    receiver = Keypair(SessionKeys(b_to_a, a_to_b, 2, 1, False), 0.0)
    return sender, receiver


@pytest.mark.parametrize(
    ("size", "mtu", "padded"),
    [(1, None, 16), (16, None, 16), (17, None, 32), (1, 10, 10), (1, 16, 16), (20, 10, 20), (0, None, 0)],
)
def test_seal_pads_to_16_bytes_but_never_past_the_mtu(size: int, mtu: int | None, padded: int) -> None:
    sender, receiver = _keypair_pair()
    message = sender.seal(b"\x45" * size, mtu)
    assert len(message) == MESSAGE_TRANSPORT_HEADER_SIZE + padded + 16
    assert receiver.open(message) == b"\x45" * size + bytes(padded - size)


def test_seal_counts_messages_from_zero() -> None:
    sender, _ = _keypair_pair()
    counters = [messages.parse(sender.seal(b"x")) for _ in range(3)]
    assert [m.counter for m in counters if isinstance(m, messages.Transport)] == [0, 1, 2]
    assert sender.send_counter == 3


# --- dataplane/wireguard/replay.py (the receive fast path in tunn.py inlines the common case) -------------------------


def test_replay_filter_starts_and_resets_empty() -> None:
    replay = ReplayFilter()
    assert replay.last == 0 and not any(replay.ring)
    assert replay.validate(5) and not replay.validate(5)
    replay.reset()
    assert replay.last == 0 and not any(replay.ring)
    assert replay.validate(5)


def test_moving_forward_within_a_block_keeps_earlier_bits() -> None:
    replay = ReplayFilter()
    assert [replay.validate(1), replay.validate(2), replay.validate(1)] == [True, True, False]


def test_moving_forward_clears_the_block_right_after_the_old_one() -> None:
    replay = ReplayFilter()
    assert replay.validate(64 + 4)  # block 1, ring slot 1
    assert replay.validate(64 * 128)  # block 128: slots 2..0 cleared, slot 1 still block 1 (in the window)
    assert replay.validate(64 * 129 + 10)  # block 129 reuses slot 1: it must be cleared on entry
    assert replay.validate(64 * 129 + 4)  # out of order but never seen: accepted


# --- dataplane/wireguard/ratelimit.py -----------------------------------------------------------------------------------


def test_rate_limiter_collects_entries_older_than_one_interval_once_per_interval() -> None:
    limiter = RateLimiter()
    for source, now in (("192.0.2.1", 0.0), ("192.0.2.2", 1.0), ("192.0.2.3", 1.5)):
        assert limiter.allow(source, now)
    assert len(limiter) == 3  # collected at 1.0 (nothing older than 0.0); not again before 2.0
    assert limiter.allow("192.0.2.4", 2.0)
    assert len(limiter) == 3  # at 2.0 only the entry last seen at 0.0 (< 1.0) went; 1.0 itself stays


def test_no_tokens_accrue_without_time_passing() -> None:
    limiter = RateLimiter(packets_per_second=500_000_000, burst=1)  # one token costs 2 ns
    assert limiter.allow("192.0.2.1", 0.0)
    assert not limiter.allow("192.0.2.1", 1e-9)  # 1 ns later: half a token
    assert not limiter.allow("192.0.2.1", 1e-9)  # same instant: still half a token


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("2001:db8::1", "2001:db8::100:0:0:1"),  # the /64 ends before byte 8, where these differ
        ("fe80::1%eth0%x", "fe80::2"),  # everything from the first % is a zone, however odd
    ],
)
def test_ipv6_sources_in_one_slash_64_share_a_bucket(first: str, second: str) -> None:
    limiter = RateLimiter()
    assert all(limiter.allow(first, 0.0) for _ in range(5))  # the burst
    assert not limiter.allow(second, 0.0)
    assert len(limiter) == 1
