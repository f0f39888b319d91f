"""STUN client transactions as deadline ladders, on a fake clock."""

from __future__ import annotations

import pytest

from dataplane.stun import RFC8489_POLICY, TURN_POLICY, RetransmitPolicy, Transaction, TransactionStep


def _run(policy: RetransmitPolicy) -> tuple[list[float], float]:
    """Drives a transaction by jumping to each deadline; returns send times and the give-up time."""
    txn = Transaction(b"\x00" * 12, b"req", ("192.0.2.1", 3478), policy, now=0.0)
    sends = [0.0]
    while True:
        deadline = txn.poll_timeout()
        assert deadline is not None
        assert txn.handle_timeout(deadline - 1e-6) is TransactionStep.WAIT
        step = txn.handle_timeout(deadline)
        if step is TransactionStep.GAVE_UP:
            assert txn.gave_up and txn.poll_timeout() is None
            return sends, deadline
        assert step is TransactionStep.RETRANSMIT
        sends.append(deadline)


def test_turn_policy_retransmits_at_1_3_7_and_gives_up_at_8_seconds() -> None:
    sends, gave_up = _run(TURN_POLICY)
    assert sends == [0.0, 1.0, 3.0, 7.0]
    assert gave_up == 8.0
    assert TURN_POLICY.schedule() == (sends, gave_up)


def test_rfc8489_default_ladder_gives_up_after_39_5_seconds() -> None:
    sends, gave_up = _run(RFC8489_POLICY)
    assert sends == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert gave_up == pytest.approx(39.5)
    assert len(sends) == 7


def test_ice_style_capped_ladder() -> None:
    # Firezone's client profile: 250 ms initial, capped at 1.5 s, 12 retransmits after the first send.
    policy = RetransmitPolicy(initial_rto=0.25, max_rto=1.5, max_transmissions=13)
    sends, gave_up = _run(policy)
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert gaps[:3] == [0.25, 0.5, 1.0]
    assert all(g == 1.5 for g in gaps[3:])
    assert len(sends) == 13
    assert gave_up == pytest.approx(sends[-1] + 1.5)


def test_late_timer_retransmits_once_and_reschedules_from_the_actual_send() -> None:
    txn = Transaction(b"\x01" * 12, b"req", ("192.0.2.1", 3478), TURN_POLICY, now=10.0)
    assert txn.poll_timeout() == 11.0
    assert txn.handle_timeout(11.5) is TransactionStep.RETRANSMIT
    assert txn.poll_timeout() == 13.5
    assert txn.transmissions == 2


def test_complete_stops_the_ladder_and_measures_rtt_from_last_send() -> None:
    txn = Transaction(b"\x02" * 12, b"req", ("192.0.2.1", 3478), TURN_POLICY, now=0.0)
    assert txn.handle_timeout(1.0) is TransactionStep.RETRANSMIT
    assert txn.complete(1.25) == pytest.approx(0.25)
    assert txn.poll_timeout() is None
    assert txn.handle_timeout(100.0) is TransactionStep.WAIT
    assert not txn.gave_up


def test_policy_misuse_raises() -> None:
    with pytest.raises(ValueError):
        RetransmitPolicy(initial_rto=1.0)
    with pytest.raises(ValueError):
        RetransmitPolicy(initial_rto=0.0, max_elapsed=1.0)
