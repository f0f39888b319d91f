"""A minimal TURN relay for the simulation, written independently of the client it tests (``dataplane/turn.py``).

Speaks what Firezone's relays speak (docs/protocol.md §4.5): unauthenticated BINDING; ALLOCATE (UDP, dual-stack via
ADDITIONAL-ADDRESS-FAMILY), REFRESH and CHANNEL-BIND with long-term credentials in realm ``firezone`` using Firezone's
credential scheme (username ``"<expiry>:<salt>"``, password ``base64_nopad(sha256("<expiry>:<secret>:<salt>"))``);
ChannelData both ways; a peer that has a permission (its IP has a channel) but no channel of its own reaches the
client in a Data indication, as with coturn (RFC 8656 §11.6: a roaming peer's new port gets through this way). No
Send indications and no CreatePermission: a channel binding is the permission. Every
authenticated response carries MESSAGE-INTEGRITY. The relay listens on port 3478 and relays from ports 49152 and up.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import struct
from dataclasses import dataclass, field

from dataplane import stun
from dataplane.base import Address, DropCounter
from tests.sim.net import SimHost, SimNetwork

REALM = "firezone"
RELAY_PORT = 3478
FIRST_RELAY_PORT = 49152
DEFAULT_LIFETIME = 600
MAX_LIFETIME = 3600
CHANNEL_LIFETIME = 600.0
CHANNEL_REBIND_TIMEOUT = 300.0  # RFC 8656 §12: a number stays reserved for its peer 5 min after expiry
PERMISSION_LIFETIME = 300.0
FIRST_CHANNEL = 0x4000
LAST_CHANNEL = 0x7FFF
UDP_TRANSPORT = 17
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
SIM_EPOCH = 1_800_000_000.0  # simulated wall clock = epoch + network time


def b64_nopad(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def firezone_password(expiry: int, secret: str, salt: str) -> str:
    return b64_nopad(hashlib.sha256(f"{expiry}:{secret}:{salt}".encode()).digest())


def mint_credentials(secret: str, public_key_b64: str, expiry: int = 2145916800) -> tuple[str, str]:
    """What the portal hands a gateway for one relay: (username, password)."""
    salt = b64_nopad(hashlib.sha256(public_key_b64.encode()).digest())
    return f"{expiry}:{salt}", firezone_password(expiry, secret, salt)


class RelayDropReason(enum.Enum):
    NOT_STUN = "not_stun"
    UNKNOWN_CHANNEL = "unknown_channel"
    NO_ALLOCATION = "no_allocation"
    NO_PERMISSION = "no_permission"
    BAD_CHANNEL_DATA = "bad_channel_data"
    UNEXPECTED_CLASS = "unexpected_class"


@dataclass
class _Allocation:
    client: Address
    username: str
    key: bytes
    relayed: list[Address]
    expires: float
    channels: dict[int, tuple[Address, float]] = field(default_factory=dict)  # number → (peer, expires)
    permissions: dict[str, float] = field(default_factory=dict)  # peer ip → expires

    def channel_for(self, peer: Address, now: float) -> int | None:
        for number, (bound, expires) in self.channels.items():
            if bound == peer and expires > now:
                return number
        return None


class SimRelay:
    """One relay host on the simulated internet."""

    def __init__(
        self,
        network: SimNetwork,
        host: SimHost,
        *,
        secret: str = "sim-relay-secret",
        nonce_uses: int = 10_000,
        nonce_lifetime: float | None = None,
    ) -> None:
        self.network = network
        self.host = host
        self.secret = secret
        self.nonce_uses = nonce_uses
        self.nonce_lifetime = nonce_lifetime
        self.drops = DropCounter()
        self.requests: dict[int, int] = {}  # method → count (for assertions)
        self.online = True
        self._allocations: dict[Address, _Allocation] = {}
        self._by_relayed: dict[Address, _Allocation] = {}
        self._nonces: dict[str, tuple[int, float]] = {}  # nonce → (uses left, issued at)
        self._next_port = FIRST_RELAY_PORT
        self._nonce_counter = 0
        self._indications = 0
        host.bind(RELAY_PORT, self._on_control)

    @property
    def addresses(self) -> list[Address]:
        return [(ip, RELAY_PORT) for ip in self.host.addresses]

    @property
    def allocations(self) -> int:
        return len(self._allocations)

    def credentials_for(self, public_key_b64: str, expiry: int = 2145916800) -> tuple[str, str]:
        return mint_credentials(self.secret, public_key_b64, expiry)

    def _next_indication_id(self) -> bytes:
        self._indications += 1
        return self._indications.to_bytes(stun.TRANSACTION_ID_LENGTH, "big")

    def shut_down(self) -> None:
        """The relay disappears without a word (crash, partition)."""
        self.online = False
        self.host.online = False

    def restart(self) -> None:
        """The relay comes back as a fresh process: every allocation and nonce is forgotten."""
        for allocation in list(self._allocations.values()):
            self._delete(allocation)
        self._nonces.clear()
        self.online = True
        self.host.online = True

    # -- control port: STUN and ChannelData from clients -------------------------------------------------------

    def _on_control(self, data: bytes, src: Address, local: Address, now: float) -> None:
        if not data:
            self.drops.drop(RelayDropReason.NOT_STUN)
            return
        if 0x40 <= data[0] <= 0x7F:
            self._on_channel_data(data, src, now)
            return
        try:
            msg = stun.decode(data)
        except stun.StunParseError:
            self.drops.drop(RelayDropReason.NOT_STUN)
            return
        if msg.message_class != stun.MessageClass.REQUEST:
            self.drops.drop(RelayDropReason.UNEXPECTED_CLASS)
            return
        self.requests[msg.method] = self.requests.get(msg.method, 0) + 1
        if msg.method == stun.Method.BINDING:
            response = self._response(msg)
            response.add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, src)
            self._reply(local, src, response, None)
            return
        if msg.method not in (stun.Method.ALLOCATE, stun.Method.REFRESH, stun.Method.CHANNEL_BIND):
            self._reply(local, src, self._error(msg, 400, "Bad Request"), None)
            return
        key = self._authenticate(msg, data, src, local, now)
        if key is None:
            return
        if msg.method == stun.Method.ALLOCATE:
            self._allocate(msg, src, local, key, now)
        elif msg.method == stun.Method.REFRESH:
            self._refresh(msg, src, local, key, now)
        else:
            self._channel_bind(msg, src, local, key, now)

    def _response(self, request: stun.StunMessage) -> stun.StunMessage:
        return request.success_response()

    def _error(self, request: stun.StunMessage, code: int, reason: str) -> stun.StunMessage:
        return request.error_response(code, reason)

    def _reply(self, local: Address, dst: Address, msg: stun.StunMessage, key: bytes | None) -> None:
        msg.add_software("sim-relay")
        self.host.send(local, dst, stun.encode(msg, integrity_key=key))

    def _new_nonce(self, now: float) -> str:
        self._nonce_counter += 1
        nonce = f"nonce{self._nonce_counter:08d}"
        self._nonces[nonce] = (self.nonce_uses, now)
        return nonce

    def _challenge(
        self, msg: stun.StunMessage, local: Address, src: Address, code: int, reason: str, now: float
    ) -> None:
        error = self._error(msg, code, reason)
        error.add_realm(REALM)
        error.add_nonce(self._new_nonce(now))
        self._reply(local, src, error, None)

    def _authenticate(
        self, msg: stun.StunMessage, raw: bytes, src: Address, local: Address, now: float
    ) -> bytes | None:
        username_raw = msg.get(stun.Attr.USERNAME)
        nonce_raw = msg.get(stun.Attr.NONCE)
        if username_raw is None or nonce_raw is None or msg.get(stun.Attr.REALM) is None:
            self._challenge(msg, local, src, 401, "Unauthorized", now)
            return None
        username = username_raw.decode(errors="replace")
        password = self._password_for(username, now)
        key = stun.long_term_key(username, REALM, password) if password is not None else None
        if key is None or not stun.check_integrity(raw, key):
            self._challenge(msg, local, src, 401, "Unauthorized", now)
            return None
        nonce = nonce_raw.decode(errors="replace")
        state = self._nonces.get(nonce)
        stale = state is None or state[0] <= 0
        if state is not None and self.nonce_lifetime is not None and now - state[1] >= self.nonce_lifetime:
            stale = True
        if stale:
            self._challenge(msg, local, src, 438, "Stale Nonce", now)
            return None
        assert state is not None
        self._nonces[nonce] = (state[0] - 1, state[1])
        return key

    def _password_for(self, username: str, now: float) -> str | None:
        expiry_text, sep, salt = username.partition(":")
        if not sep or not expiry_text.isdigit():
            return None
        expiry = int(expiry_text)
        if expiry < SIM_EPOCH + now:
            return None
        return firezone_password(expiry, self.secret, salt)

    def _allocate(self, msg: stun.StunMessage, src: Address, local: Address, key: bytes, now: float) -> None:
        existing = self._allocations.get(src)
        if existing is not None and existing.expires > now:
            self._reply(local, src, self._error(msg, 437, "Allocation Mismatch"), key)
            return
        transport = msg.get(stun.Attr.REQUESTED_TRANSPORT)
        if transport is None or len(transport) < 1 or transport[0] != UDP_TRANSPORT:
            self._reply(local, src, self._error(msg, 442, "Unsupported Transport Protocol"), key)
            return
        families = {FAMILY_IPV4}
        extra = msg.get(stun.Attr.ADDITIONAL_ADDRESS_FAMILY)
        if extra and extra[0] == FAMILY_IPV6:
            families.add(FAMILY_IPV6)
        relayed: list[Address] = []
        port = self._allocate_port()
        for ip in self.host.addresses:
            family = FAMILY_IPV6 if ipaddress.ip_address(ip).version == 6 else FAMILY_IPV4
            if family in families and all(
                ipaddress.ip_address(r[0]).version != ipaddress.ip_address(ip).version for r in relayed
            ):
                relayed.append((ip, port))
        if not relayed:
            self._reply(local, src, self._error(msg, 440, "Address Family not Supported"), key)
            return
        lifetime = self._lifetime(msg)
        username = (msg.get(stun.Attr.USERNAME) or b"").decode(errors="replace")
        allocation = _Allocation(src, username, key, relayed, now + lifetime)
        self._allocations[src] = allocation
        for address in relayed:
            self._by_relayed[address] = allocation
            self.host.bind(address[1], self._on_relayed, ip=address[0])
        response = self._response(msg)
        for address in relayed:
            response.add_xor_address(stun.Attr.XOR_RELAYED_ADDRESS, address)
        response.add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, src)
        response.add_lifetime(lifetime)
        self._reply(local, src, response, key)

    def _allocate_port(self) -> int:
        port = self._next_port
        self._next_port += 1
        return port

    def _lifetime(self, msg: stun.StunMessage) -> int:
        raw = msg.get(stun.Attr.LIFETIME)
        if raw is None or len(raw) != 4:
            return DEFAULT_LIFETIME
        return min(int.from_bytes(raw, "big"), MAX_LIFETIME)

    def _live_allocation(self, src: Address, now: float) -> _Allocation | None:
        allocation = self._allocations.get(src)
        if allocation is None:
            return None
        if allocation.expires <= now:
            self._delete(allocation)
            return None
        return allocation

    def _delete(self, allocation: _Allocation) -> None:
        self._allocations.pop(allocation.client, None)
        for address in allocation.relayed:
            self._by_relayed.pop(address, None)
            self.host.unbind(address[1], ip=address[0])

    def _refresh(self, msg: stun.StunMessage, src: Address, local: Address, key: bytes, now: float) -> None:
        allocation = self._live_allocation(src, now)
        if allocation is None:
            self._reply(local, src, self._error(msg, 437, "Allocation Mismatch"), key)
            return
        lifetime = self._lifetime(msg)
        if lifetime == 0:
            self._delete(allocation)
        else:
            allocation.expires = now + lifetime
        response = self._response(msg)
        response.add_lifetime(lifetime)
        self._reply(local, src, response, key)

    def _channel_bind(self, msg: stun.StunMessage, src: Address, local: Address, key: bytes, now: float) -> None:
        allocation = self._live_allocation(src, now)
        if allocation is None:
            self._reply(local, src, self._error(msg, 437, "Allocation Mismatch"), key)
            return
        number_raw = msg.get(stun.Attr.CHANNEL_NUMBER)
        peer = msg.xor_address(stun.Attr.XOR_PEER_ADDRESS)
        if number_raw is None or len(number_raw) != 4 or peer is None:
            self._reply(local, src, self._error(msg, 400, "Bad Request"), key)
            return
        number = struct.unpack("!H", number_raw[:2])[0]
        current = allocation.channels.get(number)
        if current is not None and current[0] != peer and now >= current[1] + CHANNEL_REBIND_TIMEOUT:
            del allocation.channels[number]  # expired long enough ago: the number may serve another peer now
            current = None
        other_channel = allocation.channel_for(peer, now)
        if (
            not FIRST_CHANNEL <= number <= LAST_CHANNEL
            or (current is not None and current[0] != peer)
            or (other_channel is not None and other_channel != number)
        ):
            self._reply(local, src, self._error(msg, 400, "Bad Request"), key)
            return
        allocation.channels[number] = (peer, now + CHANNEL_LIFETIME)
        allocation.permissions[peer[0]] = now + PERMISSION_LIFETIME
        self._reply(local, src, self._response(msg), key)

    def _on_channel_data(self, data: bytes, src: Address, now: float) -> None:
        if len(data) < 4:
            self.drops.drop(RelayDropReason.BAD_CHANNEL_DATA)
            return
        number, length = struct.unpack_from("!HH", data)
        if len(data) - 4 < length:
            self.drops.drop(RelayDropReason.BAD_CHANNEL_DATA)
            return
        allocation = self._live_allocation(src, now)
        if allocation is None:
            self.drops.drop(RelayDropReason.NO_ALLOCATION)
            return
        bound = allocation.channels.get(number)
        if bound is None or bound[1] <= now:
            self.drops.drop(RelayDropReason.UNKNOWN_CHANNEL)
            return
        peer = bound[0]
        version = ipaddress.ip_address(peer[0]).version
        relayed = next((r for r in allocation.relayed if ipaddress.ip_address(r[0]).version == version), None)
        if relayed is None:
            self.drops.drop(RelayDropReason.NO_PERMISSION)
            return
        self.host.send(relayed, peer, data[4 : 4 + length])

    # -- relayed ports: datagrams from peers ------------------------------------------------------------------

    def _on_relayed(self, data: bytes, src: Address, local: Address, now: float) -> None:
        allocation = self._by_relayed.get(local)
        if allocation is None or allocation.expires <= now:
            self.drops.drop(RelayDropReason.NO_ALLOCATION)
            return
        if allocation.permissions.get(src[0], 0.0) <= now:
            self.drops.drop(RelayDropReason.NO_PERMISSION)
            return
        number = allocation.channel_for(src, now)
        control = next(
            a
            for a in self.addresses
            if ipaddress.ip_address(a[0]).version == ipaddress.ip_address(allocation.client[0]).version
        )
        if number is None:
            indication = stun.StunMessage.indication(stun.Method.DATA, self._next_indication_id())
            indication.add_xor_address(stun.Attr.XOR_PEER_ADDRESS, src).add(stun.Attr.DATA, data)
            self.host.send(control, allocation.client, stun.encode(indication, fingerprint=True))
            return
        self.host.send(control, allocation.client, struct.pack("!HH", number, len(data)) + data)
