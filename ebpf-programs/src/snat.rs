//! Source ports for SNAT: a flow from outside sent to a backend on another node leaves with this node's
//! address, and a port such that the backend's reply (backend → node:port) names exactly one flow.
use weir_common::{Addr, Backend, SNAT_PORT_MIN};

use crate::{ct, flow, packet::Flow};

/// Candidates tried before giving up (the flow is then dropped and counted, and the client retries).
/// With double hashing each try is an independent draw, so at a port-space occupancy of one half 16
/// tries all fail about once in 65,536 new flows.
const TRIES: u32 = 16;

/// A port whose reply key is free: the client's own port when it is in range and unused (so most flows
/// keep their port, as the kernel's masquerade does, and a flow whose forward entry was evicted gets
/// its old port back), else ports drawn by double hashing. A reply key whose flow is gone (see
/// [`ct::reply_taken`]) counts as free.
#[inline(always)]
pub fn allocate_port(node: &Addr, backend: &Backend, flow: &Flow) -> Option<u16> {
    const SPAN: u32 = (u16::MAX - SNAT_PORT_MIN) as u32 + 1;
    const _: () = assert!(
        SPAN.is_power_of_two(),
        "an odd stride must visit every port"
    );
    let own = u16::from_be(flow.sport_be);
    // Start and stride from an independent hash: with one stride for all flows (linear probing),
    // flows starting near each other walk the same ports, and runs of taken ports grow until 16 tries
    // are not enough long before the ports run out.
    let h = flow::hash64_other(flow);
    let start = h as u32;
    let stride = (h >> 32) as u32 | 1;
    let mut reply = ct::Tuple {
        saddr: backend.addr_be,
        daddr: *node,
        sport_be: backend.port_be,
        dport_be: 0,
        proto: flow.proto,
        v6: flow.v6,
        ihl: 0,
        l4_off: 0,
        tcp_flags: 0,
    };
    let mut i = 0;
    while i < TRIES {
        let port = if i == 0 && own >= SNAT_PORT_MIN {
            own
        } else {
            let offset = start.wrapping_add(i.wrapping_mul(stride)) % SPAN;
            SNAT_PORT_MIN + offset as u16
        };
        reply.dport_be = port.to_be();
        if !ct::reply_taken(&reply) {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}
