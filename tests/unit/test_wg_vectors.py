"""Known-answer tests for the WireGuard core from tests/vectors (KDF, Noise IKpsk2, messages, mac1, replay)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from dataplane.io.rng import SeededRng
from dataplane.wireguard import crypto, noise
from dataplane.wireguard.cookie import CookieChecker, CookieGenerator, mac1_key
from dataplane.wireguard.replay import WINDOW_SIZE, ReplayFilter
from dataplane.wireguard.session import Keypair
from tests.vectors import load_vectors

_load = load_vectors


x = bytes.fromhex


@pytest.mark.parametrize("index", range(3))
def test_kdf_vectors(index: int) -> None:
    vector = _load("wireguard-kdf.json")["vectors"][index]
    key, data = x(vector["key_hex"]), x(vector["input_hex"])
    t0, t1, t2 = x(vector["t0_hex"]), x(vector["t1_hex"]), x(vector["t2_hex"])
    assert crypto.hmac_blake2s(key, data) == x(vector["prk_hex"])
    assert crypto.kdf1(key, data) == t0
    assert crypto.kdf2(key, data) == (t0, t1)
    assert crypto.kdf3(key, data) == (t0, t1, t2)


def test_cacophony_ikpsk2() -> None:
    vector = _load("noise-ikpsk2.json")["vectors"][0]
    prologue = x(vector["init_prologue"])
    psk = x(vector["init_psks"][0])
    messages = vector["messages"]
    created = noise.create_initiation(
        static_private=x(vector["init_static"]),
        remote_static=x(vector["init_remote_static"]),
        ephemeral_private=x(vector["init_ephemeral"]),
        sender_index=7,
        timestamp=x(messages[0]["payload"]),
        prologue=prologue,
    )
    assert created is not None
    body, state = created
    # WireGuard frames Noise message 1 behind a type and a sender index.
    assert body[8:] == x(messages[0]["ciphertext"])
    consumed = noise.consume_initiation(
        static_private=x(vector["resp_static"]),
        static_public=crypto.public_key(x(vector["resp_static"])),
        message=body,
        body_size=len(body),
        prologue=prologue,
    )
    assert consumed is not None
    assert consumed.timestamp == x(messages[0]["payload"])
    assert consumed.remote_static == crypto.public_key(x(vector["init_static"]))
    response = noise.create_response(
        consumed,
        ephemeral_private=x(vector["resp_ephemeral"]),
        sender_index=9,
        preshared_key=psk,
        payload=x(messages[1]["payload"]),
    )
    assert response is not None
    response_body, responder_keys = response
    assert response_body[12:] == x(messages[1]["ciphertext"])
    initiator_keys = noise.consume_response(
        state,
        static_private=x(vector["init_static"]),
        preshared_key=psk,
        message=response_body,
        body_size=len(response_body),
    )
    assert initiator_keys is not None
    assert initiator_keys.handshake_hash == responder_keys.handshake_hash == x(vector["handshake_hash"])
    # Transport messages alternate initiator -> responder, responder -> initiator, nonces from 0 per direction.
    counters = {"initiator": 0, "responder": 0}
    for i, message in enumerate(messages[2:]):
        sender = "initiator" if i % 2 == 0 else "responder"
        key = initiator_keys.send_key if sender == "initiator" else responder_keys.send_key
        ciphertext = crypto.aead_encrypt(key, counters[sender], x(message["payload"]), b"")
        counters[sender] += 1
        assert ciphertext == x(message["ciphertext"])


def test_cacophony_wrong_psk_fails() -> None:
    vector = _load("noise-ikpsk2.json")["vectors"][0]
    created = noise.create_initiation(
        static_private=x(vector["init_static"]),
        remote_static=x(vector["init_remote_static"]),
        ephemeral_private=x(vector["init_ephemeral"]),
        sender_index=1,
        timestamp=b"",
    )
    assert created is not None
    body, state = created
    consumed = noise.consume_initiation(
        static_private=x(vector["resp_static"]),
        static_public=x(vector["init_remote_static"]),
        message=body,
        body_size=len(body),
    )
    assert consumed is not None
    response = noise.create_response(
        consumed, ephemeral_private=x(vector["resp_ephemeral"]), sender_index=2, preshared_key=bytes(32)
    )
    assert response is not None
    wrong = noise.consume_response(
        state, static_private=x(vector["init_static"]), preshared_key=b"\x01" * 32, message=response[0]
    )
    assert wrong is None


def _handshakes() -> list[dict[str, Any]]:
    handshakes: list[dict[str, Any]] = _load("wireguard-handshake-messages.json")["handshakes"]
    assert len(handshakes) == 2
    return handshakes


def test_initial_chain_values() -> None:
    constants = _load("wireguard-handshake-messages.json")["constants"]
    assert noise.INITIAL_CHAIN_KEY == x(constants["initial_chaining_key_hex"])
    assert noise.INITIAL_HASH == x(constants["initial_hash_hex"])


@pytest.mark.parametrize("handshake", _handshakes(), ids=lambda h: h["name"])
def test_wireguard_handshake_messages(handshake: dict[str, Any]) -> None:
    data = _load("wireguard-handshake-messages.json")
    keys = data["keys"]
    initiator_private = x(keys["initiator_static_private_hex"])
    responder_private = x(keys["responder_static_private_hex"])
    responder_public = x(keys["responder_static_public_hex"])
    initiator_public = x(keys["initiator_static_public_hex"])
    psk = x(handshake["preshared_key_hex"])
    assert crypto.public_key(initiator_private) == initiator_public
    timestamp = x(handshake["timestamp_tai64n_hex"])
    assert crypto.tai64n(data["timestamp"]["unix_seconds"]) == timestamp

    created = noise.create_initiation(
        static_private=initiator_private,
        remote_static=responder_public,
        ephemeral_private=x(keys["initiator_ephemeral_private_hex"]),
        sender_index=handshake["initiator_sender_index"],
        timestamp=timestamp,
    )
    assert created is not None
    body, state = created
    initiation = x(handshake["handshake_initiation"]["packet_hex"])
    assert mac1_key(responder_public) == x(handshake["handshake_initiation"]["mac1_key_hex"])
    assert CookieGenerator(responder_public).add_macs(body, 0.0) == initiation
    assert state.chain_key == x(handshake["handshake_initiation"]["chaining_key_after_hex"])
    assert state.hash == x(handshake["handshake_initiation"]["hash_after_hex"])

    checker = CookieChecker(responder_public, SeededRng(0))
    assert checker.check_mac1(initiation)
    consumed = noise.consume_initiation(
        static_private=responder_private, static_public=responder_public, message=initiation
    )
    assert consumed is not None
    assert consumed.remote_static == initiator_public and consumed.timestamp == timestamp
    response = noise.create_response(
        consumed,
        ephemeral_private=x(keys["responder_ephemeral_private_hex"]),
        sender_index=handshake["responder_sender_index"],
        preshared_key=psk,
    )
    assert response is not None
    response_body, responder_keys = response
    response_packet = x(handshake["handshake_response"]["packet_hex"])
    assert CookieGenerator(initiator_public).add_macs(response_body, 0.0) == response_packet
    assert CookieChecker(initiator_public, SeededRng(0)).check_mac1(response_packet)

    initiator_keys = noise.consume_response(
        state, static_private=initiator_private, preshared_key=psk, message=response_packet
    )
    assert initiator_keys is not None
    transport = handshake["transport_keys"]
    assert initiator_keys.send_key == x(transport["initiator_send_hex"]) == responder_keys.receive_key
    assert initiator_keys.receive_key == x(transport["initiator_receive_hex"]) == responder_keys.send_key

    sides = {
        "initiator_to_responder": (Keypair(initiator_keys, 0.0), Keypair(responder_keys, 0.0)),
        "responder_to_initiator": (Keypair(responder_keys, 0.0), Keypair(initiator_keys, 0.0)),
    }
    for message in handshake["transport_messages"]:
        sender, receiver = sides[message["direction"]]
        assert sender.send_counter == message["counter"]
        packet = sender.seal(x(message["plaintext_hex"]))
        assert packet == x(message["packet_hex"])
        assert receiver.open(packet) == x(message["plaintext_hex"])


def test_public_mac1_vectors() -> None:
    for vector in _load("wireguard-handshake-messages.json")["public_mac1_vectors"]:
        public = x(vector["responder_public_key_hex"])
        packet = x(vector["packet_hex"])
        assert mac1_key(public) == x(vector["mac1_key_hex"])
        assert crypto.mac(mac1_key(public), packet[:116]) == x(vector["expected_mac1_hex"])
        checker = CookieChecker(public, SeededRng(0))
        assert checker.check_mac1(packet) is vector["mac1_valid"]
        tampered = bytearray(packet)
        tampered[20] ^= 1
        assert not checker.check_mac1(bytes(tampered))


def _expand(steps: list[dict[str, Any]]) -> list[tuple[int, bool]]:
    out: list[tuple[int, bool]] = []
    for step in steps:
        if "counter_range" in step:
            r = step["counter_range"]
            out.extend((c, step["accept"]) for c in range(r["first"], r["last"] + r["step"], r["step"]))
        else:
            out.append((step["counter"], step["accept"]))
    return out


def test_replay_suites() -> None:
    data = _load("wireguard-replay.json")
    assert data["window_size"] == WINDOW_SIZE
    checked = 0
    for suite in data["suites"]:
        for phase in suite["phases"]:
            replay = ReplayFilter(limit=suite["limit"])
            steps = _expand(phase["steps"])
            assert len(steps) == phase["expanded_length"]
            results = [replay.validate(counter) for counter, _ in steps]
            assert results == [accept for _, accept in steps], (suite["name"], phase["name"])
            assert sum(results) == phase["accept_count"]
            checked += len(steps)
    assert checked > 90_000


_MASK32 = 0xFFFFFFFF


def hchacha20_rounds(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 as draft-irtf-cfrg-xchacha §2.2 specifies it: the ChaCha20 state (constants, key, nonce), 20 rounds
    without the final addition, words 0-3 and 12-15. The oracle for the fast path in crypto.py."""
    state = [*struct.unpack("<4I", b"expand 32-byte k"), *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]

    def quarter_round(a: int, b: int, c: int, d: int) -> None:
        for left, right, target, shift in ((a, b, d, 16), (c, d, b, 12), (a, b, d, 8), (c, d, b, 7)):
            state[left] = (state[left] + state[right]) & _MASK32
            mixed = state[target] ^ state[left]
            state[target] = ((mixed << shift) | (mixed >> (32 - shift))) & _MASK32

    for _ in range(10):
        for a, b, c, d in ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)):  # columns
            quarter_round(a, b, c, d)
        for a, b, c, d in ((0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)):  # diagonals
            quarter_round(a, b, c, d)
    return struct.pack("<8I", *state[0:4], *state[12:16])


def test_hchacha20_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    key = x("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
    nonce = x("000000090000004a0000000031415927")
    expected = x("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    assert crypto.hchacha20(key, nonce) == expected
    assert hchacha20_rounds(key, nonce) == expected


def test_hchacha20_fast_path_matches_the_rounds() -> None:
    rng = SeededRng(12)
    for _ in range(200):
        key, nonce = rng.random_bytes(32), rng.random_bytes(16)
        assert crypto.hchacha20(key, nonce) == hchacha20_rounds(key, nonce)
    # counter words near 2^32 must not carry into the nonce words
    key = rng.random_bytes(32)
    for nonce in (b"\xff" * 16, b"\xff\xff\xff\xff" + bytes(12), bytes(16)):
        assert crypto.hchacha20(key, nonce) == hchacha20_rounds(key, nonce)


def test_xchacha20_poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 §A.3.1
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
        b"sunscreen would be it."
    )
    aad = x("50515253c0c1c2c3c4c5c6c7")
    key = x("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
    nonce = x("404142434445464748494a4b4c4d4e4f5051525354555657")
    sealed = crypto.xaead_encrypt(key, nonce, plaintext, aad)
    assert sealed[-16:] == x("c0875924c1c7987947deafd8780acf49")
    assert sealed[:16] == x("bd6d179d3e83d43b9576579493c0e939")
    assert crypto.xaead_decrypt(key, nonce, sealed, aad) == plaintext
    assert crypto.xaead_decrypt(key, nonce, sealed, aad + b"x") is None


def test_tai64n_clears_low_nanosecond_bits_and_orders() -> None:
    a = crypto.tai64n(1704067200.5)
    b = crypto.tai64n(1704067201.0)
    assert len(a) == 12 and a < b
    assert int.from_bytes(a[8:], "big") & 0xFFFFFF == 0
