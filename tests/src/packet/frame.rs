//! Frames built, parsed and checksummed in userspace, independently of the datapath's own code: the
//! fixtures compare the program's output with frames built here, and the fuzzer judges its output with
//! the parser and checksum routines here.

use std::net::{Ipv4Addr, SocketAddrV4};

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

    /// The segment with its checksum for the given addresses.
    pub fn segment(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut s = vec![0u8; 20];
        s[0..2].copy_from_slice(&self.sport.to_be_bytes());
        s[2..4].copy_from_slice(&self.dport.to_be_bytes());
        s[4..8].copy_from_slice(&self.seq.to_be_bytes());
        s[8..12].copy_from_slice(&self.ack.to_be_bytes());
        s[12] = 5 << 4;
        s[13] = self.flags;
        s[14..16].copy_from_slice(&self.window.to_be_bytes());
        s.extend_from_slice(&self.payload);
        let c = checksum(&[&pseudo_header(src, dst, PROTO_TCP, s.len()), &s]);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }
}

/// A UDP datagram with its checksum (0 is sent as 0xffff, RFC 768).
pub fn udp_segment(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 8];
    s[0..2].copy_from_slice(&src.port().to_be_bytes());
    s[2..4].copy_from_slice(&dst.port().to_be_bytes());
    s[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(payload);
    let c = checksum(&[&pseudo_header(*src.ip(), *dst.ip(), PROTO_UDP, s.len()), &s]);
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
}
