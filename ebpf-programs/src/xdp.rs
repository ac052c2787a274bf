//! The XDP fast path of external interfaces: NodePort, externalIP and LoadBalancer traffic whose
//! backend lives on another node is translated (DNAT + SNAT) and sent back out in the driver, before
//! the kernel allocates an skb; so are the backends' replies. `loadBalancerSourceRanges` and
//! traffic-policy drops happen here too. Everything else passes, untouched, to the stack, where the
//! TC program on the same interface handles it as before: local backends, rejects, ICMP errors,
//! fragments, and any packet whose next hop the FIB cannot give (no neighbour entry yet).
//!
//! XDP has no checksum helpers: checksums are updated here incrementally (RFC 1624). The packets are
//! received ones, whose checksums are complete.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_redirect,
    programs::XdpContext,
};
use weir_common::{
    Addr, CT_FORWARD, CT_REVERSE, NEXT_HOP_TTL_S, NextHop, NextHopKey, PROTO_TCP, PROTO_UDP,
    STAT_FWD_ESTABLISHED, STAT_FWD_NEW, STAT_REVERSE_NAT, STAT_XDP_FORWARDED, STAT_XDP_PASS,
    ServiceKey,
};

use crate::{
    NEW, backend_still_valid, ct, fib,
    hook::Hook,
    maps::{EXT_IFACES, NEXT_HOPS},
    new_flow,
    packet::{self, ETH_HLEN, Flow, IPV4_MIN_HLEN, IPV6_HLEN},
    reopened_without_reverse,
    stats::{count, count_service},
    track,
};

const PASS: i32 = xdp_action::XDP_PASS as i32;

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> i32 {
    let Some(flow) = packet::parse(ctx) else {
        return pass();
    };
    let mut entry = ct::Entry::NONE;
    if ct::lookup(&flow, &mut entry, true) {
        if entry.kind == CT_REVERSE {
            return translate(ctx, &flow, &entry, STAT_REVERSE_NAT);
        }
        if entry.kind == CT_FORWARD && backend_still_valid(&entry) {
            // Without SNAT the backend is on this node: the stack delivers it (TC translates, and
            // checks a SYN's reverse entry itself).
            if ct::is_none(&entry.peer_addr) {
                return pass();
            }
            if !reopened_without_reverse(&flow, &entry) {
                return translate(ctx, &flow, &entry, STAT_FWD_ESTABLISHED);
            }
        }
    }
    match new_flow(ctx, &flow, true, &mut entry) {
        NEW if !ct::is_none(&entry.peer_addr) => {
            track(&flow, &entry);
            translate(ctx, &flow, &entry, STAT_FWD_NEW)
        }
        // A local backend, a reject (TC builds the RST / ICMP), or not a frontend: the stack's.
        NEW | crate::REJECT | PASS => pass(),
        verdict => verdict,
    }
}

#[inline(always)]
fn pass() -> i32 {
    count(STAT_XDP_PASS);
    PASS
}

/// The addresses and ports a tracked packet leaves with, by reference into the flow and the entry (no
/// copies: every byte of stack counts, see `rewrite4`). `stat` says which way: `STAT_REVERSE_NAT`
/// rewrites the source back to the frontend and, with a peer, the destination back to the client; the
/// forward stats rewrite the destination to the backend and the source to the peer.
struct Rewrite<'a> {
    saddr: &'a Addr,
    daddr: &'a Addr,
    sport_be: u16,
    dport_be: u16,
}

#[inline(always)]
fn rewrite_of<'a>(flow: &'a Flow, entry: &'a ct::Entry, stat: u32) -> Rewrite<'a> {
    let peer = !ct::is_none(&entry.peer_addr);
    if stat == STAT_REVERSE_NAT {
        Rewrite {
            saddr: &entry.nat_addr,
            sport_be: entry.nat_port_be,
            daddr: if peer { &entry.peer_addr } else { &flow.daddr },
            dport_be: if peer {
                entry.peer_port_be
            } else {
                flow.dport_be
            },
        }
    } else {
        Rewrite {
            saddr: &entry.peer_addr,
            sport_be: entry.peer_port_be,
            daddr: &entry.nat_addr,
            dport_be: entry.nat_port_be,
        }
    }
}

/// Translates per `entry` (`stat` says which way: `STAT_REVERSE_NAT` rewrites the source back to the
/// frontend and, with a peer, the destination back to the client; the forward stats rewrite the
/// destination to the backend and the source to the peer) and sends the packet out of the interface
/// the FIB names, when that is an external interface and the neighbour is known; otherwise the packet
/// passes untouched and TC does the same work in the stack.
#[inline(never)]
fn translate(ctx: &XdpContext, flow: &Flow, entry: &ct::Entry, stat: u32) -> i32 {
    let to = rewrite_of(flow, entry, stat);
    let mut hop = NextHop {
        ifindex: 0,
        smac: [0; 6],
        dmac: [0; 6],
        checked_s: 0,
    };
    if !next_hop(ctx, to.saddr, to.daddr, flow.proto, &mut hop) {
        return pass();
    }
    let done = if flow.v6 {
        rewrite6(ctx, flow, entry, stat)
    } else {
        rewrite4(ctx, flow, entry, stat)
    };
    if done.is_none() || set_macs(ctx, &hop).is_none() {
        // Nothing was written (each rewrite checks every bound before its first store).
        return pass();
    }
    account(ctx.pkt_len(), flow, entry, stat);
    if hop.ifindex == ctx.ifindex() {
        return xdp_action::XDP_TX as i32;
    }
    // SAFETY: plain helper call with an ifindex the FIB returned.
    unsafe { bpf_redirect(hop.ifindex, 0) as i32 }
}

/// Where a packet from `saddr` to `daddr` goes: from the next-hop cache while its answer is younger
/// than `NEXT_HOP_TTL_S`, else from the FIB (then cached). False when the FIB cannot give a resolved
/// next hop through an external interface: the stack's (TC's) packet then. The cache is keyed by
/// destination and input interface, not source: the node's routes to pods and clients do not depend
/// on which of the node's own addresses a translated packet carries. Out of line: the FIB parameters
/// (64 bytes) stay out of `translate`'s frame.
#[inline(never)]
fn next_hop(ctx: &XdpContext, saddr: &Addr, daddr: &Addr, proto: u8, out: &mut NextHop) -> bool {
    let key = NextHopKey {
        daddr_be: *daddr,
        ifindex: ctx.ifindex(),
    };
    let now = ct::now_s();
    if let Some(cached) = NEXT_HOPS.get_ptr(key) {
        // SAFETY: pointer from a successful lookup, read in place; NextHop is plain data, written
        // whole by inserts.
        let cached = unsafe { &*cached };
        if now.wrapping_sub(cached.checked_s) < NEXT_HOP_TTL_S {
            out.ifindex = cached.ifindex;
            out.smac = cached.smac;
            out.dmac = cached.dmac;
            return true;
        }
    }
    // SAFETY: FibParams is a plain C struct of integers and unions of integers; all-zero is valid.
    let mut fib_out: FibParams = unsafe { core::mem::zeroed() };
    if fib::lookup(ctx, saddr, daddr, proto, &mut fib_out) != BPF_FIB_LKUP_RET_SUCCESS
        || EXT_IFACES.get_ptr(fib_out.ifindex).is_none()
    {
        return false;
    }
    out.ifindex = fib_out.ifindex;
    out.smac = fib_out.smac;
    out.dmac = fib_out.dmac;
    out.checked_s = now;
    // An LRU insert only fails on allocation failure: the next packet asks the FIB again.
    let _ = NEXT_HOPS.insert(key, out, 0);
    true
}

/// Counters of a packet the fast path sent: its kind, the fast path's own, and its frontend's traffic.
/// Out of line for the stack (see `rewrite4`).
#[inline(never)]
fn account(len: u32, flow: &Flow, entry: &ct::Entry, stat: u32) {
    count(stat);
    count(STAT_XDP_FORWARDED);
    let (addr_be, port_be) = if stat == STAT_REVERSE_NAT {
        (entry.nat_addr, entry.nat_port_be)
    } else {
        (flow.daddr, flow.dport_be)
    };
    count_service(
        &ServiceKey {
            addr_be,
            port_be,
            proto: flow.proto,
            pad: 0,
        },
        len,
    );
}

/// One's-complement sum of the 16-bit halves of `old` (negated) and `new`, as RFC 1624 updates a
/// checksum: the caller folds it into the field.
#[inline(always)]
fn diff32(acc: u32, old: u32, new: u32) -> u32 {
    acc + (!old & 0xffff) + ((!old) >> 16) + (new & 0xffff) + (new >> 16)
}

#[inline(always)]
fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + u32::from(!old) + u32::from(new)
}

/// The checksum field updated by `acc` (from `diff32`/`diff16`), all in the packet's byte order.
#[inline(always)]
fn fold(check: u16, acc: u32) -> u16 {
    let mut sum = u32::from(!check) + acc;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// # Safety
/// `[start + off, start + off + size_of::<T>())` must have been checked against the packet's end.
#[inline(always)]
unsafe fn at<T>(start: usize, off: usize) -> *mut T {
    (start + off) as *mut T
}

const L4_V4: usize = ETH_HLEN + IPV4_MIN_HLEN;
const L4_V6: usize = ETH_HLEN + IPV6_HLEN;

/// IPv4 without options: addresses, ports, TTL and both checksums. `None` (nothing written) when the
/// headers are not all there or the TTL is spent. Out of line, like `rewrite6`: the verifier limits a
/// call chain's stack to 512 bytes.
#[inline(never)]
fn rewrite4(ctx: &XdpContext, flow: &Flow, entry: &ct::Entry, stat: u32) -> Option<()> {
    let to = rewrite_of(flow, entry, stat);
    if flow.ihl as usize != IPV4_MIN_HLEN {
        return None;
    }
    let tcp = flow.proto == PROTO_TCP;
    let csum_off = if tcp { 16 } else { 6 };
    let (start, end) = ctx.bounds();
    if start + L4_V4 + 8 > end || tcp && start + L4_V4 + 20 > end {
        return None;
    }
    let (old_s, old_d, new_s, new_d) = (flow.saddr[3], flow.daddr[3], to.saddr[3], to.daddr[3]);
    // SAFETY: all offsets below are inside the IPv4 header and the L4 header checked just above.
    unsafe {
        let ttl = at::<u8>(start, ETH_HLEN + 8);
        if *ttl <= 1 {
            return None;
        }
        // TTL shares a 16-bit checksum word with the protocol.
        let ttl_word = at::<u16>(start, ETH_HLEN + 8);
        let old_ttl_word = ttl_word.read_unaligned();
        *ttl -= 1;
        let new_ttl_word = ttl_word.read_unaligned();
        let ip_acc = diff16(
            diff32(diff32(0, old_s, new_s), old_d, new_d),
            old_ttl_word,
            new_ttl_word,
        );
        let ip_check = at::<u16>(start, ETH_HLEN + 10);
        ip_check.write_unaligned(fold(ip_check.read_unaligned(), ip_acc));
        at::<u32>(start, ETH_HLEN + 12).write_unaligned(new_s);
        at::<u32>(start, ETH_HLEN + 16).write_unaligned(new_d);

        let l4_acc = diff16(
            diff16(
                diff32(diff32(0, old_s, new_s), old_d, new_d),
                flow.sport_be,
                to.sport_be,
            ),
            flow.dport_be,
            to.dport_be,
        );
        let l4_check = at::<u16>(start, L4_V4 + csum_off);
        let old_check = l4_check.read_unaligned();
        // A UDP checksum of 0 means none, and must stay 0.
        if !(flow.proto == PROTO_UDP && old_check == 0) {
            let mut new_check = fold(old_check, l4_acc);
            if flow.proto == PROTO_UDP && new_check == 0 {
                new_check = 0xffff;
            }
            l4_check.write_unaligned(new_check);
        }
        at::<u16>(start, L4_V4).write_unaligned(to.sport_be);
        at::<u16>(start, L4_V4 + 2).write_unaligned(to.dport_be);
    }
    Some(())
}

/// IPv6 (no extension headers: the parser only accepts TCP/UDP right after the fixed header):
/// addresses, ports, hop limit and the L4 checksum (IPv6 has no header checksum).
#[inline(never)]
fn rewrite6(ctx: &XdpContext, flow: &Flow, entry: &ct::Entry, stat: u32) -> Option<()> {
    let to = rewrite_of(flow, entry, stat);
    let tcp = flow.proto == PROTO_TCP;
    let csum_off = if tcp { 16 } else { 6 };
    let (start, end) = ctx.bounds();
    if start + L4_V6 + 8 > end || tcp && start + L4_V6 + 20 > end {
        return None;
    }
    let mut acc = 0;
    let mut i = 0;
    while i < 4 {
        acc = diff32(acc, flow.saddr[i], to.saddr[i]);
        acc = diff32(acc, flow.daddr[i], to.daddr[i]);
        i += 1;
    }
    acc = diff16(acc, flow.sport_be, to.sport_be);
    acc = diff16(acc, flow.dport_be, to.dport_be);
    // SAFETY: all offsets below are inside the IPv6 header and the L4 header checked just above.
    unsafe {
        let hop = at::<u8>(start, ETH_HLEN + 7);
        if *hop <= 1 {
            return None;
        }
        *hop -= 1;
        let mut i = 0;
        while i < 4 {
            at::<u32>(start, ETH_HLEN + 8 + 4 * i).write_unaligned(to.saddr[i]);
            at::<u32>(start, ETH_HLEN + 24 + 4 * i).write_unaligned(to.daddr[i]);
            i += 1;
        }
        let l4_check = at::<u16>(start, L4_V6 + csum_off);
        let mut new_check = fold(l4_check.read_unaligned(), acc);
        if flow.proto == PROTO_UDP && new_check == 0 {
            new_check = 0xffff;
        }
        l4_check.write_unaligned(new_check);
        at::<u16>(start, L4_V6).write_unaligned(to.sport_be);
        at::<u16>(start, L4_V6 + 2).write_unaligned(to.dport_be);
    }
    Some(())
}

#[inline(always)]
fn set_macs(ctx: &XdpContext, hop: &NextHop) -> Option<()> {
    let (start, end) = ctx.bounds();
    if start + ETH_HLEN > end {
        return None;
    }
    let mut i = 0;
    while i < 6 {
        // SAFETY: `i < 6` keeps both writes inside the Ethernet header checked above.
        unsafe {
            *at::<u8>(start, i) = hop.dmac[i];
            *at::<u8>(start, 6 + i) = hop.smac[i];
        }
        i += 1;
    }
    Some(())
}
