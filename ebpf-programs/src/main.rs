//! Weir's datapath: TC programs that DNAT Service traffic to Maglev-selected backends, track connections
//! and reverse-NAT replies. Maps and their key/value types come from `weir-common`.
#![no_std]
#![no_main]

mod affinity;
mod csum;
mod ct;
mod fib;
mod flow;
mod hook;
mod icmp;
mod l7;
mod maps;
mod nat;
mod packet;
mod reject;
mod snat;
mod sock;
mod stats;
mod xdp;

use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use weir_common::{
    Addr, CT_FORWARD, CT_REVERSE, HAIRPIN_ADDR, HAIRPIN_ADDR6, PROTO_TCP,
    SOURCE_RANGE_FRONTEND_BITS, STAT_DROP_FRAGMENT, STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_LOCAL_ENDPOINT, STAT_DROP_REWRITE_FAILED, STAT_DROP_SNAT_EXHAUSTED,
    STAT_DROP_SOURCE_RANGE, STAT_FWD_ESTABLISHED, STAT_FWD_NEW, STAT_PASS_NOT_SERVICE,
    STAT_PASS_UNPARSED, STAT_REVERSE_NAT, STAT_SNAT_NEW, SVC_FLAG_DROP, SVC_FLAG_L7,
    SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES, ServiceKey, SourceRangeKey, v4_mapped,
};

use crate::{
    hook::Hook,
    maps::{BACKENDS, EXT_IFACES, SERVICES, SOURCE_RANGES},
    packet::{Flow, TCP_SYN},
    stats::{count, count_service},
};

/// Ingress of the node side of a pod interface: every packet a pod sends passes here first, so both a
/// client's request (to a frontend) and a backend's reply (to translate back) are seen before routing.
#[classifier]
pub fn weir_pod_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx, false)
}

/// Ingress of an external interface: NodePort, externalIP and LoadBalancer traffic from outside the
/// node, and replies from backends on other nodes.
#[classifier]
pub fn weir_ext_ingress(ctx: TcContext) -> i32 {
    ingress(&ctx, true)
}

/// The fast path of an external interface (native XDP): see `xdp.rs`. What it passes, the TC program on
/// the same interface handles.
#[xdp]
pub fn weir_ext_xdp(ctx: XdpContext) -> u32 {
    xdp::ingress(&ctx) as u32
}

#[cgroup_sock_addr(connect4)]
pub fn weir_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn weir_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn weir_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(getpeername4)]
pub fn weir_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn weir_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn weir_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::translate(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn weir_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[cgroup_sock_addr(getpeername6)]
pub fn weir_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::restore(&ctx, true)
}

#[inline(always)]
/// Every path returns a plain verdict: the BPF backend returns aggregates (a `Result`, an enum with data)
/// through a pointer to the caller's stack, which the verifier refuses to see returned.
fn ingress(ctx: &TcContext, outside: bool) -> i32 {
    let Some(flow) = packet::parse(ctx) else {
        // From here, not in `unparsed`: each call level costs stack (512 bytes for the whole chain).
        if let Some(verdict) = icmp::translate_error(ctx) {
            return verdict;
        }
        return unparsed(ctx);
    };

    let mut entry = ct::Entry::NONE;
    if ct::lookup(&flow, &mut entry, true) {
        if entry.kind == CT_REVERSE {
            return reply(ctx, &flow, &entry);
        }
        if entry.kind == CT_FORWARD
            && backend_still_valid(&entry)
            && !reopened_without_reverse(&flow, &entry)
        {
            return forward(ctx, &flow, &entry, STAT_FWD_ESTABLISHED);
        }
        // A forward entry whose backend is gone, or a new connection on a tuple whose reverse entry is
        // gone, falls through and is re-balanced like a new flow.
    }
    // Each path is its own subprogram and rejects are built at this level: the verifier limits the
    // stack of a whole call chain to 512 bytes.
    match new_flow(ctx, &flow, outside, &mut entry) {
        NEW => {
            track(&flow, &entry);
            forward(ctx, &flow, &entry, STAT_FWD_NEW)
        }
        REJECT => reject::reject(ctx, &flow),
        verdict => verdict,
    }
}

/// Not a TCP/UDP packet we can parse, nor an ICMP error about one of our flows: a fragment to a
/// frontend, or none of our business (it passes untouched: what we cannot parse is not ours to drop).
#[inline(never)]
fn unparsed(ctx: &TcContext) -> i32 {
    // Fragments to a ClusterIP cannot be balanced (only the first carries ports): drop, counted,
    // rather than let them wander to a node that has no route for a virtual address.
    if let Some((proto, daddr)) = packet::fragment_destination(ctx) {
        let any_port = ServiceKey {
            addr_be: daddr,
            port_be: 0,
            proto,
            pad: 0,
        };
        if SERVICES.get_ptr(any_port).is_some() {
            count(STAT_DROP_FRAGMENT);
            return TC_ACT_SHOT;
        }
    }
    count(STAT_PASS_UNPARSED);
    TC_ACT_OK
}

/// `new_flow`'s answer when the frontend has no endpoint (or the ClusterIP no such port): answer with
/// RST / ICMP. Not a TC verdict (those are small non-negative numbers, or -1).
const REJECT: i32 = i32::MIN;
/// `new_flow`'s answer when it chose a backend (the forward entry is filled in): record and forward.
const NEW: i32 = i32::MIN + 1;

/// A backend's reply: source back to the frontend (and destination back to the real client when the
/// flow was hairpinned or SNATed).
#[inline(never)]
fn reply(ctx: &TcContext, flow: &Flow, entry: &ct::Entry) -> i32 {
    count(STAT_REVERSE_NAT);
    count_service(
        &ServiceKey {
            addr_be: entry.nat_addr,
            port_be: entry.nat_port_be,
            proto: flow.proto,
            pad: 0,
        },
        ctx.len(),
    );
    let mut done = nat::snat(ctx, flow, &entry.nat_addr, entry.nat_port_be);
    let peer = !ct::is_none(&entry.peer_addr);
    if done.is_ok() && peer {
        done = nat::dnat(ctx, flow, &entry.peer_addr, entry.peer_port_be);
    }
    let daddr = if peer { &entry.peer_addr } else { &flow.daddr };
    match done {
        Ok(()) => fib::forward(ctx, &entry.nat_addr, daddr, flow.proto),
        Err(e) => rewrite_or_drop(Err(e)),
    }
}

/// A packet of a flow already balanced (`stat` is `STAT_FWD_ESTABLISHED`), or the first one of a flow
/// just recorded (`STAT_FWD_NEW`): to the entry's backend.
#[inline(never)]
fn forward(ctx: &TcContext, flow: &Flow, entry: &ct::Entry, stat: u32) -> i32 {
    count(stat);
    count_service(
        &ServiceKey {
            addr_be: flow.daddr,
            port_be: flow.dport_be,
            proto: flow.proto,
            pad: 0,
        },
        ctx.len(),
    );
    forward_to_backend(ctx, flow, entry)
}

/// A packet that starts a flow: find its frontend and pick a backend. Returns `NEW` with the forward
/// entry in `out`, `REJECT`, or the verdict for the packet. Recording and translating are the caller's,
/// each in its own subprogram: the verifier limits a call chain's stack to 512 bytes.
#[inline(never)]
fn new_flow<C: Hook>(ctx: &C, flow: &Flow, outside: bool, out: &mut ct::Entry) -> i32 {
    let svc_key = ServiceKey {
        addr_be: flow.daddr,
        port_be: flow.dport_be,
        proto: flow.proto,
        pad: 0,
    };
    let Some(svc) = SERVICES.get_ptr(svc_key) else {
        // A ClusterIP on a port no Service defines is refused, as kube-proxy does, rather than routed
        // nowhere: the agent marks every ClusterIP with a port-0 entry that rejects.
        let any_port = ServiceKey {
            port_be: 0,
            ..svc_key
        };
        if SERVICES.get_ptr(any_port).is_some() {
            return REJECT;
        }
        if !C::FAST_PATH {
            count(STAT_PASS_NOT_SERVICE);
        }
        return C::PASS;
    };
    // SAFETY: pointer from a successful lookup, read in place (a copy would cost stack); ServiceValue
    // is plain data and the agent replaces entries whole (one update per frontend), so it reads a
    // consistent value.
    let svc = unsafe { &*svc };
    // HTTPRoute: pods' TCP connections go to the L7 proxy, which balances per request.
    if svc.flags & SVC_FLAG_L7 != 0 && flow.proto == PROTO_TCP && !outside {
        return ctx.steer_l7(flow);
    }
    if svc.flags & SVC_FLAG_DROP != 0 {
        count(STAT_DROP_NO_LOCAL_ENDPOINT);
        return C::DROP;
    }
    if svc.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(&svc_key, &flow.saddr) {
        count(STAT_DROP_SOURCE_RANGE);
        return C::DROP;
    }
    if svc.flags & SVC_FLAG_REJECT != 0 || svc.table_size == 0 {
        return REJECT;
    }

    let Some(hashed) = maps::maglev_slot(svc, flow::hash(flow)) else {
        count(STAT_DROP_NO_BACKEND);
        return C::DROP;
    };
    let backend_id = if svc.affinity_timeout_s != 0 {
        affinity::choose(&svc_key, svc, &flow.saddr, hashed)
    } else {
        hashed
    };
    let Some(backend) = BACKENDS.get_ptr(backend_id) else {
        count(STAT_DROP_NO_BACKEND);
        return C::DROP;
    };
    // The backend is read through the map's pointer, not copied to the stack: a whole-struct copy
    // between two stack slots LLVM aligned to 16 bytes crashes the BPF backend ("unsupported memcpy
    // alignment", llvm/llvm-project#199541).
    // SAFETY: pointer from a successful lookup; Backend is plain data.
    let backend = unsafe { &*backend };

    // Whose address the backend sees. A pod reaching itself through the Service (hairpin) must see
    // another source, or its reply would never leave it. Outside traffic to a backend on another node
    // must see this node, or the reply would go straight to the client, untranslated.
    let (peer_addr, peer_port) = if backend.addr_be == flow.saddr {
        let hairpin = if flow.v6 {
            HAIRPIN_ADDR6
        } else {
            v4_mapped(u32::from_ne_bytes(HAIRPIN_ADDR))
        };
        (hairpin, flow.sport_be)
    } else if outside && let Some(node) = remote_via_ext(ctx, flow, &backend.addr_be) {
        match snat::allocate_port(&node, backend, flow) {
            Some(port) => {
                count(STAT_SNAT_NEW);
                (node, port)
            }
            None => {
                count(STAT_DROP_SNAT_EXHAUSTED);
                return C::DROP;
            }
        }
    } else {
        ([0; 4], 0)
    };
    *out = ct::Entry {
        nat_addr: backend.addr_be,
        nat_port_be: backend.port_be,
        kind: CT_FORWARD,
        backend_id,
        peer_addr,
        peer_port_be: peer_port,
    };
    NEW
}

/// The reverse entry of a forward one: the key the backend's replies arrive with (from the backend, to
/// the client or, with SNAT/hairpin, to the peer) and what it rewrites them to.
#[inline(always)]
fn reverse_of(flow: &Flow, forward: &ct::Entry) -> (ct::Tuple, ct::Entry) {
    let peer = !ct::is_none(&forward.peer_addr);
    let key = ct::Tuple {
        saddr: forward.nat_addr,
        daddr: if peer { forward.peer_addr } else { flow.saddr },
        sport_be: forward.nat_port_be,
        dport_be: if peer {
            forward.peer_port_be
        } else {
            flow.sport_be
        },
        proto: flow.proto,
        v6: flow.v6,
        ihl: 0,
        l4_off: 0,
        tcp_flags: 0,
    };
    let entry = ct::Entry {
        nat_addr: flow.daddr,
        nat_port_be: flow.dport_be,
        kind: CT_REVERSE,
        backend_id: forward.backend_id,
        peer_addr: if peer { flow.saddr } else { [0; 4] },
        peer_port_be: if peer { flow.sport_be } else { 0 },
    };
    (key, entry)
}

/// Records a new flow both ways: `forward` for its packets, and the reverse entry its backend's replies
/// will hit. Out of line: the reverse key and entry, and the map key and value of each insert, would
/// otherwise sit in the new-flow path's frame (the verifier limits a call chain to 512 bytes).
#[inline(never)]
fn track(flow: &Flow, forward: &ct::Entry) {
    let (reverse_key, reverse) = reverse_of(flow, forward);
    ct::insert(&reverse_key, &reverse);
    ct::insert(flow, forward);
}

/// A SYN on a tracked tuple opens a new connection on it (or retransmits one) and its replies need the
/// reverse entry, which can be gone alone: the LRU evicts entries one by one, and the collector may
/// expire the old connection's pair just as the client reuses the tuple. Such a SYN is balanced and
/// recorded anew instead of being forwarded into a flow whose replies would go untranslated. Other
/// packets are not checked (one lookup more per packet); only a SYN can start over.
#[inline(always)]
fn reopened_without_reverse(flow: &Flow, forward: &ct::Entry) -> bool {
    flow.tcp_flags & TCP_SYN != 0 && !reverse_intact(flow, forward)
}

/// The reverse entry of `forward` exists and still leads back to this flow.
#[inline(never)]
fn reverse_intact(flow: &Flow, forward: &ct::Entry) -> bool {
    let (key, want) = reverse_of(flow, forward);
    let mut found = ct::Entry::NONE;
    ct::lookup(&key, &mut found, false)
        && found.kind == CT_REVERSE
        && found.nat_addr == want.nat_addr
        && found.nat_port_be == want.nat_port_be
        && found.peer_addr == want.peer_addr
        && found.peer_port_be == want.peer_port_be
}

/// When the backend is reached through an external interface (it lives on another node), this node's
/// address (of the flow's family) on the interface the request came in on, to SNAT to.
#[inline(always)]
fn remote_via_ext<C: Hook>(ctx: &C, flow: &Flow, backend: &Addr) -> Option<Addr> {
    let egress = fib::egress_ifindex(ctx, flow, backend)?;
    EXT_IFACES.get_ptr(egress)?;
    let ingress = ctx.ifindex();
    // SAFETY: pointer from a successful lookup; ExtIface is plain data.
    let addrs = unsafe { *EXT_IFACES.get_ptr(ingress)? };
    let node = if flow.v6 {
        addrs.addr6_be
    } else if addrs.addr4_be != 0 {
        v4_mapped(addrs.addr4_be)
    } else {
        [0; 4]
    };
    // No address of this family on the interface: nothing to SNAT to.
    (!ct::is_none(&node)).then_some(node)
}

/// DNAT to the entry's backend; with a peer (hairpin, SNAT) also rewrite the source and send the packet
/// on with a FIB redirect (the node's routes would otherwise see a hairpin leave where it came in, and
/// a node address as source is a martian to its input path).
#[inline(always)]
fn forward_to_backend(ctx: &TcContext, flow: &Flow, entry: &ct::Entry) -> i32 {
    let done = nat::dnat(ctx, flow, &entry.nat_addr, entry.nat_port_be);
    if ct::is_none(&entry.peer_addr) {
        return rewrite_or_drop(done);
    }
    let done = done.and_then(|()| nat::snat(ctx, flow, &entry.peer_addr, entry.peer_port_be));
    match done {
        Ok(()) => fib::forward(ctx, &entry.peer_addr, &entry.nat_addr, flow.proto),
        Err(e) => rewrite_or_drop(Err(e)),
    }
}

/// `loadBalancerSourceRanges`: is `client` inside one of the frontend's allowed prefixes? Out of line
/// for the stack: its 40-byte trie key.
#[inline(never)]
fn source_allowed(frontend: &ServiceKey, client: &Addr) -> bool {
    let key = Key::new(
        SOURCE_RANGE_FRONTEND_BITS + 128,
        SourceRangeKey {
            frontend: *frontend,
            addr_be: *client,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// A forward entry may outlive its backend (removed from the Service); its id may even have been reused.
fn backend_still_valid(entry: &ct::Entry) -> bool {
    match BACKENDS.get_ptr(entry.backend_id) {
        Some(b) => {
            // SAFETY: pointer from a successful lookup, read in place; Backend is plain data.
            let b = unsafe { &*b };
            b.addr_be == entry.nat_addr && b.port_be == entry.nat_port_be
        }
        None => false,
    }
}

fn rewrite_or_drop(result: Result<(), i64>) -> i32 {
    match result {
        Ok(()) => TC_ACT_OK,
        Err(_) => {
            // A half-rewritten packet must never leave: its checksum or address would be wrong.
            count(STAT_DROP_REWRITE_FAILED);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
