//! Per-CPU datapath counters: every verdict that is not a plain translation is counted by reason.
use crate::maps::STATS;

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a preallocated array, only this CPU writes it while we run.
        unsafe { *counter += 1 };
    }
}
