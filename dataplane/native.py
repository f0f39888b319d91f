"""The hot-path functions the data plane calls: ``dataplane._native`` (C, GIL released per batch) when it is built
and not disabled with ``FIREZONE_NATIVE=0``, else the pure-Python twin ``dataplane.native_fallback``.

Both have the same API and give byte-identical results; the choice is made once, at import, and logged once.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Protocol, TypeVar

from . import native_fallback

Buffer = native_fallback.Buffer

_log = logging.getLogger(__name__)


class OnesComplementSum(Protocol):
    def __call__(self, data: Buffer, initial: int = 0, /) -> int: ...


_T = TypeVar("_T")


class SplitDatagrams(Protocol):
    def __call__(self, buffer: Buffer, size: int, segment_size: int, source: _T, /) -> list[tuple[bytes, _T]]: ...


def _select() -> tuple[ModuleType, str]:
    try:
        from . import _native
    except ImportError as error:
        return native_fallback, f"the C extension dataplane._native is not built ({error}): pure-Python hot path"
    if _native.disabled_by_environment:
        return native_fallback, "FIREZONE_NATIVE=0: pure-Python hot path"
    return _native, f"C hot path (dataplane._native, {_native.openssl_version})"


implementation, description = _select()
#: True when the C extension is in use.
NATIVE = implementation is not native_fallback
if NATIVE:
    _log.debug("data plane: %s", description)
else:
    _log.info("data plane: %s", description)

seal_batch: Callable[[Buffer, int, int, Sequence[Buffer], int | None], list[bytes]] = implementation.seal_batch
open_batch: Callable[[Buffer, Sequence[Buffer]], list[bytes | None]] = implementation.open_batch
ones_complement_sum: OnesComplementSum = implementation.ones_complement_sum
#: The end of a run of plain IPv4 packets of one flow in a list (the gateway's per-flow fast path).
plain_flow_end: Callable[[list[bytes], int, bytes, int, int], int] = implementation.plain_flow_end
#: Bytes of the messages seal_batch makes of packets (for the send accounting done before sealing).
sealed_size: Callable[[Sequence[Buffer], int | None], int] = implementation.sealed_size
#: A batch of datagrams for one destination cut into UDP GSO sends.
gso_run_ends: Callable[[Sequence[Buffer], int, int], list[int]] = implementation.gso_run_ends
#: A batch of packets cut into runs of one destination address (the send path's cryptokey routing).
destination_runs: Callable[[Sequence[Buffer]], list[tuple[int, bytes | None]]] = implementation.destination_runs
#: One UDP GRO read cut into its datagrams, each paired with the sender's address.
split_datagrams: SplitDatagrams = implementation.split_datagrams
AcceptedRun = native_fallback.AcceptedRun
#: The replay check and inner header checks of an opened run of transport messages (the receive path).
accept_transport_run: Callable[[Sequence[Buffer], Sequence[bytes | None], array[int], int, int], AcceptedRun] = (
    implementation.accept_transport_run
)

# The packet transforms. Their pure twins are the functions of dataplane.packet (the reference), which imports this
# module for ones_complement_sum: hence the import below comes last and the pure functions are looked up per call.
# The C functions return None for anything the reference rejects (or they do not handle); the reference is then
# called, so malformed input raises exactly its exceptions.
from . import packet as _packet  # noqa: E402


def split_gso(hdr: _packet.VirtioNetHdr, packet: Buffer) -> list[bytes]:
    """:func:`dataplane.packet.split_gso` (C when built: the GIL is released for a large super-packet)."""
    if NATIVE:
        segments: list[bytes] | None = implementation.split_gso(
            hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start, hdr.csum_offset, packet
        )
        if segments is not None:
            return segments
    return _packet.split_gso(hdr, packet)


def split_gso_frame(frame: Buffer) -> list[bytes]:
    """:func:`split_gso` of a whole TUN read: the ``virtio_net_hdr`` is decoded from the first 10 bytes."""
    if NATIVE:
        segments: list[bytes] | None = implementation.split_gso_frame(frame)
        if segments is not None:
            return segments
    return _packet.split_gso(_packet.VirtioNetHdr.decode(frame), memoryview(frame)[_packet.VIRTIO_NET_HDR_LEN :])


def _pure_flow_hash(packet: Buffer) -> int:
    return _packet.flow_hash(packet)


#: :func:`dataplane.packet.flow_hash` (C when built: the same hash of the same key bytes, without the copies).
flow_hash: Callable[[Buffer], int] = implementation.flow_hash if NATIVE else _pure_flow_hash


def coalesce(packets: Sequence[bytes], *, tcp: bool = True, udp: bool = False) -> list[bytes]:
    """:func:`dataplane.packet.coalesce` (C when built: headers and copies written with the GIL released)."""
    if NATIVE:
        frames: list[bytes] | None = implementation.coalesce(packets, tcp, udp)
        if frames is not None:
            return frames
    return _packet.coalesce(packets, tcp=tcp, udp=udp)
