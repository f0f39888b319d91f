"""What a TURN relay sends the gateway: ChannelData frames and STUN responses/indications, through a live Allocation.

The input is a sequence of datagrams (:func:`fuzz.harness.split_datagrams`) fed to one fresh Allocation whose
randomness is seeded, so a transcript recorded against a scripted relay replays into deep states (allocated, channels
bound) and mutations explore from there. Invariants: ``decode_channel_data`` raises only ChannelDataParseError and
round-trips; ``Allocation.handle_input`` never raises and its tables stay bounded.
"""

from __future__ import annotations

from dataplane import stun, turn
from dataplane.base import Address
from dataplane.io.rng import SeededRng
from fuzz.harness import fuzz_main, join_datagrams, split_datagrams

SERVER: Address = ("198.51.100.7", 3478)
PEER: Address = ("192.0.2.50", 6000)
USERNAME = "2145916800:salt"
PASSWORD = "pass"
REALM = "firezone"
NONCE = "nonce-1"
MAX_CHANNELS = turn.CHANNEL_NUMBER_LAST - turn.CHANNEL_NUMBER_FIRST + 1


def new_allocation() -> turn.Allocation:
    return turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)


def _answer(payload: bytes) -> bytes:
    """A long-term-credential relay's answer to one request (challenge first, then success)."""
    request = stun.decode(payload)
    key = stun.long_term_key(USERNAME, REALM, PASSWORD)
    if request.method == stun.Method.BINDING:
        return stun.encode(
            request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, ("203.0.113.20", 1))
        )
    if request.nonce() is None:
        challenge = request.error_response(stun.ErrorCode.UNAUTHENTICATED, "Unauthorized").add_realm(REALM)
        return stun.encode(challenge.add_nonce(NONCE))
    response = request.success_response()
    if request.method == stun.Method.ALLOCATE:
        response.add_xor_address(stun.Attr.XOR_RELAYED_ADDRESS, ("198.51.100.7", 50000))
        response.add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, ("203.0.113.20", 1)).add_lifetime(600)
    return stun.encode(response, integrity_key=key)


def _local_actions(allocation: turn.Allocation, now: float) -> None:
    """What the gateway does between datagrams; the replay must repeat it so the recorded transaction ids match."""
    if allocation.is_allocated:
        allocation.encapsulate(PEER, b"hello", now)


def _transcript() -> list[bytes]:
    """The relay's side of binding → 401 → allocate → channel bind → relayed data, as one datagram sequence."""
    allocation = new_allocation()
    answers: list[bytes] = []
    now = 0.0
    while (transmit := allocation.poll_transmit()) is not None and len(answers) < 8:
        answer = _answer(transmit.payload)
        answers.append(answer)
        allocation.handle_input(answer, SERVER, now)
        _local_actions(allocation, now)
        now += 1.0
    channel = allocation.channel_for(PEER) or turn.CHANNEL_NUMBER_FIRST
    answers.append(turn.encode_channel_data(channel, b"relayed payload"))
    indication = stun.StunMessage.indication(stun.Method.DATA, bytes(12))
    indication.add_xor_address(stun.Attr.XOR_PEER_ADDRESS, PEER).add_data(b"indicated payload")
    answers.append(stun.encode(indication))
    return answers


def seeds() -> list[bytes]:
    frames = [
        turn.encode_channel_data(0x4000, b""),
        turn.encode_channel_data(0x4FFF, b"x" * 100),
        turn.encode_channel_data(0x7FFF, bytes(range(256))),
    ]
    return [join_datagrams(_transcript()), *(join_datagrams([frame]) for frame in frames)]


def TestOneInput(data: bytes) -> None:
    datagrams = split_datagrams(data)
    for datagram in datagrams:
        turn.is_channel_data(datagram)
        try:
            number, payload = turn.decode_channel_data(datagram)
        except turn.ChannelDataParseError:
            continue
        if turn.encode_channel_data(number, payload) != datagram:
            raise AssertionError("ChannelData does not round-trip")
    allocation = new_allocation()
    now = 0.0
    for datagram in datagrams:
        allocation.handle_input(datagram, SERVER, now)
        allocation.handle_input(datagram, PEER, now)
        _local_actions(allocation, now)
        while allocation.poll_event() is not None:
            pass
        if len(allocation._channels_by_number) > MAX_CHANNELS:
            raise AssertionError("channel table grew past the channel number space")
        now += 1.0
    while allocation.poll_transmit() is not None:
        pass
    allocation.handle_timeout(now + 3600.0)


if __name__ == "__main__":
    fuzz_main("fuzz_channel_data")
