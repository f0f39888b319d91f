"""WireGuard's primitives: BLAKE2s HASH/MAC/HMAC/KDF, X25519, (X)ChaCha20-Poly1305 and TAI64N.

XChaCha20-Poly1305 is only used for cookie replies; ``cryptography`` has none, so the HChaCha20 subkey is derived
from one native ChaCha20 block (see :func:`hchacha20`) and fed to ChaCha20-Poly1305.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "blake2s_hash",
    "dh",
    "hchacha20",
    "hmac_blake2s",
    "kdf1",
    "kdf2",
    "kdf3",
    "load_private_key",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

_ZERO_NONCE_PREFIX = b"\x00\x00\x00\x00"
_TAI64_BASE = 0x400000000000000A
_blake2s = hashlib.blake2s


def blake2s_hash(*parts: bytes) -> bytes:
    h = _blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s-128 (WireGuard's MAC; not an HMAC)."""
    return _blake2s(data, digest_size=16, key=key).digest()


_HMAC_BLOCK = 64
_TRANS_36 = bytes(x ^ 0x36 for x in range(256))
_TRANS_5C = bytes(x ^ 0x5C for x in range(256))


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104), written out because ``hmac.new`` with a BLAKE2 constructor is slow."""
    if len(key) > _HMAC_BLOCK:
        key = _blake2s(key).digest()
    key = key.ljust(_HMAC_BLOCK, b"\x00")
    inner = _blake2s(key.translate(_TRANS_36))
    inner.update(data)
    outer = _blake2s(key.translate(_TRANS_5C))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    prk = hmac_blake2s(key, data)
    return hmac_blake2s(prk, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t0 = hmac_blake2s(prk, b"\x01")
    return t0, hmac_blake2s(prk, t0 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    prk = hmac_blake2s(key, data)
    t0 = hmac_blake2s(prk, b"\x01")
    t1 = hmac_blake2s(prk, t0 + b"\x02")
    return t0, t1, hmac_blake2s(prk, t1 + b"\x03")


PrivateKey = bytes | X25519PrivateKey
"""A static or ephemeral X25519 private key: raw bytes, or loaded once with :func:`load_private_key`.

Loading costs about as much as two exchanges (OpenSSL derives the public key), so long-lived keys are loaded once.
"""


def load_private_key(private_key: PrivateKey) -> X25519PrivateKey:
    if isinstance(private_key, X25519PrivateKey):
        return private_key
    return X25519PrivateKey.from_private_bytes(private_key)


def public_key(private_key: PrivateKey) -> bytes:
    return load_private_key(private_key).public_key().public_bytes_raw()


def dh(private_key: PrivateKey, peer_public_key: bytes) -> bytes | None:
    """X25519; None when the peer's point is of low order (an all-zero shared secret), which WireGuard rejects."""
    try:
        return load_private_key(private_key).exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError:
        return None


def aead_nonce(counter: int) -> bytes:
    return _ZERO_NONCE_PREFIX + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, associated_data: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, associated_data)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, associated_data: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), ciphertext, associated_data)
    except InvalidTag:
        return None


_MASK32 = 0xFFFFFFFF
_ZERO_BLOCK = bytes(64)
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2) from one native ChaCha20 block.

    A ChaCha20 block is the permuted state plus the input state; HChaCha20 is the permuted state itself (words 0-3
    and 12-15). With ``nonce16`` as ChaCha20's counter-and-nonce, words 0-3 of the input are the constants and words
    12-15 are ``nonce16``, so subtracting them recovers HChaCha20. This is ~10x faster than the rounds in Python
    (tests/unit/test_wg_vectors.py checks it against them), which matters because cookie replies are what a device
    sends while flooded.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZERO_BLOCK)
    words = struct.unpack("<16I", block)
    n0, n1, n2, n3 = struct.unpack("<4I", nonce16)
    m = _MASK32
    return struct.pack(
        "<8I",
        (words[0] - _SIGMA[0]) & m,
        (words[1] - _SIGMA[1]) & m,
        (words[2] - _SIGMA[2]) & m,
        (words[3] - _SIGMA[3]) & m,
        (words[12] - n0) & m,
        (words[13] - n1) & m,
        (words[14] - n2) & m,
        (words[15] - n3) & m,
    )


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey).encrypt(_ZERO_NONCE_PREFIX + nonce24[16:], plaintext, associated_data)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, associated_data: bytes) -> bytes | None:
    subkey = hchacha20(key, nonce24[:16])
    try:
        return ChaCha20Poly1305(subkey).decrypt(_ZERO_NONCE_PREFIX + nonce24[16:], ciphertext, associated_data)
    except InvalidTag:
        return None


def tai64n(unix_seconds: float) -> bytes:
    """TAI64N label; the low 24 bits of the nanoseconds are cleared, as wireguard-go does, to blur timing."""
    seconds = int(unix_seconds)
    nanoseconds = int((unix_seconds - seconds) * 1e9) & ~0xFFFFFF
    return struct.pack(">QI", _TAI64_BASE + seconds, max(nanoseconds, 0))
