//! Socket-level load balancing for the node's own processes (host-network pods, the kubelet, …): their
//! packets never cross a pod interface, so the destination is translated when the socket connects or
//! sends, before any packet exists, and translated back for `recvmsg` and `getpeername`, as Cilium's
//! socket LB does. No per-packet NAT, no conntrack entry.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use weir_common::{
    Addr, CONFIG_NETNS_COOKIE, PROTO_TCP, PROTO_UDP, SVC_FLAG_DROP, SVC_FLAG_REJECT, ServiceKey,
    SockRevKey, SockRevValue, is_v4_mapped, v4_mapped,
};

use crate::maps::{self, BACKENDS, CONFIG, SERVICES, SOCK_REVNAT};

/// Verdicts of cgroup sock_addr programs: 1 lets the call proceed, 0 fails it with EPERM.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

/// Only sockets of the agent's own network namespace: cgroup hooks run for every namespace on the host.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    CONFIG
        .get(CONFIG_NETNS_COOKIE)
        .is_some_and(|c| *c != 0 && *c == cookie)
}

/// The address the call names, in the maps' form. A dual-stack IPv6 socket addressing an IPv4 frontend
/// names it IPv4-mapped, which is already that form.
///
/// The context is accessed one 32-bit word at a time (volatile, so LLVM cannot merge the words into a
/// `memcpy`, which would walk the context pointer byte by byte: the verifier only allows fixed offsets
/// into it).
#[inline(always)]
fn user_addr(sa: &aya_ebpf::bindings::bpf_sock_addr, v6: bool) -> Addr {
    if !v6 {
        return v4_mapped(sa.user_ip4);
    }
    let mut addr = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        // SAFETY: `i < 4` indexes inside the context's `user_ip6` array.
        addr[i] = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) };
        i += 1;
    }
    addr
}

#[inline(always)]
fn set_user_addr(sa: &mut aya_ebpf::bindings::bpf_sock_addr, v6: bool, addr: &Addr) {
    if !v6 {
        sa.user_ip4 = addr[3];
        return;
    }
    let mut i = 0;
    while i < 4 {
        // SAFETY: `i < 4` indexes inside the context's `user_ip6` array.
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], addr[i]) };
        i += 1;
    }
}

/// connect4/6 / sendmsg4/6: a frontend destination becomes a Maglev-chosen backend.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let key = ServiceKey {
        addr_be: user_addr(sa, v6),
        port_be: sa.user_port as u16,
        proto,
        pad: 0,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return ALLOW;
    };
    // SAFETY: pointer from a successful lookup; ServiceValue is plain data.
    let svc = unsafe { *svc };
    if svc.flags & (SVC_FLAG_DROP | SVC_FLAG_REJECT) != 0 || svc.table_size == 0 {
        // The socket API has no "refused" at connect time from here; EPERM fails it at once.
        return DENY;
    }
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // One socket, one backend: hash the cookie (murmur3's finaliser) onto the Maglev table.
    let mut h = cookie ^ (cookie >> 33);
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    let Some(backend_id) = maps::maglev_slot(&svc, h as u32) else {
        return ALLOW;
    };
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        return ALLOW;
    };
    // SAFETY: pointer from a successful lookup; Backend is plain data.
    let backend = unsafe { *backend };
    // An IPv4 socket can only be sent to an IPv4 backend (a frontend's backends share its family).
    if !v6 && !is_v4_mapped(&backend.addr_be) {
        return ALLOW;
    }
    let rev_key = SockRevKey {
        cookie,
        backend_addr_be: backend.addr_be,
        backend_port_be: backend.port_be,
        pad: 0,
        pad2: 0,
    };
    let rev = SockRevValue {
        frontend_addr_be: key.addr_be,
        frontend_port_be: key.port_be,
        pad: 0,
    };
    if SOCK_REVNAT.insert(rev_key, rev, 0).is_err() {
        // Without the reverse entry replies would show the backend's address: leave this one alone.
        return ALLOW;
    }
    set_user_addr(sa, v6, &backend.addr_be);
    sa.user_port = u32::from(backend.port_be);
    ALLOW
}

/// recvmsg4/6 / getpeername4/6: the backend's address shown as the frontend the socket addressed.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, v6: bool) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_addr for this call.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: plain helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevKey {
        cookie,
        backend_addr_be: user_addr(sa, v6),
        backend_port_be: sa.user_port as u16,
        pad: 0,
        pad2: 0,
    };
    if let Some(rev) = SOCK_REVNAT.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; SockRevValue is plain data.
        let rev = unsafe { *rev };
        set_user_addr(sa, v6, &rev.frontend_addr_be);
        sa.user_port = u32::from(rev.frontend_port_be);
    }
    ALLOW
}
