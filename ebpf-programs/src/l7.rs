//! Hands a pod's TCP connection to a Service with an HTTPRoute to the agent's L7 proxy, TPROXY-style:
//! the packet is assigned to the proxy's socket and marked so the node routes it locally, its destination
//! untouched, so the proxy's accepted socket has the ClusterIP:port the client dialled as its local
//! address and its replies leave with that address as source.
use core::mem;

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, TC_ACT_OK, TC_ACT_SHOT, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use weir_common::{CONFIG_L7_PORT, L7_MARK, STAT_DROP_L7_NO_PROXY, STAT_L7_STEERED};

use crate::{maps::CONFIG, packet::Flow, stats::count};

const TCP_LISTEN: u32 = 10;

#[inline(never)]
pub fn steer(ctx: &TcContext, flow: &Flow) -> i32 {
    let port = CONFIG.get(CONFIG_L7_PORT).copied().unwrap_or(0);
    if port == 0 || port > u64::from(u16::MAX) {
        count(STAT_DROP_L7_NO_PROXY);
        return TC_ACT_SHOT;
    }
    ctx.set_mark(L7_MARK);
    // SAFETY: bpf_sock_tuple is a union of plain integer structs; all-zero is valid.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    // The helper tells the families apart by the length passed: 12 bytes IPv4, 36 IPv6.
    let tuple_len = if flow.v6 {
        tuple.__bindgen_anon_1.ipv6.saddr = flow.saddr;
        tuple.__bindgen_anon_1.ipv6.daddr = flow.daddr;
        tuple.__bindgen_anon_1.ipv6.sport = flow.sport_be;
        tuple.__bindgen_anon_1.ipv6.dport = flow.dport_be;
        36u32
    } else {
        tuple.__bindgen_anon_1.ipv4.saddr = flow.saddr[3];
        tuple.__bindgen_anon_1.ipv4.daddr = flow.daddr[3];
        tuple.__bindgen_anon_1.ipv4.sport = flow.sport_be;
        tuple.__bindgen_anon_1.ipv4.dport = flow.dport_be;
        12u32
    };
    // An established proxied connection: its own socket.
    // SAFETY: the helper reads `tuple_len` bytes of the tuple and returns a referenced socket or null.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if !sk.is_null() {
        // SAFETY: non-null result of the lookup; `state` is readable on every socket kind it returns.
        let state = unsafe { (*sk).state };
        if state != TCP_LISTEN {
            return assign(ctx, sk.cast());
        }
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    // A new connection: the proxy's listener (bound to every address on its port).
    // dport sits at the same place relative to each family's struct, but not in the union: set it per family.
    if flow.v6 {
        tuple.__bindgen_anon_1.ipv6.dport = (port as u16).to_be();
    } else {
        tuple.__bindgen_anon_1.ipv4.dport = (port as u16).to_be();
    }
    // SAFETY: as above.
    let listener = unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            tuple_len,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if listener.is_null() {
        count(STAT_DROP_L7_NO_PROXY);
        return TC_ACT_SHOT;
    }
    assign(ctx, listener.cast())
}

#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut core::ffi::c_void) -> i32 {
    // SAFETY: `sk` is a referenced socket from a lookup; the helper takes its own reference.
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb.cast(), sk, 0) };
    // SAFETY: releasing the lookup's reference, assigned or not.
    unsafe { bpf_sk_release(sk) };
    if ret != 0 {
        count(STAT_DROP_L7_NO_PROXY);
        return TC_ACT_SHOT;
    }
    count(STAT_L7_STEERED);
    TC_ACT_OK
}
