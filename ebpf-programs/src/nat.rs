//! Address/port rewrites with incremental checksum updates (the kernel helpers handle CHECKSUM_PARTIAL
//! skbs from local sockets, which a full recomputation here would get wrong).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weir_common::{Addr, PROTO_UDP};

use crate::packet::{ETH_HLEN, Flow, l4_csum_off};

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;
const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
const IP6_DADDR_OFF: usize = ETH_HLEN + 24;

/// Destination NAT: frontend → backend.
#[inline(always)]
pub fn dnat(ctx: &TcContext, flow: &Flow, addr: &Addr, port_be: u16) -> Result<(), i64> {
    let addr_off = if flow.v6 { IP6_DADDR_OFF } else { IP_DADDR_OFF };
    rewrite_addr(ctx, flow, addr_off, &flow.daddr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off as usize + 2, flow.dport_be, port_be)
}

/// Source NAT: backend → frontend on a reply, client → this node (or the hairpin address) on a request.
#[inline(always)]
pub fn snat(ctx: &TcContext, flow: &Flow, addr: &Addr, port_be: u16) -> Result<(), i64> {
    let addr_off = if flow.v6 { IP6_SADDR_OFF } else { IP_SADDR_OFF };
    rewrite_addr(ctx, flow, addr_off, &flow.saddr, addr)?;
    rewrite_port(ctx, flow, flow.l4_off as usize, flow.sport_be, port_be)
}

/// A UDP checksum of 0 means "none" and must stay 0; MANGLED_0 also avoids writing a computed 0.
#[inline(always)]
fn udp_flag(flow: &Flow) -> u64 {
    if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    old: &Addr,
    new: &Addr,
) -> Result<(), i64> {
    let csum_off = l4_csum_off(flow);
    let flags = BPF_F_PSEUDO_HDR as u64 | udp_flag(flow) | 4;
    if !flow.v6 {
        // IPv4 addresses are the last word of the mapped form.
        let (o, n) = (old[3], new[3]);
        if o != n {
            ctx.l4_csum_replace(csum_off, o as u64, n as u64, flags)?;
            ctx.l3_csum_replace(IP_CSUM_OFF, o as u64, n as u64, 4)?;
            ctx.store(addr_off, &n, 0)?;
        }
        return Ok(());
    }
    if old == new {
        return Ok(());
    }
    // IPv6 has no header checksum; the address is in the L4 pseudo-header, one word at a time.
    let mut i = 0;
    while i < 4 {
        if old[i] != new[i] {
            ctx.l4_csum_replace(csum_off, old[i] as u64, new[i] as u64, flags)?;
        }
        i += 1;
    }
    ctx.store(addr_off, new, 0)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    flow: &Flow,
    port_off: usize,
    old: u16,
    new: u16,
) -> Result<(), i64> {
    if old != new {
        ctx.l4_csum_replace(
            l4_csum_off(flow),
            old as u64,
            new as u64,
            udp_flag(flow) | 2,
        )?;
        ctx.store(port_off, &new, 0)?;
    }
    Ok(())
}
