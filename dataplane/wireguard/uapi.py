"""The cross-platform userspace configuration protocol (UAPI) that `wg` speaks to wireguard-go, over a :class:`Device`.

Sans-IO: a driver accepts connections on ``/var/run/wireguard/IFNAME.sock``, opens one :class:`UapiSession` per
connection, feeds it the bytes it reads and writes back what :meth:`UapiSession.data_to_send` returns.

The protocol, as wireguard-go implements it (device/uapi.go, ipc/uapi_unix.go) and `wg` expects it (ipc-uapi.h):

- an operation line ``get=1`` or ``set=1``; anything else closes the connection without a reply;
- ``get=1`` must be followed by a blank line; the reply is ``key=value`` lines then ``errno=0`` and a blank line;
- ``set=1`` is followed by ``key=value`` lines, applied one by one as they arrive, up to a blank line; the reply is
  ``errno=0`` or, at the first bad line, the negated errno (``errno=-22`` for EINVAL) — lines applied before the bad
  one stay applied, exactly as in wireguard-go. The rest of a failed ``set`` is skipped up to its blank line.

Binding the UDP port and setting the fwmark are I/O, so they are delegated to the driver through the
``on_listen_port``/``on_fwmark`` callbacks; an ``OSError`` from them becomes ``errno=-98`` (EADDRINUSE) like
wireguard-go's ``IpcErrorPortInUse``.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from dataplane.base import Address, DropCounter

__all__ = [
    "MAX_LINE_LENGTH",
    "UapiDevice",
    "UapiError",
    "UapiPeer",
    "Uapi",
    "UapiSession",
    "format_endpoint",
    "parse_allowed_ip",
    "parse_endpoint",
]

logger = logging.getLogger(__name__)

KEY_LENGTH = 32
MAX_LINE_LENGTH = 64 * 1024
"""wireguard-go reads `set` lines with a bufio.Scanner, whose token limit is 64 KiB."""

ERRNO_IO = -errno.EIO
ERRNO_PROTOCOL = -errno.EPROTO
ERRNO_INVALID = -errno.EINVAL
ERRNO_PORT_IN_USE = -errno.EADDRINUSE

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DECIMAL = re.compile(r"[0-9]+")
_ZERO_KEY = bytes(KEY_LENGTH)


class UapiPeer(Protocol):
    """The peer state `get` reports (``dataplane.wireguard.device.Peer``)."""

    @property
    def public_key(self) -> bytes: ...
    @property
    def preshared_key(self) -> bytes | None: ...
    @property
    def endpoint(self) -> Address | None: ...
    @property
    def persistent_keepalive(self) -> int | None: ...
    @property
    def allowed_ips(self) -> Sequence[IpNetwork]: ...
    @property
    def last_handshake_wall(self) -> float | None: ...
    @property
    def rx_bytes(self) -> int: ...
    @property
    def tx_bytes(self) -> int: ...


class UapiDevice(Protocol):
    """The part of ``dataplane.wireguard.device.Device`` that the UAPI configures."""

    @property
    def private_key(self) -> bytes | None: ...
    @property
    def public_key(self) -> bytes | None: ...
    @property
    def peers(self) -> Mapping[bytes, UapiPeer]: ...

    def set_private_key(self, key: bytes | None, now: float) -> None: ...

    def upsert_peer(
        self,
        public_key: bytes,
        now: float,
        *,
        preshared_key: bytes | None = None,
        endpoint: Address | None = None,
        persistent_keepalive: int | None = None,
        allowed_ips: Sequence[IpNetwork] = (),
        replace_allowed_ips: bool = False,
    ) -> object: ...

    def remove_peer(self, public_key: bytes, now: float) -> None: ...

    def remove_all_peers(self, now: float) -> None: ...


class UapiError(Exception):
    """A `set` line that cannot be applied; ``errno`` is the negative value sent back (wireguard-go's IPCError)."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


class DropReason(enum.Enum):
    INVALID_OPERATION = "invalid_operation"
    LINE_TOO_LONG = "line_too_long"


def _parse_key(value: str, what: str) -> bytes:
    if len(value) != 2 * KEY_LENGTH:
        raise UapiError(ERRNO_INVALID, f"failed to set {what}: key must be {2 * KEY_LENGTH} hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UapiError(ERRNO_INVALID, f"failed to set {what}: invalid hex") from None


def _parse_uint(value: str, bits: int, what: str) -> int:
    # Go's strconv.ParseUint(value, 10, bits): ASCII digits only, no sign, no spaces, no underscores.
    if _DECIMAL.fullmatch(value) is None or int(value) >= 1 << bits:
        raise UapiError(ERRNO_INVALID, f"failed to parse {what}: {value!r}")
    return int(value)


def _parse_bool_true(value: str, what: str) -> None:
    if value != "true":
        raise UapiError(ERRNO_INVALID, f"failed to set {what}, invalid value: {value!r}")


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in text:
        # Address carries no scope id, so a zoned link-local address could not be used for sending anyway.
        raise ValueError("IPv6 zones are not supported")
    return ipaddress.ip_address(text)


def parse_endpoint(value: str) -> Address:
    """``a.b.c.d:port`` or ``[v6]:port`` (Go's netip.ParseAddrPort); raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(f"not an ip:port: {value!r}")
    bracketed = host.startswith("[")
    if bracketed:
        if not host.endswith("]"):
            raise ValueError(f"unclosed bracket: {value!r}")
        host = host[1:-1]
    address = _parse_ip(host)
    if bracketed != (address.version == 6):
        raise ValueError(f"square brackets are required for IPv6 and only allowed for IPv6: {value!r}")
    if _DECIMAL.fullmatch(port_text) is None or int(port_text) > 0xFFFF:
        raise ValueError(f"invalid port: {value!r}")
    return (_format_ip(address), int(port_text))


def _format_ip(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # Go prints IPv4-mapped IPv6 addresses with a dotted tail; Python 3.11 does not.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def format_endpoint(endpoint: Address) -> str:
    """The inverse of :func:`parse_endpoint` (Go's AddrPort.String)."""
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_allowed_ip(value: str) -> IpNetwork:
    """``addr/bits`` (Go's netip.ParsePrefix); host bits are masked off as wireguard-go's trie does."""
    host, sep, bits_text = value.partition("/")
    if not sep or _DECIMAL.fullmatch(bits_text) is None or (len(bits_text) > 1 and bits_text[0] == "0"):
        raise ValueError(f"invalid prefix: {value!r}")
    address = _parse_ip(host)
    bits = int(bits_text)
    if bits > address.max_prefixlen:
        raise ValueError(f"prefix length out of range: {value!r}")
    return ipaddress.ip_network((address, bits), strict=False)


def _format_network(network: IpNetwork) -> str:
    return f"{_format_ip(network.network_address)}/{network.prefixlen}"


class Uapi:
    """UAPI for one device: holds the settings that live outside the Device (listen port, fwmark)."""

    def __init__(
        self,
        device: UapiDevice,
        *,
        listen_port: int = 0,
        fwmark: int = 0,
        on_listen_port: Callable[[int], int] | None = None,
        on_fwmark: Callable[[int], None] | None = None,
    ) -> None:
        """``on_listen_port(port)`` binds the UDP socket(s) and returns the port actually bound (``port`` 0 = any);
        ``on_fwmark(mark)`` applies SO_MARK. Both raise OSError on failure."""
        self.device = device
        self.listen_port = listen_port
        self.fwmark = fwmark
        self._on_listen_port = on_listen_port
        self._on_fwmark = on_fwmark
        self.drops = DropCounter()

    def open_session(self) -> UapiSession:
        return UapiSession(self)

    def request(self, text: str, now: float) -> str:
        """Runs a whole request (``"get=1\\n\\n"`` or ``"set=1\\n...\\n\\n"``) and returns the reply text."""
        session = self.open_session()
        session.receive_data(text.encode(), now)
        return session.data_to_send().decode()

    # -- get ------------------------------------------------------------------------------------------------------

    def get(self) -> str:
        lines: list[str] = []
        device = self.device
        if device.private_key is not None and device.private_key != _ZERO_KEY:
            lines.append(f"private_key={device.private_key.hex()}")
        if self.listen_port != 0:
            lines.append(f"listen_port={self.listen_port}")
        if self.fwmark != 0:
            lines.append(f"fwmark={self.fwmark}")
        for peer in list(device.peers.values()):
            lines.append(f"public_key={peer.public_key.hex()}")
            lines.append(f"preshared_key={(peer.preshared_key or _ZERO_KEY).hex()}")
            lines.append("protocol_version=1")
            if peer.endpoint is not None:
                lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
            seconds, nanoseconds = 0, 0
            if peer.last_handshake_wall is not None:
                seconds, nanoseconds = divmod(round(peer.last_handshake_wall * 1e9), 1_000_000_000)
            lines.append(f"last_handshake_time_sec={seconds}")
            lines.append(f"last_handshake_time_nsec={nanoseconds}")
            lines.append(f"tx_bytes={peer.tx_bytes}")
            lines.append(f"rx_bytes={peer.rx_bytes}")
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
            lines.extend(f"allowed_ip={_format_network(network)}" for network in peer.allowed_ips)
        lines.append("errno=0")
        return "\n".join(lines) + "\n\n"

    # -- set ------------------------------------------------------------------------------------------------------

    def set_listen_port(self, port: int) -> None:
        if self._on_listen_port is None:
            self.listen_port = port
            return
        try:
            self.listen_port = self._on_listen_port(port)
        except OSError as exc:
            # Unlike wireguard-go, which then reports the port it failed to bind, keep reporting the port the driver
            # is still bound to.
            raise UapiError(ERRNO_PORT_IN_USE, f"failed to set listen_port: {exc}") from exc

    def set_fwmark(self, mark: int) -> None:
        if mark == self.fwmark:
            return
        self.fwmark = mark
        if self._on_fwmark is not None:
            try:
                self._on_fwmark(mark)
            except OSError as exc:
                raise UapiError(ERRNO_PORT_IN_USE, f"failed to update fwmark: {exc}") from exc


class _Mode(enum.Enum):
    OPERATION = enum.auto()  # waiting for "get=1" / "set=1"
    GET_BLANK = enum.auto()  # "get=1" seen, its terminating blank line must follow
    SET = enum.auto()  # applying "set" lines
    SKIP_SET = enum.auto()  # a "set" line failed: ignore the rest up to the blank line


class UapiSession:
    """One UAPI client connection: bytes in, bytes out, and whether the driver should hang up."""

    def __init__(self, uapi: Uapi) -> None:
        self._uapi = uapi
        self._buffer = bytearray()
        self._output = bytearray()
        self._mode = _Mode.OPERATION
        self.closed = False
        # The peer the current `set` lines apply to: None before the first public_key line.
        self._peer_key: bytes | None = None
        self._peer_dummy = False
        self._peer_created = False

    def receive_data(self, data: bytes, now: float) -> None:
        if self.closed:
            return
        self._buffer += data
        while not self.closed:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE_LENGTH:
                    self._protocol_violation(DropReason.LINE_TOO_LONG, "line too long")
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._handle_line(line, now)

    def receive_eof(self, now: float) -> None:
        """The client closed its side; a `set` without its blank line still counts, as in wireguard-go."""
        self.closed = True

    def data_to_send(self) -> bytes:
        data = bytes(self._output)
        self._output.clear()
        return data

    def _handle_line(self, line: bytes, now: float) -> None:
        mode = self._mode
        if mode is _Mode.OPERATION:
            if line == b"set=1":
                self._mode = _Mode.SET
                self._peer_key = None
                self._peer_dummy = False
            elif line == b"get=1":
                self._mode = _Mode.GET_BLANK
            else:
                self._protocol_violation(DropReason.INVALID_OPERATION, f"invalid UAPI operation: {line[:64]!r}")
        elif mode is _Mode.GET_BLANK:
            self._mode = _Mode.OPERATION
            if line:
                self._reply_error(UapiError(ERRNO_INVALID, "trailing characters in UAPI get"))
                # wireguard-go consumed only one byte of this line; the rest reads as the next operation.
                self._handle_line(line[1:], now)
            else:
                self._output += self._uapi.get().encode()
        elif mode is _Mode.SKIP_SET:
            if not line.rstrip(b"\r"):
                self._mode = _Mode.OPERATION
        else:
            text = line.decode("utf-8", "replace")
            if text.endswith("\r"):
                text = text[:-1]
            if not text:
                self._mode = _Mode.OPERATION
                self._output += b"errno=0\n\n"
                return
            try:
                self._apply_set_line(text, now)
            except UapiError as exc:
                self._reply_error(exc)
                self._mode = _Mode.SKIP_SET
            except ValueError as exc:
                # The Device refused a value the parser let through (e.g. a peer limit): still the client's input.
                self._reply_error(UapiError(ERRNO_INVALID, f"invalid value: {exc}"))
                self._mode = _Mode.SKIP_SET

    def _reply_error(self, exc: UapiError) -> None:
        logger.warning("UAPI: %s (errno=%d)", exc, exc.errno)
        self._output += f"errno={exc.errno}\n\n".encode()

    def _protocol_violation(self, reason: DropReason, message: str) -> None:
        self._uapi.drops.drop(reason)
        logger.warning("UAPI: %s; closing the connection", message)
        self.closed = True
        self._buffer.clear()

    def _apply_set_line(self, line: str, now: float) -> None:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(ERRNO_PROTOCOL, f"failed to parse line {line[:64]!r}")
        if key == "public_key":
            self._select_peer(_parse_key(value, "peer public key"), now)
        elif self._peer_key is None:
            self._apply_device_line(key, value, now)
        else:
            self._apply_peer_line(self._peer_key, key, value, now)

    def _apply_device_line(self, key: str, value: str, now: float) -> None:
        uapi = self._uapi
        if key == "private_key":
            private_key = _parse_key(value, "private_key")
            logger.debug("UAPI: updating private key")
            uapi.device.set_private_key(None if private_key == _ZERO_KEY else private_key, now)
        elif key == "listen_port":
            port = _parse_uint(value, 16, "listen_port")
            logger.debug("UAPI: updating listen port to %d", port)
            uapi.set_listen_port(port)
        elif key == "fwmark":
            uapi.set_fwmark(_parse_uint(value, 32, "fwmark"))
        elif key == "replace_peers":
            _parse_bool_true(value, "replace_peers")
            logger.debug("UAPI: removing all peers")
            uapi.device.remove_all_peers(now)
        else:
            raise UapiError(ERRNO_INVALID, f"invalid UAPI device key: {key[:64]!r}")

    def _select_peer(self, public_key: bytes, now: float) -> None:
        device = self._uapi.device
        own_public_key = device.public_key or _ZERO_KEY
        self._peer_key = public_key
        # A peer with the device's own public key is accepted and silently ignored, as wireguard-go does.
        self._peer_dummy = public_key == own_public_key
        self._peer_created = False
        if not self._peer_dummy and public_key not in device.peers:
            try:
                device.upsert_peer(public_key, now)
            except ValueError as exc:
                raise UapiError(ERRNO_INVALID, f"failed to create new peer: {exc}") from exc
            self._peer_created = True
            logger.debug("UAPI: peer %s created", public_key.hex()[:16])

    def _apply_peer_line(self, public_key: bytes, key: str, value: str, now: float) -> None:
        device = self._uapi.device
        dummy = self._peer_dummy
        if key == "update_only":
            _parse_bool_true(value, "update only")
            if self._peer_created and not dummy:
                device.remove_peer(public_key, now)
                self._peer_dummy = True
        elif key == "remove":
            _parse_bool_true(value, "remove")
            if not dummy:
                logger.debug("UAPI: peer %s removed", public_key.hex()[:16])
                device.remove_peer(public_key, now)
            self._peer_dummy = True
        elif key == "preshared_key":
            preshared_key = _parse_key(value, "preshared key")
            if not dummy:
                device.upsert_peer(public_key, now, preshared_key=preshared_key)
        elif key == "endpoint":
            try:
                endpoint = parse_endpoint(value)
            except ValueError as exc:
                raise UapiError(ERRNO_INVALID, f"failed to set endpoint {value[:64]!r}: {exc}") from None
            if not dummy:
                device.upsert_peer(public_key, now, endpoint=endpoint)
        elif key == "persistent_keepalive_interval":
            interval = _parse_uint(value, 16, "persistent keepalive interval")
            if not dummy:
                device.upsert_peer(public_key, now, persistent_keepalive=interval)
        elif key == "replace_allowed_ips":
            _parse_bool_true(value, "replace allowed ips")
            if not dummy:
                device.upsert_peer(public_key, now, replace_allowed_ips=True)
        elif key == "allowed_ip":
            removing = value.startswith("-")
            try:
                network = parse_allowed_ip(value[1:] if removing else value)
            except ValueError as exc:
                raise UapiError(ERRNO_INVALID, f"failed to set allowed ip: {exc}") from None
            if dummy:
                return
            if removing:
                remaining = [n for n in device.peers[public_key].allowed_ips if n != network]
                device.upsert_peer(public_key, now, allowed_ips=remaining, replace_allowed_ips=True)
            else:
                device.upsert_peer(public_key, now, allowed_ips=[network])
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(ERRNO_INVALID, f"invalid protocol version: {value[:64]!r}")
        else:
            raise UapiError(ERRNO_INVALID, f"invalid UAPI peer key: {key[:64]!r}")
