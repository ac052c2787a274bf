//! Maglev table builds with the agent's own `maglev::build` and `table_size`, and what a table costs in
//! kernel memory (one `BPF_F_INNER_MAP | BPF_F_MMAPABLE` array of u32 backend ids per frontend).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use weir_agent::maglev;
use weir_common::{DEFAULT_BACKENDS_MAX, TableChunk};

use super::Progress;
use super::stats::Spread;

/// The classic Maglev table size (the paper's example, and the target's).
pub const PAPER_SIZE: u32 = 65_537;

#[derive(Clone, Debug)]
pub struct Plan {
    pub backends: Vec<usize>,
    pub reps: usize,
    /// Also build at the largest size the code produces (`table_size(--max-backends default)`).
    pub largest: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MaglevResults {
    pub slots_per_backend: u64,
    pub largest_size: u32,
    pub builds: Vec<Build>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Build {
    pub backends: usize,
    /// `default` (what the agent uses: `table_size(backends)`), `paper` (65,537) or `largest`.
    pub size_kind: String,
    pub slots: u32,
    pub build_ms: Option<Spread>,
    /// Kernel memory of one table of this size: its chunks of the Maglev arena (4 bytes a slot).
    pub table_bytes: u64,
    pub table_bytes_measured: bool,
    /// Every backend owns ⌊M/N⌋ or ⌈M/N⌉ slots.
    pub balanced: bool,
}

fn members(n: usize) -> Vec<(Vec<u8>, u32)> {
    (0..n)
        .map(|i| {
            (
                format!(
                    "10.{}.{}.{}:8080/TCP",
                    100 + i / 65_536,
                    (i / 256) % 256,
                    i % 256
                )
                .into_bytes(),
                i as u32 + 1,
            )
        })
        .collect()
}

/// Arena bytes a table of `slots` slots occupies: whole chunks of 4-byte slots.
fn table_bytes(slots: u32) -> u64 {
    u64::from(weir_agent::arena::chunks_for(slots)) * std::mem::size_of::<TableChunk>() as u64
}

pub fn run(plan: &Plan, progress: &Progress) -> anyhow::Result<MaglevResults> {
    let largest = maglev::table_size(DEFAULT_BACKENDS_MAX as usize);
    let mut results = MaglevResults {
        slots_per_backend: maglev::SLOTS_PER_BACKEND,
        largest_size: largest,
        builds: Vec::new(),
    };
    for &n in &plan.backends {
        let m = members(n);
        let mut sizes = vec![("default", maglev::table_size(n)), ("paper", PAPER_SIZE)];
        if plan.largest {
            sizes.push(("largest", largest));
        }
        for (kind, slots) in sizes {
            // The largest tables take seconds each: fewer repetitions.
            let reps = if kind == "largest" {
                plan.reps.min(2)
            } else {
                plan.reps
            };
            let mut times = Vec::new();
            let mut balanced = true;
            for _ in 0..reps.max(1) {
                let t = Instant::now();
                let table = maglev::build(&m, slots);
                times.push(t.elapsed().as_secs_f64() * 1e3);
                let mut counts = vec![0u32; n + 1];
                for id in &table {
                    counts[*id as usize] += 1;
                }
                let (lo, hi) = (slots / n as u32, slots.div_ceil(n as u32));
                balanced &= table.len() == slots as usize
                    && counts[1..].iter().all(|c| *c == lo || *c == hi);
            }
            // Computed from the arena's layout (the arena is one preallocated map, so there is no
            // per-table map to measure).
            let (table_bytes, measured) = (table_bytes(slots), false);
            let build = Build {
                backends: n,
                size_kind: kind.to_owned(),
                slots,
                build_ms: Spread::of(&times),
                table_bytes,
                table_bytes_measured: measured,
                balanced,
            };
            progress.note(&format!(
                "Maglev {n} backends, {kind} size {slots}: {} ms, {:.1} KB",
                build.build_ms.map_or("-".into(), |s| s.fmt(2)),
                table_bytes as f64 / 1024.0
            ));
            results.builds.push(build);
        }
    }
    Ok(results)
}
