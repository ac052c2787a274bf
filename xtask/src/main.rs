//! Developer tasks for Weir, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Each command lives in its own module: `setup` installs the prerequisites, `test` runs the whole
//! suite (lints, unit tests, privileged integration tests), `build-ebpf` builds the eBPF object alone.
//! `demo` (the one-node lab), `fuzz` (the long packet fuzz run) and `bench` link the agent, so this
//! binary only makes sure the toolchain is there and hands them to `xtask-lab` (see Cargo.toml).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xtask::{cmd, setup};

mod build_ebpf;
mod test;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Weir developer tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (rust-src for nightly, bpf-linker, Debian packages); needs root.
    Setup,
    /// Run setup, build the agent, then fmt, clippy, unit tests and the privileged integration tests.
    Test(test::Args),
    /// Run setup, build the agent and run the one-node network-namespace demo; needs root.
    #[command(disable_help_flag = true)]
    Demo(Passthrough),
    /// Build the eBPF programs alone with the nightly toolchain (bpfel-unknown-none).
    BuildEbpf,
    /// Fuzz the TC programs with random and mutated frames through BPF_PROG_TEST_RUN (default 10
    /// million per program), checking the datapath's invariants; needs root. `--help` for options.
    #[command(disable_help_flag = true)]
    Fuzz(Passthrough),
    /// Run setup, build the agent, then benchmark Weir against kube-proxy's iptables and nftables
    /// modes; writes bench-results/REPORT.md; needs root. `--help` for options.
    #[command(disable_help_flag = true)]
    Bench(Passthrough),
}

/// Arguments of a command `xtask-lab` parses (its `--help` included).
#[derive(clap::Args)]
struct Passthrough {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(&args),
        Command::Demo(args) => lab("demo", &args),
        Command::BuildEbpf => build_ebpf::run(),
        Command::Fuzz(args) => lab("fuzz", &args),
        Command::Bench(args) => lab("bench", &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the toolchain the agent's build needs, then runs `command` in `xtask-lab` (built here, in
/// release mode like this binary), which does the rest of the setup itself.
fn lab(command: &str, args: &Passthrough) -> anyhow::Result<()> {
    setup::toolchain()?;
    let mut lab = cmd::cargo()?;
    lab.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "xtask",
        "--features",
        "lab",
        "--bin",
        "xtask-lab",
        "--",
        command,
    ])
    .args(&args.args);
    let status = lab
        .status()
        .with_context(|| format!("running {}", cmd::display(&lab)))?;
    anyhow::ensure!(status.success(), "cargo xtask {command} failed ({status})");
    Ok(())
}
