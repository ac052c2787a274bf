//! `cargo xtask bench [--quick]`: Weir against kube-proxy's iptables and nftables modes, side by side.
//!
//! 1. Maglev table builds (`maglev.rs`).
//! 2. Per-packet cost of the TC program with BPF_PROG_TEST_RUN against an empty program, at N services
//!    (`packet.rs`).
//! 3. End to end through a ClusterIP in the network-namespace labs, Weir vs kube-proxy's rules loaded with
//!    the real tools, and the control plane: programming from nothing, EndpointSlice changes, syncs,
//!    memory (`e2e.rs`, `rules.rs`, `net.rs`).
//! 4. L7: requests through a 90/10 weighted HTTPRoute, Weir's proxy against nginx doing the same split
//!    (`l7.rs`).
//! 5. NodePort forwarding rate: Weir's XDP fast path, an empty XDP_TX program and kube-proxy's rule sets
//!    forwarding live frames from BPF_PROG_TEST_RUN to a backend on another node (`forward.rs`).
//!
//! Results go to `REPORT.md`, `results.json` and SVG charts (`report.rs`, `svg.rs`). An experiment that
//! fails is reported as an error and the others still run. `--quick` measures N = 1 and 1,000 with fewer
//! repetitions; the hidden `--smoke` runs every code path once at N = 1 (the smoke test's mode).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

mod e2e;
mod forward;
mod l7;
mod maglev;
mod net;
mod packet;
mod report;
mod rules;
mod scenario;
mod stats;
mod svg;
mod sys;

pub use report::{Results, Target};

/// `cargo xtask bench` flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Args {
    /// A subset (N = 1 and 1,000, fewer repetitions) that finishes in under 3 minutes.
    #[arg(long)]
    pub quick: bool,
    /// Every experiment's code path once at N = 1 (what the smoke test runs).
    #[arg(long, hide = true, conflicts_with = "quick")]
    pub smoke: bool,
    /// Where to write REPORT.md, results.json and the charts [default: <workspace>/bench-results].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Measure nothing: re-render REPORT.md and the charts from the results.json in the output
    /// directory (after a change to the report's code).
    #[arg(long, hide = true)]
    pub render_only: bool,
    /// Run one experiment only (maglev, packet, e2e, l7, forward); with an existing results.json in
    /// the output directory, only that experiment's section is replaced.
    #[arg(long, hide = true, value_name = "EXPERIMENT")]
    pub only: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Full,
    Quick,
    Smoke,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Full => "full",
            Profile::Quick => "quick",
            Profile::Smoke => "smoke",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub profile: Profile,
    pub out_dir: PathBuf,
    /// Run only this experiment (`maglev`, `packet`, `e2e`, `l7`, `forward`); `None`: all.
    pub only: Option<String>,
}

impl Args {
    pub fn options(&self) -> Options {
        let profile = if self.smoke {
            Profile::Smoke
        } else if self.quick {
            Profile::Quick
        } else {
            Profile::Full
        };
        let out_dir = self.out.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join("bench-results")
        });
        Options {
            profile,
            out_dir,
            only: self.only.clone(),
        }
    }
}

/// One line per step, with the time since the bench started.
pub struct Progress {
    started: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn step(&self, msg: &str) {
        eprintln!("[{:>7.1}s] ==> {msg}", self.started.elapsed().as_secs_f64());
    }

    pub fn note(&self, msg: &str) {
        eprintln!("[{:>7.1}s]     {msg}", self.started.elapsed().as_secs_f64());
    }
}

/// A private bpffs for an in-process datapath, unmounted (with everything pinned in it) on drop.
pub struct Bpffs(weir_tests::bpffs::Bpffs);

impl Bpffs {
    pub fn mount(tag: &str) -> anyhow::Result<Self> {
        let dir = Path::new("/run/weir-bench")
            .join(format!("{}-{tag}", std::process::id()))
            .join("bpf");
        weir_tests::bpffs::Bpffs::mount(dir).map(Self)
    }

    pub fn dir(&self) -> &Path {
        self.0.dir()
    }
}

/// A scratch directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weir-bench-{}-{tag}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Plans {
    maglev: maglev::Plan,
    packet: packet::Plan,
    e2e: e2e::Plan,
    l7: l7::Plan,
    forward: forward::Plan,
}

fn plans(profile: Profile) -> Plans {
    let secs = Duration::from_secs;
    match profile {
        Profile::Full => Plans {
            maglev: maglev::Plan {
                backends: vec![10, 100, 1000],
                reps: 5,
                largest: true,
            },
            packet: packet::Plan {
                ns: vec![1, 1_000, 10_000, 100_000],
                endpoints: 1,
                reps: 5,
                repeat: 200_000,
                shots: 3_000,
                change_at: Some(10_000),
                changes: 200,
                program_cap: secs(2400),
            },
            e2e: e2e::Plan {
                ns: vec![1, 1_000, 10_000],
                endpoints: 10,
                reps: 9,
                conn_time: secs(2),
                requests: 3_000,
                start_reps: 1,
                change_at: Some(10_000),
                changes: 40,
                sync_reps: 3,
                ipt_cap: secs(180),
                nft_cap: secs(300),
                ipt_nft_cap: secs(120),
                nft_resync_max: 1_000,
            },
            l7: l7::Plan {
                reps: 5,
                round: secs(3),
                connections: 16,
                fresh: true,
            },
            forward: forward::Plan {
                ns: vec![1, 1_000, 10_000],
                reps: 5,
                chunk: 65_536,
                batch: 64,
                round: secs(1),
                warmup: true,
                load_cap: secs(300),
            },
        },
        Profile::Quick => Plans {
            maglev: maglev::Plan {
                backends: vec![10, 100, 1000],
                reps: 3,
                largest: false,
            },
            packet: packet::Plan {
                ns: vec![1, 1_000],
                endpoints: 1,
                reps: 3,
                repeat: 50_000,
                shots: 1_000,
                change_at: Some(1_000),
                changes: 50,
                program_cap: secs(300),
            },
            e2e: e2e::Plan {
                ns: vec![1, 1_000],
                endpoints: 10,
                reps: 2,
                conn_time: secs(1),
                requests: 1_000,
                start_reps: 1,
                change_at: Some(1_000),
                changes: 10,
                sync_reps: 2,
                ipt_cap: secs(60),
                nft_cap: secs(60),
                ipt_nft_cap: secs(30),
                nft_resync_max: 1_000,
            },
            l7: l7::Plan {
                reps: 3,
                round: secs(1),
                connections: 16,
                fresh: true,
            },
            forward: forward::Plan {
                ns: vec![1, 1_000],
                reps: 3,
                chunk: 65_536,
                batch: 64,
                round: Duration::from_millis(500),
                warmup: true,
                load_cap: secs(60),
            },
        },
        Profile::Smoke => Plans {
            maglev: maglev::Plan {
                backends: vec![10],
                reps: 1,
                largest: false,
            },
            packet: packet::Plan {
                ns: vec![1],
                endpoints: 1,
                reps: 2,
                repeat: 10_000,
                shots: 200,
                change_at: Some(1),
                changes: 5,
                program_cap: secs(60),
            },
            e2e: e2e::Plan {
                ns: vec![1],
                endpoints: 2,
                reps: 1,
                conn_time: Duration::from_millis(300),
                requests: 200,
                start_reps: 1,
                change_at: Some(1),
                changes: 3,
                sync_reps: 1,
                ipt_cap: secs(30),
                nft_cap: secs(30),
                ipt_nft_cap: secs(30),
                nft_resync_max: 1_000,
            },
            l7: l7::Plan {
                reps: 1,
                round: Duration::from_millis(300),
                connections: 4,
                fresh: true,
            },
            // One call of a few thousand frames per mode: the code path, not a figure.
            forward: forward::Plan {
                ns: vec![1],
                reps: 1,
                chunk: 4_096,
                batch: 64,
                round: Duration::ZERO,
                warmup: false,
                load_cap: secs(30),
            },
        },
    }
}

const LEFT_OUT: [&str; 5] = [
    "NodePort end to end with connections (the forwarding experiment counts frames a node forwards, \
     every one a new flow; externalIPs and LoadBalancer IPs take the same XDP path and are not measured \
     apart).",
    "Socket-level load balancing for host-network clients (cgroup connect4): not measured; every client \
     here is a pod.",
    "kube-proxy's IPVS mode: IPVS is not built into this kernel (`CONFIG_IP_VS` is not set).",
    "End to end at 100k services: at 10 endpoints per service Weir's Maglev tables alone would take \
     about 6.5 GB of kernel memory (16,128 slots × 4 bytes each, by design: M ≥ 1000·N keeps a backend \
     change from moving more than 1 % of the other slots); kube-proxy's nftables rules already take \
     over a minute to load at 10k, most of it with a CPU held in the kernel. The per-packet experiment \
     covers 100k services (one endpoint each) instead.",
    "Multi-core throughput: the client is one thread on a shared 2-vCPU VM; the figures are latency-bound \
     rates, comparable side by side but not capacity limits.",
];

const NOTES: [&str; 5] = [
    "iptables mode is measured with iptables-legacy (x_tables); iptables-nft is timed for loads only: \
     its `--noflush` restore of an existing 10k-service rule set did not finish in 10 minutes when tried \
     by hand on this machine.",
    "The four probe services the client dials have distinct endpoint addresses, as different Services' \
     pods do. With one set of endpoints shared by all four (tried first), Weir produced 1 s connect \
     timeouts at N = 1,000: its reverse conntrack entry is keyed by (backend address:port, client \
     address:port) without the frontend, so connections from one client port to two Services that pick \
     the same backend overwrite each other's reverse entry; entries then lived until the LRU evicted \
     them (the agent's conntrack collector, added later, expires them by kube-proxy's timeouts), so a \
     client that later reused the source port got its SYN-ACK translated to the other Service's ClusterIP. netfilter avoids this by tracking TCP state and remapping the source \
     port when reply tuples clash.",
    "Maglev tables live in one preallocated, mmapable array (the slot arena, `--maglev-slots`), written \
     through a mapping of just the table's pages and switched in by one update of the frontend's entry. \
     Earlier runs kept each table in its own inner map of a hash-of-maps, and the kernel makes every \
     userspace insert or delete in a map-in-map wait for an RCU grace period (8–20 ms here): 10k \
     services took 169 s to program and a change at least two grace periods. The arena removed both.",
    "Request p99s on this shared VM move from round to round in every mode alike (see the min–max \
     spreads; on one machine they came in two levels, about 6 µs or about 22 µs): a p99 compared \
     between N values measured minutes apart compares the background load as much as the proxy. The Weir/baseline ratios, \
     paired within the same rounds, are the better guide, and the per-packet figures show Weir's \
     conntrack hit flat from 1 to 100k services.",
    "Single-shot times are whole nanoseconds from a clock that advanced in 10 ns steps here, so their \
     medians are multiples of 10 ns; the repeat method averages over many runs and is finer.",
];

/// `cargo xtask bench` after setup and the agent build: measures, or only re-renders.
pub fn command(args: &Args) -> anyhow::Result<()> {
    let opts = args.options();
    if args.render_only {
        render(&opts.out_dir).map(drop)
    } else {
        run(&opts).map(drop)
    }
}

/// Re-renders the report in `out_dir` from its `results.json` (notes, what was left out and the targets
/// are those of this code).
pub fn render(out_dir: &Path) -> anyhow::Result<Results> {
    let path = out_dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut results: Results =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    results.notes.retain(|n| kept_note(n));
    results.notes.extend(NOTES.iter().map(|n| (*n).to_owned()));
    results.left_out = LEFT_OUT.iter().map(|s| (*s).to_owned()).collect();
    if let Some(e) = results.end_to_end.as_mut() {
        e.iptables_backend = e2e::iptables_backend();
    }
    results.targets = report::targets(&results);
    report::write(out_dir, &results)?;
    Ok(results)
}

/// With `--only`, the one experiment measured replaces its section of the `results.json` already in
/// `out_dir` (the machine, profile and other sections stay those of the run that made it, and a note
/// says what was measured again when); without one there, `fresh` alone.
fn merge_into_existing(out_dir: &Path, only: &str, fresh: Results) -> Results {
    let path = out_dir.join("results.json");
    let Some(mut old) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Results>(&t).ok())
    else {
        return fresh;
    };
    let prefix = match only {
        "maglev" => "maglev",
        "packet" => "per-packet",
        "e2e" => "end to end",
        "l7" => "L7",
        "forward" => "forwarding",
        _ => return fresh,
    };
    match only {
        "maglev" => old.maglev = fresh.maglev,
        "packet" => old.per_packet = fresh.per_packet,
        "e2e" => old.end_to_end = fresh.end_to_end,
        "l7" => old.l7 = fresh.l7,
        _ => old.forward = fresh.forward,
    }
    let related = |e: &String| {
        e.starts_with(prefix)
            || (only == "e2e" && (e.starts_with("control plane") || e.contains(" sync: ")))
    };
    old.errors.retain(|e| !related(e));
    old.errors.extend(fresh.errors.into_iter().filter(related));
    old.notes.retain(|n| kept_note(n));
    old.notes.push(format!(
        "`--only {only}` ({} profile) measured again {} at {} and merged into this report; kernel {}, \
         {} CPUs",
        fresh.profile,
        fresh.machine.date_utc,
        fresh.machine.commit,
        fresh.machine.kernel,
        fresh.machine.nproc
    ));
    old.notes.extend(NOTES.iter().map(|n| (*n).to_owned()));
    old.left_out = fresh.left_out;
    old
}

/// Notes that belong to a run (kept when the report is re-rendered or merged), as opposed to `NOTES`,
/// which are this code's.
fn kept_note(n: &str) -> bool {
    n.starts_with("agent binary") || n.starts_with("`--only")
}

/// Runs the bench and writes the report into `opts.out_dir`. Needs root and the release agent binary
/// (`weir_tests::agent_binary`).
pub fn run(opts: &Options) -> anyhow::Result<Results> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the bench loads eBPF programs and builds network namespaces: run it as root"
    );
    let agent = weir_tests::agent_binary()?;
    // The agent library running in this process (datapath, reconciler) reports failed map writes only
    // through its logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("weir_agent=error"))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let progress = Progress::new();
    let plans = plans(opts.profile);
    let mut results = Results {
        schema: 1,
        profile: opts.profile.name().to_owned(),
        command: match opts.profile {
            Profile::Full => "cargo xtask bench".to_owned(),
            Profile::Quick => "cargo xtask bench --quick".to_owned(),
            Profile::Smoke => "cargo xtask bench --smoke".to_owned(),
        },
        machine: report::Machine::probe(),
        left_out: LEFT_OUT.iter().map(|s| (*s).to_owned()).collect(),
        ..Results::default()
    };
    results
        .notes
        .push(format!("agent binary: {}", agent.display()));
    results.notes.extend(NOTES.iter().map(|n| (*n).to_owned()));

    let wants = |x: &str| opts.only.as_deref().is_none_or(|o| o == x);
    if wants("maglev") {
        progress.step("Maglev table builds");
        match maglev::run(&plans.maglev, &progress) {
            Ok(m) => results.maglev = Some(m),
            Err(e) => results.errors.push(format!("maglev: {e:#}")),
        }
    }
    if wants("packet") {
        progress.step(&format!(
            "per-packet cost with BPF_PROG_TEST_RUN at N = {:?}",
            plans.packet.ns
        ));
        match packet::run(&plans.packet, &progress) {
            Ok(p) => {
                results
                    .errors
                    .extend(p.errors.iter().map(|e| format!("per-packet: {e}")));
                results.per_packet = Some(p);
            }
            Err(e) => results.errors.push(format!("per-packet: {e:#}")),
        }
    }
    if wants("e2e") {
        match e2e::run(&plans.e2e, &progress) {
            Ok(e) => {
                for p in &e.points {
                    for err in &p.control.errors {
                        results
                            .errors
                            .push(format!("control plane at N = {}: {err}", p.services));
                    }
                    for m in &p.modes {
                        if let (Some(mode), Some(err)) = (m.mode, &m.error) {
                            results.errors.push(format!(
                                "end to end at N = {}, {}: {err}",
                                p.services,
                                mode.label()
                            ));
                        }
                    }
                }
                for s in &e.baseline_syncs {
                    if let Some(err) = &s.error {
                        results
                            .errors
                            .push(format!("{} {} sync: {err}", s.tool, s.kind));
                    }
                }
                results.end_to_end = Some(e);
            }
            Err(e) => results.errors.push(format!("end to end: {e:#}")),
        }
    }
    if wants("forward") {
        match forward::run(&plans.forward, &progress) {
            Ok(f) => {
                results
                    .errors
                    .extend(f.errors.iter().map(|e| format!("forwarding: {e}")));
                results.forward = Some(f);
            }
            Err(e) => results.errors.push(format!("forwarding: {e:#}")),
        }
    }
    if wants("l7") {
        match l7::run(&plans.l7, &progress) {
            Ok(l) => {
                for k in &l.kinds {
                    for p in k.proxies.iter().filter(|p| p.errors > 0) {
                        results.errors.push(format!(
                            "L7 {} through {}: {} failed requests (first: {})",
                            k.kind,
                            p.proxy,
                            p.errors,
                            p.first_error.as_deref().unwrap_or("?")
                        ));
                    }
                }
                results.l7 = Some(l);
            }
            Err(e) => results.errors.push(format!("L7: {e:#}")),
        }
    }
    results.elapsed_s = progress.started.elapsed().as_secs_f64();
    if let Some(only) = opts.only.as_deref() {
        results = merge_into_existing(&opts.out_dir, only, results);
    }
    results.targets = report::targets(&results);
    report::write(&opts.out_dir, &results)?;
    progress.step(&format!(
        "report written to {}",
        opts.out_dir.join("REPORT.md").display()
    ));
    for t in &results.targets {
        let verdict = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "  –   ",
        };
        progress.note(&format!(
            "{verdict} {}: {} (goal {})",
            t.name, t.measured, t.goal
        ));
    }
    Ok(results)
}
