//! Header parsing: direct packet access for fixed offsets, each preceded by a bounds check against
//! `data_end`; bounds-checked helper loads for the variable-offset L4 header.
use weir_common::{Addr, PROTO_TCP, PROTO_UDP, is_v4_mapped, v4_mapped};

pub const ETH_HLEN: usize = 14;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset: any of them set means this is a fragment.
const IP_FRAG_MASK: u16 = 0x3fff;
/// IPv6 next-header value of the fragment extension header.
const IPV6_FRAGMENT: u8 = 44;

/// The L3/L4 facts the datapath needs, copied out of the packet so later helper calls (which invalidate
/// packet pointers) cannot leave us reading stale memory. Addresses are in the maps' form (IPv4 as
/// IPv4-mapped), so lookups need no per-family code.
pub struct Flow {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub v6: bool,
    /// IP header length in bytes (IPv4: 20..=60, IPv6: 40). Narrow, like `l4_off`: this struct is on
    /// the stack of every path.
    pub ihl: u16,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ...); 0 for UDP and for keys built from entries.
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// Source and destination ports, and the TCP flags byte (13 bytes into the TCP header) for TCP: one
/// helper load either way.
#[inline(always)]
fn ports_and_flags<C: Hook>(ctx: &C, l4_off: usize, proto: u8) -> Option<([u16; 2], u8)> {
    if proto == PROTO_TCP {
        let h: [u8; 14] = ctx.load(l4_off)?;
        Some((
            [
                u16::from_ne_bytes([h[0], h[1]]),
                u16::from_ne_bytes([h[2], h[3]]),
            ],
            h[13],
        ))
    } else {
        Some((ctx.load(l4_off)?, 0))
    }
}

use crate::hook::Hook;

/// # Safety
/// `start` must be the packet start the caller bounds-checked `offset + size_of::<T>()` against.
#[inline(always)]
unsafe fn read<T: Copy>(start: usize, offset: usize) -> T {
    // SAFETY: the caller checked that the read stays inside [data, data_end).
    unsafe { core::ptr::read_unaligned((start + offset) as *const T) }
}

/// Parses Ethernet + IPv4 or IPv6 + TCP/UDP. Returns `None` for anything that is not a complete,
/// unfragmented IPv4 or IPv6 TCP or UDP packet (IPv6 with extension headers included): those pass
/// untouched.
#[inline(always)]
pub fn parse<C: Hook>(ctx: &C) -> Option<Flow> {
    let (start, end) = ctx.bounds();
    if start + ETH_HLEN + IPV4_MIN_HLEN > end {
        return None;
    }
    // SAFETY: bytes [0, ETH_HLEN + 20) were bounds-checked just above.
    let eth_proto: u16 = unsafe { read(start, 12) };
    if eth_proto == ETH_P_IPV6_BE {
        return parse_ipv6(ctx);
    }
    if eth_proto != ETH_P_IP_BE {
        return None;
    }
    // SAFETY: within the checked Ethernet + minimal IPv4 header.
    let version_ihl: u8 = unsafe { read(start, ETH_HLEN) };
    if version_ihl >> 4 != 4 {
        return None;
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return None;
    }
    // SAFETY: within the checked minimal IPv4 header.
    let frag: u16 = unsafe { read(start, ETH_HLEN + 6) };
    if u16::from_be(frag) & IP_FRAG_MASK != 0 {
        return None;
    }
    // SAFETY: within the checked minimal IPv4 header.
    let proto: u8 = unsafe { read(start, ETH_HLEN + 9) };
    let l4_min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    // SAFETY: the minimal IPv4 header was bounds-checked above. Read before any helper call: a fresh
    // `data` pointer after a call carries no bounds proof.
    let (saddr_be, daddr_be) = unsafe { (read(start, ETH_HLEN + 12), read(start, ETH_HLEN + 16)) };
    let l4_off = ETH_HLEN + ihl;
    // The L4 offset varies with the IPv4 options, and LLVM re-derives variable packet pointers in ways
    // the verifier cannot follow; the skb length check plus a bounds-checked helper load are robust.
    if (ctx.pkt_len() as usize) < l4_off + l4_min {
        return None;
    }
    let (ports, tcp_flags) = ports_and_flags(ctx, l4_off, proto)?;
    Some(Flow {
        saddr: v4_mapped(saddr_be),
        daddr: v4_mapped(daddr_be),
        sport_be: ports[0],
        dport_be: ports[1],
        proto,
        v6: false,
        ihl: ihl as u16,
        l4_off: l4_off as u16,
        tcp_flags,
    })
}

/// IPv6 whose next header is TCP or UDP. Extension headers are not walked: they are rare on pod
/// traffic, and a packet carrying them passes untouched (fragments to a frontend are caught by
/// `fragment_destination`).
#[inline(always)]
fn parse_ipv6<C: Hook>(ctx: &C) -> Option<Flow> {
    let l4_off = ETH_HLEN + IPV6_HLEN;
    let (start, end) = ctx.bounds();
    if start + l4_off > end {
        return None;
    }
    // SAFETY: the whole IPv6 header was bounds-checked just above.
    let (version, next) = unsafe {
        (
            read::<u8>(start, ETH_HLEN) >> 4,
            read::<u8>(start, ETH_HLEN + 6),
        )
    };
    if version != 6 {
        return None;
    }
    // One helper copy of both addresses: unaligned direct reads would be 32 byte loads, spilled all
    // over a stack the verifier limits.
    let [saddr, daddr]: [Addr; 2] = ctx.load(ETH_HLEN + 8)?;
    // IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2), and in the maps they are the
    // IPv4 frontends and backends: an IPv6 packet naming one is not ours.
    if is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
        return None;
    }
    let l4_min = match next {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    if (ctx.pkt_len() as usize) < l4_off + l4_min {
        return None;
    }
    let (ports, tcp_flags) = ports_and_flags(ctx, l4_off, next)?;
    Some(Flow {
        saddr,
        daddr,
        sport_be: ports[0],
        dport_be: ports[1],
        proto: next,
        v6: true,
        ihl: IPV6_HLEN as u16,
        l4_off: l4_off as u16,
        tcp_flags,
    })
}

/// For a fragment (first or not) of a TCP or UDP packet: its protocol and destination address. Fragments
/// after the first carry no ports, so no fragment can be balanced; the caller decides whether it is
/// addressed to a frontend.
#[inline(always)]
pub fn fragment_destination<C: Hook>(ctx: &C) -> Option<(u8, Addr)> {
    let (start, end) = ctx.bounds();
    if start + ETH_HLEN + IPV6_HLEN + 8 <= end {
        // SAFETY: bytes [0, ETH_HLEN + 48) were bounds-checked just above.
        let (eth_proto, version, next, inner_next, daddr) = unsafe {
            (
                read::<u16>(start, 12),
                read::<u8>(start, ETH_HLEN) >> 4,
                read::<u8>(start, ETH_HLEN + 6),
                read::<u8>(start, ETH_HLEN + IPV6_HLEN),
                read::<Addr>(start, ETH_HLEN + 24),
            )
        };
        if eth_proto == ETH_P_IPV6_BE {
            let l4 = inner_next == PROTO_TCP || inner_next == PROTO_UDP;
            return (version == 6 && next == IPV6_FRAGMENT && l4).then_some((inner_next, daddr));
        }
    }
    if start + ETH_HLEN + IPV4_MIN_HLEN > end {
        return None;
    }
    // SAFETY: bytes [0, ETH_HLEN + 20) were bounds-checked just above.
    let (eth_proto, version_ihl, frag, proto, daddr) = unsafe {
        (
            read::<u16>(start, 12),
            read::<u8>(start, ETH_HLEN),
            read::<u16>(start, ETH_HLEN + 6),
            read::<u8>(start, ETH_HLEN + 9),
            read::<u32>(start, ETH_HLEN + 16),
        )
    };
    let is_fragment =
        eth_proto == ETH_P_IP_BE && version_ihl >> 4 == 4 && u16::from_be(frag) & IP_FRAG_MASK != 0;
    (is_fragment && (proto == PROTO_TCP || proto == PROTO_UDP)).then_some((proto, v4_mapped(daddr)))
}

/// Offset of the L4 checksum field.
#[inline(always)]
pub fn l4_csum_off(flow: &Flow) -> usize {
    if flow.proto == PROTO_TCP {
        flow.l4_off as usize + 16
    } else {
        flow.l4_off as usize + 6
    }
}
