//! Forwarding without the routing input path: after a reverse translation the packet may carry a source
//! address local to the node (a NodePort on a node IP), which the kernel's input routing drops as a
//! martian. A FIB lookup and a redirect to the egress interface send it the way the node's routes say,
//! as a router would (TTL decremented), and skip the stack's per-packet work on the way.
use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use weir_common::{Addr, is_v4_mapped};

use crate::{
    hook::Hook,
    packet::{ETH_HLEN, Flow},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IP_TTL_OFF: usize = ETH_HLEN + 8;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;

/// Lookup parameters for a packet from `saddr` to `daddr` (IPv4 ones in their mapped form, which is
/// how the family is told) entering on the skb's interface.
#[inline(always)]
fn params<C: Hook>(ctx: &C, saddr: &Addr, daddr: &Addr, proto: u8) -> FibParams {
    let v6 = !is_v4_mapped(daddr);
    // SAFETY: FibParams is a plain C struct of integers and unions of integers; all-zero is valid.
    let mut params: FibParams = unsafe { mem::zeroed() };
    params.l4_protocol = proto;
    params.ifindex = ctx.ifindex();
    if v6 {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = *saddr;
        params.__bindgen_anon_4.ipv6_dst = *daddr;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = saddr[3];
        params.__bindgen_anon_4.ipv4_dst = daddr[3];
    }
    params
}

/// Redirects the (already rewritten) packet towards `daddr` per the node's FIB. Returns the TC
/// verdict; anything the FIB cannot answer (a local destination, no route, TTL about to expire) goes to
/// the stack as `TC_ACT_OK`, which then decides as it always would. Out of line: the lookup parameters
/// would otherwise sit in every caller's frame.
#[inline(never)]
pub fn forward(ctx: &TcContext, saddr: &Addr, daddr: &Addr, proto: u8) -> i32 {
    let v6 = !is_v4_mapped(daddr);
    let mut params = params(ctx, saddr, daddr, proto);
    // SAFETY: the helper reads and writes only `params`, whose size we pass.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    let ret = ret as u32;
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return TC_ACT_OK;
    }
    let hop = if v6 {
        decrement_hop_limit(ctx)
    } else {
        decrement_ttl(ctx)
    };
    if hop.is_err() {
        return TC_ACT_OK;
    }
    if ret == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The kernel resolves the neighbour (ARP) and fills in both MAC addresses itself.
        // SAFETY: plain helper call; a null params pointer with length 0 is the documented form.
        return unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&params.dmac);
    eth[6..].copy_from_slice(&params.smac);
    if ctx.store(0, &eth, 0).is_err() {
        return TC_ACT_OK;
    }
    // SAFETY: plain helper call with an ifindex the FIB returned.
    unsafe { bpf_redirect(params.ifindex, 0) as i32 }
}

/// The interface the FIB would send `flow`'s packets to `daddr` out of, or `None` when it cannot say
/// (local, no route). Few arguments: a BPF function takes at most five, the return slot included.
#[inline(never)]
pub fn egress_ifindex<C: Hook>(ctx: &C, flow: &Flow, daddr: &Addr) -> Option<u32> {
    let mut params = params(ctx, &flow.saddr, daddr, flow.proto);
    // SAFETY: the helper reads and writes only `params`, whose size we pass.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.raw(),
            &mut params,
            mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    (ret == BPF_FIB_LKUP_RET_SUCCESS || ret == BPF_FIB_LKUP_RET_NO_NEIGH).then_some(params.ifindex)
}

/// A router's TTL decrement, refusing when the packet would expire (the stack then sends the ICMP).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), i64> {
    // TTL and protocol share one 16-bit checksum word.
    let word: [u8; 2] = ctx.load(IP_TTL_OFF)?;
    if word[0] <= 1 {
        return Err(-1);
    }
    let new = [word[0] - 1, word[1]];
    ctx.l3_csum_replace(
        IP_CSUM_OFF,
        u16::from_ne_bytes(word) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )?;
    ctx.store(IP_TTL_OFF, &new[0], 0)
}

/// IPv6's TTL: no header checksum to update.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext) -> Result<(), i64> {
    let hop: u8 = ctx.load(IP6_HOP_LIMIT_OFF)?;
    if hop <= 1 {
        return Err(-1);
    }
    ctx.store(IP6_HOP_LIMIT_OFF, &(hop - 1), 0)
}

/// A FIB lookup for a packet from `saddr` to `daddr`: the result code and the parameters (egress
/// interface, MAC addresses) for the caller to act on.
#[inline(always)]
pub fn lookup<C: Hook>(ctx: &C, saddr: &Addr, daddr: &Addr, proto: u8, out: &mut FibParams) -> u32 {
    *out = params(ctx, saddr, daddr, proto);
    // SAFETY: the helper reads and writes only `out`, whose size we pass.
    (unsafe { bpf_fib_lookup(ctx.raw(), out, mem::size_of::<FibParams>() as i32, 0) }) as u32
}
