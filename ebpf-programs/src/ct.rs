//! Connection tracking for both families behind one interface: IPv4 flows live in `WEIR_CT` with their
//! 16-byte key (the hot path of most clusters), IPv6 flows in `WEIR_CT6`; callers see one entry type
//! with addresses in the maps' common form.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use weir_common::{
    Addr, CT_FLAG_FIN, CT_FLAG_RST, CT_FLAG_SEEN, CT_FORWARD, CT_REVERSE, CtKey, CtKey6, CtValue,
    CtValue6, v4_mapped,
};

use crate::{
    maps::{CONNTRACK, CONNTRACK6},
    packet::{TCP_FIN, TCP_RST, TCP_SYN},
};

/// One direction of a flow as seen on the wire: a parsed packet is its own key (its offsets unused),
/// so the main path keeps a single copy on the stack, which the verifier limits to 512 bytes per
/// call chain.
pub type Tuple = crate::packet::Flow;

/// What to do with a tracked packet (see `weir_common::CtValue`).
#[derive(Clone, Copy)]
pub struct Entry {
    pub nat_addr: Addr,
    pub nat_port_be: u16,
    pub kind: u8,
    pub backend_id: u32,
    /// All-zero: no peer rewrite.
    pub peer_addr: Addr,
    pub peer_port_be: u16,
}

impl Entry {
    pub const NONE: Self = Self {
        nat_addr: [0; 4],
        nat_port_be: 0,
        kind: 0,
        backend_id: 0,
        peer_addr: [0; 4],
        peer_port_be: 0,
    };
}

#[inline(always)]
fn key4(t: &Tuple) -> CtKey {
    CtKey {
        saddr_be: t.saddr[3],
        daddr_be: t.daddr[3],
        sport_be: t.sport_be,
        dport_be: t.dport_be,
        proto: t.proto,
        pad: [0; 3],
    }
}

#[inline(always)]
fn key6(t: &Tuple) -> CtKey6 {
    CtKey6 {
        saddr_be: t.saddr,
        daddr_be: t.daddr,
        sport_be: t.sport_be,
        dport_be: t.dport_be,
        proto: t.proto,
        pad: [0; 3],
    }
}

/// An IPv4 entry's peer of 0 means none; in the common form that is all-zero, not `::ffff:0.0.0.0`.
#[inline(always)]
fn peer4(addr_be: u32) -> Addr {
    if addr_be == 0 {
        [0; 4]
    } else {
        v4_mapped(addr_be)
    }
}

/// Whole seconds of CLOCK_MONOTONIC, the agent's clock for conntrack timeouts. The coarse clock (tick
/// resolution) is cheaper per packet and plenty for seconds.
#[inline(always)]
pub fn now_s() -> u32 {
    // SAFETY: plain helper call reading the monotonic clock.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// The entry's flags after a packet with `tcp_flags` went its way: seen, FIN/RST remembered for the
/// agent's close timeouts, and forgotten on a SYN (the client reused the tuple for a new connection).
#[inline(always)]
fn flags_after(flags: u8, tcp_flags: u8) -> u8 {
    let mut f = flags | CT_FLAG_SEEN;
    if tcp_flags & TCP_SYN != 0 {
        f &= !(CT_FLAG_FIN | CT_FLAG_RST);
    }
    if tcp_flags & TCP_FIN != 0 {
        f |= CT_FLAG_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        f |= CT_FLAG_RST;
    }
    f
}

/// Records that a packet went the entry's way: its time (at most one write a second, so a busy flow
/// does not bounce the entry's cache line between CPUs) and its TCP flags.
///
/// # Safety
/// `seen` and `flags` must point into a live conntrack map value.
#[inline(always)]
unsafe fn touch(seen: *mut u32, flags: *mut u8, tcp_flags: u8) {
    let now = now_s();
    // SAFETY: the caller's pointers are into a map value; racing writers store whole words of the same
    // meaning, so the worst outcome is an older time, corrected by the next packet.
    unsafe {
        let old = core::ptr::read_volatile(flags);
        let new = flags_after(old, tcp_flags);
        if new != old {
            core::ptr::write_volatile(flags, new);
        }
        if core::ptr::read_volatile(seen) != now {
            core::ptr::write_volatile(seen, now);
        }
    }
}

/// Fills `out` with the entry for `t` and returns true, or returns false. With `refresh`, the packet
/// counts as traffic of the flow (time and TCP flags recorded); an ICMP error quoting the flow does
/// not. Out of line, and through an out-parameter: the map keys and values stay out of the caller's
/// frame, and the BPF backend returns an aggregate as a pointer to the caller's stack, which the
/// verifier refuses.
#[inline(never)]
pub fn lookup(t: &Tuple, out: &mut Entry, refresh: bool) -> bool {
    if t.v6 {
        let Some(v) = CONNTRACK6.get_ptr_mut(key6(t)) else {
            return false;
        };
        if refresh {
            // SAFETY: pointer from a successful lookup, into the map value.
            unsafe { touch(&raw mut (*v).seen_s, &raw mut (*v).flags, t.tcp_flags) };
        }
        // SAFETY: pointer from a successful lookup; CtValue6 is plain data, and a concurrent update
        // can at worst give a stale copy, which the callers' checks tolerate.
        let v = unsafe { &*v };
        out.nat_addr = v.nat_addr_be;
        out.nat_port_be = v.nat_port_be;
        out.kind = v.kind;
        out.backend_id = v.backend_id;
        out.peer_addr = v.peer_addr_be;
        out.peer_port_be = v.peer_port_be;
    } else {
        let Some(v) = CONNTRACK.get_ptr_mut(key4(t)) else {
            return false;
        };
        if refresh {
            // SAFETY: pointer from a successful lookup, into the map value.
            unsafe { touch(&raw mut (*v).seen_s, &raw mut (*v).flags, t.tcp_flags) };
        }
        // SAFETY: as above, for CtValue.
        let v = unsafe { &*v };
        out.nat_addr = v4_mapped(v.nat_addr_be);
        out.nat_port_be = v.nat_port_be;
        out.kind = v.kind;
        out.backend_id = v.backend_id;
        out.peer_addr = peer4(v.peer_addr_be);
        out.peer_port_be = v.peer_port_be;
    }
    true
}

/// True when the reverse key `reply` belongs to a live flow: it exists and its forward entry, found
/// through it, still points back at it. A reverse entry whose forward entry the LRU evicted (or a
/// newer flow of the same client tuple replaced) is stale: no client packet can reach its flow any
/// more, so its key may be taken over (SNAT reuses such ports; otherwise they would pile up until the
/// agent's garbage collector came by). Values are read in place. Inlined: as a subprogram called from
/// the SNAT search loop, the verifier explored over a million instructions.
#[inline(always)]
pub fn reply_taken(reply: &Tuple) -> bool {
    if reply.v6 {
        let Some(r) = CONNTRACK6.get_ptr(key6(reply)) else {
            return false;
        };
        // SAFETY: pointer from a successful lookup; CtValue6 is plain data (a racing update at worst
        // gives a mixed value, which only makes the answer "taken" or "stale" for one port).
        let r = unsafe { &*r };
        if r.kind != CT_REVERSE {
            return true;
        }
        let peer = !is_none(&r.peer_addr_be);
        let forward = CtKey6 {
            saddr_be: if peer { r.peer_addr_be } else { reply.daddr },
            daddr_be: r.nat_addr_be,
            sport_be: if peer { r.peer_port_be } else { reply.dport_be },
            dport_be: r.nat_port_be,
            proto: reply.proto,
            pad: [0; 3],
        };
        let Some(f) = CONNTRACK6.get_ptr(forward) else {
            return false;
        };
        // SAFETY: as above.
        let f = unsafe { &*f };
        let (peer_addr, peer_port) = if peer {
            (reply.daddr, reply.dport_be)
        } else {
            ([0; 4], 0)
        };
        f.kind == CT_FORWARD
            && f.nat_addr_be == reply.saddr
            && f.nat_port_be == reply.sport_be
            && f.peer_addr_be == peer_addr
            && f.peer_port_be == peer_port
    } else {
        let Some(r) = CONNTRACK.get_ptr(key4(reply)) else {
            return false;
        };
        // SAFETY: as above, for CtValue.
        let r = unsafe { &*r };
        if r.kind != CT_REVERSE {
            return true;
        }
        let peer = r.peer_addr_be != 0;
        let forward = CtKey {
            saddr_be: if peer { r.peer_addr_be } else { reply.daddr[3] },
            daddr_be: r.nat_addr_be,
            sport_be: if peer { r.peer_port_be } else { reply.dport_be },
            dport_be: r.nat_port_be,
            proto: reply.proto,
            pad: [0; 3],
        };
        let Some(f) = CONNTRACK.get_ptr(forward) else {
            return false;
        };
        // SAFETY: as above.
        let f = unsafe { &*f };
        let (peer_addr, peer_port) = if peer {
            (reply.daddr[3], reply.dport_be)
        } else {
            (0, 0)
        };
        f.kind == CT_FORWARD
            && f.nat_addr_be == reply.saddr[3]
            && f.nat_port_be == reply.sport_be
            && f.peer_addr_be == peer_addr
            && f.peer_port_be == peer_port
    }
}

/// An LRU insert only fails on allocation failure; callers go on (the next packet of the flow picks
/// the same backend from the same Maglev table).
#[inline(always)]
pub fn insert(t: &Tuple, e: &Entry) {
    // A new entry has seen no packet yet in its direction; the forward one records its first packet's
    // TCP flags (a flow picked up mid-stream may start with a FIN).
    let flags = flags_after(0, t.tcp_flags) & !CT_FLAG_SEEN;
    let seen_s = now_s();
    if t.v6 {
        let value = CtValue6 {
            nat_addr_be: e.nat_addr,
            nat_port_be: e.nat_port_be,
            kind: e.kind,
            flags,
            backend_id: e.backend_id,
            peer_addr_be: e.peer_addr,
            peer_port_be: e.peer_port_be,
            pad2: [0; 2],
            seen_s,
        };
        let _ = CONNTRACK6.insert(key6(t), value, 0);
    } else {
        let value = CtValue {
            nat_addr_be: e.nat_addr[3],
            nat_port_be: e.nat_port_be,
            kind: e.kind,
            flags,
            backend_id: e.backend_id,
            peer_addr_be: e.peer_addr[3],
            peer_port_be: e.peer_port_be,
            pad2: [0; 2],
            seen_s,
        };
        let _ = CONNTRACK.insert(key4(t), value, 0);
    }
}

/// True for the all-zero address, the "none" of `Entry::peer_addr`.
#[inline(always)]
pub fn is_none(addr: &Addr) -> bool {
    (addr[0] | addr[1] | addr[2] | addr[3]) == 0
}
