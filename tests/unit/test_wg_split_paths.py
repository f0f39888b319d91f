"""The Device's split paths for threaded drivers give what the one-call paths give.

``prepare_send`` + ``SealJob.seal`` (sealing outside the driver's lock) must produce the very datagrams
``send_packets`` queues, with the same counters, byte counts and timers; ``open_datagrams`` + ``receive_opened``
(decrypting outside the lock) must deliver what ``receive_datagrams`` delivers, and must not trust plaintexts opened
with a keypair that is no longer the one the receiver index names.
"""

from __future__ import annotations

import copy

from dataplane.native import sealed_size
from dataplane.wireguard.device import DropReason, ReceivedRun
from tests.unit.test_wg_device import (
    ADDRESS_A,
    ADDRESS_B,
    TUNNEL6_A,
    TUNNEL6_B,
    TUNNEL_A,
    TUNNEL_B,
    Pair,
    ipv4_packet,
    ipv6_packet,
)


def _established(seed: int = 7) -> Pair:
    pair = Pair(seed=seed)
    assert pair.a_to_b(b"handshake") and pair.b_to_a(b"confirm")
    pair.a.drain_packets()
    return pair


def _burst() -> list[bytes]:
    return [ipv4_packet(TUNNEL_A, TUNNEL_B, b"x" * size) for size in (0, 1, 15, 16, 17, 1380, 1400)] + [
        ipv6_packet(TUNNEL6_A, TUNNEL6_B, b"six")
    ]


def test_prepared_jobs_seal_to_the_datagrams_send_packets_queues() -> None:
    one_call, split = _established(), _established()
    one_call.a.send_packets(_burst(), one_call.now)
    expected = one_call.a.drain_datagram_runs()

    jobs = split.a.prepare_send(_burst(), split.now)
    assert split.a.drain_datagram_runs() == []  # everything became a job: nothing for the driver to flush
    assert [(job.destination, job.seal()) for job in jobs] == expected
    assert [destination for destination, _ in expected] == [ADDRESS_B]
    assert split.peer_b.tx_bytes == one_call.peer_b.tx_bytes
    assert split.a.poll_timeout() == one_call.a.poll_timeout()

    # The next batch continues the counters after the reserved ones, and the peer accepts both batches.
    later = split.a.prepare_send([ipv4_packet(TUNNEL_A, TUNNEL_B, b"later")], split.now)
    split.b.receive_datagrams([(m, ADDRESS_A) for job in jobs + later for m in job.seal()], split.now)
    assert split.b.drain_packets() == [p for p in _burst() if len(p) > 0] + [ipv4_packet(TUNNEL_A, TUNNEL_B, b"later")]
    assert split.b.drops.total() == 0


def test_a_peer_without_a_session_is_staged_not_a_job() -> None:
    pair = Pair(seed=3)
    jobs = pair.a.prepare_send([ipv4_packet(TUNNEL_A, TUNNEL_B, b"first")], pair.now)
    assert jobs == []
    runs = pair.a.drain_datagram_runs()
    assert [destination for destination, _ in runs] == [ADDRESS_B]
    assert [len(message) for message in runs[0][1]] == [148]  # the handshake initiation; the packet waits for it
    pair.b.receive_datagrams([(message, ADDRESS_A) for message in runs[0][1]], pair.now)
    pair.pump()
    assert pair.b.drain_packets() == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"first")]


def test_packets_without_a_route_are_counted_not_jobs() -> None:
    pair = _established()
    jobs = pair.a.prepare_send([ipv4_packet(TUNNEL_A, "10.200.0.1"), b"\x00garbage"], pair.now)
    assert jobs == []
    assert pair.a.drops[DropReason.NO_ROUTE] == 1
    assert pair.a.drops[DropReason.INVALID_INNER_PACKET] == 1


def test_sealed_size_matches_the_messages() -> None:
    packets = [b"\x45" * size for size in (0, 1, 16, 1419, 1420, 1500)]
    pair = _established()
    tunn = pair.peer_b.tunn
    for mtu in (None, 1420):
        tunn.mtu = mtu
        reservation = tunn.reserve_send(packets, pair.now)
        assert reservation is not None
        assert sealed_size(packets, mtu) == sum(map(len, reservation.seal()))


def test_opened_runs_deliver_what_receive_datagrams_delivers() -> None:
    pair = _established()
    pair.a.send_packets(_burst(), pair.now)
    datagrams = [(m, ADDRESS_A) for _, messages in pair.a.drain_datagram_runs() for m in messages]
    runs = pair.b.open_datagrams(datagrams + [(b"\x09junk", ADDRESS_A)])
    assert [run.index >= 0 for run in runs] == [True, False]
    pair.b.receive_opened(runs, pair.now)
    assert pair.b.drain_packets() == [p for p in _burst() if len(p) > 0]
    assert pair.b.drops[DropReason.BAD_TYPE] == 1


def test_plaintexts_opened_with_another_keypair_are_decrypted_again() -> None:
    pair = _established()
    packet = ipv4_packet(TUNNEL_A, TUNNEL_B, b"genuine")
    pair.a.send_packets([packet], pair.now)
    datagrams = [(m, ADDRESS_A) for _, messages in pair.a.drain_datagram_runs() for m in messages]
    (run,) = pair.b.open_datagrams(datagrams)
    assert run.keypair is not None
    forged = ipv4_packet(TUNNEL_A, TUNNEL_B, b"forged!")
    # Opened by a keypair object that is not the current one for the index (as if it changed in between).
    stale = ReceivedRun(run.index, run.source, run.messages, copy.copy(run.keypair), [forged])
    pair.b.receive_opened([stale], pair.now)
    assert pair.b.drain_packets() == [packet]
    # Opened with the keypair the index still names: those plaintexts are used as they are.
    pair.a.send_packets([packet], pair.now)
    datagrams = [(m, ADDRESS_A) for _, messages in pair.a.drain_datagram_runs() for m in messages]
    (run,) = pair.b.open_datagrams(datagrams)
    pair.b.receive_opened([ReceivedRun(run.index, run.source, run.messages, run.keypair, [forged])], pair.now)
    assert pair.b.drain_packets() == [forged]
