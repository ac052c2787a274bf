//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! setup, then `cargo fmt --check`, the release build of the agent (which builds the eBPF object),
//! clippy with warnings denied (userspace, then the eBPF crate on nightly), the unit tests of the default members, and the privileged
//! integration tests in `tests/` against the built agent. After the build every step runs even if
//! an earlier one failed; the summary names the failed ones and the exit status is non-zero.

use std::process::Command;

use anyhow::{Result, bail};

use xtask::{cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for the integration test binary, given after `--` (e.g. a test name filter:
    /// `cargo xtask test -- clusterip`).
    #[arg(last = true, value_name = "TEST_ARGS")]
    pub test_args: Vec<String>,
}

struct Outcome {
    step: &'static str,
    ok: bool,
}

pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    let agent_bin = cmd::agent_bin()?;
    let mut outcomes = Vec::new();

    let mut fmt = cmd::cargo()?;
    fmt.args(["fmt", "--all", "--", "--check"]);
    step(&mut outcomes, "fmt", &mut fmt);

    let mut build = cmd::cargo()?;
    build.args(["build", "--release", "-p", "weir-agent"]);
    if !step(&mut outcomes, "build agent", &mut build) {
        // Everything after this compiles the agent too, and the integration tests need it.
        return finish(&outcomes);
    }

    let mut clippy = cmd::cargo()?;
    // Every userspace crate, the privileged tests included; the eBPF crate gets its own pass below.
    clippy.args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "weir-ebpf",
        "--features",
        "xtask/lab",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step(&mut outcomes, "clippy", &mut clippy);

    let mut clippy_ebpf = cmd::nightly("cargo");
    clippy_ebpf
        .current_dir(cmd::workspace_root()?)
        .env("PATH", cmd::path_with_tools()?)
        .args([
            "clippy",
            "--release",
            "-p",
            "weir-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
    step(&mut outcomes, "clippy (eBPF)", &mut clippy_ebpf);

    let mut unit = cmd::cargo()?;
    unit.args(["test", "--release", "--features", "xtask/lab"]);
    step(&mut outcomes, "unit tests", &mut unit);

    let mut integration = cmd::cargo()?;
    integration
        .env("WEIR_AGENT_BIN", &agent_bin)
        .args([
            "test",
            "--release",
            "-p",
            "weir-tests",
            "--",
            "--test-threads=2",
        ])
        .args(&args.test_args);
    step(&mut outcomes, "integration tests", &mut integration);

    finish(&outcomes)
}

/// Runs one step with its output streamed; records and returns whether it passed.
fn step(outcomes: &mut Vec<Outcome>, name: &'static str, command: &mut Command) -> bool {
    cmd::announce(command);
    let ok = match cmd::run(command) {
        Ok(()) => true,
        Err(err) => {
            eprintln!("xtask: step `{name}` failed: {err:#}");
            false
        }
    };
    outcomes.push(Outcome { step: name, ok });
    ok
}

fn finish(outcomes: &[Outcome]) -> Result<()> {
    eprintln!("==> summary");
    for outcome in outcomes {
        eprintln!(
            "    {:<4}  {}",
            if outcome.ok { "ok" } else { "FAIL" },
            outcome.step
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|outcome| !outcome.ok)
        .map(|outcome| outcome.step)
        .collect();
    if !failed.is_empty() {
        bail!("failed step(s): {}", failed.join(", "));
    }
    Ok(())
}
