"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it (whitepaper §5.4.2-5.4.4), as pure functions.

Callers inject the ephemeral private key, the sender index and the timestamp, so known-answer vectors can be replayed.
MACs are not added here (see cookie.py); message bodies stop where mac1 starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import CONSTRUCTION, IDENTIFIER, KEY_SIZE, MESSAGE_INITIATION, MESSAGE_RESPONSE
from .crypto import (
    PrivateKey,
    aead_decrypt,
    aead_encrypt,
    blake2s_hash,
    dh,
    kdf1,
    kdf2,
    kdf3,
    load_private_key,
    public_key,
)
from .messages import INITIATION_MAC1_OFFSET, RESPONSE_MAC1_OFFSET

INITIAL_CHAIN_KEY = blake2s_hash(CONSTRUCTION)
INITIAL_HASH = blake2s_hash(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_PRESHARED_KEY = bytes(KEY_SIZE)
_EMPTY = b""


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Transport keys derived by a completed handshake."""

    send_key: bytes
    receive_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool
    handshake_hash: bytes = b""


@dataclass(frozen=True, slots=True)
class InitiatorState:
    """What the initiator keeps between sending an initiation and receiving its response."""

    chain_key: bytes
    hash: bytes
    ephemeral_private: PrivateKey
    sender_index: int


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    """A decrypted initiation: who sent it and the state the responder continues from."""

    remote_static: bytes
    timestamp: bytes
    chain_key: bytes
    hash: bytes
    remote_ephemeral: bytes
    sender_index: int


def initial_hash_for(responder_static_public: bytes, prologue: bytes = IDENTIFIER) -> bytes:
    """h after the prologue and the pre-message "<- s" (WireGuard's prologue is its identifier string)."""
    base = INITIAL_HASH if prologue == IDENTIFIER else blake2s_hash(INITIAL_CHAIN_KEY, prologue)
    return blake2s_hash(base, responder_static_public)


def _mix_key_and_encrypt(ck: bytes, h: bytes, shared: bytes, plaintext: bytes) -> tuple[bytes, bytes, bytes]:
    """Noise MixKey(shared) then EncryptAndHash(plaintext): (chain key, hash, ciphertext)."""
    ck, key = kdf2(ck, shared)
    ciphertext = aead_encrypt(key, 0, plaintext, h)
    return ck, blake2s_hash(h, ciphertext), ciphertext


def _mix_key_and_decrypt(ck: bytes, h: bytes, shared: bytes, ciphertext: bytes) -> tuple[bytes, bytes, bytes] | None:
    """Noise MixKey(shared) then DecryptAndHash(ciphertext): (chain key, hash, plaintext), None when it does not
    authenticate."""
    ck, key = kdf2(ck, shared)
    plaintext = aead_decrypt(key, 0, ciphertext, h)
    if plaintext is None:
        return None
    return ck, blake2s_hash(h, ciphertext), plaintext


def _mix_response_keys(
    ck: bytes, h: bytes, ephemeral: bytes, ee: bytes, se: bytes, preshared_key: bytes | None
) -> tuple[bytes, bytes, bytes]:
    """The response's "e", "ee", "se" and "psk" tokens over the state the initiation left (both sides compute the same
    DH results from their own keys): (chain key, hash, key for the empty payload)."""
    ck = kdf1(kdf1(kdf1(ck, ephemeral), ee), se)
    ck, tau, key = kdf3(ck, preshared_key or ZERO_PRESHARED_KEY)
    return ck, blake2s_hash(blake2s_hash(h, ephemeral), tau), key


def create_initiation(
    *,
    static_private: PrivateKey,
    remote_static: bytes,
    ephemeral_private: PrivateKey,
    sender_index: int,
    timestamp: bytes,
    static_static: bytes | None = None,
    prologue: bytes = IDENTIFIER,
) -> tuple[bytes, InitiatorState] | None:
    """The 116-byte initiation body (type..encrypted timestamp), or None when a DH result is all zero.

    ``timestamp`` is the Noise payload of the first message (any length outside WireGuard, for test vectors).
    """
    h = initial_hash_for(remote_static, prologue)
    ephemeral_private = load_private_key(ephemeral_private)
    ephemeral_public = public_key(ephemeral_private)
    ck = kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    h = blake2s_hash(h, ephemeral_public)
    es = dh(ephemeral_private, remote_static)
    if es is None:
        return None
    ck, h, encrypted_static = _mix_key_and_encrypt(ck, h, es, public_key(static_private))
    ss = static_static if static_static is not None else dh(static_private, remote_static)
    if ss is None:
        return None
    ck, h, encrypted_timestamp = _mix_key_and_encrypt(ck, h, ss, timestamp)
    body = (
        MESSAGE_INITIATION.to_bytes(4, "little")
        + sender_index.to_bytes(4, "little")
        + ephemeral_public
        + encrypted_static
        + encrypted_timestamp
    )
    return body, InitiatorState(ck, h, ephemeral_private, sender_index)


def consume_initiation(
    *,
    static_private: PrivateKey,
    static_public: bytes,
    message: bytes,
    body_size: int = INITIATION_MAC1_OFFSET,
    prologue: bytes = IDENTIFIER,
) -> ConsumedInitiation | None:
    """Decrypt an initiation addressed to us (mac1 already checked); None when it does not authenticate."""
    if len(message) < body_size or body_size < 88 + 16:
        return None
    sender_index = int.from_bytes(message[4:8], "little")
    ephemeral = message[8:40]
    encrypted_static = message[40:88]
    encrypted_timestamp = message[88:body_size]
    static_private = load_private_key(static_private)
    h = initial_hash_for(static_public, prologue)
    ck = kdf1(INITIAL_CHAIN_KEY, ephemeral)
    h = blake2s_hash(h, ephemeral)
    es = dh(static_private, ephemeral)
    if es is None:
        return None
    static_step = _mix_key_and_decrypt(ck, h, es, encrypted_static)
    if static_step is None:
        return None
    ck, h, remote_static = static_step
    ss = dh(static_private, remote_static)
    if ss is None:
        return None
    timestamp_step = _mix_key_and_decrypt(ck, h, ss, encrypted_timestamp)
    if timestamp_step is None:
        return None
    ck, h, timestamp = timestamp_step
    return ConsumedInitiation(remote_static, timestamp, ck, h, ephemeral, sender_index)


def create_response(
    initiation: ConsumedInitiation,
    *,
    ephemeral_private: PrivateKey,
    sender_index: int,
    preshared_key: bytes | None,
    payload: bytes = _EMPTY,
) -> tuple[bytes, SessionKeys] | None:
    """The 60-byte response body and the responder's transport keys (``payload`` is empty in WireGuard)."""
    ephemeral_private = load_private_key(ephemeral_private)
    ephemeral_public = public_key(ephemeral_private)
    ee = dh(ephemeral_private, initiation.remote_ephemeral)
    se = dh(ephemeral_private, initiation.remote_static)
    if ee is None or se is None:
        return None
    ck, h, key = _mix_response_keys(initiation.chain_key, initiation.hash, ephemeral_public, ee, se, preshared_key)
    encrypted_nothing = aead_encrypt(key, 0, payload, h)
    h = blake2s_hash(h, encrypted_nothing)
    body = (
        MESSAGE_RESPONSE.to_bytes(4, "little")
        + sender_index.to_bytes(4, "little")
        + initiation.sender_index.to_bytes(4, "little")
        + ephemeral_public
        + encrypted_nothing
    )
    initiator_send, responder_send = kdf2(ck, _EMPTY)
    keys = SessionKeys(
        send_key=responder_send,
        receive_key=initiator_send,
        local_index=sender_index,
        remote_index=initiation.sender_index,
        is_initiator=False,
        handshake_hash=h,
    )
    return body, keys


def consume_response(
    state: InitiatorState,
    *,
    static_private: PrivateKey,
    preshared_key: bytes | None,
    message: bytes,
    body_size: int = RESPONSE_MAC1_OFFSET,
) -> SessionKeys | None:
    """Complete the handshake from a response (mac1 already checked); None when it does not authenticate."""
    if len(message) < body_size or body_size < 44 + 16:
        return None
    sender_index = int.from_bytes(message[4:8], "little")
    ephemeral = message[12:44]
    encrypted_nothing = message[44:body_size]
    ee = dh(state.ephemeral_private, ephemeral)
    se = dh(static_private, ephemeral)
    if ee is None or se is None:
        return None
    ck, h, key = _mix_response_keys(state.chain_key, state.hash, ephemeral, ee, se, preshared_key)
    if aead_decrypt(key, 0, encrypted_nothing, h) is None:
        return None
    h = blake2s_hash(h, encrypted_nothing)
    initiator_send, responder_send = kdf2(ck, _EMPTY)
    return SessionKeys(
        send_key=initiator_send,
        receive_key=responder_send,
        local_index=state.sender_index,
        remote_index=sender_index,
        is_initiator=True,
        handshake_hash=h,
    )
