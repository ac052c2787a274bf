//! Address/port rewrites with incremental checksum updates (the kernel helpers handle CHECKSUM_PARTIAL
//! skbs from local sockets, which a full recomputation here would get wrong).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use weir_common::PROTO_UDP;

use crate::packet::{ETH_HLEN, Flow, l4_csum_off};

const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;

/// Destination NAT: frontend → backend.
#[inline(always)]
pub fn dnat(ctx: &TcContext, flow: &Flow, addr_be: u32, port_be: u16) -> Result<(), i64> {
    rewrite(
        ctx,
        flow,
        IP_DADDR_OFF,
        flow.daddr_be,
        addr_be,
        flow.l4_off + 2,
        flow.dport_be,
        port_be,
    )
}

/// Source NAT of a reply: backend → frontend, so the client only ever sees the address it dialled.
#[inline(always)]
pub fn snat(ctx: &TcContext, flow: &Flow, addr_be: u32, port_be: u16) -> Result<(), i64> {
    rewrite(
        ctx,
        flow,
        IP_SADDR_OFF,
        flow.saddr_be,
        addr_be,
        flow.l4_off,
        flow.sport_be,
        port_be,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let csum_off = l4_csum_off(flow);
    // A UDP checksum of 0 means "none" and must stay 0; MANGLED_0 also avoids writing a computed 0.
    let udp = if flow.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            BPF_F_PSEUDO_HDR as u64 | udp | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, udp | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}
