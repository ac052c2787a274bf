//! The commands of `cargo xtask` that link the agent: `demo`, `fuzz` and `bench`. Built with the `lab`
//! feature by the plain `xtask` binary once the toolchain is installed (see xtask's Cargo.toml).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xtask::{bench, cmd, demo, fuzz, setup};

#[derive(Parser)]
#[command(
    name = "xtask-lab",
    bin_name = "cargo xtask",
    about = "Weir developer tasks that run the agent",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run setup, build the agent and run the one-node network-namespace demo; needs root.
    Demo,
    /// Fuzz the TC programs with random and mutated frames through BPF_PROG_TEST_RUN (default 10
    /// million per program), checking the datapath's invariants; needs root.
    Fuzz(fuzz::Args),
    /// Run setup, build the agent, then benchmark Weir against kube-proxy's iptables and nftables
    /// modes; writes bench-results/REPORT.md; needs root.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo => demo_command(),
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

fn bench_command(args: &bench::Args) -> anyhow::Result<()> {
    if !args.render_only {
        setup::run()?;
        cmd::build_agent()?;
    }
    bench::command(args)
}
