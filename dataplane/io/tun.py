"""Linux TUN device driver: multi-queue, one reader and one writer thread per queue, offloads, batches.

The event loop never blocks on the device: reader threads push received packets into one bounded deque and bump an
eventfd once per batch (``wakeup_fd``, an epoll fd, becomes readable), or, given ``on_packets``, hand each batch to
that callback themselves (firezone-wg seals and sends in the reader threads, one queue per core). ``send``/
``send_many`` append to a bounded per-queue deque that the queue's writer thread drains (one or two packets for an idle
writer are written directly).
The queue for a written packet is picked by its flow hash so one flow is always written by one thread, in order
(Firezone #10231: racing writers reordered flows and TCP throttled). On read the kernel already steers a flow to one
queue (the queue that last wrote one of its packets), and each reader appends its batches in order, so reads keep
per-flow order too. With ``one_writer`` a single writer thread (queue 0's) takes every packet and writes each merged
frame to the fd of the queue its flow hash picks: the reads stay spread over the queues as before, while the producer
pays one append and one wake-up per batch instead of a flow hash per packet, and the writer merges whole batches.

When a queue has been quiet for a few milliseconds the event loop reads it itself (its fd joins the ``wakeup_fd``
epoll) until a read finds traffic building up again, then the thread takes over: a ping or a lone request pays one
thread hop less. Switches happen under a lock, after the thread's last batch is queued, so they never reorder a flow.
With ``on_packets`` this is opt-in (``direct_when_quiet``): the owner then handles what ``poll_recv_many`` returns
under the same lock its callback takes, which keeps the order across a switch.

A process whose own thread already holds a batch for the device (the gateway's event loop after decrypting) can write
it with :meth:`Tun.write_now` instead: merged and written on the calling thread, through the same code as the writer
threads, with no hand-off (waking a writer costs a GIL hand-over, more than the write itself).

With offloads (``IFF_VNET_HDR`` + ``TUNSETOFFLOAD``), readers split TSO/USO super-packets with
``dataplane.native.split_gso_frame`` and writers merge consecutive same-flow segments with ``coalesce`` (the C extension
when it is built, else :mod:`dataplane.packet`); the syscalls and this work run in the threads, and
``os.read``/``os.write`` release the GIL while the kernel works.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dataplane.base import DropCounter
from dataplane.io.osthread import set_os_thread_name
from dataplane.native import coalesce, flow_hash, split_gso_frame
from dataplane.packet import VIRTIO_NET_HDR_LEN, PacketParseError

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
SIOCSIFTXQLEN = 0x8943
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

TUN_OFFLOADS_FULL = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6
TUN_OFFLOADS_TCP = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

DEFAULT_TXQUEUELEN = 10000
LOCK_DIR = "/run/firezone"
NUM_TUN_THREADS_ENV = "FIREZONE_NUM_TUN_THREADS"
READ_OFFLOAD_ENV = "FIREZONE_TUN_READ_OFFLOAD"
# One read can return a 64 KiB TSO frame plus its virtio header.
_READ_SIZE = 65536 + VIRTIO_NET_HDR_LEN
# How many frames a reader takes from the device before handing the batch over.
_READ_BURST = 64
# A queue quiet for this long is read by the event loop directly ...
_QUIET_MS = 5
# ... until one poll_recv_many finds this many frames waiting, or this many packets in what it read (a super-packet):
# then its thread takes over again.
_DIRECT_FRAMES = 8
# How long a reader waits before looking again when the consumer has not made room yet.
_FULL_WAIT_MS = 1
# How many packets a writer takes per pass (merged before writing when offloads are on).
_WRITE_BURST = 128
# Batches up to this size are written by the caller itself when the queue's writer is idle with nothing pending.
_INLINE_MAX = 2
# A virtio_net_hdr with no flags and no GSO: the frame of one plain packet (what coalesce gives a lone packet).
_PLAIN_HEADER = bytes(VIRTIO_NET_HDR_LEN)


@dataclass(frozen=True, slots=True)
class TunStats:
    rx_frames: int
    rx_packets: int
    rx_direct_frames: int  # of rx_frames, read by the event loop itself (adaptive reads)
    tx_frames: int
    tx_packets: int


class TunError(OSError):
    """The device cannot be created or attached (in use by another process, exists already, no permission...)."""


class TunDropReason(enum.Enum):
    INBOUND_QUEUE_FULL = "inbound_queue_full"
    OUTBOUND_QUEUE_FULL = "outbound_queue_full"
    MALFORMED_OFFLOAD_FRAME = "malformed_offload_frame"
    WRITE_FAILED = "write_failed"
    READ_FAILED = "read_failed"
    THREAD_FAILED = "thread_failed"
    CONSUMER_FAILED = "consumer_failed"


def queues_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``FIREZONE_NUM_TUN_THREADS``, default 2 (1 on a single-CPU machine)."""
    env = os.environ if environ is None else environ
    raw = env.get(NUM_TUN_THREADS_ENV, "").strip()
    if raw:
        value = int(raw)
        if not 1 <= value <= 64:
            raise ValueError(f"{NUM_TUN_THREADS_ENV} must be between 1 and 64, got {value}")
        return value
    return 1 if (os.cpu_count() or 1) < 2 else 2


def _set_offload(fd: int, flags: int) -> None:
    """``TUNSETOFFLOAD``; a seam so tests can force the probe to fail."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def _open_queue(name: str, flags: int) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
    except OSError:
        os.close(fd)
        raise
    return fd


def _netns_id() -> int:
    """Identity of the calling thread's network namespace: one interface name may exist once per namespace."""
    try:
        return os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return 0


def _interface_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _set_txqueuelen(name: str, length: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFTXQLEN, struct.pack("16si20x", name.encode(), length))


class _Queue:
    """One queue's fd, its writer's pending packets and the writer's wakeup eventfd."""

    __slots__ = (
        "direct",
        "direct_readable",
        "fd",
        "outbound",
        "park_fd",
        "producer_waiting",
        "room_fd",
        "rx_direct_frames",
        "rx_frames",
        "rx_packets",
        "tx_frames",
        "tx_packets",
        "wake_fd",
        "writer_idle",
    )

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # True: the event loop reads this queue itself (quiet traffic, one thread hop less); False: the reader thread.
        self.direct = False
        self.park_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Written by this queue's threads only; read for stats.
        self.rx_frames = 0
        self.rx_packets = 0
        self.rx_direct_frames = 0
        self.tx_frames = 0
        self.tx_packets = 0
        self.outbound: collections.deque[bytes] = collections.deque()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.writer_idle = False
        # A producer waiting for room in ``outbound`` (``outbound_wait``) sets the flag; the writer then signals room_fd.
        self.room_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.producer_waiting = False
        # The event loop's direct reads ask it whether another frame waits instead of reading until EAGAIN: the
        # exception costs about 40 us more than this poll after an idle pause, on every lone ping.
        self.direct_readable = select.poll()
        self.direct_readable.register(fd, select.POLLIN)


class Tun:
    """A TUN device with ``queues`` queues. Create with :meth:`create`; call from one (event loop) thread."""

    def __init__(
        self,
        name: str,
        queue_fds: Sequence[int],
        lock_fd: int,
        *,
        offload_flags: int,
        read_offload: bool,
        inbound_capacity: int,
        outbound_capacity: int,
        adaptive: bool = True,
        lock_path: str | None = None,
        on_packets: Callable[[list[bytes]], None] | None = None,
        one_writer: bool = False,
        outbound_wait: float = 0.0,
        direct_when_quiet: bool = False,
    ) -> None:
        self.name = name
        self.queues = len(queue_fds)
        self.offload_flags = offload_flags
        self.offload_enabled = offload_flags != 0
        self.read_offload = read_offload
        self.drops = DropCounter()
        self.inbound_capacity = inbound_capacity
        self.outbound_capacity = outbound_capacity
        self.outbound_wait = outbound_wait
        self._coalesce_tcp = bool(offload_flags & (TUN_F_TSO4 | TUN_F_TSO6))
        self._coalesce_udp = bool(offload_flags & (TUN_F_USO4 | TUN_F_USO6))
        self._lock_fd = lock_fd
        self._lock_path = lock_path
        self._drops_lock = threading.Lock()
        self._queues = [_Queue(fd) for fd in queue_fds]
        # Set with more than one queue: only queue 0 has a writer thread and a deque; frames go to their flow's fd.
        self._one_writer = one_writer and len(queue_fds) > 1
        self._queue_fds = [queue.fd for queue in self._queues]
        # Written by write_now's caller only (one thread, see there); read for stats.
        self._caller_tx_frames = 0
        self._caller_tx_packets = 0
        self._inbound: collections.deque[bytes] = collections.deque()
        # Orders "reader thread enqueues / hands a queue back" against "event loop drains and reads directly".
        self._mode_lock = threading.Lock()
        # Set: each reader thread hands its batches to this callback itself (the owner's per-queue work then runs in
        # parallel, e.g. sealing with the GIL released) instead of queueing them for poll_recv_many.
        self._on_packets = on_packets
        self._consumer_failures = 0
        self._adaptive = adaptive and (on_packets is None or direct_when_quiet)
        # wakeup_fd is an epoll instance: readable when a reader thread signalled a batch (eventfd) or when a queue in
        # direct mode has packets in the kernel.
        self._epoll = select.epoll()
        self.wakeup_fd = self._epoll.fileno()
        self._signal_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._signal_fd, select.EPOLLIN)
        self._signalled = select.poll()  # poll_recv_many clears the eventfd only when it is set (no EAGAIN exception)
        self._signalled.register(self._signal_fd, select.POLLIN)
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False
        self.failure: str | None = None
        """Set when a reader or writer thread died of an unexpected error: the device no longer serves that queue, so
        the owner must stop (a supervisor restarts it) instead of running on with a silently dead queue."""
        self._threads: list[threading.Thread] = []
        for index, queue in enumerate(self._queues):
            roles: list[tuple[str, Callable[[_Queue], None]]] = [("rx", self._reader)]
            if index == 0 or not self._one_writer:
                roles.append(("tx", self._writer))
            for role, target in roles:
                thread = threading.Thread(
                    target=self._guarded,
                    args=(target, queue, f"tun-{role}{index}"),
                    name=f"tun-{name}-{role}{index}",
                    daemon=True,
                )
                self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    @classmethod
    def create(
        cls,
        name: str,
        *,
        queues: int = 1,
        offload: bool = True,
        txqueuelen: int = DEFAULT_TXQUEUELEN,
        inbound_capacity: int = 4096,
        outbound_capacity: int = 2048,
        read_offload: bool | None = None,
        adaptive_reads: bool = True,
        on_packets: Callable[[list[bytes]], None] | None = None,
        one_writer: bool = False,
        outbound_wait: float = 0.0,
        direct_when_quiet: bool = False,
    ) -> Tun:
        """Creates ``name`` with ``queues`` queues (``IFF_MULTI_QUEUE`` when more than one) in the calling thread's
        network namespace. Raises :class:`TunError` when another process holds the device or it exists already.

        ``offload``: use ``IFF_VNET_HDR`` + ``TUNSETOFFLOAD`` when the kernel accepts them (probed). ``read_offload``
        (default: ``FIREZONE_TUN_READ_OFFLOAD``, on unless "0"): let the kernel hand over TSO/USO super-packets, which
        the reader threads split (``split_gso_frame``: C when the extension is built); off, the kernel segments and checksums in C and each read is one packet,
        while writes are still merged. Which is faster depends on the machine (see lab.bench).

        ``on_packets``: called by each queue's reader thread with every batch it read, in order, instead of queueing
        it for :meth:`poll_recv_many` (which then returns nothing). One flow is read by one queue, so the callback
        sees each flow's packets in order, from one thread; it runs concurrently for different queues. An exception
        from it is logged and its batch counted as dropped (``consumer_failed``); the thread goes on.

        ``direct_when_quiet`` (with ``on_packets``): a queue quiet for a few milliseconds is read by
        :meth:`poll_recv_many` instead (``wakeup_fd`` turns readable), until a read finds traffic building up and
        hands it back to the thread. An owner that answers ``wakeup_fd`` in the thread that received the packet which
        provoked the reply (firezone-wg's event loop: a ping's reply is in the device when its write returns) saves
        a thread wake-up per lone packet. It must call ``poll_recv_many`` and handle its packets under the same lock
        that ``on_packets`` takes: a callback batch that follows a hand-back then waits for them.

        ``one_writer``: one writer thread for all queues instead of one per queue (see the module docstring): for an
        owner whose single producer thread is its bottleneck (firezone-wg's event loop), where hashing every packet to
        a queue and waking two writers cost more than the second writer gives back."""
        if not name or len(name.encode()) > 15:
            raise ValueError(f"invalid interface name {name!r}")
        if queues < 1:
            raise ValueError("queues must be >= 1")
        lock_fd, lock_path = cls._lock(name)
        fds: list[int] = []
        try:
            if _interface_exists(name):
                raise TunError(errno.EEXIST, f"interface {name} already exists and is not managed by this process")
            base = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if queues > 1 else 0)
            offload_flags = 0
            if offload:
                fds.append(_open_queue(name, base | IFF_VNET_HDR))
                offload_flags = cls._probe_offloads(fds[0])
                if not offload_flags:
                    # The device must be recreated without the virtio header: closing its only fd removes it.
                    os.close(fds.pop())
            flags = base | (IFF_VNET_HDR if offload_flags else 0)
            while len(fds) < queues:
                fds.append(_open_queue(name, flags))
            if read_offload is None:
                read_offload = os.environ.get(READ_OFFLOAD_ENV, "1").strip() != "0"
            if offload_flags and not read_offload:
                # Writes may still carry GSO frames: TUNSETOFFLOAD only limits what the kernel hands to us.
                _set_offload(fds[0], 0)
            try:
                _set_txqueuelen(name, txqueuelen)
            except OSError as exc:
                log.warning("could not set txqueuelen %d on %s: %s", txqueuelen, name, exc)
        except BaseException as exc:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            os.close(lock_fd)
            if isinstance(exc, OSError) and not isinstance(exc, TunError):
                raise TunError(exc.errno, f"cannot create TUN device {name}: {exc.strerror or exc}") from exc
            raise
        log.info("TUN %s: %d queue(s), offloads %#x, read offload %s", name, queues, offload_flags, read_offload)
        return cls(
            name,
            fds,
            lock_fd,
            offload_flags=offload_flags,
            read_offload=bool(offload_flags and read_offload),
            adaptive=adaptive_reads,
            on_packets=on_packets,
            direct_when_quiet=direct_when_quiet,
            one_writer=one_writer,
            inbound_capacity=inbound_capacity,
            outbound_capacity=outbound_capacity,
            outbound_wait=outbound_wait,
            lock_path=lock_path,
        )

    @staticmethod
    def _lock(name: str) -> tuple[int, str]:
        """Takes the per-namespace, per-name lock file; returns its fd and path (removed again by :meth:`close`)."""
        os.makedirs(LOCK_DIR, exist_ok=True)
        path = os.path.join(LOCK_DIR, f"tun-{_netns_id()}-{name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TunError(errno.EBUSY, f"TUN device {name} is in use by another process (lock {path})") from None
            # The holder unlinks the file before releasing it: a lock on a file no longer at the path protects
            # nothing, so take the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd, path
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def _probe_offloads(fd: int) -> int:
        for flags in (TUN_OFFLOADS_FULL, TUN_OFFLOADS_TCP):
            try:
                _set_offload(fd, flags)
            except OSError as exc:
                log.debug("TUNSETOFFLOAD %#x refused: %s", flags, exc)
                continue
            return flags
        log.info("TUN offloads unavailable; falling back to one packet per read/write")
        return 0

    # -- the event loop side ------------------------------------------------------------------------------------------

    def poll_recv_many(self, max: int = 100) -> list[bytes]:
        """Up to ``max`` received IP packets, without blocking; ``[]`` when none wait. With ``on_packets`` the last
        super-packet read may take it past ``max``: keeping the rest back for the next call would let the reader
        thread, given the queue back meanwhile, deliver later packets first."""
        inbound = self._inbound
        with self._mode_lock:
            count = min(max, len(inbound))
            popleft = inbound.popleft
            packets = [popleft() for _ in range(count)]
            if not inbound:
                # Clear the signal, then look again: a batch appended in between re-signals or is seen here.
                if self._signalled.poll(0):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._signal_fd)
                if inbound:
                    os.eventfd_write(self._signal_fd, 1)
                elif self._adaptive and len(packets) < max:
                    # Queued packets first, then what direct-mode queues hold: a flow's order is kept because a
                    # queue only turns direct after its reader's last batch went into the deque (under this lock).
                    for queue in self._queues:
                        if queue.direct:
                            self._read_direct(queue, packets, max)
        return packets

    def _read_direct(self, queue: _Queue, packets: list[bytes], limit: int) -> None:
        budget = min(limit - len(packets), _DIRECT_FRAMES)
        if budget <= 0:
            return
        before = len(packets)
        frames = self._read_frames(queue, packets, budget, ask_first=True)
        queue.rx_direct_frames += max(frames, 0)
        split_into = len(packets) - before
        if len(packets) > limit and self._on_packets is None:
            # A split super-packet overshot: the rest waits in the (empty) deque, still in order, and re-signals.
            self._inbound.extend(packets[limit:])
            del packets[limit:]
            os.eventfd_write(self._signal_fd, 1)
        if frames >= budget or split_into >= _DIRECT_FRAMES:
            # The budget ran out, so more is waiting and traffic is building up, or a super-packet came (a stream,
            # not a lone packet): hand the queue back to its thread (syscalls, splitting, sealing off the loop).
            queue.direct = False
            self._epoll.unregister(queue.fd)
            os.eventfd_write(queue.park_fd, 1)

    def poll_send_ready(self) -> bool:
        """True while every queue's outbound buffer has room."""
        capacity = self.outbound_capacity
        return all(len(queue.outbound) < capacity for queue in self._queues)

    def send(self, packet: bytes) -> bool:
        """Queues one IP packet for writing; False (and counted) when its queue is full (after waiting up to
        ``outbound_wait`` for room) or the device is closed."""
        queues = self._queues
        queue = queues[flow_hash(packet) % len(queues)] if len(queues) > 1 and not self._one_writer else queues[0]
        if self._closed:
            self._drop(TunDropReason.OUTBOUND_QUEUE_FULL)
            return False
        if len(queue.outbound) >= self.outbound_capacity and not self._wait_for_room(queue):
            self._drop(TunDropReason.OUTBOUND_QUEUE_FULL)
            return False
        if queue.writer_idle and not queue.outbound:
            # Nothing of this queue is in flight: writing here saves a thread wakeup (latency of pings, lone ACKs).
            self._write_batch(queue, [packet])
            return True
        queue.outbound.append(packet)
        if queue.writer_idle:
            os.eventfd_write(queue.wake_fd, 1)
        return True

    def send_many(self, packets: Sequence[bytes]) -> int:
        """Queues packets (per-flow order kept); returns how many were accepted, the rest are counted as drops.

        A full queue makes the caller wait up to ``outbound_wait`` seconds for its writer to take packets (default 0:
        drop at once)."""
        queues = self._queues
        if self._closed:
            for _ in packets:
                self._drop(TunDropReason.OUTBOUND_QUEUE_FULL)
            return 0
        if len(packets) <= _INLINE_MAX:
            return sum(self.send(packet) for packet in packets)
        capacity = self.outbound_capacity
        accepted = 0
        if len(queues) == 1 or self._one_writer:
            queue = queues[0]
            start = 0
            count = len(packets)
            while True:
                room = min(capacity - len(queue.outbound), count - start)
                if room > 0:
                    queue.outbound.extend(packets[start : start + room] if start or room < count else packets)
                    start += room
                if start == count or not self._wait_for_room(queue):
                    break
            if start and queue.writer_idle:
                os.eventfd_write(queue.wake_fd, 1)
            accepted = start
        else:
            n = len(queues)
            touched_set: set[int] = set()
            for packet in packets:
                index = flow_hash(packet) % n
                queue = queues[index]
                if len(queue.outbound) >= capacity and not self._wait_for_room(queue):
                    continue
                queue.outbound.append(packet)
                accepted += 1
                touched_set.add(index)
            for index in touched_set:
                if queues[index].writer_idle:
                    os.eventfd_write(queues[index].wake_fd, 1)
        for _ in range(len(packets) - accepted):
            self._drop(TunDropReason.OUTBOUND_QUEUE_FULL)
        return accepted

    def _wait_for_room(self, queue: _Queue) -> bool:
        """Blocks the caller until ``queue``'s writer has taken packets out of its full deque: True, or False after
        ``outbound_wait`` seconds without room (at once when it is 0) or when the device closes.

        Waiting instead of dropping is backpressure: the caller (the UDP receive loop) stops reading meanwhile, so the
        datagrams wait in the socket's buffer and nothing that arrived intact is lost here.
        """
        if queue.writer_idle:
            os.eventfd_write(queue.wake_fd, 1)  # it must run to make room
        if self.outbound_wait <= 0:
            return False  # drop at once, even if the writer, just woken, has already made room
        deadline = time.monotonic() + self.outbound_wait
        capacity = self.outbound_capacity
        while len(queue.outbound) >= capacity and not self._closed:
            queue.producer_waiting = True
            # Re-check after publishing: a writer that saw producer_waiting False popped before this line.
            if len(queue.outbound) < capacity:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            select.select([queue.room_fd], [], [], remaining)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(queue.room_fd)
        queue.producer_waiting = False
        return len(queue.outbound) < capacity and not self._closed

    def write_now(self, packets: Sequence[bytes]) -> None:
        """Writes packets on the calling thread, in the order given (merged when offloads allow; a lone packet such as
        a ping goes straight to the device), counted in :meth:`stats`; a failed write is counted as ``write_failed``.

        For an owner whose thread already holds the batch: handing it to a writer thread would cost a GIL hand-over per
        batch, more than the write, which releases the GIL while the kernel delivers anyway. Each frame goes to the fd
        of the queue its flow hash picks: the kernel records the queue a flow was written on and hands that flow's
        packets in the other direction to the same queue's reader, so writing everything on one queue would leave the
        other readers idle. Per-flow order holds as long as one thread calls this and the owner does not also hand the
        same flows to :meth:`send`/:meth:`send_many`."""
        if not packets:
            return
        if self._closed:
            self._drop(TunDropReason.WRITE_FAILED, len(packets))
            return
        frames = self._merge(packets)
        self._caller_tx_packets += len(packets)
        self._caller_tx_frames += len(frames)
        self._write_frames(self._queues[0].fd, frames, by_flow=len(self._queues) > 1)

    def pending_outbound(self) -> int:
        """Packets accepted by ``send`` but not yet written (for tests and metrics)."""
        return sum(len(queue.outbound) for queue in self._queues)

    def queue_fds(self) -> list[int]:
        return [queue.fd for queue in self._queues]

    def stats(self) -> TunStats:
        """Frames (device reads/writes) and packets (after splitting / before merging) per direction, all queues."""
        queues = self._queues
        return TunStats(
            rx_frames=sum(q.rx_frames for q in queues),
            rx_packets=sum(q.rx_packets for q in queues),
            rx_direct_frames=sum(q.rx_direct_frames for q in queues),
            tx_frames=self._caller_tx_frames + sum(q.tx_frames for q in queues),
            tx_packets=self._caller_tx_packets + sum(q.tx_packets for q in queues),
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._stop_fd, 1)
        for thread in self._threads:
            thread.join()
        for queue in self._queues:
            os.close(queue.fd)
            os.close(queue.wake_fd)
            os.close(queue.park_fd)
            os.close(queue.room_fd)
            queue.outbound.clear()
        self._inbound.clear()
        self._epoll.close()
        os.close(self._signal_fd)
        os.close(self._stop_fd)
        if self._lock_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path)  # while still holding it (see _lock)
        os.close(self._lock_fd)

    def __enter__(self) -> Tun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the threads -------------------------------------------------------------------------------------------------

    def _guarded(self, target: Callable[[_Queue], None], queue: _Queue, os_name: str) -> None:
        """Runs a queue's thread (``os_name``: its name for the kernel, e.g. ``tun-rx0``); an unexpected exception is
        logged, counted and reported through :attr:`failure` (and the event loop is woken to notice it)."""
        set_os_thread_name(os_name)
        try:
            target(queue)
        except BaseException as exc:
            if self._closed:
                return
            name = threading.current_thread().name
            log.critical("TUN %s: thread %s died: %s", self.name, name, exc, exc_info=True)
            self._drop(TunDropReason.THREAD_FAILED)
            if self.failure is None:
                self.failure = f"thread {name} died: {exc.__class__.__name__}: {exc}"
            with contextlib.suppress(OSError):
                os.eventfd_write(self._signal_fd, 1)

    def _drop(self, reason: TunDropReason, count: int = 1) -> None:
        with self._drops_lock:
            self.drops.drop(reason, count)

    def _read_frames(self, queue: _Queue, batch: list[bytes], limit: int, *, ask_first: bool = False) -> int:
        """Reads up to ``limit`` frames without blocking into ``batch`` (split when offloaded); returns frames read,
        or -1 when the device is gone. ``ask_first``: poll before each read instead of reading until EAGAIN (for the
        event loop's direct reads: mostly one lone frame, and nothing on the other queues it looks at)."""
        fd = queue.fd
        read = os.read
        offload = self.offload_enabled
        frames = 0
        before = len(batch)
        for _ in range(limit):
            if ask_first and not queue.direct_readable.poll(0):
                break
            try:
                frame = read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADFD or self._closed:
                    return -1
                log.debug("TUN %s read failed: %s", self.name, exc)
                self._drop(TunDropReason.READ_FAILED)
                break
            frames += 1
            if not offload:
                batch.append(frame)
                continue
            if len(frame) >= VIRTIO_NET_HDR_LEN and not frame[0] and not frame[1]:
                # No flags, no GSO: a plain packet (the common case), without decoding the header.
                batch.append(frame[VIRTIO_NET_HDR_LEN:])
                continue
            try:
                batch.extend(split_gso_frame(frame))
            except PacketParseError as exc:
                log.debug("TUN %s: dropping malformed offload frame: %s", self.name, exc)
                self._drop(TunDropReason.MALFORMED_OFFLOAD_FRAME)
        queue.rx_frames += frames
        queue.rx_packets += len(batch) - before
        return frames

    def _reader(self, queue: _Queue) -> None:
        poller = select.poll()
        poller.register(queue.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        parked = select.poll()
        parked.register(queue.park_fd, select.POLLIN)
        parked.register(self._stop_fd, select.POLLIN)
        stop_poller = select.poll()
        stop_poller.register(self._stop_fd, select.POLLIN)
        inbound = self._inbound
        capacity = self.inbound_capacity
        quiet_timeout = _QUIET_MS if self._adaptive else -1
        on_packets = self._on_packets
        while True:
            if queue.direct:
                if any(ready_fd == self._stop_fd for ready_fd, _ in parked.poll()):
                    return
                try:
                    os.eventfd_read(queue.park_fd)
                except BlockingIOError:
                    pass
                continue
            room = capacity - len(inbound)
            if room <= 0:
                # Backpressure instead of reading and dropping: packets wait in the kernel's queue, where TCP small
                # queues slow the local sender down (and an overflow is counted by the kernel as tx_dropped).
                if stop_poller.poll(_FULL_WAIT_MS):
                    return
                continue
            events = poller.poll(quiet_timeout)
            if any(ready_fd == self._stop_fd for ready_fd, _ in events):
                return
            if not events:
                # Quiet for a while: let the event loop read this queue itself until traffic builds up again.
                with self._mode_lock:
                    queue.direct = True
                    self._epoll.register(queue.fd, select.EPOLLIN)
                continue
            batch: list[bytes] = []
            if self._read_frames(queue, batch, min(_READ_BURST, room)) < 0:
                return
            if not batch:
                continue
            if on_packets is not None:
                self._deliver(on_packets, batch)
                continue
            room = capacity - len(inbound)
            if room < len(batch):
                self._drop(TunDropReason.INBOUND_QUEUE_FULL, len(batch) - max(room, 0))
                batch = batch[: max(room, 0)]
                if not batch:
                    continue
            with self._mode_lock:
                inbound.extend(batch)
            os.eventfd_write(self._signal_fd, 1)

    def _deliver(self, on_packets: Callable[[list[bytes]], None], batch: list[bytes]) -> None:
        try:
            on_packets(batch)
        except Exception:
            if self._closed:
                return
            self._drop(TunDropReason.CONSUMER_FAILED, len(batch))
            self._consumer_failures += 1
            # Loud once, then quiet: a bug hit by every batch must not flood the log at packet rate.
            if self._consumer_failures == 1:
                log.exception(
                    "TUN %s: the packet consumer failed (batch dropped; further failures logged at debug)", self.name
                )
            else:
                log.debug("TUN %s: the packet consumer failed", self.name, exc_info=True)

    def _writer(self, queue: _Queue) -> None:
        poller = select.poll()
        poller.register(queue.wake_fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        outbound = queue.outbound
        popleft = outbound.popleft
        while True:
            if not outbound:
                queue.writer_idle = True
                # Re-check after publishing idleness: a producer that saw writer_idle False appended before this line.
                if not outbound:
                    events = poller.poll()
                    if any(ready_fd == self._stop_fd for ready_fd, _ in events):
                        queue.writer_idle = False
                        return
                queue.writer_idle = False
                try:
                    os.eventfd_read(queue.wake_fd)
                except BlockingIOError:
                    pass
                continue
            if self._closed:
                return
            count = min(len(outbound), _WRITE_BURST)
            batch = [popleft() for _ in range(count)]
            if queue.producer_waiting:
                os.eventfd_write(queue.room_fd, 1)
            if not self._write_batch(queue, batch):
                return

    def _write_batch(self, queue: _Queue, packets: list[bytes]) -> bool:
        """Writes packets to the queue's fd (merged when offloads allow); False once the device is closing."""
        frames = self._merge(packets)
        queue.tx_packets += len(packets)
        queue.tx_frames += len(frames)
        return self._write_frames(queue.fd, frames, by_flow=self._one_writer)

    def _merge(self, packets: Sequence[bytes]) -> Sequence[bytes]:
        """The frames that carry ``packets`` to the device, in order: merged runs with offloads, else the packets."""
        if not self.offload_enabled:
            return packets
        if len(packets) == 1:
            return [_PLAIN_HEADER + packets[0]]  # nothing to merge: skip the flow bookkeeping
        return coalesce(packets, tcp=self._coalesce_tcp, udp=self._coalesce_udp)

    def _write_frames(self, fd: int, frames: Sequence[bytes], *, by_flow: bool = False) -> bool:
        """Writes frames to ``fd`` (a failed write is counted and the rest still go); False once the device is
        closing. With ``by_flow`` each frame goes instead to the fd of the queue its flow hash picks (a merged frame
        carries one flow): the kernel then reads each flow's other direction on that queue, so the reader threads
        share the flows."""
        fds = self._queue_fds
        header = VIRTIO_NET_HDR_LEN if self.offload_enabled else 0
        for frame in frames:
            if by_flow:
                fd = fds[flow_hash(memoryview(frame)[header:] if header else frame) % len(fds)]
            try:
                os.write(fd, frame)
            except OSError as exc:
                if self._closed:
                    return False
                self._on_write_error(frame, exc)
        return True

    def _on_write_error(self, frame: bytes, exc: OSError) -> None:
        self._drop(TunDropReason.WRITE_FAILED)
        merged = self.offload_enabled and len(frame) > VIRTIO_NET_HDR_LEN and frame[1] != 0
        if merged and exc.errno in (errno.EINVAL, errno.EIO) and (self._coalesce_tcp or self._coalesce_udp):
            log.warning("TUN %s refused a coalesced write (%s); writing packets one by one from now on", self.name, exc)
            self._coalesce_tcp = self._coalesce_udp = False
        else:
            log.debug("TUN %s write failed: %s", self.name, exc)
