//! ICMP errors about translated flows, translated back: a backend (or a router on the way) reporting
//! "port unreachable" or "fragmentation needed" quotes the packet as it saw it, addressed to the backend;
//! the client's kernel only matches the error to its socket if the quote names the frontend it dialled.
//! This is what makes path-MTU discovery and UDP "connection refused" work through a Service.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};
use weir_common::{
    Addr, CT_REVERSE, CtKey, CtValue, PROTO_TCP, PROTO_UDP, STAT_ICMP_TRANSLATED, v4_mapped,
};

use crate::{
    ct, fib,
    maps::CONNTRACK,
    packet::{ETH_HLEN, IPV6_HLEN},
    stats::count,
};

const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const OUTER_CSUM: usize = ETH_HLEN + 10;
const OUTER_SADDR: usize = ETH_HLEN + 12;
const OUTER_DADDR: usize = ETH_HLEN + 16;
const ICMP: usize = ETH_HLEN + 20;
const ICMP_CSUM: usize = ICMP + 2;
const INNER: usize = ICMP + 8;
const INNER_CSUM: usize = INNER + 10;
const INNER_DADDR: usize = INNER + 16;
const INNER_L4: usize = INNER + 20;
/// Outer headers, ICMP header, inner IPv4 header and the 8 quoted L4 bytes.
const NEEDED: usize = INNER_L4 + 8;

/// `Some(verdict)` when the packet was an ICMP or ICMPv6 error about one of our flows (translated and
/// sent on), `None` when it is not ours.
#[inline(always)]
pub fn translate_error(ctx: &TcContext) -> Option<i32> {
    let eth_proto: [u8; 2] = ctx.load(ETH_HLEN - 2).ok()?;
    match eth_proto {
        [0x08, 0x00] => translate_error4(ctx),
        [0x86, 0xdd] => translate_error6(ctx),
        _ => None,
    }
}

#[inline(never)]
fn translate_error4(ctx: &TcContext) -> Option<i32> {
    if (ctx.len() as usize) < NEEDED {
        return None;
    }
    // An IPv4 frame; outer IPv4 without options, whose total length covers the quote (bytes past it
    // are not covered by the ICMP checksum), not a later fragment (whose payload is no ICMP header),
    // ICMP, an error type, quoting IPv4 without options.
    let eth_proto: [u8; 2] = ctx.load(ETH_HLEN - 2).ok()?;
    let outer: [u8; 20] = ctx.load(ETH_HLEN).ok()?;
    if eth_proto != [0x08, 0x00]
        || outer[0] != 0x45
        || (u16::from_be_bytes([outer[2], outer[3]]) as usize) < NEEDED - ETH_HLEN
        || outer[6] & 0x1f != 0
        || outer[7] != 0
        || outer[9] != PROTO_ICMP
    {
        return None;
    }
    let icmp_type: u8 = ctx.load(ICMP).ok()?;
    if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner: [u8; 20] = ctx.load(INNER).ok()?;
    let proto = inner[9];
    if inner[0] != 0x45 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return None;
    }
    let ports: [u16; 2] = ctx.load(INNER_L4).ok()?;
    let inner_saddr = u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]);
    let inner_daddr = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
    // The quoted packet went client → backend; its reply direction is our reverse entry.
    let key = CtKey {
        saddr_be: inner_daddr,
        daddr_be: inner_saddr,
        sport_be: ports[1],
        dport_be: ports[0],
        proto,
        pad: [0; 3],
    };
    // SAFETY: pointer from a successful lookup; CtValue is plain data.
    let entry = unsafe { *CONNTRACK.get_ptr(key)? };
    if entry.kind != CT_REVERSE {
        return None;
    }
    rewrite(
        ctx,
        &outer,
        inner_daddr,
        ports[1],
        entry.nat_addr_be,
        entry.nat_port_be,
    )
    .ok()?;
    let mut outer_daddr = u32::from_ne_bytes([outer[16], outer[17], outer[18], outer[19]]);
    // SNATed or hairpinned: the backend saw (and quotes) the peer address, and sent the error there.
    if entry.peer_addr_be != 0 {
        if !rewrite_peer4(ctx, &entry) {
            return None;
        }
        outer_daddr = entry.peer_addr_be;
    }
    count(STAT_ICMP_TRANSLATED);
    let outer_saddr = u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]);
    let new_saddr = if outer_saddr == inner_daddr {
        entry.nat_addr_be
    } else {
        outer_saddr
    };
    let verdict = fib::forward(
        ctx,
        &v4_mapped(new_saddr),
        &v4_mapped(outer_daddr),
        PROTO_ICMP,
    );
    Some(if verdict < 0 { TC_ACT_OK } else { verdict })
}

const PROTO_ICMPV6: u8 = 58;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const OUTER6_SADDR: usize = ETH_HLEN + 8;
const OUTER6_DADDR: usize = ETH_HLEN + 24;
const ICMP6: usize = ETH_HLEN + IPV6_HLEN;
const ICMP6_CSUM: usize = ICMP6 + 2;
const INNER6: usize = ICMP6 + 8;
const INNER6_DADDR: usize = INNER6 + 24;
const INNER6_L4: usize = INNER6 + IPV6_HLEN;
const NEEDED6: usize = INNER6_L4 + 8;

/// ICMPv6 destination unreachable, packet too big (IPv6's only path-MTU signal: routers never
/// fragment) and time exceeded, quoting an IPv6 TCP/UDP packet without extension headers.
#[inline(never)]
fn translate_error6(ctx: &TcContext) -> Option<i32> {
    if (ctx.len() as usize) < NEEDED6 {
        return None;
    }
    let outer_next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let version: u8 = ctx.load(ETH_HLEN).ok()?;
    let payload: [u8; 2] = ctx.load(ETH_HLEN + 4).ok()?;
    let icmp_type: u8 = ctx.load(ICMP6).ok()?;
    let inner_version: u8 = ctx.load(INNER6).ok()?;
    // The payload length must cover the quote (bytes past it are outside the ICMPv6 checksum), and the
    // quote must be IPv6.
    if version >> 4 != 6
        || inner_version >> 4 != 6
        || (u16::from_be_bytes(payload) as usize) < NEEDED6 - ETH_HLEN - IPV6_HLEN
        || outer_next != PROTO_ICMPV6
        || !matches!(
            icmp_type,
            ICMPV6_DEST_UNREACH | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
        )
    {
        return None;
    }
    let inner_next: u8 = ctx.load(INNER6 + 6).ok()?;
    if inner_next != PROTO_TCP && inner_next != PROTO_UDP {
        return None;
    }
    let inner_saddr: Addr = ctx.load(INNER6 + 8).ok()?;
    let inner_daddr: Addr = ctx.load(INNER6_DADDR).ok()?;
    let ports: [u16; 2] = ctx.load(INNER6_L4).ok()?;
    // The quoted packet went client → backend; its reply direction is our reverse entry.
    let mut entry = ct::Entry::NONE;
    let found = ct::lookup(
        &ct::Tuple {
            saddr: inner_daddr,
            daddr: inner_saddr,
            sport_be: ports[1],
            dport_be: ports[0],
            proto: inner_next,
            v6: true,
            ihl: 0,
            l4_off: 0,
            tcp_flags: 0,
        },
        &mut entry,
        false,
    );
    if !found {
        return None;
    }
    if entry.kind != CT_REVERSE {
        return None;
    }
    let outer_saddr: Addr = ctx.load(OUTER6_SADDR).ok()?;
    let mut outer_daddr: Addr = ctx.load(OUTER6_DADDR).ok()?;
    let from_backend = outer_saddr == inner_daddr;
    rewrite6(ctx, &inner_daddr, ports[1], &entry, from_backend).ok()?;
    // SNATed or hairpinned: the backend saw (and quotes) the peer address, and sent the error there.
    if !ct::is_none(&entry.peer_addr) {
        if !rewrite_peer6(ctx, &entry) {
            return None;
        }
        outer_daddr = entry.peer_addr;
    }
    count(STAT_ICMP_TRANSLATED);
    let new_saddr = if from_backend {
        entry.nat_addr
    } else {
        outer_saddr
    };
    let verdict = fib::forward(ctx, &new_saddr, &outer_daddr, PROTO_ICMPV6);
    Some(if verdict < 0 { TC_ACT_OK } else { verdict })
}

/// As `rewrite_peer4`, for ICMPv6: the quote's source and the error's destination back to the peer (the
/// destination is in the ICMPv6 pseudo-header).
#[inline(never)]
fn rewrite_peer6(ctx: &TcContext, entry: &ct::Entry) -> bool {
    peer6(ctx, entry).is_ok()
}

#[inline(always)]
fn peer6(ctx: &TcContext, entry: &ct::Entry) -> Result<(), i64> {
    let quoted_src: Addr = ctx.load(INNER6 + 8)?;
    let quoted_sport: u16 = ctx.load(INNER6_L4)?;
    let outer_daddr: Addr = ctx.load(OUTER6_DADDR)?;
    let peer = &entry.peer_addr;
    let mut i = 0;
    while i < 4 {
        if quoted_src[i] != peer[i] {
            ctx.l4_csum_replace(ICMP6_CSUM, quoted_src[i] as u64, peer[i] as u64, 4)?;
        }
        if outer_daddr[i] != peer[i] {
            let flags = BPF_F_PSEUDO_HDR as u64 | 4;
            ctx.l4_csum_replace(ICMP6_CSUM, outer_daddr[i] as u64, peer[i] as u64, flags)?;
        }
        i += 1;
    }
    ctx.store(INNER6 + 8, peer, 0)?;
    ctx.store(OUTER6_DADDR, peer, 0)?;
    ctx.store(INNER6_L4, &entry.peer_port_be, 0)?;
    ctx.l4_csum_replace(
        ICMP6_CSUM,
        quoted_sport as u64,
        entry.peer_port_be as u64,
        2,
    )
}

/// The quote's destination back to the frontend, and the outer source too when the backend sent the
/// error; the ICMPv6 checksum covers the quote and (through the pseudo-header) the outer addresses.
#[inline(always)]
fn rewrite6(
    ctx: &TcContext,
    backend: &Addr,
    backend_port_be: u16,
    entry: &ct::Entry,
    from_backend: bool,
) -> Result<(), i64> {
    let frontend = &entry.nat_addr;
    let mut i = 0;
    while i < 4 {
        if backend[i] != frontend[i] {
            ctx.l4_csum_replace(ICMP6_CSUM, backend[i] as u64, frontend[i] as u64, 4)?;
            if from_backend {
                let flags = BPF_F_PSEUDO_HDR as u64 | 4;
                ctx.l4_csum_replace(ICMP6_CSUM, backend[i] as u64, frontend[i] as u64, flags)?;
            }
        }
        i += 1;
    }
    ctx.store(INNER6_DADDR, frontend, 0)?;
    if from_backend {
        ctx.store(OUTER6_SADDR, frontend, 0)?;
    }
    ctx.store(INNER6_L4 + 2, &entry.nat_port_be, 0)?;
    ctx.l4_csum_replace(
        ICMP6_CSUM,
        backend_port_be as u64,
        entry.nat_port_be as u64,
        2,
    )
}

/// The quote's source back to the client the backend never saw (SNAT, hairpin), and the error's
/// destination with it. Out of line for the stack, with few arguments and a plain result (a BPF call
/// takes five registers, and an aggregate result would come back through the stack): what it changes
/// it reads again from the packet.
#[inline(never)]
fn rewrite_peer4(ctx: &TcContext, entry: &CtValue) -> bool {
    peer4(ctx, entry).is_ok()
}

#[inline(always)]
fn peer4(ctx: &TcContext, entry: &CtValue) -> Result<(), i64> {
    let quoted_src: u32 = ctx.load(INNER + 12)?;
    let quoted_sport: u16 = ctx.load(INNER_L4)?;
    let outer_daddr: u32 = ctx.load(OUTER_DADDR)?;
    let old_inner_csum: u16 = ctx.load(INNER_CSUM)?;
    ctx.l3_csum_replace(INNER_CSUM, quoted_src as u64, entry.peer_addr_be as u64, 4)?;
    ctx.store(INNER + 12, &entry.peer_addr_be, 0)?;
    ctx.l4_csum_replace(ICMP_CSUM, quoted_src as u64, entry.peer_addr_be as u64, 4)?;
    let new_inner_csum: u16 = ctx.load(INNER_CSUM)?;
    ctx.l4_csum_replace(ICMP_CSUM, old_inner_csum as u64, new_inner_csum as u64, 2)?;
    ctx.store(INNER_L4, &entry.peer_port_be, 0)?;
    ctx.l4_csum_replace(ICMP_CSUM, quoted_sport as u64, entry.peer_port_be as u64, 2)?;
    ctx.l3_csum_replace(OUTER_CSUM, outer_daddr as u64, entry.peer_addr_be as u64, 4)?;
    ctx.store(OUTER_DADDR, &entry.peer_addr_be, 0)
}

/// Inner destination address and port back to the frontend, the inner IPv4 checksum and the ICMP
/// checksum (which covers the quote) updated to match; the outer source too when the backend itself
/// sent the error.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    outer: &[u8; 20],
    backend_be: u32,
    backend_port_be: u16,
    frontend_be: u32,
    frontend_port_be: u16,
) -> Result<(), i64> {
    let old_inner_csum: u16 = ctx.load(INNER_CSUM)?;
    ctx.l3_csum_replace(INNER_CSUM, backend_be as u64, frontend_be as u64, 4)?;
    ctx.store(INNER_DADDR, &frontend_be, 0)?;
    ctx.l4_csum_replace(ICMP_CSUM, backend_be as u64, frontend_be as u64, 4)?;
    let new_inner_csum: u16 = ctx.load(INNER_CSUM)?;
    ctx.l4_csum_replace(ICMP_CSUM, old_inner_csum as u64, new_inner_csum as u64, 2)?;
    // The quote's destination port is the second 16-bit word of its L4 header.
    ctx.store(INNER_L4 + 2, &frontend_port_be, 0)?;
    ctx.l4_csum_replace(
        ICMP_CSUM,
        backend_port_be as u64,
        frontend_port_be as u64,
        2,
    )?;
    let outer_saddr = u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]);
    if outer_saddr == backend_be {
        ctx.l3_csum_replace(OUTER_CSUM, backend_be as u64, frontend_be as u64, 4)?;
        ctx.store(OUTER_SADDR, &frontend_be, 0)?;
    }
    Ok(())
}
