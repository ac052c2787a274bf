//! Source ports for SNAT: a flow from outside sent to a backend on another node leaves with this node's
//! address, and a port such that the backend's reply (backend → node:port) names exactly one flow.
use weir_common::{Addr, Backend, SNAT_PORT_MIN};

use crate::{ct, flow, packet::Flow};

/// Candidates tried before giving up (the flow is then dropped and counted, and the client retries).
const TRIES: u32 = 16;

/// A port whose reply key is free: the client's own port when it is in range and unused (so most flows
/// keep their port, as the kernel's masquerade does), else ports spread by the flow hash.
#[inline(always)]
pub fn allocate_port(node: &Addr, backend: &Backend, flow: &Flow) -> Option<u16> {
    let span = u32::from(u16::MAX - SNAT_PORT_MIN) + 1;
    let own = u16::from_be(flow.sport_be);
    let seed = flow::hash(flow);
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
            // 2654435761: Knuth's multiplicative hash step, so successive tries scatter.
            let offset = seed.wrapping_add(i.wrapping_mul(2_654_435_761)) % span;
            SNAT_PORT_MIN + offset as u16
        };
        reply.dport_be = port.to_be();
        if !ct::exists(&reply) {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}
