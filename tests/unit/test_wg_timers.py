"""WireGuard timer timelines on a fake clock (wireguard-go timer semantics, docs/protocol.md §F)."""

from __future__ import annotations

from dataplane.wireguard.constants import MESSAGE_INITIATION, MESSAGE_TRANSPORT
from dataplane.wireguard.device import DropReason
from dataplane.wireguard.tunn import HandshakeCompleted, HandshakeGaveUp, KeysZeroed

from .test_wg_device import TUNNEL_A, TUNNEL_B, Pair, events, ipv4_packet


def kinds(messages: list[bytes]) -> list[int]:
    return [m[0] for m in messages]


def initiations(messages: list[bytes]) -> int:
    return kinds(messages).count(MESSAGE_INITIATION)


def keepalives(messages: list[bytes]) -> int:
    return sum(1 for m in messages if m[0] == MESSAGE_TRANSPORT and len(m) == 32)


class Recorder:
    """Remembers when each datagram crossed the link."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.log: list[tuple[float, str, bytes]] = []
        self.blocked: set[str] = set()
        pair.link = self

    def __call__(self, direction: str, data: bytes) -> bool:
        self.log.append((self.pair.now, direction, data))
        return direction not in self.blocked

    def times(self, direction: str, kind: int, size: int | None = None) -> list[float]:
        return [t for t, d, m in self.log if d == direction and m[0] == kind and (size is None or len(m) == size)]


def established() -> tuple[Pair, Recorder]:
    pair = Pair()
    recorder = Recorder(pair)
    assert pair.a_to_b() != []
    events(pair.a)
    events(pair.b)
    return pair, recorder


def test_initiator_rekeys_on_send_after_120_seconds() -> None:
    pair, recorder = established()
    pair.run_until(119.0)
    before = len(recorder.times("a->b", MESSAGE_INITIATION))
    assert pair.a_to_b(b"at 119") != []
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == before
    pair.run_until(120.5)
    assert pair.a_to_b(b"at 120.5") != []
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == before + 1
    assert HandshakeCompleted(pair.b.public_key or b"", True) in events(pair.a)
    # the new session carries traffic
    assert pair.a_to_b(b"new session") == [ipv4_packet(TUNNEL_A, TUNNEL_B, b"new session")]


def test_responder_does_not_rekey_on_send_but_initiator_rekeys_on_receive_after_165_seconds() -> None:
    pair, recorder = established()
    pair.run_until(158.0)
    # B's keys are older than Rekey-After-Time, but B is the responder: it does not rekey on send.
    assert pair.b_to_a(b"158") != []
    assert recorder.times("b->a", MESSAGE_INITIATION) == []
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == 1
    # A, silent, only rekeys when it receives with keys older than 165 s (its passive keepalive is due at 168).
    pair.run_until(166.0)
    assert pair.b_to_a(b"166") != []
    assert recorder.times("b->a", MESSAGE_INITIATION) == []
    assert recorder.times("a->b", MESSAGE_INITIATION)[-1] == 166.0


def test_passive_keepalive_after_10_seconds_of_silence() -> None:
    pair, recorder = established()
    start = pair.now
    pair.run_until(30.0)
    # B received data at 0 and had nothing to send: one keepalive at exactly 10 s, then nothing.
    assert recorder.times("b->a", MESSAGE_TRANSPORT, 32) == [start + 10.0]
    # A's staged data packet confirmed the session, so A never needed a keepalive.
    assert recorder.times("a->b", MESSAGE_TRANSPORT, 32) == []


def test_new_handshake_when_no_reply_15_seconds_after_send() -> None:
    pair, recorder = established()
    pair.run_until(20.0)  # B's passive keepalive at 10 s answered A's first packet
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == 1
    recorder.blocked.add("b->a")
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], pair.now)
    pair.pump()
    pair.run_until(34.9)
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == 1
    pair.run_until(36.0)
    sent = recorder.times("a->b", MESSAGE_INITIATION)
    assert len(sent) == 2
    assert 35.0 <= sent[1] <= 35.0 + 1 / 3 + 1e-9


def test_handshake_gives_up_after_rekey_attempt_time() -> None:
    pair = Pair()
    recorder = Recorder(pair)
    recorder.blocked.add("a->b")
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, bytes([i])) for i in range(3)], 0.0)
    pair.pump()
    pair.run_until(89.0)
    assert events(pair.a) == []
    pair.run_until(200.0)
    sent = recorder.times("a->b", MESSAGE_INITIATION)
    gave_up = events(pair.a)
    assert gave_up == [HandshakeGaveUp(pair.b.public_key or b"", 3)]
    assert 18 <= len(sent) <= 19
    # retries every Rekey-Timeout plus up to 1/3 s of jitter
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert all(5.0 <= gap <= 5.0 + 1 / 3 + 1e-9 for gap in gaps)
    assert sent[-1] < 90.0 <= sent[-1] + 5.34
    assert pair.a.drops[DropReason.HANDSHAKE_GAVE_UP] == 3
    # nothing more after giving up
    assert max(t for t, d, _ in recorder.log if d == "a->b") < 96.0


def test_firezone_rekey_attempt_time_of_20_seconds() -> None:
    pair = Pair(rekey_attempt_time=20.0)
    recorder = Recorder(pair)
    recorder.blocked.add("a->b")
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B)], 0.0)
    pair.pump()
    pair.run_until(60.0)
    assert len(recorder.times("a->b", MESSAGE_INITIATION)) == 4
    assert events(pair.a) == [HandshakeGaveUp(pair.b.public_key or b"", 1)]


def test_keys_unusable_after_180_seconds() -> None:
    pair, recorder = established()
    # block A's new initiations so the session is not renewed
    recorder.blocked.add("a->b")
    pair.run_until(100.0)
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"late")], pair.now)
    pair.pump()
    held = recorder.log[-1][2]
    assert held[0] == MESSAGE_TRANSPORT
    pair.run_until(180.0)
    recorder.blocked.clear()
    pair.b.receive_datagrams([(held, pair.address_a)], pair.now)
    assert pair.b.drain_packets() == []
    assert pair.b.drops[DropReason.KEYS_EXPIRED] == 1
    # A no longer encrypts with the old keys: the packet is staged until a new handshake (retried since 115 s
    # because nothing answered the packet sent at 100 s) completes.
    recorder.log.clear()
    pair.a.send_packets([ipv4_packet(TUNNEL_A, TUNNEL_B, b"fresh")], pair.now)
    pair.pump()
    assert recorder.log == []
    pair.run_until(186.0)
    assert recorder.log[0][1:] == ("a->b", recorder.log[0][2]) and recorder.log[0][2][0] == MESSAGE_INITIATION
    assert ipv4_packet(TUNNEL_A, TUNNEL_B, b"fresh") in pair.b.drain_packets()


def test_keys_zeroed_after_540_seconds() -> None:
    pair, _ = established()
    pair.run_until(539.0)
    assert pair.peer_b.tunn.has_session
    pair.run_until(541.0)
    assert KeysZeroed(pair.b.public_key or b"") in events(pair.a)
    assert not pair.peer_b.tunn.has_session and not pair.peer_a.tunn.has_session
    assert len(pair.a._indices) == 0 and len(pair.b._indices) == 0
    assert pair.a.poll_timeout() is None


def test_persistent_keepalive_every_interval_when_idle() -> None:
    pair, recorder = established()
    pair.a.upsert_peer(pair.b.public_key or b"", pair.now, persistent_keepalive=25)
    pair.pump()
    pair.run_until(80.0)
    # sent at once when switched on; then 25 s after the last authenticated packet either way (B's keepalive at 10)
    assert recorder.times("a->b", MESSAGE_TRANSPORT, 32) == [0.0, 35.0, 60.0]
    pair.a.upsert_peer(pair.b.public_key or b"", pair.now, persistent_keepalive=0)
    pair.run_until(200.0)
    assert max(recorder.times("a->b", MESSAGE_TRANSPORT, 32)) == 60.0


def test_poll_timeout_is_earliest_deadline() -> None:
    pair, _ = established()
    deadline = pair.b.poll_timeout()
    assert deadline == 10.0  # B's passive keepalive
    pair.b.handle_timeout(9.9)
    assert pair.b.drain_transmits() == []
    pair.b.handle_timeout(10.0)
    assert len(pair.b.drain_transmits()) == 1
