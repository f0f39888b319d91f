"""dataplane.io.rng.SystemRng: strong randomness where it matters, no system call per jitter draw."""

from __future__ import annotations

import os
import secrets

import pytest

from dataplane.io.rng import SystemRng


def test_jitter_draws_make_no_system_call_and_stay_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = SystemRng()

    def refuse(*_: object) -> object:
        raise AssertionError("a jitter draw asked the system for randomness")

    monkeypatch.setattr(os, "urandom", refuse)
    monkeypatch.setattr(secrets, "randbits", refuse)
    monkeypatch.setattr(secrets, "token_bytes", refuse)
    draws = [rng.uniform(2.0, 3.0) for _ in range(1000)]
    assert all(2.0 <= draw <= 3.0 for draw in draws)
    assert len(set(draws)) > 990


def test_two_instances_draw_different_jitter_and_keys_stay_system_random() -> None:
    first, second = SystemRng(), SystemRng()
    assert [first.uniform(0.0, 1.0) for _ in range(4)] != [second.uniform(0.0, 1.0) for _ in range(4)]
    assert len(first.random_bytes(32)) == 32
    assert first.random_bytes(32) != first.random_bytes(32)
    assert 0 <= first.random_u32() < 2**32
    assert 0 <= first.random_u64() < 2**64
