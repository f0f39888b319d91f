"""Tests that kill mutants ``make mutate`` found surviving in the network parsers (tools/mutation_report.py).

Each pins a boundary or an error message the rest of the suite left loose: a mutant that moves the boundary by one
byte, reads the type field big-endian, or drops the reason from a parse error now fails a test.
"""

from __future__ import annotations

import struct

import pytest

from dataplane.wireguard import messages
from dataplane.wireguard.constants import (
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
)

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
