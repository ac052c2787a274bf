//! `weir`: inspects a node's Weir datapath. Reads the maps the agent pinned under `--bpffs-dir` and names
//! what it finds with the agent's `GET /state` (on `--agent-addr`); without the agent it shows addresses.
//!
//! `weir service list`, `weir service get NS/NAME|IP:PORT[/PROTO]`, `weir conntrack list`, `weir stats`;
//! each prints a table, or JSON with `-o json`.
mod agent_state;
mod pinned;
mod table;
mod view;

use std::{
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use weir_agent::state::AgentState;

use crate::{
    pinned::Pinned,
    view::{Names, Selector},
};

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    version,
    about = "Inspect the Weir datapath on this node: services, conntrack, counters"
)]
struct Cli {
    /// Where the agent pinned its maps (the agent's --bpffs-dir).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/sys/fs/bpf/weir"
    )]
    bpffs_dir: PathBuf,

    /// The agent's metrics address, which serves GET /state (the agent's --metrics-addr).
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:10249"
    )]
    agent_addr: String,

    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns, for people.
    Table,
    /// One JSON document, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Frontends (ClusterIP:port/protocol) and their Maglev tables.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Connection-tracking entries.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Datapath packet counters (summed over CPUs) and how full each map is.
    Stats,
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// One row per programmed frontend.
    List,
    /// A Service's frontends with their backends and each backend's share of the Maglev slots.
    Get {
        /// NAMESPACE/NAME (needs the agent), or a frontend IP:PORT[/PROTO] (works from the maps alone).
        target: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConntrackCommand {
    /// Every entry: direction, the flow as on the wire, its translation and backend id.
    List {
        /// Show at most N entries (0: all).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        limit: usize,
    },
}

/// How long the agent gets to answer `/state` before we go on without names.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `weir ... | head` closing the pipe is not an error worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let pinned = Pinned::new(&cli.bpffs_dir);
    match &cli.command {
        Command::Service(ServiceCommand::List) => {
            // Maps first: a wrong --bpffs-dir fails before we wait on the agent.
            let services = pinned.services()?;
            let names = names(cli);
            let list = view::service_list(&services, &names);
            emit(cli.output, &list, || list.render())
        }
        Command::Service(ServiceCommand::Get { target }) => {
            let selector = Selector::parse(target)?;
            let services = pinned.services()?;
            let backends = pinned.backends()?;
            let maglev = pinned.maglev()?;
            let names = names(cli);
            let detail = view::service_get(
                &selector,
                target,
                &services,
                &backends,
                &names,
                |base, size| maglev.table(base, size),
            )?;
            emit(cli.output, &detail, || detail.render())
        }
        Command::Conntrack(ConntrackCommand::List { limit }) => {
            let dump = pinned.conntrack(*limit)?;
            let names = names(cli);
            let now = weir_agent::conntrack_gc::monotonic_now_s();
            let list = view::conntrack_list(&dump.entries, dump.total, &names, now);
            emit(cli.output, &list, || list.render())?;
            if let Some(note) = list.truncation_note() {
                eprintln!("weir: {note}");
            }
            Ok(())
        }
        Command::Stats => {
            let stats = view::Stats {
                counters: view::counters(&pinned.counters()?),
                maps: pinned.fill()?,
            };
            emit(cli.output, &stats, || stats.render())
        }
    }
}

/// The agent's names, or none with a warning on stderr: the maps alone are still worth showing.
fn names(cli: &Cli) -> Names {
    match agent_state::fetch(&cli.agent_addr, AGENT_TIMEOUT) {
        Ok(state) => {
            warn_on_other_pins(&state, cli);
            Names::new(Some(&state))
        }
        Err(e) => {
            eprintln!(
                "weir: warning: no names from the agent at {} ({e:#}); showing addresses only",
                cli.agent_addr
            );
            Names::new(None)
        }
    }
}

/// An agent pinning elsewhere names other maps than the ones we read.
fn warn_on_other_pins(state: &AgentState, cli: &Cli) {
    let ours = cli
        .bpffs_dir
        .canonicalize()
        .unwrap_or(cli.bpffs_dir.clone());
    let theirs = PathBuf::from(&state.bpffs_dir);
    let theirs = theirs.canonicalize().unwrap_or(theirs);
    if !state.bpffs_dir.is_empty() && ours != theirs {
        eprintln!(
            "weir: warning: the agent at {} pins its maps under {}, not {}: names may not match",
            cli.agent_addr,
            state.bpffs_dir,
            cli.bpffs_dir.display()
        );
    }
}

fn emit<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let text = match output {
        Output::Table => table(),
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
    };
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere_and_defaults_match_the_agent() {
        let cli = Cli::try_parse_from(["weir", "service", "list", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.bpffs_dir, PathBuf::from("/sys/fs/bpf/weir"));
        assert_eq!(cli.agent_addr, "127.0.0.1:10249");
        let cli = Cli::try_parse_from([
            "weir",
            "--bpffs-dir",
            "/x",
            "conntrack",
            "list",
            "--limit",
            "5",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Conntrack(ConntrackCommand::List { limit: 5 })
        ));
        assert_eq!(cli.bpffs_dir, PathBuf::from("/x"));
        assert!(Cli::try_parse_from(["weir", "service", "get"]).is_err());
        assert!(Cli::try_parse_from(["weir", "stats", "-o", "yaml"]).is_err());
    }

    #[test]
    fn a_missing_pin_dir_is_a_clear_error() {
        let cli = Cli::try_parse_from([
            "weir",
            "--bpffs-dir",
            "/nonexistent/weir",
            "--agent-addr",
            "127.0.0.1:1",
            "service",
            "list",
        ])
        .unwrap();
        let err = run(&cli).unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "bpffs dir /nonexistent/weir does not exist: is the agent running with --bpffs-dir \
             /nonexistent/weir?"
        );
        let dir = std::env::temp_dir();
        let cli =
            Cli::try_parse_from(["weir", "--bpffs-dir", dir.to_str().unwrap(), "stats"]).unwrap();
        let err = format!("{:#}", run(&cli).unwrap_err());
        assert!(err.contains("has no WEIR_STATS map"), "{err}");
    }
}
