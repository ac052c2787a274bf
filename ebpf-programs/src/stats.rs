//! Per-CPU datapath counters: every verdict that is not a plain translation is counted by reason.
use weir_common::{ServiceCounters, ServiceKey};

use crate::maps::{SERVICE_STATS, STATS};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a preallocated array, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}

/// Counts a packet of a frontend's flow (either direction). The first packet on a CPU creates the entry;
/// if the map is full the packet is simply not counted.
#[inline(always)]
pub fn count_service(frontend: &ServiceKey, bytes: u32) {
    match SERVICE_STATS.get_ptr_mut(frontend) {
        Some(c) => {
            // SAFETY: per-CPU value of a successful lookup, only this CPU writes it while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += u64::from(bytes);
            }
        }
        None => {
            let first = ServiceCounters {
                packets: 1,
                bytes: u64::from(bytes),
            };
            let _ = SERVICE_STATS.insert(frontend, first, 0);
        }
    }
}
