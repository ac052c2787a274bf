//! Frames built, parsed and checksummed in userspace, independently of the datapath's own code: the
//! fixtures compare the program's output with frames built here, and the fuzzer judges its output with
//! the parser and checksum routines here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_GRE: u8 = 47;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 next-header values of the extension headers the fixtures build.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;
pub const IPV6_NO_NEXT: u8 = 59;
pub const IPV6_HLEN: usize = 40;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The MACs every built frame carries (client side, node side).
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// RFC 1071 one's-complement sum of `parts` concatenated (an odd part is padded with a zero byte, as
/// only the last part may be), folded and complemented. A region that includes its own checksum sums
/// to 0 when the checksum is right. Written from the RFC, not from the datapath's `csum.rs`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 pseudo-header of an L4 segment.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = proto;
    p[10..12].copy_from_slice(&(l4_len as u16).to_be_bytes());
    p
}

/// The IPv6 pseudo-header of an upper-layer packet (RFC 8200 section 8.1).
pub fn pseudo_header6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4_len: usize) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0..16].copy_from_slice(&src.octets());
    p[16..32].copy_from_slice(&dst.octets());
    p[32..36].copy_from_slice(&(l4_len as u32).to_be_bytes());
    p[39] = next;
    p
}

/// The pseudo-header of either family. Panics on addresses of two families (a bug in the test).
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header(s, d, proto, l4_len).to_vec(),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_header6(s, d, proto, l4_len).to_vec(),
        _ => panic!("pseudo-header for {src} -> {dst}: two families"),
    }
}

/// An Ethernet frame: our two MACs, `ethertype`, `payload`.
pub fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 header's variable fields; the rest (version, IHL, total length, checksum) is derived.
#[derive(Clone, Debug)]
pub struct Ip4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub id: u16,
    /// Flags and fragment offset (host order): 0x4000 is DF, 0x2000 MF, the low 13 bits the offset.
    pub frag: u16,
    /// Options, padded by the builder to a multiple of 4 bytes (at most 40).
    pub options: Vec<u8>,
}

impl Ip4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            ttl: 64,
            id: 0x1234,
            frag: 0x4000,
            options: Vec::new(),
        }
    }

    /// Header + `payload`, with the total length and header checksum computed.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        assert!(options.len() <= 40, "IPv4 options longer than 40 bytes");
        let hlen = 20 + options.len();
        let mut h = vec![0u8; hlen];
        h[0] = 0x40 | (hlen / 4) as u8;
        h[2..4].copy_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        h[6..8].copy_from_slice(&self.frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = self.proto;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        h[20..].copy_from_slice(&options);
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

/// A TCP segment's fields.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8) -> Self {
        Self {
            sport,
            dport,
            seq: 1000,
            ack: if flags & TCP_ACK != 0 { 2000 } else { 0 },
            flags,
            window: 65535,
            payload: Vec::new(),
        }
    }

    /// The segment with its checksum for the given addresses (either family, both the same).
    pub fn segment(&self, src: impl Into<IpAddr>, dst: impl Into<IpAddr>) -> Vec<u8> {
        let mut s = vec![0u8; 20];
        s[0..2].copy_from_slice(&self.sport.to_be_bytes());
        s[2..4].copy_from_slice(&self.dport.to_be_bytes());
        s[4..8].copy_from_slice(&self.seq.to_be_bytes());
        s[8..12].copy_from_slice(&self.ack.to_be_bytes());
        s[12] = 5 << 4;
        s[13] = self.flags;
        s[14..16].copy_from_slice(&self.window.to_be_bytes());
        s.extend_from_slice(&self.payload);
        let c = checksum(&[&pseudo(src.into(), dst.into(), PROTO_TCP, s.len()), &s]);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }
}

/// A UDP datagram with its checksum (0 is sent as 0xffff, RFC 768), for either family.
pub fn udp_segment(
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    let mut s = vec![0u8; 8];
    s[0..2].copy_from_slice(&src.port().to_be_bytes());
    s[2..4].copy_from_slice(&dst.port().to_be_bytes());
    s[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(payload);
    let c = checksum(&[&pseudo(src.ip(), dst.ip(), PROTO_UDP, s.len()), &s]);
    let c = if c == 0 { 0xffff } else { c };
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// Ethernet + IPv4 + TCP from `src` to `dst` with `flags`.
pub fn tcp4(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    tcp4_with(src, dst, &Tcp::new(src.port(), dst.port(), flags), |_| {})
}

/// Ethernet + IPv4 + `tcp` (ports taken from `tcp`), the IPv4 header adjusted by `ip`.
pub fn tcp4_with(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    tcp: &Tcp,
    ip: impl FnOnce(&mut Ip4),
) -> Vec<u8> {
    let mut h = Ip4::new(*src.ip(), *dst.ip(), PROTO_TCP);
    ip(&mut h);
    ethernet(ETH_P_IP, &h.packet(&tcp.segment(h.src, h.dst)))
}

/// Ethernet + IPv4 + UDP from `src` to `dst`.
pub fn udp4(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let h = Ip4::new(*src.ip(), *dst.ip(), PROTO_UDP);
    ethernet(ETH_P_IP, &h.packet(&udp_segment(src, dst, payload)))
}

/// An ICMP message (`kind`, `code`, 4 bytes `rest`, `body`) with its checksum.
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&[&m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Ethernet + IPv4 + ICMP from `src` to `dst`.
pub fn icmp4(src: Ipv4Addr, dst: Ipv4Addr, message: &[u8]) -> Vec<u8> {
    ethernet(ETH_P_IP, &Ip4::new(src, dst, PROTO_ICMP).packet(message))
}

/// "Destination unreachable, fragmentation needed" (MTU 1400) from `from` to the quoted packet's source,
/// quoting the IPv4 header and first 8 L4 bytes of `quoted` (a frame).
pub fn icmp_frag_needed(from: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let ip = &quoted[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let quote = &ip[..(ihl + 8).min(ip.len())];
    let to = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    icmp4(from, to, &icmp_message(3, 4, [0, 0, 0x05, 0x78], quote))
}

/// An IPv6 header's variable fields; version and payload length are derived. Extension headers are
/// part of the payload, `next` names the first.
#[derive(Clone, Debug)]
pub struct Ip6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next: u8,
    pub hop_limit: u8,
    /// Traffic class (8 bits) and flow label (20 bits), the low 28 bits of the first word.
    pub class_flow: u32,
}

impl Ip6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next: u8) -> Self {
        Self {
            src,
            dst,
            next,
            hop_limit: 64,
            class_flow: 0,
        }
    }

    /// Header + `payload`, the payload length computed.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut h = (0x6000_0000 | (self.class_flow & 0x0fff_ffff))
            .to_be_bytes()
            .to_vec();
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.push(self.next);
        h.push(self.hop_limit);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(payload);
        h
    }
}

/// Ethernet + IPv6 + TCP from `src` to `dst` with `flags`.
pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    tcp6_with(src, dst, &Tcp::new(src.port(), dst.port(), flags), |_| {})
}

/// Ethernet + IPv6 + `tcp` (ports taken from `tcp`), the IPv6 header adjusted by `ip`.
pub fn tcp6_with(
    src: SocketAddrV6,
    dst: SocketAddrV6,
    tcp: &Tcp,
    ip: impl FnOnce(&mut Ip6),
) -> Vec<u8> {
    let mut h = Ip6::new(*src.ip(), *dst.ip(), PROTO_TCP);
    ip(&mut h);
    ethernet(ETH_P_IPV6, &h.packet(&tcp.segment(h.src, h.dst)))
}

/// Ethernet + IPv6 + UDP from `src` to `dst`.
pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
    let h = Ip6::new(*src.ip(), *dst.ip(), PROTO_UDP);
    ethernet(ETH_P_IPV6, &h.packet(&udp_segment(src, dst, payload)))
}

/// TCP of either family (both addresses of one).
pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => tcp4(s, d, flags),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => tcp6(s, d, flags),
        _ => panic!("TCP from {src} to {dst}: two families"),
    }
}

/// UDP of either family (both addresses of one).
pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => udp4(s, d, payload),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => udp6(s, d, payload),
        _ => panic!("UDP from {src} to {dst}: two families"),
    }
}

/// An ICMPv6 message (`kind`, `code`, 4 bytes `rest`, `body`) from `src` to `dst`, its checksum over
/// the pseudo-header too (RFC 4443 section 2.3).
pub fn icmp6_message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = checksum(&[&pseudo_header6(src, dst, PROTO_ICMPV6, m.len()), &m]);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Ethernet + IPv6 + ICMPv6 `kind`/`code` from `src` to `dst`.
pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let m = icmp6_message(src, dst, kind, code, rest, body);
    ethernet(ETH_P_IPV6, &Ip6::new(src, dst, PROTO_ICMPV6).packet(&m))
}

/// The IPv6 source of an IPv6 frame.
pub fn ipv6_src(frame: &[u8]) -> Ipv6Addr {
    let b: [u8; 16] = frame[ETH_HLEN + 8..ETH_HLEN + 24]
        .try_into()
        .expect("16 bytes");
    b.into()
}

/// The IPv6 destination of an IPv6 frame.
pub fn ipv6_dst(frame: &[u8]) -> Ipv6Addr {
    let b: [u8; 16] = frame[ETH_HLEN + 24..ETH_HLEN + 40]
        .try_into()
        .expect("16 bytes");
    b.into()
}

/// An ICMPv6 error `kind`/`code`/`rest` from `from` to the source of `quoted` (an IPv6 frame), quoting
/// its first `quote_len` bytes of IPv6 packet (all of it when shorter).
pub fn icmp6_error(
    kind: u8,
    code: u8,
    rest: [u8; 4],
    from: Ipv6Addr,
    quoted: &[u8],
    quote_len: usize,
) -> Vec<u8> {
    let ip = &quoted[ETH_HLEN..];
    let quote = &ip[..quote_len.min(ip.len())];
    icmp6(from, ipv6_src(quoted), kind, code, rest, quote)
}

/// "Packet too big" (MTU 1280) from `from` about `quoted` (an IPv6 frame), quoting all of it, as a
/// router does (the error stays under the minimum MTU for the frames the tests build).
pub fn icmp6_packet_too_big(from: Ipv6Addr, quoted: &[u8]) -> Vec<u8> {
    icmp6_error(2, 0, 1280u32.to_be_bytes(), from, quoted, usize::MAX)
}

/// An IPv6 header (`next` header, payload) between `src` and `dst` as raw 16-byte addresses.
pub fn ipv6(next: u8, src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// The bytes as `aa bb cc …`, for failure messages and the fuzzer's reports.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What the datapath considers an IPv4 TCP/UDP packet, read here by our own rules: Ethernet type IPv4,
/// version 4, IHL ≥ 5, not a fragment, TCP/UDP with its minimal header inside the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L4Packet {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub proto: u8,
    pub ihl: usize,
    pub tot_len: usize,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
}

/// Parses `frame` as [`L4Packet`]; `None` for anything else (which the datapath must pass untouched
/// unless it is an ICMP error about a tracked flow or a fragment to a frontend).
pub fn parse_l4(frame: &[u8]) -> Option<L4Packet> {
    if frame.len() < ETH_HLEN + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let proto = ip[9];
    let l4_min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    let l4_off = ETH_HLEN + ihl;
    if frame.len() < l4_off + l4_min {
        return None;
    }
    let l4 = &frame[l4_off..];
    Some(L4Packet {
        src: SocketAddrV4::new(
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            u16::from_be_bytes([l4[0], l4[1]]),
        ),
        dst: SocketAddrV4::new(
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        proto,
        ihl,
        tot_len: usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        l4_off,
    })
}

/// A checksum's state in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sum {
    Valid,
    Invalid,
    /// UDP's "no checksum" (0).
    Absent,
    /// Cannot be checked: the header or the length it covers is not (entirely) in the frame.
    Unknown,
}

/// The IPv4 header checksum of an IPv4 frame (`Unknown` when the header is not all there).
pub fn ipv4_header_sum(frame: &[u8]) -> Sum {
    if frame.len() < ETH_HLEN + 20 {
        return Sum::Unknown;
    }
    let ihl = usize::from(frame[ETH_HLEN] & 0x0f) * 4;
    if ihl < 20 || frame.len() < ETH_HLEN + ihl {
        return Sum::Unknown;
    }
    if checksum(&[&frame[ETH_HLEN..ETH_HLEN + ihl]]) == 0 {
        Sum::Valid
    } else {
        Sum::Invalid
    }
}

/// The L4 segment an IPv4 header's total length says the frame carries, if it is all in the frame.
fn l4_segment(frame: &[u8], ihl: usize, tot_len: usize) -> Option<&[u8]> {
    let end = ETH_HLEN.checked_add(tot_len)?;
    (tot_len >= ihl && end <= frame.len()).then(|| &frame[ETH_HLEN + ihl..end])
}

/// The TCP/UDP checksum of a parsed packet, over the segment its total length covers.
pub fn l4_sum(frame: &[u8], p: &L4Packet) -> Sum {
    let Some(seg) = l4_segment(frame, p.ihl, p.tot_len) else {
        return Sum::Unknown;
    };
    let csum_at = if p.proto == PROTO_TCP { 16 } else { 6 };
    if seg.len() < csum_at + 2 {
        return Sum::Unknown;
    }
    if p.proto == PROTO_UDP && seg[6] == 0 && seg[7] == 0 {
        return Sum::Absent;
    }
    let pseudo = pseudo_header(*p.src.ip(), *p.dst.ip(), p.proto, seg.len());
    if checksum(&[&pseudo, seg]) == 0 {
        Sum::Valid
    } else {
        Sum::Invalid
    }
}

/// An ICMP error (destination unreachable, time exceeded) in an IPv4 frame without options (whose total
/// length covers the quote, and not a fragment other than the first, whose payload is no ICMP header),
/// quoting an
/// IPv4 header without options and 8 L4 bytes of TCP or UDP: what the datapath may translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub outer_src: Ipv4Addr,
    pub outer_dst: Ipv4Addr,
    /// The quoted packet's addresses and ports as it was sent.
    pub inner_src: SocketAddrV4,
    pub inner_dst: SocketAddrV4,
    pub inner_proto: u8,
}

pub fn parse_icmp_error(frame: &[u8]) -> Option<IcmpError> {
    const INNER: usize = ETH_HLEN + 28;
    if frame.len() < INNER + 28 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let later_fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
    let covers_quote = usize::from(u16::from_be_bytes([ip[2], ip[3]])) >= 20 + 8 + 28;
    if ip[0] != 0x45
        || !covers_quote
        || later_fragment
        || ip[9] != PROTO_ICMP
        || !(ip[20] == 3 || ip[20] == 11)
    {
        return None;
    }
    let q = &frame[INNER..];
    if q[0] != 0x45 || !(q[9] == PROTO_TCP || q[9] == PROTO_UDP) {
        return None;
    }
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Some(IcmpError {
        outer_src: addr(&ip[12..16]),
        outer_dst: addr(&ip[16..20]),
        inner_src: SocketAddrV4::new(addr(&q[12..16]), u16::from_be_bytes([q[20], q[21]])),
        inner_dst: SocketAddrV4::new(addr(&q[16..20]), u16::from_be_bytes([q[22], q[23]])),
        inner_proto: q[9],
    })
}

/// The ICMP checksum of an IPv4 ICMP frame, over the message its total length covers.
pub fn icmp_sum(frame: &[u8]) -> Sum {
    if frame.len() < ETH_HLEN + 20 {
        return Sum::Unknown;
    }
    let ip = &frame[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    match l4_segment(frame, ihl, tot_len) {
        Some(m) if m.len() >= 8 => {
            if checksum(&[m]) == 0 {
                Sum::Valid
            } else {
                Sum::Invalid
            }
        }
        _ => Sum::Unknown,
    }
}

/// An IPv4 fragment (MF or an offset) of TCP or UDP: its protocol and destination.
pub fn fragment_destination(frame: &[u8]) -> Option<(u8, Ipv4Addr)> {
    if frame.len() < ETH_HLEN + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let fragment = ip[0] >> 4 == 4 && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    (fragment && (ip[9] == PROTO_TCP || ip[9] == PROTO_UDP))
        .then(|| (ip[9], Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])))
}

/// A TCP/UDP packet of either family as the datapath parses it, read here by our own rules. IPv4: as
/// [`parse_l4`]. IPv6: Ethernet type IPv6, version 6, next header TCP/UDP (no extension header), the
/// minimal L4 header inside the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub v6: bool,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// Where the IP header's length field says the packet ends (may lie past the frame).
    pub ip_end: usize,
}

/// Parses `frame` as a [`Packet`] of either family.
pub fn parse(frame: &[u8]) -> Option<Packet> {
    if let Some(p) = parse_l4(frame) {
        return Some(Packet {
            src: p.src.into(),
            dst: p.dst.into(),
            proto: p.proto,
            v6: false,
            l4_off: p.l4_off,
            ip_end: ETH_HLEN + p.tot_len,
        });
    }
    if frame.len() < ETH_HLEN + IPV6_HLEN
        || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6
    {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 6 {
        return None;
    }
    let proto = ip[6];
    let l4_min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    let l4_off = ETH_HLEN + IPV6_HLEN;
    if frame.len() < l4_off + l4_min {
        return None;
    }
    let l4 = &frame[l4_off..];
    Some(Packet {
        src: SocketAddrV6::new(ipv6_src(frame), u16::from_be_bytes([l4[0], l4[1]]), 0, 0).into(),
        dst: SocketAddrV6::new(ipv6_dst(frame), u16::from_be_bytes([l4[2], l4[3]]), 0, 0).into(),
        proto,
        v6: true,
        l4_off,
        ip_end: l4_off + usize::from(u16::from_be_bytes([ip[4], ip[5]])),
    })
}

/// The TCP/UDP checksum of a parsed packet of either family, over the segment its IP header's length
/// covers. A zero UDP checksum is `Absent` in both families (invalid in IPv6, RFC 8200 section 8.1, but
/// a rewrite must keep it what it was).
pub fn packet_sum(frame: &[u8], p: &Packet) -> Sum {
    if p.ip_end < p.l4_off || p.ip_end > frame.len() {
        return Sum::Unknown;
    }
    let seg = &frame[p.l4_off..p.ip_end];
    let csum_at = if p.proto == PROTO_TCP { 16 } else { 6 };
    if seg.len() < csum_at + 2 {
        return Sum::Unknown;
    }
    if p.proto == PROTO_UDP && seg[6] == 0 && seg[7] == 0 {
        return Sum::Absent;
    }
    if checksum(&[&pseudo(p.src.ip(), p.dst.ip(), p.proto, seg.len()), seg]) == 0 {
        Sum::Valid
    } else {
        Sum::Invalid
    }
}

/// An ICMP or ICMPv6 error the datapath may translate, of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpErrorAny {
    pub kind: u8,
    pub code: u8,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    pub inner_src: SocketAddr,
    pub inner_dst: SocketAddr,
    pub inner_proto: u8,
}

/// Offset of the quoted IPv6 packet in an ICMPv6 error frame.
pub const ICMP6_QUOTE: usize = ETH_HLEN + IPV6_HLEN + 8;

/// An ICMPv6 destination unreachable, packet too big or time exceeded in an IPv6 frame without
/// extension headers, whose payload length covers the quote (bytes past it are not covered by the
/// ICMPv6 checksum), quoting an IPv6 header (version 6, no extension header) and 8 L4 bytes of TCP or UDP.
pub fn parse_icmp6_error(frame: &[u8]) -> Option<IcmpErrorAny> {
    const QUOTE_LEN: usize = IPV6_HLEN + 8;
    if frame.len() < ICMP6_QUOTE + QUOTE_LEN
        || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6
    {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let icmp = &ip[IPV6_HLEN..];
    if ip[0] >> 4 != 6
        || ip[6] != PROTO_ICMPV6
        || payload < 8 + QUOTE_LEN
        || !(1..=3).contains(&icmp[0])
    {
        return None;
    }
    let q = &frame[ICMP6_QUOTE..];
    if q[0] >> 4 != 6 || !(q[6] == PROTO_TCP || q[6] == PROTO_UDP) {
        return None;
    }
    let addr = |b: &[u8]| -> Ipv6Addr { <[u8; 16]>::try_from(b).expect("16 bytes").into() };
    let port = |at: usize| u16::from_be_bytes([q[IPV6_HLEN + at], q[IPV6_HLEN + at + 1]]);
    Some(IcmpErrorAny {
        kind: icmp[0],
        code: icmp[1],
        outer_src: addr(&ip[8..24]).into(),
        outer_dst: addr(&ip[24..40]).into(),
        inner_src: SocketAddrV6::new(addr(&q[8..24]), port(0), 0, 0).into(),
        inner_dst: SocketAddrV6::new(addr(&q[24..40]), port(2), 0, 0).into(),
        inner_proto: q[6],
    })
}

/// [`parse_icmp_error`] or [`parse_icmp6_error`].
pub fn parse_icmp_error_any(frame: &[u8]) -> Option<IcmpErrorAny> {
    if let Some(e) = parse_icmp_error(frame) {
        let icmp = &frame[ETH_HLEN + 20..];
        return Some(IcmpErrorAny {
            kind: icmp[0],
            code: icmp[1],
            outer_src: e.outer_src.into(),
            outer_dst: e.outer_dst.into(),
            inner_src: e.inner_src.into(),
            inner_dst: e.inner_dst.into(),
            inner_proto: e.inner_proto,
        });
    }
    parse_icmp6_error(frame)
}

/// The ICMPv6 checksum of an IPv6 frame whose next header is ICMPv6, over the message its payload
/// length covers, with the pseudo-header.
pub fn icmp6_sum(frame: &[u8]) -> Sum {
    if frame.len() < ETH_HLEN + IPV6_HLEN || frame[ETH_HLEN + 6] != PROTO_ICMPV6 {
        return Sum::Unknown;
    }
    let payload = usize::from(u16::from_be_bytes([
        frame[ETH_HLEN + 4],
        frame[ETH_HLEN + 5],
    ]));
    let start = ETH_HLEN + IPV6_HLEN;
    if payload < 8 || start + payload > frame.len() {
        return Sum::Unknown;
    }
    let pseudo = pseudo_header6(ipv6_src(frame), ipv6_dst(frame), PROTO_ICMPV6, payload);
    if checksum(&[&pseudo, &frame[start..start + payload]]) == 0 {
        Sum::Valid
    } else {
        Sum::Invalid
    }
}

/// The ICMP checksum of an IPv4 frame or the ICMPv6 one of an IPv6 frame.
pub fn icmp_sum_any(frame: &[u8]) -> Sum {
    if frame.len() >= ETH_HLEN && u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_IPV6 {
        icmp6_sum(frame)
    } else {
        icmp_sum(frame)
    }
}

/// A fragment of TCP or UDP of either family: its protocol and destination. IPv6: a fragment header
/// right after the fixed header (the datapath walks no other extension header), naming TCP or UDP.
pub fn fragment_destination_any(frame: &[u8]) -> Option<(u8, IpAddr)> {
    if let Some((proto, dst)) = fragment_destination(frame) {
        return Some((proto, dst.into()));
    }
    if frame.len() < ETH_HLEN + IPV6_HLEN + 8
        || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IPV6
    {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    let inner = ip[IPV6_HLEN];
    (ip[0] >> 4 == 6 && ip[6] == IPV6_FRAGMENT && (inner == PROTO_TCP || inner == PROTO_UDP))
        .then(|| (inner, ipv6_dst(frame).into()))
}

/// Whether an IPv4-typed frame's header checksum is right (`Unknown` for other frames).
pub fn ip_header_sum_any(frame: &[u8]) -> Sum {
    if frame.len() < ETH_HLEN || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return Sum::Unknown;
    }
    ipv4_header_sum(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc_1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, so the checksum is 220d.
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            0x220d
        );
        // Split anywhere (even boundaries), the sum is the same.
        assert_eq!(
            checksum(&[&[0x00, 0x01], &[0xf2, 0x03, 0xf4, 0xf5], &[0xf6, 0xf7]]),
            0x220d
        );
        // An odd tail is padded.
        assert_eq!(checksum(&[&[0xff]]), !0xff00);
    }

    #[test]
    fn built_frames_parse_and_verify() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80);
        for frame in [tcp4(src, dst, TCP_SYN), udp4(src, dst, b"hello")] {
            let p = parse_l4(&frame).expect("parses");
            assert_eq!((p.src, p.dst), (src, dst));
            assert_eq!(ipv4_header_sum(&frame), Sum::Valid);
            assert_eq!(l4_sum(&frame, &p), Sum::Valid);
            let mut bad = frame.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            assert_eq!(l4_sum(&bad, &p), Sum::Invalid, "a flipped bit is caught");
        }
        let icmp = icmp_frag_needed(Ipv4Addr::new(10, 244, 0, 1), &tcp4(src, dst, TCP_SYN));
        assert_eq!(icmp_sum(&icmp), Sum::Valid);
        let e = parse_icmp_error(&icmp).expect("an ICMP error");
        assert_eq!((e.inner_src, e.inner_dst), (src, dst));
        assert_eq!(e.outer_dst, *src.ip());
    }

    #[test]
    fn built_ipv6_frames_parse_and_verify() {
        let src = SocketAddrV6::new("fd00:10::20".parse().unwrap(), 40000, 0, 0);
        let dst = SocketAddrV6::new("fd00:96::1".parse().unwrap(), 80, 0, 0);
        for frame in [tcp6(src, dst, TCP_SYN), udp6(src, dst, b"hello")] {
            let p = parse(&frame).expect("parses");
            assert_eq!((p.src, p.dst), (src.into(), dst.into()));
            assert!(p.v6);
            assert_eq!(p.ip_end, frame.len());
            assert_eq!(packet_sum(&frame, &p), Sum::Valid);
            let mut bad = frame.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x01;
            assert_eq!(
                packet_sum(&bad, &p),
                Sum::Invalid,
                "a flipped bit is caught"
            );
            // A changed address is caught through the pseudo-header.
            let mut moved = frame.clone();
            moved[ETH_HLEN + 39] ^= 0x01;
            let q = parse(&moved).expect("parses");
            assert_eq!(packet_sum(&moved, &q), Sum::Invalid);
        }
        let too_big = icmp6_packet_too_big(*dst.ip(), &tcp6(src, dst, TCP_SYN));
        assert_eq!(icmp6_sum(&too_big), Sum::Valid);
        let e = parse_icmp_error_any(&too_big).expect("an ICMPv6 error");
        assert_eq!((e.inner_src, e.inner_dst), (src.into(), dst.into()));
        assert_eq!((e.kind, e.outer_dst), (2, IpAddr::V6(*src.ip())));
        // RFC 4443's checksum of a known message: an echo request ::1 -> ::1, id 0, seq 0, no data,
        // sums to 0x7fbb... computed independently: 0x8000 + 58 + 8 + 1 + 1 = 0x8044, so ~ = 0x7fbb.
        let echo = icmp6_message(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            128,
            0,
            [0; 4],
            &[],
        );
        assert_eq!(u16::from_be_bytes([echo[2], echo[3]]), 0x7fbb);
    }
}
