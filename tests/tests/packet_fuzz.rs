//! The short packet fuzz run (`cargo xtask fuzz` runs the long one): random and mutated frames through
//! `weir_pod_ingress` and `weir_ext_ingress`, every run checked against the invariants in
//! `weir_tests::packet::fuzz`, IPv4 and IPv6 frames alike. `WEIR_FUZZ_SEED` replays a run (the seed
//! is printed); `WEIR_FUZZ_FRAMES` changes the count per program (default 100,000); `WEIR_FUZZ_STRICT=1`
//! counts the known datapath bugs (`KNOWN_BUG_*` outcomes) as violations.

use weir_tests::packet::fuzz::{self, ProgReport, seed_from_env};
use weir_tests::packet::rig::{Prog, with_rig};

fn frames() -> u64 {
    match std::env::var("WEIR_FUZZ_FRAMES") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("WEIR_FUZZ_FRAMES={s:?} is not a count: {e}")),
        Err(_) => 100_000,
    }
}

/// The generator must reach every path the invariants are about, in both families, or a green run
/// proves little.
fn assert_coverage(r: &ProgReport) {
    let has = |k: &str| r.outcomes.get(k).copied().unwrap_or(0) > 0;
    let mut classes = vec![
        "not_ours_unchanged",
        "forward",
        "reverse",
        "hairpin",
        "reject_rst",
        "reject_icmp",
        "icmp_translated",
        "dropped",
    ];
    if r.program == Prog::Ext.name() {
        classes.push("snat");
    }
    for class in classes {
        for class in [class.to_owned(), format!("{class}_v6")] {
            assert!(
                has(&class),
                "{}: no run reached {class}\n{}",
                r.program,
                r.render()
            );
        }
    }
}

#[test]
fn fuzz_both_programs_short_run() {
    let seed = seed_from_env();
    let frames = frames();
    eprintln!(
        "packet fuzz: seed {seed:#x} (WEIR_FUZZ_SEED={seed:#x} replays), {frames} frames per program"
    );
    let reports = with_rig(|rig| {
        Prog::ALL
            .iter()
            .map(|&prog| fuzz::fuzz(rig, prog, frames, seed, |_| {}))
            .collect::<Vec<_>>()
    });
    for r in &reports {
        eprint!("{}", r.render());
    }
    for r in &reports {
        assert_eq!(
            r.violation_count,
            0,
            "seed {seed:#x}: invariants broken\n{}",
            r.render()
        );
        assert_eq!(
            r.frames + r.refused,
            frames,
            "every frame was run or refused"
        );
        assert_coverage(r);
    }
}

/// The judge is not vacuous: told that nothing is a frontend, it sees the translations as violations
/// (rewrites of traffic that is not ours).
#[test]
fn fuzz_judge_catches_a_rewrite_of_traffic_that_is_not_ours() {
    let seed = seed_from_env();
    let report = with_rig(|rig| {
        rig.blind = true;
        fuzz::fuzz(rig, Prog::Pod, 20_000, seed, |_| {})
    });
    assert!(
        report.violation_count > 0,
        "with no frontends known to the judge, translations must be violations\n{}",
        report.render()
    );
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.what.starts_with("not ours")),
        "{}",
        report.render()
    );
}
