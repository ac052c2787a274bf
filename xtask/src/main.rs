//! Developer tasks for Weir, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! Each command lives in its own module: `setup` installs the prerequisites, `test` runs the whole
//! suite (lints, unit tests, privileged integration tests), `demo` runs the one-node lab, `fuzz` the
//! long packet fuzz run, and `build-ebpf` builds the eBPF object alone.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod build_ebpf;
mod cmd;
mod demo;
mod fuzz;
mod setup;
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
    Demo,
    /// Build the eBPF programs alone with the nightly toolchain (bpfel-unknown-none).
    BuildEbpf,
    /// Fuzz the TC programs with random and mutated frames through BPF_PROG_TEST_RUN (default 10
    /// million per program), checking the datapath's invariants; needs root.
    Fuzz(fuzz::Args),
    /// Run setup, build the agent, then benchmark Weir against kube-proxy's iptables and nftables
    /// modes; writes bench-results/REPORT.md; needs root.
    Bench(xtask::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(&args),
        Command::Demo => demo_command(),
        Command::BuildEbpf => build_ebpf::run(),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Bench(args) => bench_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo_command() -> anyhow::Result<()> {
    setup::run()?;
    cmd::build_agent()?;
    demo::run()
}

fn bench_command(args: &xtask::bench::Args) -> anyhow::Result<()> {
    if !args.render_only {
        setup::run()?;
        cmd::build_agent()?;
    }
    xtask::bench::command(args)
}
