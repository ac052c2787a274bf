//! ClientIP session affinity (kube-proxy's `recent` match): a client's new connections to a frontend go to
//! the backend of its previous one while they come less than `timeoutSeconds` apart.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use weir_common::{Addr, AffinityKey, AffinityValue, MemberKey, ServiceKey, ServiceValue};

use crate::maps::{AFFINITY, MEMBERS};

/// The backend for a new flow of `client`: the remembered one when fresh and still in the frontend's
/// table, else `hashed` (Maglev's pick). Either way the choice is remembered with the current time.
/// Out of line: its map key and value would otherwise sit in the new-flow path's frame.
#[inline(never)]
pub fn choose(frontend: &ServiceKey, svc: &ServiceValue, client: &Addr, hashed: u32) -> u32 {
    let key = AffinityKey {
        frontend: *frontend,
        client_addr_be: *client,
    };
    // SAFETY: plain helper call reading the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    let mut chosen = hashed;
    if let Some(prev) = AFFINITY.get_ptr(key) {
        // SAFETY: pointer from a successful lookup; AffinityValue is plain data.
        let prev = unsafe { *prev };
        let fresh = now.saturating_sub(prev.last_ns) <= timeout_ns;
        let member = MemberKey {
            table_id: svc.table_base,
            backend_id: prev.backend_id,
        };
        // An endpoint that left the Service loses its clients, as with kube-proxy.
        if fresh && MEMBERS.get_ptr(member).is_some() {
            chosen = prev.backend_id;
        }
    }
    let value = AffinityValue {
        backend_id: chosen,
        pad: 0,
        last_ns: now,
    };
    // An LRU insert only fails on allocation failure; the flow is still served, just without memory.
    let _ = AFFINITY.insert(key, value, 0);
    chosen
}
