"""``firezone-wg [-f] IFNAME``: a userspace WireGuard daemon that the stock `wg` tool configures, like wireguard-go.

It creates the TUN device, serves the UAPI on ``/var/run/wireguard/IFNAME.sock`` and moves packets between the TUN
device, the UDP sockets and the sans-IO :class:`dataplane.wireguard.device.Device`, which one lock guards:

- TUN → peer runs in each TUN queue's reader thread: under the lock ``Device.prepare_send`` routes a batch and claims
  its counters; outside it the batch is sealed (the C extension releases the GIL) and sent as GSO runs, so two queues
  seal on two cores. A flow is read by one queue, so its packets are sealed and sent in order by one thread. A queue
  quiet for a few milliseconds is read by the event loop instead (``direct_when_quiet``), under the lock, until
  traffic builds up: a ping's reply then leaves without waking a thread.
- Everything else runs in the event-loop thread, under the lock for each whole wakeup: UDP (GRO) →
  ``receive_datagrams`` → ``drain_packets`` → the batch handed to the TUN's one writer thread (``one_writer``: one
  append and one wake-up per batch; the writer merges it and writes each flow to its queue's fd); the UAPI; the single
  timer, re-armed to ``Device.poll_timeout()`` (a reader thread that moved the deadline earlier wakes the loop).

Without ``-f`` it daemonises (double fork); the parent exits 0 once the interface is up, or 1 with the daemon's error.
SIGTERM/SIGINT, deleting the UAPI socket or deleting the link stop it; the socket and the device are removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataplane.base import Address
    from dataplane.io.tun import Tun
    from dataplane.io.udp import UdpSocket
    from dataplane.wireguard.device import Device
    from dataplane.wireguard.uapi import Uapi, UapiSession

__all__ = ["SOCKET_DIRECTORY", "WgDaemon", "StartupError", "main", "socket_path"]

logger = logging.getLogger("firezone_wg")

SOCKET_DIRECTORY = "/var/run/wireguard"
DEFAULT_MTU = 1420  # wireguard-go's DefaultMTU
TUN_BATCH = 128  # wireguard-go's conn.IdealBatchSize
UDP_BATCH = 64
# How long the event loop waits for the TUN writer to make room before it drops decrypted packets. Waiting is
# backpressure (datagrams stay in the socket buffer meanwhile), as wireguard-go's blocking TUN write; dropping here
# cost TCP retransmits whenever the receive loop outpaced the writer.
TUN_OUTBOUND_WAIT = 0.1
HOUSEKEEPING_INTERVAL = 1.0
UAPI_MAX_UNSENT = 4 * 1024 * 1024  # reply bytes a UAPI client may leave unread before we stop reading its requests
PORT_RETRIES = 100  # wireguard-go retries this often to find a random port free on both families
CAP_NET_ADMIN = 12
IFNAMSIZ = 16
VERSION = "0.1.0"
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
IFF_UP = 0x1


class StartupError(Exception):
    """A condition that stops the daemon from starting; the message is printed as one line."""


def socket_path(ifname: str) -> str:
    return f"{SOCKET_DIRECTORY}/{ifname}.sock"


# -- preflight checks ---------------------------------------------------------------------------------------------


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


def _interface_exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def preflight(ifname: str) -> None:
    """Checks what can be checked before forking, so the errors reach the caller's terminal."""
    if not ifname or len(ifname.encode()) >= IFNAMSIZ or "/" in ifname or any(c.isspace() for c in ifname):
        raise StartupError(f"invalid interface name {ifname!r} (1-{IFNAMSIZ - 1} characters, no '/' or spaces)")
    if os.geteuid() != 0 and not _has_cap_net_admin():
        raise StartupError("must be run as root (creating a TUN device needs CAP_NET_ADMIN)")
    if not os.path.exists("/dev/net/tun"):
        raise StartupError("/dev/net/tun is missing (load the tun module, or pass the device into the container)")
    if _interface_exists(ifname):
        raise StartupError(f"interface {ifname} already exists")


# -- the daemon ---------------------------------------------------------------------------------------------------


def _open_uapi_listener(ifname: str) -> tuple[socket.socket, os.stat_result]:
    os.makedirs(SOCKET_DIRECTORY, mode=0o755, exist_ok=True)  # removed again at exit when nothing else is in it
    path = socket_path(ifname)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        try:
            listener.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                pass  # stale socket of a dead daemon: take it over
            else:
                raise StartupError(f"UAPI socket {path} is in use by another process") from None
            finally:
                probe.close()
            os.unlink(path)
            listener.bind(path)
    except BaseException:
        listener.close()
        raise
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.setblocking(False)
    return listener, os.stat(path)


def _set_link_up(ifname: str, mtu: int) -> None:
    """``ip link set IFNAME mtu MTU up`` through the classic ioctls (no netlink library needed)."""
    name = ifname.encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCSIFMTU, struct.pack("16si20x", name, mtu))
        flags = struct.unpack_from("16sH", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, struct.pack("16sH22x", name, 0)))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))


class _UdpReader:
    """Selector data for a UDP socket: the event loop receives from it before taking the Device lock."""

    __slots__ = ("daemon", "udp")

    def __init__(self, daemon: WgDaemon, udp: UdpSocket) -> None:
        self.daemon = daemon
        self.udp = udp

    def receive(self) -> list[tuple[bytes, Address]]:
        udp = self.udp
        if udp is not self.daemon.udp4 and udp is not self.daemon.udp6:
            return []  # closed by a listen_port change
        return udp.recv_many(UDP_BATCH)


class WgDaemon:
    """The driver: owns the TUN device, the UDP sockets, the UAPI listener and the event loop."""

    def __init__(
        self, ifname: str, *, num_tun_queues: int = 1, mtu: int = DEFAULT_MTU, increase_buffers: bool = True
    ) -> None:
        self.ifname = ifname
        self.num_tun_queues = num_tun_queues
        self.increase_buffers = increase_buffers
        self.mtu = mtu
        self.tun: Tun | None = None
        self.udp4: UdpSocket | None = None
        self.udp6: UdpSocket | None = None
        self.device: Device | None = None
        self.uapi: Uapi | None = None
        self.fwmark = 0
        self._listener: socket.socket | None = None
        self._socket_stat: os.stat_result | None = None
        self._selector = selectors.DefaultSelector()
        self._sessions: dict[int, tuple[socket.socket, UapiSession, bytearray]] = {}  # fd → (conn, session, unsent)
        self._stop = False
        self.failure: str | None = None
        self._signal_pair: tuple[socket.socket, socket.socket] | None = None
        self._previous_wakeup_fd = -1
        # Guards the Device (and the UAPI that configures it) between the event loop and the TUN reader threads.
        self._lock = threading.Lock()
        # The deadline the event loop sleeps until (monotonic), and the eventfd that wakes it when a reader thread
        # moves the Device's timer earlier than that.
        self._sleeping_until = 0.0
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Creates everything; raises StartupError (or OSError) with nothing left behind."""
        from dataplane.io.rng import SystemRng
        from dataplane.io.tun import Tun
        from dataplane.wireguard.device import Device
        from dataplane.wireguard.uapi import Uapi

        try:
            try:
                # One writer thread for all queues: the event loop is this process's busiest thread, and hashing each
                # decrypted packet to a queue and waking a writer per queue cost it more than a second writer gains.
                self.tun = Tun.create(
                    self.ifname,
                    queues=self.num_tun_queues,
                    on_packets=self._on_tun_packets,
                    one_writer=True,
                    outbound_wait=TUN_OUTBOUND_WAIT,
                    # A quiet queue is read by the event loop (under the lock, in _on_tun_readable): a ping's reply
                    # is in the device when the loop's write of the request returns, so it goes out without waking
                    # the reader thread.
                    direct_when_quiet=True,
                )
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    raise StartupError(f"interface {self.ifname} already exists") from exc
                raise StartupError(exc.strerror or str(exc)) from exc
            self._listener, self._socket_stat = _open_uapi_listener(self.ifname)
            # Padding must not grow a full-size packet past the MTU (wireguard-go pads to min(MTU, 16-multiple)).
            self.device = Device(rng=SystemRng(), wall_clock=time.time, mtu=self.mtu)
            port = self._bind(0)
            self.uapi = Uapi(self.device, listen_port=port, on_listen_port=self._bind, on_fwmark=self._set_fwmark)
            _set_link_up(self.ifname, self.mtu)
        except BaseException:
            self.close()
            raise
        selector = self._selector
        selector.register(self.tun.wakeup_fd, selectors.EVENT_READ, self._on_tun_readable)
        selector.register(self._listener, selectors.EVENT_READ, self._on_uapi_accept)
        selector.register(self._wake_fd, selectors.EVENT_READ, self._on_wake)
        logger.info("Device started (UDP port %d, UAPI %s)", port, socket_path(self.ifname))

    def close(self) -> None:
        for sock, _, _ in list(self._sessions.values()):
            self._close_session(sock)
        if self._listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
            self._remove_socket_file()
        for udp in (self.udp4, self.udp6):
            if udp is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(udp.fileno())
                udp.close()
        self.udp4 = self.udp6 = None
        if self.tun is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.tun.wakeup_fd)
            # A non-persistent TUN device disappears with its last descriptor.
            self.tun.close()
            self.tun = None
        self._selector.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _remove_socket_file(self) -> None:
        path = socket_path(self.ifname)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return
        # Only remove our own socket, not one a successor bound after us.
        if self._socket_stat is not None and (current.st_ino, current.st_dev) == (
            self._socket_stat.st_ino,
            self._socket_stat.st_dev,
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            # Leave the host as we found it: the directory goes too unless another daemon's socket is in it.
            with contextlib.suppress(OSError):
                os.rmdir(SOCKET_DIRECTORY)

    def request_stop(self) -> None:
        self._stop = True

    # -- UDP binding (called at start and from the UAPI) ----------------------------------------------------------

    def _bind(self, port: int) -> int:
        from dataplane.io.udp import UdpSocket

        old_port = self.udp4.local_address[1] if self.udp4 is not None else None
        self._close_udp()
        last_error: OSError | None = None
        for _ in range(PORT_RETRIES if port == 0 else 1):
            try:
                udp4 = UdpSocket.bind("0.0.0.0", port, mark=self.fwmark or None, increase_buffers=self.increase_buffers)
            except OSError as exc:
                last_error = exc
                continue
            bound = udp4.local_address[1]
            try:
                udp6: UdpSocket | None = UdpSocket.bind(
                    "::", bound, mark=self.fwmark or None, increase_buffers=self.increase_buffers
                )
            except OSError as exc:
                if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                    udp6 = None  # no IPv6 here: IPv4 alone is fine
                else:
                    udp4.close()
                    last_error = exc
                    continue
            self._install_udp(udp4, udp6)
            return bound
        if old_port is not None and port != old_port:
            # Keep serving on the old port rather than ending up without sockets.
            with contextlib.suppress(OSError):
                self._bind(old_port)
        assert last_error is not None
        raise last_error

    def _install_udp(self, udp4: UdpSocket, udp6: UdpSocket | None) -> None:
        self.udp4, self.udp6 = udp4, udp6
        self._selector.register(udp4.fileno(), selectors.EVENT_READ, self._make_udp_reader(udp4))
        if udp6 is not None:
            self._selector.register(udp6.fileno(), selectors.EVENT_READ, self._make_udp_reader(udp6))

    def _close_udp(self) -> None:
        for udp in (self.udp4, self.udp6):
            if udp is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(udp.fileno())
                udp.close()
        self.udp4 = self.udp6 = None

    def _set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        for udp in (self.udp4, self.udp6):
            if udp is not None and not udp.set_mark(mark):
                raise PermissionError(errno.EPERM, "SO_MARK not permitted")

    # -- event loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Serves until stopped by a signal, by removing the UAPI socket, or by deleting the link."""
        assert self.device is not None
        device = self.device
        selector = self._selector
        self._install_signal_handlers()
        next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL
        lock = self._lock
        try:
            while not self._stop:
                with lock:
                    deadline = device.poll_timeout()
                    wake_at = next_housekeeping if deadline is None else min(deadline, next_housekeeping)
                    self._sleeping_until = wake_at
                events = selector.select(max(0.0, wake_at - time.monotonic()))
                packets: list[bytes] = []
                try:
                    # Outside the lock, so the reader threads can seal meanwhile: receiving, and decrypting (which
                    # changes no Device state; a keypair that changes before receive_opened means decrypting again).
                    received = []
                    handlers = []
                    for key, _ in events:
                        if isinstance(key.data, _UdpReader):
                            datagrams = key.data.receive()
                            if datagrams:
                                received.append(device.open_datagrams(datagrams))
                        else:
                            handlers.append(key.data)
                    with lock:
                        self._sleeping_until = 0.0  # awake: reader threads need not wake the loop
                        now = time.monotonic()
                        for runs in received:
                            device.receive_opened(runs, now)
                        for handler in handlers:
                            handler(now)
                        deadline = device.poll_timeout()
                        if deadline is not None and now >= deadline:
                            device.handle_timeout(now)
                        packets = self._flush()
                    if packets:
                        assert self.tun is not None
                        self.tun.send_many(packets)  # the Tun's own queues and threads: no Device state
                except Exception:
                    # A bug must not take the tunnel down with it; it is loud in the log instead.
                    logger.exception("internal error in the event loop")
                now = time.monotonic()
                if now >= next_housekeeping:
                    next_housekeeping = now + HOUSEKEEPING_INTERVAL
                    self._housekeeping()
        finally:
            self._restore_signal_handlers()

    def _flush(self) -> list[bytes]:
        """Sends the Device's datagrams and logs its events (under the lock); returns its packets for the TUN."""
        device = self.device
        assert device is not None
        runs = device.drain_datagram_runs()
        if runs:
            self._send(runs)
        while (event := device.poll_event()) is not None:
            public_key, what = event
            logger.debug("peer %s: %s", public_key.hex()[:16], type(what).__name__)
        return device.drain_packets()

    def _send(self, runs: list[tuple[Address, list[bytes]]]) -> None:
        udp4, udp6 = self.udp4, self.udp6
        if udp4 is None:
            return
        # Each run goes to one destination: the socket sends it as GSO batches of equal-sized datagrams.
        for destination, payloads in runs:
            udp = udp6 if udp6 is not None and ":" in destination[0] else udp4
            udp.send_batch(destination, payloads)

    def _on_tun_packets(self, packets: list[bytes]) -> None:
        """A TUN reader thread's batch: claim counters under the lock, seal and send outside it (in parallel with the
        other queues and the event loop)."""
        device = self.device
        if device is None:
            return  # still starting: no peers to send to yet
        lock = self._lock
        count = len(packets)
        # Chunks bound the counter range one thread holds unsent, so the other queues' batches overtaking it stay far
        # inside the receiver's replay window (8128 counters).
        for start in range(0, count, TUN_BATCH):
            chunk = packets[start : start + TUN_BATCH] if count > TUN_BATCH else packets
            with lock:
                jobs = device.prepare_send(chunk, time.monotonic())
                runs = device.drain_datagram_runs()
                if runs:
                    # Handshakes and packets sealed from the staging queue: sent before the lock is released, so that
                    # no later batch of their flows can overtake them.
                    self._send(runs)
                deadline = device.poll_timeout()
                if deadline is not None and deadline < self._sleeping_until:
                    self._sleeping_until = deadline
                    os.eventfd_write(self._wake_fd, 1)
            for job in jobs:
                self._send([(job.destination, job.seal())])

    def _on_wake(self, now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def _on_tun_readable(self, now: float) -> None:
        assert self.tun is not None and self.device is not None
        if self.tun.failure is not None and self.failure is None:
            # A dead queue thread would drop its share of the traffic for good: stop, exit 1, let the supervisor act.
            self.failure = f"TUN device {self.ifname}: {self.tun.failure}"
            logger.error("%s; shutting down", self.failure)
            self._stop = True
        # Busy queues' reader threads deliver their batches themselves; this reads the quiet ones (direct_when_quiet),
        # under the lock their callback takes, so a batch of theirs after a hand-back waits until these are sent.
        packets = self.tun.poll_recv_many(TUN_BATCH)
        if packets:
            self.device.send_packets(packets, now)

    def _make_udp_reader(self, udp: UdpSocket) -> _UdpReader:
        return _UdpReader(self, udp)

    def _housekeeping(self) -> None:
        # Like wireguard-go: deleting the UAPI socket or the link stops the daemon.
        try:
            current = os.stat(socket_path(self.ifname))
        except FileNotFoundError:
            current = None
        if current is None or self._socket_stat is None or current.st_ino != self._socket_stat.st_ino:
            logger.info("UAPI socket removed; shutting down")
            self._stop = True
        elif not _interface_exists(self.ifname):
            logger.info("interface removed; shutting down")
            self._stop = True

    # -- UAPI connections -----------------------------------------------------------------------------------------

    def _on_uapi_accept(self, now: float) -> None:
        assert self._listener is not None and self.uapi is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("UAPI accept failed: %s", exc)
            return
        # Non-blocking both ways: a client that does not read its replies must not stall the packet loop.
        conn.setblocking(False)
        session = self.uapi.open_session()
        self._sessions[conn.fileno()] = (conn, session, bytearray())
        self._selector.register(conn, selectors.EVENT_READ, lambda now, conn=conn: self._on_uapi_ready(conn, now))

    def _on_uapi_ready(self, conn: socket.socket, now: float) -> None:
        entry = self._sessions.get(conn.fileno())
        if entry is None:
            return
        _, session, unsent = entry
        if unsent and not self._send_uapi(conn, unsent):
            return
        if session.closed:
            if not unsent:
                self._close_session(conn)
            return
        if len(unsent) >= UAPI_MAX_UNSENT:
            return  # the client reads nothing: take no more requests from it until it catches up
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            session.receive_eof(now)
            self._close_session(conn)
            return
        session.receive_data(data, now)
        # Applying configuration may have queued handshakes or keepalives; they go out in this loop turn's flush.
        unsent += session.data_to_send()
        if unsent and not self._send_uapi(conn, unsent):
            return
        if session.closed and not unsent:
            self._close_session(conn)

    def _send_uapi(self, conn: socket.socket, unsent: bytearray) -> bool:
        """Sends what the socket takes now; waits for writability for the rest. False when the connection is gone."""
        try:
            sent = conn.send(unsent)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            logger.debug("UAPI client went away: %s", exc)
            self._close_session(conn)
            return False
        del unsent[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if unsent else 0)
        with contextlib.suppress(KeyError, ValueError):
            if self._selector.get_key(conn).events != events:
                self._selector.modify(conn, events, self._selector.get_key(conn).data)
        return True

    def _close_session(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        self._sessions.pop(conn.fileno(), None)
        conn.close()

    # -- signals --------------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._signal_pair = (reader, writer)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._selector.register(reader, selectors.EVENT_READ, self._on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.request_stop())

    def _on_signal(self, now: float) -> None:
        assert self._signal_pair is not None
        with contextlib.suppress(BlockingIOError):
            self._signal_pair[0].recv(64)

    def _restore_signal_handlers(self) -> None:
        if self._signal_pair is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._signal_pair[0])
        for sock in self._signal_pair:
            sock.close()
        self._signal_pair = None


# -- process plumbing ---------------------------------------------------------------------------------------------


def _log_level() -> int | None:
    """wireguard-go's LOG_LEVEL: verbose/debug, error (the default), silent."""
    value = os.environ.get("LOG_LEVEL", "error").strip().lower()
    if value in ("verbose", "debug"):
        return logging.DEBUG
    if value in ("info",):
        return logging.INFO
    if value in ("silent", "none", "off"):
        return None
    return logging.ERROR


def _configure_logging(ifname: str) -> None:
    level = _log_level()
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if level is not None else logging.NullHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s: ({ifname}) %(asctime)s %(message)s", "%Y/%m/%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level is not None else logging.CRITICAL + 1)


def _no_inc_buf() -> bool:
    """FIREZONE_NO_INC_BUF, as the gateway reads it: leave net.core.{r,w}mem_max alone."""
    from agent.config import parse_bool

    value = os.environ.get("FIREZONE_NO_INC_BUF", "")
    if not value:
        return False
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise StartupError(f"invalid FIREZONE_NO_INC_BUF={value!r}: {exc}") from None


def _num_tun_queues() -> int:
    from dataplane.io.tun import queues_from_env

    try:
        return queues_from_env()
    except ValueError as exc:
        value = os.environ.get("FIREZONE_NUM_TUN_THREADS", "")
        raise StartupError(f"invalid FIREZONE_NUM_TUN_THREADS={value!r}: {exc}") from None


def _serve(ifname: str, ready_fd: int | None, *, num_tun_queues: int, increase_buffers: bool) -> int:
    """Runs the daemon in this process; reports startup success or failure on ``ready_fd`` (daemon mode)."""
    daemon: WgDaemon | None = None
    try:
        daemon = WgDaemon(ifname, num_tun_queues=num_tun_queues, increase_buffers=increase_buffers)
        daemon.start()
    except Exception as exc:
        logger.debug("startup failed", exc_info=True)
        message = (
            f"firezone-wg: {exc}"
            if isinstance(exc, (StartupError, OSError))
            else f"firezone-wg: internal error: {exc!r}"
        )
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
        else:
            print(message, file=sys.stderr)
        return 1
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    # Everything allocated so far lives as long as the process: keep the cyclic collector from rescanning it, so
    # full collections stay short while packets flow.
    gc.freeze()
    try:
        daemon.run()
    except Exception:
        logger.exception("the event loop failed")
        return 1
    finally:
        daemon.close()
        logger.info("Device closed")
    return 1 if daemon.failure is not None else 0


def _daemonise(ifname: str, *, num_tun_queues: int, increase_buffers: bool) -> int:
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_fd)
        chunks = []
        while chunk := os.read(read_fd, 4096):
            chunks.append(chunk)
        os.close(read_fd)
        os.waitpid(first, 0)
        status = b"".join(chunks).decode(errors="replace").strip()
        if status == "ok":
            return 0
        print(status or "firezone-wg: the daemon exited during startup", file=sys.stderr)
        return 1
    # First child: leave the caller's session, then fork again so the daemon can never regain a terminal.
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if "LOG_LEVEL" not in os.environ:
        # Like wireguard-go, the daemon keeps stdout/stderr only when asked to log.
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)
    code = 1
    try:
        code = _serve(ifname, write_fd, num_tun_queues=num_tun_queues, increase_buffers=increase_buffers)
    finally:
        logging.shutdown()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="firezone-wg",
        description="Userspace WireGuard daemon configured through the UAPI socket, like wireguard-go.",
    )
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("--version", action="version", version=f"firezone-wg {VERSION}")
    parser.add_argument("interface", metavar="INTERFACE-NAME")
    args = parser.parse_args(argv)
    ifname: str = args.interface
    try:
        preflight(ifname)
        num_tun_queues = _num_tun_queues()
        increase_buffers = not _no_inc_buf()
    except StartupError as exc:
        print(f"firezone-wg: {exc}", file=sys.stderr)
        return 1
    _configure_logging(ifname)
    if args.foreground:
        return _serve(ifname, None, num_tun_queues=num_tun_queues, increase_buffers=increase_buffers)
    return _daemonise(ifname, num_tun_queues=num_tun_queues, increase_buffers=increase_buffers)


if __name__ == "__main__":
    sys.exit(main())
