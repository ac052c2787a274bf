//! Allocation of the Maglev slot arena (`WEIR_MAGLEV`): every frontend's table is a run of consecutive
//! chunks. The agent is the only writer, so the allocator lives here, in memory, and is rebuilt from the
//! frontends' `table_base`/`table_size` when an agent adopts pinned maps.
//!
//! A released run is not reused at once: a packet that read the frontend's old `table_base` just before
//! the switch may still be reading its slots, so released runs wait out [`QUARANTINE`] (far longer than
//! any program runs) before new tables may be written over them.
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use weir_common::TABLE_CHUNK_SLOTS;

/// How long a released run stays unused.
pub const QUARANTINE: Duration = Duration::from_millis(20);

/// Chunks a table of `slots` slots occupies.
pub fn chunks_for(slots: u32) -> u32 {
    slots.div_ceil(TABLE_CHUNK_SLOTS)
}

#[derive(Debug)]
pub struct SlotArena {
    capacity: u32,
    /// Free runs: first chunk → length; adjacent runs are always merged.
    free: BTreeMap<u32, u32>,
    quarantine: VecDeque<(Instant, u32, u32)>,
    used: u32,
}

impl SlotArena {
    /// An empty arena of `capacity` chunks.
    pub fn new(capacity: u32) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Self {
            capacity,
            free,
            quarantine: VecDeque::new(),
            used: 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Chunks held by tables (including released ones still in quarantine).
    pub fn used(&self) -> u32 {
        self.used
    }

    /// Marks `[start, start + len)` as used (a table found in pinned maps). False, and nothing
    /// reserved, when the run is not entirely free (outside the arena or overlapping another table).
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || end > self.capacity {
            return false;
        }
        let Some((&run_start, &run_len)) = self.free.range(..=start).next_back() else {
            return false;
        };
        let run_end = run_start + run_len;
        if end > run_end {
            return false;
        }
        self.free.remove(&run_start);
        if run_start < start {
            self.free.insert(run_start, start - run_start);
        }
        if end < run_end {
            self.free.insert(end, run_end - end);
        }
        self.used += len;
        true
    }

    /// The first chunk of a free run of `len` chunks (first fit), or `None` when no run is long
    /// enough even after waiting out the quarantine.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return None;
        }
        self.release_expired(Instant::now());
        if let Some(start) = self.first_fit(len) {
            return Some(start);
        }
        // Only quarantined runs could make room: wait until the newest is safe to reuse (at most
        // QUARANTINE), rather than refusing a table the arena has room for.
        let &(newest, _, _) = self.quarantine.back()?;
        let safe_at = newest + QUARANTINE;
        let now = Instant::now();
        if safe_at > now {
            std::thread::sleep(safe_at - now);
        }
        self.release_expired(safe_at.max(Instant::now()));
        self.first_fit(len)
    }

    /// Returns a run whose table the datapath may still be reading; reusable after the quarantine.
    pub fn release(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.quarantine.push_back((Instant::now(), start, len));
        }
    }

    /// Returns a run no packet can have seen (its table was never made reachable).
    pub fn release_now(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.used = self.used.saturating_sub(len);
            self.insert_free(start, len);
        }
    }

    fn first_fit(&mut self, len: u32) -> Option<u32> {
        let (&start, &run) = self.free.iter().find(|(_, run)| **run >= len)?;
        self.free.remove(&start);
        if run > len {
            self.free.insert(start + len, run - len);
        }
        self.used += len;
        Some(start)
    }

    fn release_expired(&mut self, now: Instant) {
        while let Some(&(at, start, len)) = self.quarantine.front() {
            if now.duration_since(at) < QUARANTINE {
                break;
            }
            self.quarantine.pop_front();
            self.release_now(start, len);
        }
    }

    fn insert_free(&mut self, mut start: u32, mut len: u32) {
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back()
            && prev + prev_len == start
        {
            self.free.remove(&prev);
            start = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_first_fit_and_merges_released_runs() {
        let mut a = SlotArena::new(10);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        assert_eq!(a.alloc(4), None, "only 2 chunks left");
        assert_eq!(a.alloc(2), Some(8));
        assert_eq!(a.used(), 10);
        a.release_now(0, 4);
        a.release_now(4, 4);
        assert_eq!(a.alloc(8), Some(0), "neighbouring runs merged");
        a.release_now(8, 2);
        a.release_now(0, 8);
        assert_eq!(a.used(), 0);
        assert_eq!(a.alloc(10), Some(0), "whole arena one run again");
    }

    #[test]
    fn released_runs_are_quarantined_before_reuse() {
        let mut a = SlotArena::new(8);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        // Taken before the release: the quarantine runs from the release's own (later) clock read,
        // so the wait is at least QUARANTINE measured from here.
        let before_release = Instant::now();
        a.release(0, 4);
        // Nothing else is free: the allocator waits the quarantine out instead of failing.
        assert_eq!(a.alloc(4), Some(0));
        assert!(before_release.elapsed() >= QUARANTINE);
        // With room elsewhere, a quarantined run is not handed out.
        let mut b = SlotArena::new(8);
        assert_eq!(b.alloc(4), Some(0));
        b.release(0, 4);
        assert_eq!(b.alloc(4), Some(4));
    }

    #[test]
    fn reserve_takes_exactly_free_runs() {
        let mut a = SlotArena::new(16);
        assert!(a.reserve(4, 4));
        assert!(!a.reserve(6, 4), "overlaps");
        assert!(!a.reserve(14, 4), "past the end");
        assert!(!a.reserve(u32::MAX, 2), "overflow");
        assert!(a.reserve(8, 8));
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(1), None);
        assert_eq!(a.used(), 16);
    }

    #[test]
    fn chunk_counts_round_up() {
        assert_eq!(chunks_for(0), 0);
        assert_eq!(chunks_for(1), 1);
        assert_eq!(chunks_for(TABLE_CHUNK_SLOTS), 1);
        assert_eq!(chunks_for(16_001), 63);
    }
}
