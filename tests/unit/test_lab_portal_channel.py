"""lab/portal_channel.py: the portal session against the dev portal on loopback, the Node timer and the candidate
grouping the headless client and the load generator share."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dataplane.ice.candidate import Candidate
from dataplane.node import CandidateGathered, CandidateInvalidated, ConnectionClosed
from lab.portal import DevPortal
from lab.portal_channel import (
    CandidateAnnouncements,
    FlowRequestDue,
    FlowRequests,
    FlowRequestTimer,
    NodeTimer,
    PortalChannelDriver,
    SessionEnd,
    client_socket_url,
)
from protocol.phoenix import ChannelEvent, ChannelJoined, LinkHiccuped, PushReceived
from tests.unit.test_lab_client import CONFIG, GATEWAY_KEY

pytestmark = pytest.mark.timeout(30)

HOST = "candidate:1 1 udp 2130706431 10.2.0.2 4444 typ host"
RELAYED = "candidate:2 1 udp 16777215 172.31.0.10 50000 typ relay raddr 10.2.0.2 rport 4444"


def driver_for(portal_url: str, token: str, seen: list[ChannelEvent], inputs: list[int]) -> PortalChannelDriver:
    return PortalChannelDriver(
        asyncio.get_running_loop(),
        url=client_socket_url(portal_url, GATEWAY_KEY),
        token=token,
        on_event=seen.append,
        after_input=lambda: inputs.append(len(seen)),
        open_timeout=5.0,
    )


def test_the_client_socket_url_carries_the_key() -> None:
    assert client_socket_url("ws://10.0.0.1:8443/", "a+b=") == "ws://10.0.0.1:8443/client/websocket?public_key=a%2Bb%3D"


async def test_unanswered_heartbeats_end_the_session_and_close_the_socket() -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        portal.faults.answer_heartbeats = False
        seen: list[ChannelEvent] = []
        inputs: list[int] = []
        driver = driver_for(portal.url, "client-token", seen, inputs)
        driver.channel.heartbeat_interval = 0.05  # the link gives up after the 4th unanswered one
        ended = await asyncio.wait_for(driver.session(), 10)
        assert ended == SessionEnd("LinkHiccuped", "missed_heartbeats")
        assert not ended.fatal and not driver.joined
        assert isinstance(seen[0], ChannelJoined) and isinstance(seen[-1], LinkHiccuped)
        assert any(isinstance(e, PushReceived) and e.event == "init" for e in seen)
        assert inputs, "the owner was never told to flush"
        # The driver closed the socket itself: the portal saw the client leave.
        await portal.wait_for(kind="closed", client="client-1")
        # The channel can be connected again: a second session joins as the first did.
        portal.faults.answer_heartbeats = True
        driver.channel.heartbeat_interval = 30.0
        since = portal.next_seq
        second = asyncio.ensure_future(driver.session())
        await portal.wait_for(since=since, kind="sent", event="init", timeout=5)
        await portal.stop()
        assert await asyncio.wait_for(second, 10) == SessionEnd("the socket closed")


async def test_a_refused_token_is_fatal_and_a_closed_port_is_not() -> None:
    async with DevPortal(CONFIG, host="127.0.0.1", port=0) as portal:
        refused = await driver_for(portal.url, "wrong", [], []).session()
        url = portal.url
    assert refused.fatal and refused.reason == "InvalidStatus" and "401" in refused.detail, refused
    unreachable = await driver_for(url, "client-token", [], []).session()
    assert not unreachable.fatal and unreachable.reason == "ConnectionRefusedError", unreachable


async def test_candidates_are_pushed_once_per_kind_and_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = driver_for("ws://127.0.0.1:9", "t", [], [])
    pushed: list[tuple[str, Any]] = []

    def record(event: str, payload: Any, now: float) -> bool:
        pushed.append((event, payload))
        return True

    monkeypatch.setattr(driver.channel, "push", record)
    host, relayed = Candidate.from_sdp(HOST), Candidate.from_sdp(RELAYED)
    announced = CandidateAnnouncements()
    assert announced.add(CandidateGathered("gw-1", host))
    assert announced.add(CandidateGathered("gw-1", relayed))
    assert announced.add(CandidateGathered("gw-2", host))
    assert announced.add(CandidateInvalidated("gw-1", host))
    assert not announced.add(ConnectionClosed("gw-1"))
    announced.push_to(driver)
    assert pushed == [
        ("broadcast_ice_candidates", {"gateway_ids": ["gw-1"], "candidates": [host.to_sdp(), relayed.to_sdp()]}),
        ("broadcast_ice_candidates", {"gateway_ids": ["gw-2"], "candidates": [host.to_sdp()]}),
        ("broadcast_invalidated_ice_candidates", {"gateway_ids": ["gw-1"], "candidates": [host.to_sdp()]}),
    ]
    announced.push_to(driver)  # emptied by the first push
    assert len(pushed) == 3


class FakeNode:
    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.timeouts: list[float] = []

    def poll_timeout(self) -> float | None:
        return self.deadline

    def handle_timeout(self, now: float) -> None:
        self.timeouts.append(now)
        self.deadline = None


async def test_the_node_timer_fires_once_at_the_deadline_then_runs_the_owner() -> None:
    loop = asyncio.get_running_loop()
    node = FakeNode(loop.time() + 0.05)
    after: list[int] = []
    timer = NodeTimer(loop, node, lambda: after.append(len(node.timeouts)))  # type: ignore[arg-type]
    timer.arm()
    first = timer._handle
    timer.arm()  # the same deadline: the handle stays
    assert first is not None and timer._handle is first
    node.deadline = loop.time() + 60
    timer.arm()  # a new deadline: a new handle, the old one cancelled
    assert timer._handle is not first and first.cancelled()
    node.deadline = loop.time() + 0.02
    timer.arm()
    await asyncio.sleep(0.2)
    assert len(node.timeouts) == 1 and after == [1] and timer._handle is None
    node.deadline = loop.time() + 0.02
    timer.arm()
    timer.cancel()
    await asyncio.sleep(0.1)
    assert len(node.timeouts) == 1


# -- FlowRequests: unanswered create_flow requests, on a fake clock --------------------------------------------------


def run_requests(requests: FlowRequests, until: float) -> list[tuple[float, str, bool, int]]:
    """Drives ``requests`` as its timer would, from its own deadlines, up to ``until``: (when, resource, ask_again,
    asks) for everything that came due."""
    seen: list[tuple[float, str, bool, int]] = []
    while (deadline := requests.poll_timeout()) is not None and deadline <= until:
        seen.extend((deadline, d.resource_id, d.ask_again, d.asks) for d in requests.handle_timeout(deadline))
    return seen


def test_an_unanswered_request_is_asked_again_at_3_7_and_15_s_then_given_up() -> None:
    # The lab plays an application's TCP connect (SYN at 0, 1, 3, 7, 15 s) through Firezone's 2 s spacing.
    requests = FlowRequests()
    assert requests.ask("res", 100.0)
    assert run_requests(requests, 1000.0) == [
        (103.0, "res", True, 2),
        (107.0, "res", True, 3),
        (115.0, "res", True, 4),
        (135.0, "res", False, 4),  # the portal's 15 s after the last ask, and 5 s grace: no answer will come
    ]
    assert "res" not in requests and requests.poll_timeout() is None


def test_an_answer_ends_the_request_and_says_when_it_was_first_asked() -> None:
    requests = FlowRequests()
    assert requests.ask("res", 10.0)
    assert run_requests(requests, 13.0) == [(13.0, "res", True, 2)]
    assert requests.answered("res") == 10.0
    assert requests.poll_timeout() is None and run_requests(requests, 100.0) == []
    assert requests.answered("res") is None  # a late second answer


def test_wanting_a_pending_resource_again_asks_at_most_once_per_2_s() -> None:
    requests = FlowRequests()
    assert requests.ask("res", 0.0)
    assert not requests.ask("res", 1.9)
    assert requests.ask("res", 2.0)
    # The schedule counts from the first ask; the 3 s demand is too soon after the ask at 2 s and is dropped.
    assert run_requests(requests, 7.0) == [(7.0, "res", True, 3)]


def test_requests_are_kept_per_resource_and_bounded() -> None:
    requests = FlowRequests(limit=2)
    assert requests.ask("a", 0.0) and requests.ask("b", 1.0)
    assert not requests.ask("c", 1.0) and "c" not in requests
    assert len(requests) == 2 and requests.resource_ids() == ["a", "b"]
    assert run_requests(requests, 4.0) == [(3.0, "a", True, 2), (4.0, "b", True, 2)]
    requests.forget("a")
    assert requests.ask("c", 5.0) and requests.resource_ids() == ["b", "c"]


def test_a_shorter_schedule_gives_up_after_its_answer_timeout() -> None:
    requests = FlowRequests(demand_offsets=(0.0, 0.5), spacing=0.2, answer_timeout=1.0)
    assert requests.ask("res", 0.0)
    assert run_requests(requests, 10.0) == [(0.5, "res", True, 2), (1.5, "res", False, 2)]


async def test_the_timer_hands_over_what_is_due() -> None:
    requests = FlowRequests(demand_offsets=(0.0, 0.01), spacing=0.0, answer_timeout=0.05)
    seen: list[FlowRequestDue] = []
    done = asyncio.Event()

    def on_due(due: list[FlowRequestDue]) -> None:
        seen.extend(due)
        if any(not d.ask_again for d in due):
            done.set()

    timer = FlowRequestTimer(asyncio.get_running_loop(), requests, on_due)
    requests.ask("res", asyncio.get_running_loop().time())
    timer.arm()
    await asyncio.wait_for(done.wait(), 5)
    assert seen == [FlowRequestDue("res", ask_again=True, asks=2), FlowRequestDue("res", ask_again=False, asks=2)]
    timer.cancel()
