//! `cargo xtask fuzz`: the long packet fuzz run. Random and mutated frames through `weir_pod_ingress` and
//! `weir_ext_ingress` with BPF_PROG_TEST_RUN (the agent's own object and maps, in a private network
//! namespace), every run checked against the invariants of `weir_tests::packet::fuzz`. Prints the seed,
//! frames/s, counts per verdict and outcome, and every kept violation with its frames in hex; fails
//! when any invariant broke. The short run is the `packet_fuzz` integration test.

use anyhow::{Result, bail};
use weir_tests::packet::fuzz::{self, seed_from_env};
use weir_tests::packet::rig::{Prog, with_rig};

use crate::setup;

#[derive(clap::Args)]
pub struct Args {
    /// Frames per program.
    #[arg(long, default_value_t = 10_000_000)]
    pub frames: u64,
    /// RNG seed (default: `WEIR_FUZZ_SEED`, else from the clock); printed so a run can be replayed.
    #[arg(long)]
    pub seed: Option<u64>,
}

pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    let seed = args.seed.unwrap_or_else(seed_from_env);
    eprintln!(
        "xtask fuzz: seed {seed} (replay: cargo xtask fuzz --seed {seed} --frames {}), {} frames per program",
        args.frames, args.frames
    );
    let reports = with_rig(|rig| {
        Prog::ALL
            .iter()
            .map(|&prog| {
                let report = fuzz::fuzz(rig, prog, args.frames, seed, |r| {
                    eprintln!(
                        "  {}: {} frames, {:.0} frames/s, {} violations",
                        r.program,
                        r.frames + r.refused,
                        r.frames_per_second(),
                        r.violation_count
                    );
                });
                eprint!("{}", report.render());
                report
            })
            .collect::<Vec<_>>()
    });
    let broken: u64 = reports.iter().map(|r| r.violation_count).sum();
    if broken > 0 {
        bail!("{broken} invariant violations (seed {seed})");
    }
    eprintln!("xtask fuzz: no invariant broken (seed {seed})");
    Ok(())
}
