"""``replay.replay_accept``, the reference replay check that ``ReplayFilter.validate`` and the pure twin of
``accept_transport_run`` share (the C path has its own copy; tests/property/test_native_run_equivalence.py holds the
two together). With the C extension built, the receive path no longer runs this code, so it is tested directly."""

from __future__ import annotations

from array import array

from dataplane.wireguard.replay import BLOCK_BIT_LOG, RING_BLOCKS, WINDOW_SIZE, new_ring, replay_accept

BLOCK = 1 << BLOCK_BIT_LOG
LIMIT = 1 << 60


def _feed(counters: list[int], last: int = 0) -> tuple[list[int], int, array[int]]:
    """Each counter's result in order, the final highest counter and the ring."""
    ring = new_ring()
    results = []
    for counter in counters:
        result = replay_accept(ring, last, LIMIT, counter)
        results.append(result)
        if result >= 0:
            last = result
    return results, last, ring


def test_rejections_are_minus_one() -> None:
    ring = new_ring()
    assert replay_accept(ring, 0, 10, 10) == -1  # at the limit
    assert replay_accept(ring, 0, LIMIT, 5) == 5
    assert replay_accept(ring, 5, LIMIT, 5) == -1  # seen
    assert replay_accept(ring, 10 * WINDOW_SIZE, LIMIT, 10 * WINDOW_SIZE - WINDOW_SIZE - 1) == -1  # too old


def test_moving_into_the_next_block_keeps_the_bits_of_the_blocks_behind() -> None:
    # From a high block (so that block and previous block numbers are large), one step into the next block must clear
    # only that block: counters just behind, in the previous block, stay marked.
    start = 200 * BLOCK + BLOCK - 8
    results, last, _ = _feed([start, start + 1, start + 2, start + 10, start + 1, start + 2, start])
    assert results[:4] == [start, start + 1, start + 2, start + 10]
    assert results[4:] == [-1, -1, -1]
    assert last == start + 10


def test_a_jump_of_several_blocks_keeps_the_window_behind_it() -> None:
    start = 300 * BLOCK + 3
    jump = start + 5 * BLOCK
    results, _, _ = _feed([start, jump, start, start + 1])
    assert results == [start, jump, -1, jump]  # an old counter accepted leaves the highest where it was


def test_blocks_are_cleared_when_the_ring_wraps() -> None:
    # In-order counters fill every block of the ring more than once; a counter never seen that arrives late (but
    # inside the window) must still be accepted, and one seen must not.
    total = RING_BLOCKS * BLOCK * 2 + 100
    skipped = total - 200
    counters = [counter for counter in range(total) if counter != skipped]
    results, last, ring = _feed(counters)
    assert all(result >= 0 for result in results)
    assert replay_accept(ring, last, LIMIT, skipped) == last
    assert replay_accept(ring, last, LIMIT, skipped + 1) == -1
