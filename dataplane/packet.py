"""IP/TCP/UDP/ICMP packet views, Internet checksums and the TUN offload transforms.

Sans-IO and allocation-light: headers are read with ``struct.unpack_from`` straight out of the buffer, checksums are
computed with one ``int.from_bytes`` per buffer (2**16 is 1 modulo 0xFFFF, so a big-endian integer taken modulo 0xFFFF
equals the one's-complement sum of its 16-bit words, up to the usual 0/0xFFFF ambiguity).

The offload half speaks the ``virtio_net_hdr`` that a TUN device opened with ``IFF_VNET_HDR`` puts in front of every
frame: :func:`split_gso` turns a TSO/USO super-packet read from the kernel into MTU-sized packets with correct IP ids,
TCP sequence numbers and checksums; :func:`coalesce` merges consecutive same-flow TCP/UDP segments into super-packets
the kernel segments again on write (GRO in reverse).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from dataplane.native import ones_complement_sum as native_ones_complement_sum

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
UDP_HEADER_LEN = 8
TCP_MIN_HEADER_LEN = 20

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

# include/uapi/linux/virtio_net.h
VIRTIO_NET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

# Largest IP datagram the length fields can describe; a coalesced super-packet must fit.
MAX_IP_PACKET = 65535
# Firezone (#14114) and the kernel's UDP_MAX_SEGMENTS both cap a batch at 64 segments.
MAX_SEGMENTS = 64

_VNET_HDR = struct.Struct("<BBHHHH")
_IPV4_FIXED = struct.Struct("!BBHHHBBH4s4s")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_FOLD = 0xFFFF
_NO_OFFLOAD_HEADER = bytes(VIRTIO_NET_HDR_LEN)


class PacketParseError(ValueError):
    """The bytes are not a packet this module can interpret (truncated, wrong version, bad lengths...)."""


# ---------------------------------------------------------------------------------------------------------------------
# Checksums


# ones_complement_sum(data, initial=0): the folded 16-bit one's-complement sum of ``data`` (odd length padded with a
# zero byte) plus ``initial`` (0..2**62): 0 only when both are zero, else 1..0xFFFF. Not complemented: this is the
# "partial" value that goes into a NEEDS_CSUM checksum field. From dataplane.native: C when built, else pure Python.
ones_complement_sum = native_ones_complement_sum


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 checksum: the complement of :func:`ones_complement_sum`."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Unfolded sum of the TCP/UDP pseudo-header (RFC 793/768 for IPv4, RFC 8200 §8.1 for IPv6)."""
    return int.from_bytes(src, "big") % _FOLD + int.from_bytes(dst, "big") % _FOLD + protocol + length


# ---------------------------------------------------------------------------------------------------------------------
# Views


@dataclass(frozen=True, slots=True)
class IpView:
    """One IP packet's headers, parsed once. Addresses are raw bytes (4 or 16); ``l4_offset`` indexes the TCP/UDP/ICMP
    header. IPv6 extension headers are not walked: ``protocol`` is then the first next-header value."""

    version: int
    header_len: int
    protocol: int
    src: bytes
    dst: bytes
    total_len: int
    ttl: int
    is_fragment: bool

    @property
    def l4_offset(self) -> int:
        return self.header_len

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)


@dataclass(frozen=True, slots=True)
class TcpView:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    header_len: int
    flags: int
    window: int


@dataclass(frozen=True, slots=True)
class UdpView:
    src_port: int
    dst_port: int
    length: int


@dataclass(frozen=True, slots=True)
class IcmpView:
    type: int
    code: int
    rest: int  # the 4 bytes after the checksum (echo id/sequence, MTU, ...) as an integer


def parse_ip(packet: bytes | bytearray | memoryview) -> IpView:
    """Parses the IP header; raises :class:`PacketParseError` for anything not a well-formed IPv4/IPv6 header."""
    if len(packet) < 1:
        raise PacketParseError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < IPV4_HEADER_LEN:
            raise PacketParseError("truncated IPv4 header")
        vihl, _tos, total_len, _ident, frag, ttl, protocol, _csum, src, dst = _IPV4_FIXED.unpack_from(packet)
        header_len = (vihl & 0x0F) * 4
        if header_len < IPV4_HEADER_LEN or header_len > len(packet):
            raise PacketParseError("bad IPv4 header length")
        if total_len < header_len or total_len > len(packet):
            raise PacketParseError("bad IPv4 total length")
        return IpView(4, header_len, protocol, src, dst, total_len, ttl, bool(frag & 0x3FFF))
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            raise PacketParseError("truncated IPv6 header")
        payload_len = _U16.unpack_from(packet, 4)[0]
        total_len = IPV6_HEADER_LEN + payload_len
        if total_len > len(packet):
            raise PacketParseError("bad IPv6 payload length")
        protocol = packet[6]
        return IpView(
            6,
            IPV6_HEADER_LEN,
            protocol,
            bytes(packet[8:24]),
            bytes(packet[24:40]),
            total_len,
            packet[7],
            protocol == 44,
        )
    raise PacketParseError(f"not IPv4/IPv6 (version {version})")


def parse_tcp(packet: bytes | bytearray | memoryview, ip: IpView) -> TcpView:
    off = ip.header_len
    if ip.protocol != IPPROTO_TCP or ip.is_fragment:
        raise PacketParseError("not an unfragmented TCP packet")
    if ip.total_len - off < TCP_MIN_HEADER_LEN:
        raise PacketParseError("truncated TCP header")
    sport, dport, seq, ack, doff, flags, window = struct.unpack_from("!HHIIBBH", packet, off)
    header_len = (doff >> 4) * 4
    if header_len < TCP_MIN_HEADER_LEN or off + header_len > ip.total_len:
        raise PacketParseError("bad TCP data offset")
    return TcpView(sport, dport, seq, ack, header_len, flags, window)


def parse_udp(packet: bytes | bytearray | memoryview, ip: IpView) -> UdpView:
    off = ip.header_len
    if ip.protocol != IPPROTO_UDP or ip.is_fragment:
        raise PacketParseError("not an unfragmented UDP packet")
    if ip.total_len - off < UDP_HEADER_LEN:
        raise PacketParseError("truncated UDP header")
    sport, dport, length = struct.unpack_from("!HHH", packet, off)
    if length < UDP_HEADER_LEN or off + length > ip.total_len:
        raise PacketParseError("bad UDP length")
    return UdpView(sport, dport, length)


def parse_icmp(packet: bytes | bytearray | memoryview, ip: IpView) -> IcmpView:
    off = ip.header_len
    expected = IPPROTO_ICMP if ip.version == 4 else IPPROTO_ICMPV6
    if ip.protocol != expected or ip.is_fragment:
        raise PacketParseError("not an unfragmented ICMP packet")
    if ip.total_len - off < 8:
        raise PacketParseError("truncated ICMP header")
    icmp_type, code = packet[off], packet[off + 1]
    return IcmpView(icmp_type, code, _U32.unpack_from(packet, off + 4)[0])


def ipv4_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum an IPv4 header (with its checksum field zeroed or not) must carry."""
    if len(header) < IPV4_HEADER_LEN:
        raise PacketParseError("truncated IPv4 header")
    current = _U16.unpack_from(header, 10)[0]
    # Subtracting the stored field is the same as summing with it zeroed.
    return internet_checksum(header, _FOLD - current if current else 0)


def l4_checksum_valid(packet: bytes | bytearray | memoryview) -> bool:
    """True when the TCP/UDP checksum of ``packet`` verifies (a UDP checksum of 0 over IPv4 means "none")."""
    ip = parse_ip(packet)
    if ip.protocol not in (IPPROTO_TCP, IPPROTO_UDP) or ip.is_fragment:
        raise PacketParseError("not an unfragmented TCP/UDP packet")
    segment = memoryview(packet)[ip.header_len : ip.total_len]
    if ip.protocol == IPPROTO_UDP and ip.version == 4 and len(segment) >= 8 and segment[6] == segment[7] == 0:
        return True
    return ones_complement_sum(segment, pseudo_header_sum(ip.src, ip.dst, ip.protocol, len(segment))) == _FOLD


# ---------------------------------------------------------------------------------------------------------------------
# Flow hash


def flow_hash(packet: bytes | bytearray | memoryview) -> int:
    """A per-process stable hash of the packet's flow (protocol, addresses and, for TCP/UDP, ports).

    Only used to pin a flow to one TUN queue, so it need not be stable across processes or symmetric. Garbage hashes to 0.
    """
    n = len(packet)
    if n < IPV4_HEADER_LEN:
        return 0
    first = packet[0]
    if first == 0x45:  # the common case: IPv4 without options; ports directly follow the addresses
        if packet[9] in _PORTED and n >= 24 and not (packet[6] & 0x3F or packet[7]):
            return hash(bytes(packet[9:10]) + bytes(packet[12:24]))
        return hash(bytes(packet[9:10]) + bytes(packet[12:20]))
    version = first >> 4
    if version == 4:
        protocol = packet[9]
        ihl = (first & 0x0F) * 4
        key = bytes(packet[9:10]) + bytes(packet[12:20])
        if protocol in _PORTED and not (packet[6] & 0x3F or packet[7]) and n >= ihl + 4:
            key += bytes(packet[ihl : ihl + 4])
        return hash(key)
    if version == 6 and n >= IPV6_HEADER_LEN:
        if packet[6] in _PORTED and n >= 44:
            return hash(bytes(packet[6:7]) + bytes(packet[8:44]))
        return hash(bytes(packet[6:7]) + bytes(packet[8:40]))
    return 0


_PORTED = frozenset((IPPROTO_TCP, IPPROTO_UDP))


# ---------------------------------------------------------------------------------------------------------------------
# virtio_net_hdr


@dataclass(frozen=True, slots=True)
class VirtioNetHdr:
    """``struct virtio_net_hdr`` (little-endian, as a TUN device on a little-endian host uses it)."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> VirtioNetHdr:
        if len(data) < VIRTIO_NET_HDR_LEN:
            raise PacketParseError("truncated virtio_net_hdr")
        return cls(*_VNET_HDR.unpack_from(data))

    def encode(self) -> bytes:
        return _VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset)


def split_gso(hdr: VirtioNetHdr, packet: bytes | bytearray | memoryview) -> list[bytes]:
    """Turns one frame read from a TUN with ``IFF_VNET_HDR`` (header already decoded, ``packet`` after it) into plain IP
    packets with complete checksums: TSO/USO super-packets are segmented, a pending NEEDS_CSUM checksum is filled in.

    Raises :class:`PacketParseError` for frames that do not make sense.
    """
    gso = hdr.gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [bytes(packet)]
        return [_complete_checksum(hdr, packet)]
    if gso in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        return _split_tcp(hdr, packet, 4 if gso == VIRTIO_NET_HDR_GSO_TCPV4 else 6)
    if gso == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split_with_template(hdr, packet, IPPROTO_UDP, None)
    raise PacketParseError(f"unsupported gso_type {hdr.gso_type}")


def _complete_checksum(hdr: VirtioNetHdr, packet: bytes | bytearray | memoryview) -> bytes:
    start = hdr.csum_start
    field = start + hdr.csum_offset
    if field + 2 > len(packet) or start > len(packet):
        raise PacketParseError("checksum offsets outside the packet")
    out = bytearray(packet)
    # The field holds the pseudo-header partial sum: summing over it includes it.
    checksum = internet_checksum(memoryview(out)[start:])
    if checksum == 0 and field - start == 6:
        checksum = 0xFFFF  # UDP: 0 means "no checksum"
    _U16.pack_into(out, field, checksum)
    return bytes(out)


def _ip_headers(packet: bytes | bytearray | memoryview, expected_version: int | None) -> tuple[int, int, bytes, bytes]:
    """(version, header length, src, dst) of the outer IP header, without trusting its length fields."""
    if len(packet) < 1:
        raise PacketParseError("empty packet")
    version = packet[0] >> 4
    if expected_version is not None and version != expected_version:
        raise PacketParseError("gso_type does not match the IP version")
    if version == 4:
        if len(packet) < IPV4_HEADER_LEN:
            raise PacketParseError("truncated IPv4 header")
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_HEADER_LEN or ihl > len(packet):
            raise PacketParseError("bad IPv4 header length")
        return 4, ihl, bytes(packet[12:16]), bytes(packet[16:20])
    if version == 6:
        if len(packet) < IPV6_HEADER_LEN:
            raise PacketParseError("truncated IPv6 header")
        return 6, IPV6_HEADER_LEN, bytes(packet[8:24]), bytes(packet[24:40])
    raise PacketParseError(f"not IPv4/IPv6 (version {version})")


def _segment_plan(
    packet: bytes | bytearray | memoryview, l4_header_len: int | None, protocol: int, expected_version: int | None
) -> tuple[int, int, int, int, bytearray, int, int]:
    """What splitting needs, computed once per super-packet: (version, ihl, l4 header length, IPv4 id, header template
    with the per-segment fields zeroed, IPv4 header sum of the template, pseudo-header + L4 header sum of the template).
    """
    version, ihl, src, dst = _ip_headers(packet, expected_version)
    if (packet[9] if version == 4 else packet[6]) != protocol:
        raise PacketParseError("gso_type does not match the transport protocol")
    if l4_header_len is None:  # TCP
        if len(packet) < ihl + TCP_MIN_HEADER_LEN:
            raise PacketParseError("truncated TCP header")
        l4_header_len = (packet[ihl + 12] >> 4) * 4
        if l4_header_len < TCP_MIN_HEADER_LEN:
            raise PacketParseError("bad TCP data offset")
    headers_len = ihl + l4_header_len
    if headers_len > len(packet):
        raise PacketParseError("truncated transport header")
    template = bytearray(packet[:headers_len])
    ip_id = 0
    ip_sum = 0
    if version == 4:
        ip_id = _U16.unpack_from(template, 4)[0]
        template[2:6] = b"\x00\x00\x00\x00"  # total length, id
        template[10:12] = b"\x00\x00"
        ip_sum = int.from_bytes(template[:ihl], "big")
    else:
        template[4:6] = b"\x00\x00"
    if protocol == IPPROTO_TCP:
        template[ihl + 4 : ihl + 8] = b"\x00\x00\x00\x00"  # sequence number
        template[ihl + 13] = 0  # flags
        template[ihl + 16 : ihl + 18] = b"\x00\x00"
    else:
        template[ihl + 4 : ihl + 8] = b"\x00\x00\x00\x00"  # length, checksum
    l4_sum = pseudo_header_sum(src, dst, protocol, 0) + int.from_bytes(template[ihl:], "big") % _FOLD
    return version, ihl, l4_header_len, ip_id, template, ip_sum % _FOLD, l4_sum


# IPv4 (no options) + TCP fixed header, and IPv6 + TCP fixed header, packed in one call per segment.
_V4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
_V6_TCP = struct.Struct("!IHBB16s16sHHIIBBHHH")


def _split_tcp(hdr: VirtioNetHdr, packet: bytes | bytearray | memoryview, version: int) -> list[bytes]:
    """TSO split. Checksums are built from per-frame constant sums: per segment only the payload is summed (one
    :func:`ones_complement_sum`) and both headers are packed by one ``struct`` call."""
    n = len(packet)
    if version == 4 and n >= 40 and packet[0] == 0x45 and packet[9] == IPPROTO_TCP:
        fields = _V4_TCP.unpack_from(packet)
        thlen = (packet[32] >> 4) * 4
        ihl = IPV4_HEADER_LEN
    elif version == 6 and n >= 60 and packet[0] >> 4 == 6 and packet[6] == IPPROTO_TCP:
        fields = _V6_TCP.unpack_from(packet)
        thlen = (packet[52] >> 4) * 4
        ihl = IPV6_HEADER_LEN
    else:
        return _split_with_template(hdr, packet, IPPROTO_TCP, version)
    headers_len = ihl + thlen
    if thlen < TCP_MIN_HEADER_LEN or headers_len > n:
        raise PacketParseError("bad TCP data offset")
    mss = hdr.gso_size
    if mss <= 0:
        raise PacketParseError("TSO frame with gso_size 0")
    if headers_len + min(mss, n - headers_len) > MAX_IP_PACKET:
        raise PacketParseError("TSO segment longer than an IP packet")
    options = bytes(packet[ihl + TCP_MIN_HEADER_LEN : headers_len])
    options_sum = int.from_bytes(options, "big") % _FOLD if options else 0
    view = memoryview(packet)
    count = max(1, -(-(n - headers_len) // mss))
    last = count - 1
    from_bytes = int.from_bytes
    payload_sum = ones_complement_sum
    join = b"".join
    out: list[bytes] = []
    if version == 4:
        vihl, tos, _, ip_id0, frag, ttl, proto, _, src, dst, sport, dport, seq0, ack, doff, flags, win, _, urg = fields
        ip_sum = (vihl << 8) + tos + frag + (ttl << 8) + proto + from_bytes(src + dst, "big") % _FOLD
    else:
        first_word, _, proto, hop_limit, src, dst, sport, dport, seq0, ack, doff, flags, win, _, urg = fields
    tcp_sum = (
        from_bytes(src + dst, "big") % _FOLD
        + IPPROTO_TCP
        + sport
        + dport
        + (ack >> 16)
        + (ack & 0xFFFF)
        + (doff << 8)
        + win
        + urg
        + options_sum
    )
    pack4 = _V4_TCP.pack
    pack6 = _V6_TCP.pack
    for index in range(count):
        start = headers_len + index * mss
        segment = view[start : start + mss]
        seg_len = len(segment)
        seq = (seq0 + index * mss) & 0xFFFFFFFF
        seg_flags = flags if index == last else flags & ~(TCP_FIN | TCP_PSH)
        if index:
            seg_flags &= ~TCP_CWR
        # The payload's folded sum (0xFFFF and 0 are the same value modulo _FOLD); every other operand is small.
        payload = payload_sum(segment)
        checksum = (-(tcp_sum + thlen + seg_len + (seq >> 16) + (seq & 0xFFFF) + seg_flags + payload)) % _FOLD
        if version == 4:
            total = headers_len + seg_len
            ip_id = (ip_id0 + index) & 0xFFFF
            ip_checksum = (-(ip_sum + total + ip_id)) % _FOLD
            header = pack4(
                vihl, tos, total, ip_id, frag, ttl, proto, ip_checksum, src, dst,
                sport, dport, seq, ack, doff, seg_flags, win, checksum, urg,
            )  # fmt: skip
        else:
            header = pack6(
                first_word, thlen + seg_len, proto, hop_limit, src, dst,
                sport, dport, seq, ack, doff, seg_flags, win, checksum, urg,
            )  # fmt: skip
        out.append(join((header, options, segment)))
    return out


def _split_with_template(
    hdr: VirtioNetHdr, packet: bytes | bytearray | memoryview, protocol: int, expected_version: int | None
) -> list[bytes]:
    """TSO/USO split for any header layout (IPv4 options, UDP): each segment's headers are a copy of a template with
    the per-segment fields patched in. Checksums are built incrementally from the template sums: per segment only the
    payload is summed (one :func:`ones_complement_sum`), everything else is small-integer arithmetic."""
    is_tcp = protocol == IPPROTO_TCP
    version, ihl, l4_len, ip_id0, template, ip_sum, l4_sum = _segment_plan(
        packet, None if is_tcp else UDP_HEADER_LEN, protocol, expected_version
    )
    size = hdr.gso_size
    if size <= 0:
        raise PacketParseError(f"{'TSO' if is_tcp else 'USO'} frame with gso_size 0")
    headers_len = ihl + l4_len
    if headers_len + min(size, len(packet) - headers_len) > MAX_IP_PACKET:
        raise PacketParseError(f"{'TSO' if is_tcp else 'USO'} segment longer than an IP packet")
    view = memoryview(packet)
    count = max(1, -(-(len(packet) - headers_len) // size))
    last = count - 1
    seq0 = _U32.unpack_from(packet, ihl + 4)[0] if is_tcp else 0
    flags = packet[ihl + 13] if is_tcp else 0
    pack_into = struct.pack_into
    payload_sum = ones_complement_sum
    join = b"".join
    out: list[bytes] = []
    for index in range(count):
        start = headers_len + index * size
        segment = view[start : start + size]
        seg_len = len(segment)
        l4_total = l4_len + seg_len
        header = bytearray(template)
        if version == 4:
            total = ihl + l4_total
            ip_id = (ip_id0 + index) & 0xFFFF
            pack_into("!HH", header, 2, total, ip_id)
            pack_into("!H", header, 10, (-(ip_sum + total + ip_id)) % _FOLD)
        else:
            pack_into("!H", header, 4, l4_total)
        payload = payload_sum(segment)
        if is_tcp:
            seq = (seq0 + index * size) & 0xFFFFFFFF
            seg_flags = flags if index == last else flags & ~(TCP_FIN | TCP_PSH)
            if index:
                seg_flags &= ~TCP_CWR
            checksum = (-(l4_sum + l4_total + (seq >> 16) + (seq & 0xFFFF) + seg_flags + payload)) % _FOLD
            pack_into("!I", header, ihl + 4, seq)
            header[ihl + 13] = seg_flags
            pack_into("!H", header, ihl + 16, checksum)
        else:
            # The UDP length counts twice: in the pseudo-header and in the UDP header.
            checksum = (-(l4_sum + 2 * l4_total + payload)) % _FOLD
            pack_into("!HH", header, ihl + 4, l4_total, checksum or 0xFFFF)
        out.append(join((header, segment)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Coalescing (the write direction)


class _Group:
    """Consecutive segments of one flow being merged into one super-packet."""

    __slots__ = (
        "closed",
        "gso_size",
        "ihl",
        "is_tcp",
        "l4_len",
        "next_ip_id",
        "next_seq",
        "packets",
        "total",
        "version",
    )

    def __init__(self, packet: bytes, args: _GroupArgs) -> None:
        version, ihl, l4_len, is_tcp, payload_len, next_seq, may_extend, ip_id = args
        self.packets = [packet]
        self.version = version
        self.ihl = ihl
        self.l4_len = l4_len
        self.is_tcp = is_tcp
        self.gso_size = payload_len
        self.next_seq = next_seq
        # The kernel gives the segments of a super-packet consecutive IPv4 ids, so without DF (ids matter for
        # reassembly) only packets whose ids are already consecutive may merge; -1: ids are not checked.
        self.next_ip_id = (ip_id + 1) & 0xFFFF if ip_id >= 0 else -1
        self.total = len(packet)
        self.closed = not may_extend


def coalesce(packets: Sequence[bytes], *, tcp: bool = True, udp: bool = False) -> list[bytes]:
    """Turns IP packets into TUN write frames (``virtio_net_hdr`` + packet), merging same-flow TCP segments (and UDP
    datagrams when ``udp``) that the kernel can segment again. Packets of one flow keep their order; checksums of the
    input are assumed valid (they are re-derived only for merged packets). Garbage passes through unmerged."""
    frames: list[bytes | _Group] = []
    open_groups: dict[object, _Group] = {}
    unpack_v4 = _V4_TCP_COALESCE.unpack_from
    for packet in packets:
        n = len(packet)
        if tcp and n > 40 and packet[0] == 0x45 and packet[9] == IPPROTO_TCP:
            # Fast path, IPv4 without options + TCP: one unpack gives every field the merge rules look at.
            tos, total, ip_id, frag, ttl, flow, seq, ack_doff, flags, window, urgent = unpack_v4(packet)
            thlen = (ack_doff[4] >> 4) * 4
            payload_len = n - 20 - thlen
            if total != n or frag & 0xBFFF or flags & ~TCP_PSH != TCP_ACK or thlen < 20 or payload_len <= 0:
                frames.append(packet)
                continue
            v4_key = (tos, frag, ttl, flow, ack_doff, window, urgent, packet[40 : 20 + thlen] if thlen > 20 else b"")
            args = (
                4,
                20,
                thlen,
                True,
                payload_len,
                (seq + payload_len) & 0xFFFFFFFF,
                not flags & TCP_PSH,
                -1 if frag & _IPV4_DF else ip_id,
            )
            group = open_groups.get(v4_key)
            if group is not None and _try_append(group, packet, args):
                continue
            group = _Group(packet, args)
            open_groups[v4_key] = group
            frames.append(group)
            continue
        key, group_args = _coalesce_key(packet, tcp, udp)
        if key is None:
            frames.append(packet)
            continue
        group = open_groups.get(key)
        if group is not None and _try_append(group, packet, group_args):
            continue
        group = _Group(packet, group_args)
        open_groups[key] = group
        frames.append(group)
    out: list[bytes] = []
    for frame in frames:
        if isinstance(frame, _Group):
            out.append(_emit_group(frame))
        else:
            out.append(_NO_OFFLOAD_HEADER + frame)
    return out


# tos, total length, flags+fragment offset, ttl, addresses+ports, seq, ack+data offset, flags, window, urgent pointer
_V4_TCP_COALESCE = struct.Struct("!xBHHHB3x12sI5sB2s2x2s")
_IPV4_DF = 0x4000

# (version, ihl, l4 header length, is_tcp, payload length, next sequence number, may be extended,
#  IPv4 id that must follow the group's ids or -1)
_GroupArgs = tuple[int, int, int, bool, int, int, bool, int]


def _coalesce_key(packet: bytes, tcp: bool, udp: bool) -> tuple[bytes | None, _GroupArgs]:
    """The bytes that must be equal for two packets to merge (IP fields, ports, TCP ack/window/options), or None."""
    none: _GroupArgs = (0, 0, 0, False, 0, 0, False, -1)
    n = len(packet)
    if n < 1:
        return None, none
    version = packet[0] >> 4
    if version == 4:
        if n < IPV4_HEADER_LEN or packet[0] != 0x45:  # options: not merged
            return None, none
        if _U16.unpack_from(packet, 2)[0] != n or packet[6] & 0xBF or packet[7]:  # padded, MF, offset, reserved bit
            return None, none
        protocol = packet[9]
        ihl = IPV4_HEADER_LEN
        ip_id = -1 if packet[6] & 0x40 else _U16.unpack_from(packet, 4)[0]
        # tos, DF bit, ttl, protocol, addresses
        ip_key = packet[1:2] + bytes((packet[6] & 0x40, packet[8], protocol)) + packet[12:20]
    elif version == 6:
        if n < IPV6_HEADER_LEN or _U16.unpack_from(packet, 4)[0] != n - IPV6_HEADER_LEN:
            return None, none
        protocol = packet[6]
        ihl = IPV6_HEADER_LEN
        ip_key = packet[0:4] + packet[6:40]  # traffic class, flow label, next header, hop limit, addresses
        ip_id = -1
    else:
        return None, none
    if protocol == IPPROTO_TCP and tcp:
        if n < ihl + TCP_MIN_HEADER_LEN:
            return None, none
        thlen = (packet[ihl + 12] >> 4) * 4
        flags = packet[ihl + 13]
        if thlen < TCP_MIN_HEADER_LEN or ihl + thlen > n or flags & ~TCP_PSH != TCP_ACK:
            return None, none
        payload_len = n - ihl - thlen
        if payload_len == 0:
            return None, none
        seq = _U32.unpack_from(packet, ihl + 4)[0]
        # ports, ack, data offset, window, options
        key = (
            ip_key
            + packet[ihl : ihl + 4]
            + packet[ihl + 8 : ihl + 13]
            + packet[ihl + 14 : ihl + 16]
            + packet[ihl + 20 : ihl + thlen]
        )
        may_extend = not flags & TCP_PSH
        return key, (version, ihl, thlen, True, payload_len, (seq + payload_len) & 0xFFFFFFFF, may_extend, ip_id)
    if protocol == IPPROTO_UDP and udp:
        if n < ihl + UDP_HEADER_LEN or _U16.unpack_from(packet, ihl + 4)[0] != n - ihl:
            return None, none
        payload_len = n - ihl - UDP_HEADER_LEN
        if payload_len == 0:
            return None, none
        return ip_key + packet[ihl : ihl + 4], (version, ihl, UDP_HEADER_LEN, False, payload_len, 0, True, ip_id)
    return None, none


def _try_append(group: _Group, packet: bytes, args: _GroupArgs) -> bool:
    _version, _ihl, _l4_len, _is_tcp, payload_len, next_seq, may_extend, ip_id = args
    if group.closed or len(group.packets) >= MAX_SEGMENTS or payload_len > group.gso_size:
        return False
    if group.total + payload_len > MAX_IP_PACKET or ip_id != group.next_ip_id:
        return False
    if group.is_tcp:
        seq = (next_seq - payload_len) & 0xFFFFFFFF
        if seq != group.next_seq:
            return False
        group.next_seq = next_seq
    if ip_id >= 0:
        group.next_ip_id = (ip_id + 1) & 0xFFFF
    group.packets.append(packet)
    group.total += payload_len
    # A short segment (or PSH) must be the last one: the kernel cuts every gso_size bytes.
    if payload_len < group.gso_size or not may_extend:
        group.closed = True
    return True


def _emit_group(group: _Group) -> bytes:
    first = group.packets[0]
    if len(group.packets) == 1:
        return _NO_OFFLOAD_HEADER + first
    ihl = group.ihl
    headers_len = ihl + group.l4_len
    header = bytearray(first[:headers_len])
    total = group.total
    l4_total = total - ihl
    if group.version == 4:
        _U16.pack_into(header, 2, total)
        header[10] = header[11] = 0
        _U16.pack_into(header, 10, internet_checksum(memoryview(header)[:ihl]))
        src, dst = first[12:16], first[16:20]
    else:
        _U16.pack_into(header, 4, l4_total)
        src, dst = first[8:24], first[24:40]
    if group.is_tcp:
        # PSH of the last segment carries over (the kernel keeps it on the last segment only).
        header[ihl + 13] |= group.packets[-1][ihl + 13] & TCP_PSH
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4 if group.version == 4 else VIRTIO_NET_HDR_GSO_TCPV6
        csum_offset = 16
        protocol = IPPROTO_TCP
    else:
        _U16.pack_into(header, ihl + 4, l4_total)
        gso_type = VIRTIO_NET_HDR_GSO_UDP_L4
        csum_offset = 6
        protocol = IPPROTO_UDP
    _U16.pack_into(header, ihl + csum_offset, ones_complement_sum(b"", pseudo_header_sum(src, dst, protocol, l4_total)))
    vnet = _VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, headers_len, group.gso_size, ihl, csum_offset)
    parts: list[bytes | memoryview] = [vnet, bytes(header)]
    parts.extend(memoryview(p)[headers_len:] for p in group.packets)
    return b"".join(parts)
