//! `cargo xtask demo`: a guided tour of Weir on one machine. Builds a throw-away lab of network
//! namespaces, runs the release agent in it, load-balances 1,000 TCP connections over three backends,
//! removes a backend, shows the new spread, and tears everything down.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use weir_tests::client::{self, ClientError};
use weir_tests::scenario::{self, CLUSTER_IP, TCP_PORT, Tally, cluster_addr, parse_greeting};
use weir_tests::{Agent, Lab, Pod};

/// Connections per round.
const CONNECTIONS: usize = 1_000;

/// What one round of connections measured.
struct Round {
    tally: Tally,
    connect_times: Vec<Duration>,
    failures: Vec<ClientError>,
    elapsed: Duration,
}

/// Runs the demo. Needs root and a release agent (`target/release/weir-agent`, built by the caller).
pub fn run() -> anyhow::Result<()> {
    ensure!(
        weir_tests::is_root(),
        "the demo creates network namespaces and loads eBPF programs: run it as root"
    );
    let started = Instant::now();
    let bin = weir_tests::agent_binary()?;
    step(&format!("Using the agent binary {}", bin.display()));

    step("Creating a lab: one \"node\" network namespace and four \"pod\" namespaces");
    let lab = Lab::new()?;
    note(&format!("node namespace {}", lab.node_netns()));
    let (backends, client) = scenario::add_standard_pods(&lab)?;
    for pod in backends.iter().chain(std::iter::once(&client)) {
        let role = if pod.name() == client.name() {
            "client".to_owned()
        } else {
            format!("echo server on :{}", TCP_PORT.1)
        };
        note(&format!(
            "pod {:<10} {:<11} node-side veth {:<4} {role}",
            pod.name(),
            pod.ip(),
            pod.node_iface()
        ));
    }

    step(&format!(
        "Writing a Service (ClusterIP {CLUSTER_IP}:{} -> port {} TCP) and its EndpointSlice",
        TCP_PORT.0, TCP_PORT.1
    ));
    scenario::write_echo_service(&lab, &backends.iter().collect::<Vec<_>>())?;
    note(&format!(
        "{} — the agent watches this directory instead of a Kubernetes API server",
        lab.config_dir().join("echo.yaml").display()
    ));
    note(&format!(
        "{CLUSTER_IP} is assigned nowhere: only Weir's eBPF programs answer it"
    ));

    step("Starting weir-agent inside the node namespace");
    let mut agent = lab.start_agent(&[])?;
    let result = tour(&lab, &mut agent, &backends, &client);
    if result.is_err() {
        eprintln!(
            "\n----- agent log tail ({}) -----\n{}\n-----",
            agent.log_path().display(),
            agent.log_tail(40)
        );
    }
    result?;

    step("Tearing down: namespaces, veths, bpffs and temp files");
    drop(agent);
    drop(lab);
    step(&format!(
        "Demo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Everything that happens while the agent runs.
fn tour(lab: &Lab, agent: &mut Agent<'_>, backends: &[Pod], client: &Pod) -> anyhow::Result<()> {
    let t = Instant::now();
    agent.wait_healthy(scenario::HEALTHY_TIMEOUT)?;
    note(&format!(
        "healthy after {:.2} s (GET /healthz -> 200), log {}",
        t.elapsed().as_secs_f64(),
        agent.log_path().display()
    ));

    step(&format!(
        "Opening {CONNECTIONS} TCP connections from {} to {}",
        client.name(),
        cluster_addr(TCP_PORT.0)
    ));
    let round = connect_round(client)?;
    report(&round, backends, None);
    ensure!(
        round.failures.is_empty(),
        "{} connections failed, first: {}",
        round.failures.len(),
        round.failures[0]
    );

    let removed = &backends[2];
    step(&format!(
        "Removing {} ({}) from the EndpointSlice and waiting 1.5 s",
        removed.name(),
        removed.ip()
    ));
    scenario::write_echo_service(lab, &[&backends[0], &backends[1]])?;
    std::thread::sleep(Duration::from_millis(1500));

    step(&format!("Opening {CONNECTIONS} more connections"));
    let round = connect_round(client)?;
    report(&round, backends, Some(removed.name()));
    ensure!(
        round.failures.is_empty(),
        "{} connections failed, first: {}",
        round.failures.len(),
        round.failures[0]
    );
    if round.tally.get(removed.name()) > 0 {
        bail!(
            "{} was removed but still got {} new connections",
            removed.name(),
            round.tally.get(removed.name())
        );
    }

    step("Stopping the agent with SIGTERM (it detaches its programs)");
    let status = agent.stop()?;
    note(&format!("agent exited: {status}"));
    ensure!(status.success(), "agent exited with {status}");
    Ok(())
}

/// `CONNECTIONS` times: connect (timed), read the backend's greeting to learn who answered, close.
fn connect_round(client: &Pod) -> anyhow::Result<Round> {
    let addr = cluster_addr(TCP_PORT.0);
    let started = Instant::now();
    let mut round = client
        .run(|| {
            let mut round = Round {
                tally: Tally::default(),
                connect_times: Vec::with_capacity(CONNECTIONS),
                failures: Vec::new(),
                elapsed: Duration::ZERO,
            };
            for _ in 0..CONNECTIONS {
                let t = Instant::now();
                let answer =
                    client::tcp_connect(addr, Duration::from_secs(2)).and_then(|mut conn| {
                        round.connect_times.push(t.elapsed());
                        conn.read_line()
                    });
                match answer {
                    Ok(line) => match parse_greeting(&line) {
                        Ok((backend, _)) => round.tally.add(&backend),
                        Err(e) => eprintln!("   unexpected reply: {e:#}"),
                    },
                    Err(e) => round.failures.push(e),
                }
            }
            round
        })
        .context("enter the client pod's namespace")?;
    round.elapsed = started.elapsed();
    Ok(round)
}

/// Prints the spread over backends and the connect latency.
fn report(round: &Round, backends: &[Pod], removed: Option<&str>) {
    println!();
    println!("   {:<12} {:>11} {:>7}", "backend", "connections", "share");
    println!("   {:-<12} {:->11} {:->7}", "", "", "");
    for b in backends {
        let mark = if Some(b.name()) == removed {
            "  (removed)"
        } else {
            ""
        };
        println!(
            "   {:<12} {:>11} {:>6.1}%{mark}",
            b.name(),
            round.tally.get(b.name()),
            round.tally.percent(b.name())
        );
    }
    if !round.failures.is_empty() {
        println!("   {:<12} {:>11}", "failed", round.failures.len());
    }
    let mut times = round.connect_times.clone();
    times.sort();
    let pct = |p: f64| {
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len().max(1)) - 1;
        times.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!();
    println!(
        "   connect latency: p50 {:.0} µs, p99 {:.0} µs ({} connections in {:.2} s)",
        pct(0.50),
        pct(0.99),
        round.tally.total() + round.failures.len(),
        round.elapsed.as_secs_f64()
    );
    println!();
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn note(msg: &str) {
    println!("    {msg}");
}
