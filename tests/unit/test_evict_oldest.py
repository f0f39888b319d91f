"""dataplane.base.evict_oldest: batch eviction from insertion-ordered dicts (the bounded caches of the data path)."""

from __future__ import annotations

from dataplane import policy
from dataplane.base import evict_oldest


def test_the_oldest_entries_go_and_the_rest_keep_their_order() -> None:
    table = {key: key * 10 for key in range(10)}
    table[3] = 99  # updating a value keeps its place: still among the oldest
    evict_oldest(table, 4)
    assert list(table.items()) == [(4, 40), (5, 50), (6, 60), (7, 70), (8, 80), (9, 90)]


def test_asking_for_more_than_there_is_empties_the_table() -> None:
    table = {"a": 1, "b": 2}
    evict_oldest(table, 5)
    assert table == {}
    evict_oldest(table, 1)
    assert table == {}


def test_a_full_flow_table_drops_its_oldest_eighth_and_stays_within_its_bound() -> None:
    table: dict[bytes, policy.Decision] = {}
    decisions = 0

    def decide(packet: bytes | bytearray | memoryview) -> policy.Decision:
        nonlocal decisions
        decisions += 1
        return policy.Decision(allowed=True)

    def packet(flow: int) -> bytes:
        # Plain IPv4 UDP: the flow key is bytes 12-24 (addresses and ports).
        header = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
        return header + flow.to_bytes(4, "big") + bytes(4)

    tables: tuple[dict[bytes, policy.Decision], dict[bytes, policy.Decision]] = ({}, table)  # (TCP, UDP)
    for flow in range(policy.FLOW_TABLE_SIZE + 1):
        policy._through_flow_table(packet(flow), tables, decide)
    assert len(table) == policy.FLOW_TABLE_SIZE - policy.FLOW_TABLE_SIZE // 8 + 1
    assert packet(0)[12:24] not in table and packet(policy.FLOW_TABLE_SIZE)[12:24] in table
    decided = decisions
    policy._through_flow_table(packet(policy.FLOW_TABLE_SIZE), tables, decide)  # a remembered flow: no decision
    assert decisions == decided
