"""A transport keypair: cached AEAD objects, the send counter and the receive replay window."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MESSAGE_TRANSPORT_HEADER_SIZE, PADDING_MULTIPLE, REJECT_AFTER_MESSAGES
from .noise import SessionKeys
from .replay import ReplayFilter

_TRANSPORT_TYPE = b"\x04\x00\x00\x00"
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_PADDING = bytes(PADDING_MULTIPLE)


class Keypair:
    """One direction pair of transport keys. ``created`` is the monotonic time the handshake derived it."""

    __slots__ = (
        "created",
        "header_prefix",
        "is_initiator",
        "local_index",
        "receive_aead",
        "receive_key",
        "remote_index",
        "replay",
        "send_aead",
        "send_counter",
        "send_key",
    )

    def __init__(self, keys: SessionKeys, created: float, *, replay_limit: int = REJECT_AFTER_MESSAGES) -> None:
        # The batch paths (dataplane.native seal_batch/open_batch) take the keys; seal/open use the AEAD objects.
        self.send_key = keys.send_key
        self.receive_key = keys.receive_key
        self.send_aead = ChaCha20Poly1305(keys.send_key)
        self.receive_aead = ChaCha20Poly1305(keys.receive_key)
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.is_initiator = keys.is_initiator
        self.created = created
        self.send_counter = 0
        self.replay = ReplayFilter(replay_limit)
        self.header_prefix = _TRANSPORT_TYPE + keys.remote_index.to_bytes(4, "little")

    def seal(self, packet: bytes, mtu: int | None = None) -> bytes:
        """One transport message for ``packet`` (padded to 16 bytes, never beyond ``mtu``); advances the counter.

        The caller checks ``send_counter < REJECT_AFTER_MESSAGES`` first.
        """
        size = len(packet)
        padding = -size % PADDING_MULTIPLE
        if padding:
            if mtu is not None and size + padding > mtu:
                padding = max(mtu - size, 0)
            packet = packet + _PADDING[:padding]
        counter_bytes = self.send_counter.to_bytes(8, "little")
        self.send_counter += 1
        return self.header_prefix + counter_bytes + self.send_aead.encrypt(_NONCE_PREFIX + counter_bytes, packet, None)

    def open(self, message: bytes) -> bytes | None:
        """The padded plaintext of a transport message for this keypair, or None when it does not authenticate.

        Replay is checked separately, after authentication (``replay.validate``), as wireguard-go does.
        """
        try:
            return self.receive_aead.decrypt(
                _NONCE_PREFIX + message[8:16], memoryview(message)[MESSAGE_TRANSPORT_HEADER_SIZE:], None
            )
        except InvalidTag:
            return None
