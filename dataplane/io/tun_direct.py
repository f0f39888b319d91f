"""Writing to a TUN device from the event-loop thread itself, merged, without the writer threads.

:meth:`Tun.send_many <dataplane.io.tun.Tun.send_many>` hands a batch to the queue's writer thread. In a process whose
event loop does the per-packet work (the gateway, the lab client) that hand-off costs more than the write: waking the
writer releases the GIL, the writer then merges the batch in Python while the loop waits to get the GIL back (up to
the interpreter's switch interval), and a lone packet may wait behind a batch. :class:`DirectTunWriter` merges the
batch (``dataplane.native.coalesce``, as the writer threads do) and writes the frames at once on the calling thread:
one packet (a ping) goes straight to the device, and ``os.write`` still releases the GIL while the kernel delivers.

All writes go to one queue's descriptor, from one thread, in the order given, so no flow is reordered. The owner must
stop using the writer before it closes the device.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

from dataplane.base import DropCounter
from dataplane.io.tun import TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6, Tun, TunDropReason
from dataplane.native import coalesce
from dataplane.packet import VIRTIO_NET_HDR_LEN

logger = logging.getLogger(__name__)

# A virtio_net_hdr with no flags and no GSO: the frame is one plain packet (what coalesce gives a lone packet).
_PLAIN_HEADER = bytes(VIRTIO_NET_HDR_LEN)


class DirectTunWriter:
    """Writes IP packets to ``fd`` (a TUN queue opened with ``offload_flags``) on the calling thread.

    ``drops`` counts failed writes (``write_failed``; the device's own counter when built with :meth:`for_tun`)."""

    __slots__ = ("_fd", "_merge_tcp", "_merge_udp", "_offload", "drops", "frames", "packets")

    def __init__(self, fd: int, offload_flags: int, drops: DropCounter | None = None) -> None:
        self._fd = fd
        self._offload = offload_flags != 0
        self._merge_tcp = bool(offload_flags & (TUN_F_TSO4 | TUN_F_TSO6))
        self._merge_udp = bool(offload_flags & (TUN_F_USO4 | TUN_F_USO6))
        self.drops = drops if drops is not None else DropCounter()
        self.frames = 0  # device writes
        self.packets = 0  # IP packets in them

    @classmethod
    def for_tun(cls, tun: Tun) -> DirectTunWriter:
        """A writer for the device's first queue (any queue's descriptor reaches the same device)."""
        return cls(tun.queue_fds()[0], tun.offload_flags, tun.drops)

    def write(self, packets: Sequence[bytes]) -> None:
        """Writes the packets in order (merged when the device takes offloads); a failed write is counted."""
        if not packets:
            return
        if not self._offload:
            frames: Sequence[bytes] = packets
        elif len(packets) == 1:
            frames = [_PLAIN_HEADER + packets[0]]  # nothing to merge: skip the flow bookkeeping
        else:
            frames = coalesce(packets, tcp=self._merge_tcp, udp=self._merge_udp)
        fd = self._fd
        for frame in frames:
            try:
                os.write(fd, frame)
            except OSError as exc:
                self._on_write_error(frame, exc)
        self.frames += len(frames)
        self.packets += len(packets)

    def _on_write_error(self, frame: bytes, exc: OSError) -> None:
        """Counts the failed frame (as the writer threads do); a merged frame the kernel refuses turns merging off."""
        self.drops.drop(TunDropReason.WRITE_FAILED)
        merged = self._offload and len(frame) > VIRTIO_NET_HDR_LEN and frame[1] != 0
        if merged and exc.errno in (errno.EINVAL, errno.EIO) and (self._merge_tcp or self._merge_udp):
            logger.warning("TUN refused a merged write (%s); writing packets one by one from now on", exc)
            self._merge_tcp = self._merge_udp = False
        else:
            logger.debug("TUN write failed: %s", exc)
