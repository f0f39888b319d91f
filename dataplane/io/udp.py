"""Batched UDP for WireGuard traffic: GSO (``UDP_SEGMENT``) on send, GRO (``UDP_GRO``) on receive.

Python's ``socket`` has no ``sendmmsg``/``recvmmsg``, so the batching comes from the kernel's segmentation offloads:
one ``sendmsg`` carries up to 64 equal-sized datagrams to one destination, and one ``recvmsg`` may return several
coalesced datagrams with their size in a ``UDP_GRO`` control message. Both are probed at bind time; GSO is switched
off for good when the kernel answers ``EIO`` (the egress device cannot checksum), as wireguard-go does.
"""

from __future__ import annotations

import enum
import errno
import logging
import select
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from dataplane.base import Address, DropCounter, Transmit
from dataplane.native import gso_run_ends, split_datagrams

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55  # u32 array; [0] SK_MEMINFO_RMEM_ALLOC (bytes queued, as truesize), [1] SK_MEMINFO_RCVBUF
_MEMINFO = struct.Struct("=2I")

DEFAULT_PORT = 52625
FIREZONE_MARK = 0xFD002021
SEND_BUFFER = 2 * 1024 * 1024
RECV_BUFFER = 16 * 1024 * 1024
# Kernel (UDP_MAX_SEGMENTS) and Firezone (#14114) cap.
GSO_MAX_SEGMENTS = 64
# The whole GSO send must fit one IP datagram: 65,535 minus the largest IP header and the UDP header.
GSO_MAX_BYTES = 65535 - 40 - 8
_RECV_BUFFER_SIZE = 65536
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_U16 = struct.Struct("=H")
IP_PKTINFO = 8
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50
# A GRO batch carries one UDP_GRO and one PKTINFO control message (in_pktinfo 12 bytes, in6_pktinfo 20 bytes).
_LOCAL_CMSG_SPACE = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(20)


class UdpDropReason(enum.Enum):
    SEND_WOULD_BLOCK = "send_would_block"
    SEND_FAILED = "send_failed"
    RECV_FAILED = "recv_failed"


def _set_mark(sock: socket.socket, mark: int) -> bool:
    try:
        # Packed as unsigned: 0xfd002021 does not fit the C int setsockopt(int) would pass.
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", mark))
    except PermissionError as exc:
        log.debug("SO_MARK not permitted: %s", exc)
        return False
    return True


def _normalize(address: tuple[object, ...]) -> Address:
    return (str(address[0]), int(address[1]))  # type: ignore[call-overload]


# Errors the kernel queues on a UDP socket from ICMP replies to earlier sends (IP_RECVERR off): they report on a
# past datagram, so the socket itself is fine and the next receive may succeed.
_ICMP_REPORTED_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EMSGSIZE,
        errno.EPROTO,
        errno.ECONNRESET,
    }
)


class UdpSocket:
    """One non-blocking UDP socket. Receive from one thread; ``send_batch``/``send_many`` may run in several threads at
    once (each ``sendmsg`` is atomic in the kernel; firezone-wg's TUN reader threads send what they sealed)."""

    def __init__(self, sock: socket.socket, *, gso: bool, gro: bool) -> None:
        self._sock = sock
        self.family = sock.family
        self.gso_enabled = gso
        self.gro_enabled = gro
        self.drops = DropCounter()
        self._send_drops_lock = threading.Lock()  # senders in several threads count failures without losing any
        host, port = sock.getsockname()[:2]
        self.local_address: Address = (str(host), int(port))
        self._buffer = bytearray(_RECV_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        # Asked between two receives whether another datagram waits: a recvmsg that fails with EAGAIN raises, and an
        # exception after an idle pause costs about 40 us more than this poll (cold caches), on every lone ping.
        self._readable = select.poll()
        self._readable.register(sock.fileno(), select.POLLIN)

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        *,
        fallback_random_port: bool = False,
        mark: int | None = None,
        gso: bool = True,
        gro: bool = True,
        increase_buffers: bool = True,
        local_addresses: bool = False,
    ) -> UdpSocket:
        """Binds ``host:port`` (``fallback_random_port``: on EADDRINUSE, any port). Raises OSError if binding fails.

        ``local_addresses``: ask the kernel for each datagram's destination address (``IP_PKTINFO``), so a socket
        bound to the wildcard address can tell :meth:`recv_many_local` callers which of the host's addresses a peer
        reached (the ICE host candidate)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if mark is not None:
                _set_mark(sock, mark)
            if increase_buffers:
                cls._increase_buffers(sock)
            try:
                sock.bind((host, port))
            except OSError as exc:
                if not (fallback_random_port and port != 0 and exc.errno == errno.EADDRINUSE):
                    raise
                log.info("UDP port %d in use on %s; using a random port", port, host)
                sock.bind((host, 0))
            if local_addresses:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.setblocking(False)
            gso_ok = gso and cls._probe_gso(sock)
            gro_ok = gro and cls._probe_gro(sock)
        except BaseException:
            sock.close()
            raise
        return cls(sock, gso=gso_ok, gro=gro_ok)

    @staticmethod
    def _increase_buffers(sock: socket.socket) -> None:
        # The FORCE variants (CAP_NET_ADMIN) exceed net.core.[rw]mem_max without changing the host's settings; without
        # the capability the plain options get what the host allows.
        for force, plain, size in (
            (SO_SNDBUFFORCE, socket.SO_SNDBUF, SEND_BUFFER),
            (SO_RCVBUFFORCE, socket.SO_RCVBUF, RECV_BUFFER),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)

    @staticmethod
    def _probe_gso(sock: socket.socket) -> bool:
        try:
            sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        except OSError as exc:
            log.info("UDP GSO unavailable: %s", exc)
            return False
        return True

    @staticmethod
    def _probe_gro(sock: socket.socket) -> bool:
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as exc:
            log.info("UDP GRO unavailable: %s", exc)
            return False
        return True

    def fileno(self) -> int:
        return self._sock.fileno()

    def receive_queue(self) -> tuple[int, int] | None:
        """(bytes waiting in the receive queue, the queue's capacity), as the kernel accounts them; None when the
        kernel cannot tell (SO_MEMINFO, Linux 3.19+)."""
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
        except OSError:
            return None
        if len(raw) < _MEMINFO.size:
            return None
        queued, capacity = _MEMINFO.unpack_from(raw)
        return queued, capacity

    def set_mark(self, mark: int) -> bool:
        """SO_MARK (fwmark); False when not permitted."""
        return _set_mark(self._sock, mark)

    def recv_many(self, max: int = 64) -> list[tuple[bytes, Address]]:
        """Up to about ``max`` datagrams without blocking (a GRO batch is never cut, so a few more may come back)."""
        out: list[tuple[bytes, Address]] = []
        sock = self._sock
        view = self._view
        buffers = [self._buffer]
        cmsg_space = _GRO_CMSG_SPACE if self.gro_enabled else 0
        readable = self._readable.poll
        while len(out) < max:
            if out and not readable(0):
                break
            try:
                nbytes, ancdata, _flags, address = sock.recvmsg_into(buffers, cmsg_space)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in _ICMP_REPORTED_ERRNOS:
                    raise  # e.g. EBADF after close(): retrying would spin forever
                # ICMP errors for earlier sends surface on the next receive; they are not fatal.
                log.debug("UDP recv error on %s: %s", self.local_address, exc)
                self.drops.drop(UdpDropReason.RECV_FAILED)
                continue
            src = _normalize(address)
            segment_size = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    segment_size = _U16.unpack_from(data)[0]
            if segment_size and nbytes > segment_size:
                # On the event loop's busiest path: one C call copies each segment out of the receive buffer.
                out += split_datagrams(view, nbytes, segment_size, src)
            else:
                out.append((bytes(view[:nbytes]), src))
        return out

    def recv_many_local(self, max: int = 64) -> list[tuple[bytes, Address, Address]]:
        """Like :meth:`recv_many`, with each datagram's local address (needs ``local_addresses`` at bind time; the
        bound address stands in when the kernel gave none)."""
        out: list[tuple[bytes, Address, Address]] = []
        sock = self._sock
        view = self._view
        buffers = [self._buffer]
        port = self.local_address[1]
        bound = self.local_address
        readable = self._readable.poll
        while len(out) < max:
            if out and not readable(0):
                break  # as in recv_many
            try:
                nbytes, ancdata, _flags, address = sock.recvmsg_into(buffers, _LOCAL_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in _ICMP_REPORTED_ERRNOS:
                    raise
                log.debug("UDP recv error on %s: %s", self.local_address, exc)
                self.drops.drop(UdpDropReason.RECV_FAILED)
                continue
            src = _normalize(address)
            segment_size = 0
            local = bound
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                    segment_size = _U16.unpack_from(data)[0]
                elif level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                    local = (socket.inet_ntop(socket.AF_INET, data[8:12]), port)
                elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 16:
                    local = (socket.inet_ntop(socket.AF_INET6, data[:16]), port)
            if segment_size and nbytes > segment_size:
                out += [(datagram, src, local) for datagram, _ in split_datagrams(view, nbytes, segment_size, src)]
            else:
                out.append((bytes(view[:nbytes]), src, local))
        return out

    def send_many(self, transmits: Sequence[Transmit]) -> None:
        """Sends datagrams in order; runs to one destination with equal sizes go out as one GSO send."""
        i = 0
        n = len(transmits)
        while i < n:
            dst = transmits[i].dst
            j = i + 1
            while j < n and transmits[j].dst == dst:
                j += 1
            self.send_batch(dst, [t.payload for t in transmits[i:j]])
            i = j

    def send_batch(self, dst: Address, payloads: Sequence[bytes]) -> None:
        """Sends datagrams to one destination in order (cheaper than ``send_many``: no Transmit per datagram).

        Each run of equal sizes (the last one may be shorter), up to 64 datagrams / 65,535 bytes, is one GSO send."""
        if not self.gso_enabled:
            for payload in payloads:
                self._send_one(payload, dst)
            return
        start = 0
        for end in gso_run_ends(payloads, GSO_MAX_SEGMENTS, GSO_MAX_BYTES):
            if end - start == 1:
                self._send_one(payloads[start], dst)
            else:
                self._send_gso(payloads[start:end], len(payloads[start]), dst)
            start = end

    def _send_one(self, payload: bytes, dst: Address) -> None:
        try:
            self._sock.sendto(payload, dst)
        except (BlockingIOError, InterruptedError):
            self._drop_all(UdpDropReason.SEND_WOULD_BLOCK, 1)
        except OSError as exc:
            log.debug("UDP send to %s failed: %s", dst, exc)
            self._drop_all(UdpDropReason.SEND_FAILED, 1)

    def _send_gso(self, payloads: Sequence[bytes], size: int, dst: Address) -> None:
        try:
            # Scatter-gather: the kernel copies each datagram once, no joined buffer in between.
            self._sock.sendmsg(payloads, [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, dst)
        except (BlockingIOError, InterruptedError):
            self._drop_all(UdpDropReason.SEND_WOULD_BLOCK, len(payloads))
        except OSError as exc:
            if exc.errno == errno.EIO:
                log.info("UDP GSO refused (EIO) on %s; sending datagrams one by one from now on", self.local_address)
                self.gso_enabled = False
                for payload in payloads:
                    self._send_one(payload, dst)
                return
            log.debug("UDP GSO send to %s failed: %s", dst, exc)
            self._drop_all(UdpDropReason.SEND_FAILED, len(payloads))

    def _drop_all(self, reason: UdpDropReason, datagrams: int) -> None:
        # A failed GSO send loses every datagram it carried: count them, as one-by-one sends would.
        with self._send_drops_lock:
            self.drops.drop(reason, datagrams)

    def close(self) -> None:
        fd = self._sock.fileno()
        if fd >= 0:
            self._readable.unregister(fd)  # the number may be reused by the next file opened
        self._sock.close()

    def __enter__(self) -> UdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class DualStackSockets:
    """The IPv4 and IPv6 sockets WireGuard listens on (either may be None when that family is unavailable)."""

    v4: UdpSocket | None
    v6: UdpSocket | None

    def sockets(self) -> list[UdpSocket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def close(self) -> None:
        for sock in self.sockets():
            sock.close()


def bind_dual_stack(
    port: int = DEFAULT_PORT,
    *,
    mark: int | None = FIREZONE_MARK,
    gso: bool = True,
    gro: bool = True,
    increase_buffers: bool = True,
    local_addresses: bool = False,
) -> DualStackSockets:
    """Binds 0.0.0.0 and [::] on ``port``, each falling back to a random port when taken (Firezone: 52625).

    Raises OSError only when neither family can be bound."""
    bound: list[UdpSocket | None] = []
    errors: list[OSError] = []
    for host in ("0.0.0.0", "::"):
        try:
            bound.append(
                UdpSocket.bind(
                    host,
                    port,
                    fallback_random_port=True,
                    mark=mark,
                    gso=gso,
                    gro=gro,
                    increase_buffers=increase_buffers,
                    local_addresses=local_addresses,
                )
            )
        except OSError as exc:
            log.warning("cannot bind UDP %s port %d: %s", host, port, exc)
            errors.append(exc)
            bound.append(None)
    if bound[0] is None and bound[1] is None:
        raise errors[0]
    return DualStackSockets(bound[0], bound[1])
