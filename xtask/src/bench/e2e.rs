//! End to end and control plane, in the harness's network-namespace labs.
//!
//! For each N, three identical labs are built (two backend pods holding the endpoint addresses as extra
//! /32s, a client pod): one served by the Weir agent, one by kube-proxy's iptables rules, one by its
//! nftables rules, loaded with the real tools in the lab's node namespace (no agent there: pod traffic to
//! a ClusterIP is DNATed by the node's netfilter in PREROUTING and routed to the backend's veth; replies
//! are un-NATed by conntrack). The client dials a few "probe" services spread evenly over the N, so that
//! in iptables mode they sit on average halfway down KUBE-SERVICES, as a random service would. Rounds
//! alternate the three labs, rotating which goes first.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use weir_tests::netns::{NetNs, ip};
use weir_tests::{Agent, Lab, Pod};

use super::net::{self, Servers};
use super::rules::{self, IptBackend, Load};
use super::scenario::{self, SERVICE_PORT, ServiceDef, TARGET_PORT};
use super::stats::{Spread, paired_ratio, percentile_sorted};
use super::{Progress, sys};

#[derive(Clone, Debug)]
pub struct Plan {
    pub ns: Vec<usize>,
    pub endpoints: usize,
    pub reps: usize,
    pub conn_time: Duration,
    pub requests: usize,
    /// Agent starts from nothing per N.
    pub start_reps: usize,
    /// EndpointSlice changes (and baseline syncs) at this N.
    pub change_at: Option<usize>,
    pub changes: usize,
    pub sync_reps: usize,
    /// Caps on one rule load.
    pub ipt_cap: Duration,
    pub nft_cap: Duration,
    pub ipt_nft_cap: Duration,
    /// Above this N the nftables full resync is not run (its load from nothing stands for it).
    pub nft_resync_max: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mode {
    Weir,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Weir, Mode::Iptables, Mode::Nftables];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Weir => "Weir",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct E2eResults {
    pub endpoints_per_service: usize,
    pub probe_services: usize,
    pub reps: usize,
    pub conn_seconds: f64,
    pub requests_per_round: usize,
    pub iptables_backend: String,
    pub points: Vec<E2ePoint>,
    pub slice_change: Option<E2eChange>,
    pub baseline_syncs: Vec<SyncTiming>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct E2ePoint {
    pub services: usize,
    pub modes: Vec<ModeResult>,
    /// Weir/baseline, paired per repetition.
    pub ratios: Vec<RatioRow>,
    pub control: ControlPoint,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: Option<Mode>,
    pub error: Option<String>,
    /// Per repetition.
    pub conn_per_s: Vec<f64>,
    pub conn_p50_us: Vec<f64>,
    pub conn_p99_us: Vec<f64>,
    pub req_p50_us: Vec<f64>,
    pub req_p99_us: Vec<f64>,
    pub failures: usize,
    pub first_failure: Option<String>,
}

impl ModeResult {
    pub fn spread(&self, metric: &str) -> Option<Spread> {
        Spread::of(self.metric(metric))
    }

    pub fn metric(&self, metric: &str) -> &[f64] {
        match metric {
            "conn_per_s" => &self.conn_per_s,
            "conn_p50_us" => &self.conn_p50_us,
            "conn_p99_us" => &self.conn_p99_us,
            "req_p50_us" => &self.req_p50_us,
            "req_p99_us" => &self.req_p99_us,
            _ => &[],
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RatioRow {
    pub metric: String,
    pub baseline: Option<Mode>,
    pub ratio: Option<Spread>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlPoint {
    pub services: usize,
    pub endpoints: usize,
    /// Agent process start → `/healthz` 200, seconds (per start from nothing).
    pub weir_start_to_healthy_s: Option<Spread>,
    /// `took_us` of the agent's first `synced` line (DesiredCache + Reconciler), ms.
    pub weir_first_sync_ms: Option<Spread>,
    /// `weir_sync_proxy_rules_duration_seconds` sum/count of the last agent.
    pub weir_sync_metric_mean_s: Option<f64>,
    pub agent_rss_mb: Option<f64>,
    pub agent_peak_rss_mb: Option<f64>,
    /// RssAnon, RssFile, RssShmem (MB).
    pub agent_rss_parts_mb: BTreeMap<String, f64>,
    pub agent_maps: Option<AgentMaps>,
    /// kube-proxy rule loads from nothing (seconds; `None` = did not finish within the cap).
    pub iptables_load_s: Option<f64>,
    pub nftables_load_s: Option<f64>,
    pub iptables_nft_load_s: Option<f64>,
    pub caps_s: BTreeMap<String, f64>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentMaps {
    /// memlock of every map fd the agent holds (from /proc/<pid>/fdinfo).
    pub fd_maps_bytes: u64,
    pub fd_maps: usize,
    /// The part of the Maglev arena that tables occupy (included in `fd_maps_bytes`).
    pub tables_bytes: u64,
    pub tables: usize,
    pub total_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct E2eChange {
    pub services: usize,
    pub changes: usize,
    /// Config file rewritten → first new connection answered by the new endpoint (ms).
    pub serve_p50_ms: f64,
    pub serve_p99_ms: f64,
    pub serve_max_ms: f64,
    pub failures: usize,
    /// `took_us` of the syncs those changes caused (ms).
    pub sync_p50_ms: f64,
    pub sync_p99_ms: f64,
    /// `weir_network_programming_duration_seconds` over the changes: bucket bounds (s) holding the
    /// median and the 99th percentile, and the mean.
    pub programming_p50_le_s: Option<f64>,
    pub programming_p99_le_s: Option<f64>,
    pub programming_mean_s: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncTiming {
    pub tool: String,
    /// `full` or `partial`.
    pub kind: String,
    pub services: usize,
    pub seconds: Option<Spread>,
    /// Runs that hit the cap (killed).
    pub timed_out: usize,
    pub cap_s: f64,
    /// After the sync a new connection reached the new endpoint.
    pub serving_checked: usize,
    pub serving_ok: usize,
    pub error: Option<String>,
    /// How the figure was obtained when not by the usual sync.
    pub note: Option<String>,
}

/// Endpoint `j` of probe service `k`: real addresses (extra /32s on the backend pods), distinct per
/// service as different Services' pods are. (Services sharing one backend address and port can collide
/// in Weir's conntrack when a client reuses a source port; see the report's notes.)
fn real_endpoint(k: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10 + k as u8, 1 + j as u8)
}

/// Addresses the changed service moves between (dedicated to it, so a replaced one is gone from the
/// datapath entirely).
const CHANGE_IPS: usize = 8;
fn change_endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 3, 1 + (k % CHANGE_IPS) as u8)
}

const PROBES: usize = 4;

/// The services of one N, and which of them the client dials.
struct Topology {
    defs: Vec<ServiceDef>,
    probes: Vec<usize>,
    change: usize,
}

impl Topology {
    fn new(n: usize, endpoints: usize) -> Self {
        let probes = scenario::spread_indices(n, PROBES);
        let change = if n < 8 {
            *probes.last().unwrap_or(&0)
        } else {
            (n / 3..n).find(|i| !probes.contains(i)).unwrap_or(n - 1)
        };
        let mut overrides: BTreeMap<usize, Vec<Ipv4Addr>> = probes
            .iter()
            .enumerate()
            .map(|(k, p)| (*p, (0..endpoints).map(|j| real_endpoint(k, j)).collect()))
            .collect();
        if !probes.contains(&change) {
            overrides.insert(change, vec![change_endpoint(0)]);
        }
        Self {
            defs: scenario::catalog(n, endpoints, &overrides),
            probes,
            change,
        }
    }

    fn targets(&self) -> Vec<SocketAddr> {
        self.probes
            .iter()
            .map(|p| SocketAddr::from((self.defs[*p].vip, SERVICE_PORT)))
            .collect()
    }

    /// The catalog with the changed service's endpoints replaced.
    fn with_change(&self, change: &ServiceDef) -> Vec<ServiceDef> {
        let mut defs = self.defs.clone();
        defs[self.change] = change.clone();
        defs
    }
}

/// One lab: backends holding every real and change address, a client, the servers.
struct Site {
    // Dropped first: the server threads stop before their namespaces go.
    _servers: Servers,
    client: Pod,
    lab: Lab,
}

fn add_address(lab: &Lab, pod: &Pod, addr: Ipv4Addr) -> anyhow::Result<()> {
    let cidr = format!("{addr}/32");
    ip(&["-n", pod.netns(), "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&[
        "-n",
        lab.node_netns(),
        "route",
        "add",
        &cidr,
        "dev",
        pod.node_iface(),
    ])?;
    Ok(())
}

fn build_site(endpoints: usize) -> anyhow::Result<Site> {
    let lab = Lab::new()?;
    let backends = vec![
        lab.add_pod("be-0", [10, 0, 0, 10])?,
        lab.add_pod("be-1", [10, 0, 0, 11])?,
    ];
    for k in 0..PROBES {
        for j in 0..endpoints {
            add_address(&lab, &backends[(k + j) % 2], real_endpoint(k, j))?;
        }
    }
    for k in 0..CHANGE_IPS {
        add_address(&lab, &backends[k % 2], change_endpoint(k))?;
    }
    let client = lab.add_pod("client", [10, 0, 0, 20])?;
    let servers = Servers::start(&backends, TARGET_PORT)?;
    Ok(Site {
        _servers: servers,
        client,
        lab,
    })
}

/// The agent's flags for N services of E endpoints (its map capacities must hold them).
fn agent_args(n: usize, endpoints: usize) -> Vec<String> {
    let cap = |x: usize| {
        (x + 1024)
            .next_power_of_two()
            .max(weir_common::DEFAULT_SERVICES_MAX as usize)
            .to_string()
    };
    vec![
        // Every ClusterIP also has "any other port" entries (one per protocol) refusing undefined ports.
        "--max-services".to_owned(),
        cap(4 * n + 1),
        "--max-backends".to_owned(),
        cap(n * endpoints + 64),
        "--maglev-slots".to_owned(),
        maglev_slots(n, endpoints).to_string(),
    ]
}

/// Arena slots for N tables of E backends, plus room for 64 tables being swapped.
pub fn maglev_slots(n: usize, endpoints: usize) -> u64 {
    let chunks = weir_agent::arena::chunks_for(weir_agent::maglev::table_size(endpoints));
    (n as u64 + 64) * u64::from(chunks) * u64::from(weir_common::TABLE_CHUNK_SLOTS)
}

/// `took_us` of every `synced` line of an agent log, in order.
pub fn synced_took_us(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(" synced"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("took_us="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// A metric's value from Prometheus text (`name` with its labels, exactly as printed).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Cumulative bucket counts of a histogram: (upper bound, count).
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, rest) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect()
}

/// The smallest bucket bound holding the `q`-quantile of the observations between two scrapes.
pub fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = after.last()?.1 - before.last().map_or(0.0, |b| b.1);
    if total <= 0.0 {
        return None;
    }
    after.iter().find_map(|(le, count)| {
        let prev = before
            .iter()
            .find(|(l, _)| l == le)
            .map_or(0.0, |(_, c)| *c);
        (count - prev >= q * total).then_some(*le)
    })
}

fn scrape(lab: &Lab) -> anyhow::Result<String> {
    let addr: SocketAddr = "127.0.0.1:10249".parse()?;
    let resp = lab
        .in_node(|| weir_tests::client::http_get(addr, "/metrics", Duration::from_secs(5)))?
        .map_err(|e| anyhow::anyhow!("GET /metrics: {e}"))?;
    ensure!(resp.status == 200, "GET /metrics: HTTP {}", resp.status);
    Ok(resp.body)
}

/// A `/proc/<pid>/status` field given in kB (`VmRSS:`, `VmHWM:`, …), in MB.
pub fn proc_status_mb(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse::<f64>()
            .ok()
            .map(|kb| kb / 1024.0)
    })
}

fn agent_maps(pid: u32, bpffs: &Path) -> anyhow::Result<AgentMaps> {
    let fd_maps = sys::process_maps(pid)?;
    let (tables_bytes, tables) = sys::arena_tables(bpffs)?;
    let fd_maps_bytes = fd_maps.iter().map(|m| m.memlock).sum();
    Ok(AgentMaps {
        fd_maps_bytes,
        fd_maps: fd_maps.len(),
        tables_bytes,
        tables,
        // The arena is one of the agent's map fds: the tables are inside its memlock.
        total_bytes: fd_maps_bytes,
    })
}

/// Removes what a stopped agent left pinned, so the next one programs from nothing.
fn clear_pins(bpffs: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(bpffs)? {
        let path = entry?.path();
        if path.is_dir() {
            for link in std::fs::read_dir(&path)? {
                std::fs::remove_file(link?.path())?;
            }
        } else {
            std::fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
        }
    }
    Ok(())
}

/// Starts the agent and polls `/healthz` every 10 ms; returns it with the seconds to healthy.
fn start_agent<'l>(lab: &'l Lab, args: &[String]) -> anyhow::Result<(Agent<'l>, f64)> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut agent = lab.start_agent(&args)?;
    loop {
        if !agent.is_running() {
            bail!(
                "agent exited before becoming healthy:\n{}",
                agent.log_tail(30)
            );
        }
        if matches!(agent.healthz(), Ok(200)) {
            return Ok((agent, t.elapsed().as_secs_f64()));
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("agent not healthy after 600 s:\n{}", agent.log_tail(30));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every probe answers from one of its real endpoints.
fn check_serving(site: &Site, topo: &Topology) -> anyhow::Result<()> {
    let targets = topo.targets();
    site.client.run(|| -> anyhow::Result<()> {
        for (k, t) in targets.iter().enumerate() {
            let real = &topo.defs[topo.probes[k]].endpoints;
            for _ in 0..3 {
                let ep = net::connect_once(*t, Duration::from_secs(2))
                    .with_context(|| format!("connection to {t}"))?;
                ensure!(
                    real.contains(&ep),
                    "{t} answered from {ep}, not its endpoint"
                );
            }
        }
        Ok(())
    })?
}

/// How the iptables mode's rules are loaded.
pub fn iptables_backend() -> String {
    IptBackend::Legacy.label().to_owned()
}

/// Runs the end-to-end and control-plane experiments.
pub fn run(plan: &Plan, progress: &Progress) -> anyhow::Result<E2eResults> {
    let mut results = E2eResults {
        endpoints_per_service: plan.endpoints,
        probe_services: PROBES,
        reps: plan.reps,
        conn_seconds: plan.conn_time.as_secs_f64(),
        requests_per_round: plan.requests,
        iptables_backend: iptables_backend(),
        ..E2eResults::default()
    };
    for &n in &plan.ns {
        let point = run_point(n, plan, progress, &mut results)?;
        results.points.push(point);
    }
    Ok(results)
}

fn run_point(
    n: usize,
    plan: &Plan,
    progress: &Progress,
    results: &mut E2eResults,
) -> anyhow::Result<E2ePoint> {
    let e = plan.endpoints;
    let mut control = ControlPoint {
        services: n,
        endpoints: e,
        ..ControlPoint::default()
    };
    control
        .caps_s
        .insert("iptables".into(), plan.ipt_cap.as_secs_f64());
    control
        .caps_s
        .insert("nftables".into(), plan.nft_cap.as_secs_f64());
    control
        .caps_s
        .insert("iptables-nft".into(), plan.ipt_nft_cap.as_secs_f64());

    let topo = Topology::new(n, e);
    progress.step(&format!(
        "end to end, N = {n}: three labs (Weir, iptables, nftables)"
    ));
    let weir = build_site(e).context("Weir lab")?;
    let ipt = build_site(e).context("iptables lab")?;
    let nft = build_site(e).context("nftables lab")?;
    let mut modes: BTreeMap<Mode, ModeResult> = Mode::ALL
        .iter()
        .map(|m| {
            (
                *m,
                ModeResult {
                    mode: Some(*m),
                    ..ModeResult::default()
                },
            )
        })
        .collect();

    // Weir from nothing, `start_reps` times; the last agent keeps serving.
    scenario::write_config_dir(weir.lab.config_dir(), &topo.defs, &[topo.change])?;
    let args = agent_args(n, e);
    let bpffs = weir.lab.bpffs_dir()?;
    let mut healthy = Vec::new();
    let mut first_sync = Vec::new();
    let mut agent: Option<Agent<'_>> = None;
    for rep in 0..plan.start_reps.max(1) {
        if let Some(mut a) = agent.take() {
            a.stop()?;
            clear_pins(&bpffs)?;
        }
        progress.note(&format!(
            "starting the agent with {n} services from nothing ({}/{})",
            rep + 1,
            plan.start_reps.max(1)
        ));
        let (a, secs) = start_agent(&weir.lab, &args)?;
        healthy.push(secs);
        if let Some(took) = synced_took_us(&a.log()).first() {
            first_sync.push(*took as f64 / 1e3);
        }
        agent = Some(a);
    }
    let mut agent = agent.context("no agent")?;
    control.weir_start_to_healthy_s = Spread::of(&healthy);
    control.weir_first_sync_ms = Spread::of(&first_sync);
    control.agent_rss_mb = proc_status_mb(agent.pid(), "VmRSS:");
    control.agent_peak_rss_mb = proc_status_mb(agent.pid(), "VmHWM:");
    for part in ["RssAnon", "RssFile", "RssShmem"] {
        if let Some(v) = proc_status_mb(agent.pid(), &format!("{part}:")) {
            control.agent_rss_parts_mb.insert(part.to_owned(), v);
        }
    }
    match agent_maps(agent.pid(), &bpffs) {
        Ok(m) => control.agent_maps = Some(m),
        Err(err) => control.errors.push(format!("agent maps: {err:#}")),
    }
    match scrape(&weir.lab) {
        Ok(text) => {
            let sum = metric(&text, "weir_sync_proxy_rules_duration_seconds_sum");
            let count = metric(&text, "weir_sync_proxy_rules_duration_seconds_count");
            control.weir_sync_metric_mean_s = sum.zip(count).map(|(s, c)| s / c.max(1.0));
        }
        Err(err) => control.errors.push(format!("metrics: {err:#}")),
    }
    progress.note(&format!(
        "agent healthy after {} s (first sync {} ms), RSS {:.1} MB",
        control
            .weir_start_to_healthy_s
            .map_or("-".into(), |s| s.fmt(2)),
        control.weir_first_sync_ms.map_or("-".into(), |s| s.fmt(1)),
        control.agent_rss_mb.unwrap_or(f64::NAN)
    ));

    // The baselines from nothing.
    progress.note("loading kube-proxy's iptables rules (iptables-legacy-restore)");
    let ipt_text = rules::iptables_full(&topo.defs, &[]);
    let ipt_ok = match rules::iptables_restore(
        ipt.lab.node_netns(),
        IptBackend::Legacy,
        &ipt_text,
        plan.ipt_cap,
    ) {
        Ok(load) => {
            control.iptables_load_s = load.seconds();
            rules::iptables_restore(
                ipt.lab.node_netns(),
                IptBackend::Legacy,
                &rules::iptables_jumps(),
                plan.ipt_cap,
            )?;
            load.seconds().is_some()
        }
        Err(err) => {
            modes
                .get_mut(&Mode::Iptables)
                .unwrap_or_else(|| unreachable!())
                .error = Some(format!("{err:#}"));
            false
        }
    };
    if !ipt_ok {
        let m = modes
            .get_mut(&Mode::Iptables)
            .unwrap_or_else(|| unreachable!());
        m.error
            .get_or_insert_with(|| format!("rules not loaded within {} s", plan.ipt_cap.as_secs()));
    }
    progress.note("loading kube-proxy's nftables rules (nft -f)");
    let nft_text = rules::nft_full(&topo.defs, &[]);
    drop(ipt_text);
    let nft_ok = match rules::nft_apply(nft.lab.node_netns(), &nft_text, plan.nft_cap) {
        Ok(load) => {
            control.nftables_load_s = load.seconds();
            load.seconds().is_some()
        }
        Err(err) => {
            modes
                .get_mut(&Mode::Nftables)
                .unwrap_or_else(|| unreachable!())
                .error = Some(format!("{err:#}"));
            false
        }
    };
    drop(nft_text);
    if !nft_ok {
        let m = modes
            .get_mut(&Mode::Nftables)
            .unwrap_or_else(|| unreachable!());
        m.error
            .get_or_insert_with(|| format!("rules not loaded within {} s", plan.nft_cap.as_secs()));
    }
    let loaded = |mode: Mode, v: Option<f64>| match (&modes[&mode].error, v) {
        (_, Some(v)) => format!("{v:.2} s"),
        (Some(_), None) => "failed".to_owned(),
        (None, None) => "timed out".to_owned(),
    };
    progress.note(&format!(
        "loaded: iptables {}, nftables {}",
        loaded(Mode::Iptables, control.iptables_load_s),
        loaded(Mode::Nftables, control.nftables_load_s)
    ));
    progress
        .note("iptables with the nf_tables backend (iptables-nft-restore), in a scratch namespace");
    match iptables_nft_load(&topo, plan.ipt_nft_cap) {
        Ok(load) => control.iptables_nft_load_s = load.seconds(),
        Err(err) => control.errors.push(format!("iptables-nft: {err:#}")),
    }

    let sites: [(Mode, &Site); 3] = [
        (Mode::Weir, &weir),
        (Mode::Iptables, &ipt),
        (Mode::Nftables, &nft),
    ];
    for (mode, site) in sites {
        let m = modes.get_mut(&mode).unwrap_or_else(|| unreachable!());
        if m.error.is_none()
            && let Err(err) = check_serving(site, &topo)
        {
            m.error = Some(format!("not serving: {err:#}"));
        }
    }

    let targets = topo.targets();
    let live: Vec<(Mode, &Site)> = sites
        .iter()
        .filter(|(m, _)| modes[m].error.is_none())
        .copied()
        .collect();
    for rep in 0..plan.reps {
        for k in 0..live.len() {
            let (mode, site) = live[(k + rep) % live.len()];
            let round = site
                .client
                .run(|| net::connection_rate(&targets, plan.conn_time))?;
            let lat = site
                .client
                .run(|| net::request_latency(&targets, plan.requests))?;
            let m = modes.get_mut(&mode).unwrap_or_else(|| unreachable!());
            m.conn_per_s.push(round.per_second());
            m.conn_p50_us.push(percentile_sorted(&round.each_us, 0.5));
            m.conn_p99_us.push(percentile_sorted(&round.each_us, 0.99));
            m.failures += round.failed;
            if m.first_failure.is_none() {
                m.first_failure = round.first_error.clone();
            }
            match lat {
                Ok(samples) => {
                    m.req_p50_us.push(percentile_sorted(&samples, 0.5));
                    m.req_p99_us.push(percentile_sorted(&samples, 0.99));
                }
                Err(err) => {
                    m.failures += 1;
                    m.first_failure.get_or_insert_with(|| err.to_string());
                }
            }
            progress.note(&format!(
                "N={n} rep {} {:<8} {:>7.0} conn/s, request p50 {:.0} µs p99 {:.0} µs",
                rep + 1,
                mode.label(),
                round.per_second(),
                m.req_p50_us.last().copied().unwrap_or(f64::NAN),
                m.req_p99_us.last().copied().unwrap_or(f64::NAN)
            ));
        }
    }

    if plan.change_at == Some(n) {
        progress.step(&format!(
            "control plane, N = {n}: EndpointSlice changes through the agent's config dir"
        ));
        match slice_changes(&weir, &agent, &topo, plan.changes) {
            Ok(c) => {
                progress.note(&format!(
                    "change → serving p50 {:.1} ms, p99 {:.1} ms (sync p50 {:.2} ms)",
                    c.serve_p50_ms, c.serve_p99_ms, c.sync_p50_ms
                ));
                results.slice_change = Some(c);
            }
            Err(err) => control.errors.push(format!("slice changes: {err:#}")),
        }
        progress.step(&format!(
            "control plane, N = {n}: kube-proxy syncs after the same change"
        ));
        let loaded = Loaded {
            ipt_ok,
            nft_ok,
            nft_load_s: control.nftables_load_s,
        };
        results
            .baseline_syncs
            .extend(baseline_syncs(&ipt, &nft, &topo, plan, loaded, progress));
    }
    let status = agent.stop()?;
    if !status.success() {
        control
            .errors
            .push(format!("agent exited with {status} on SIGTERM"));
    }
    drop(agent);

    let weir_res = modes[&Mode::Weir].clone();
    let mut ratios = Vec::new();
    for base in [Mode::Iptables, Mode::Nftables] {
        for metric in ["conn_per_s", "req_p50_us", "req_p99_us", "conn_p99_us"] {
            ratios.push(RatioRow {
                metric: metric.to_owned(),
                baseline: Some(base),
                ratio: paired_ratio(weir_res.metric(metric), modes[&base].metric(metric)),
            });
        }
    }
    Ok(E2ePoint {
        services: n,
        modes: modes.into_values().collect(),
        ratios,
        control,
    })
}

/// iptables-nft-restore from nothing in a scratch namespace (no traffic goes through it).
fn iptables_nft_load(topo: &Topology, cap: Duration) -> anyhow::Result<Load> {
    let ns = NetNs::create(&format!("weir-bench-{}-iptnft", std::process::id()))?;
    rules::iptables_restore(
        ns.name(),
        IptBackend::Nft,
        &rules::iptables_full(&topo.defs, &[]),
        cap,
    )
}

/// Rewrites the changed service's own config file `changes` times, each time to a single new endpoint,
/// and measures until a new connection is answered by it.
fn slice_changes(
    site: &Site,
    agent: &Agent<'_>,
    topo: &Topology,
    changes: usize,
) -> anyhow::Result<E2eChange> {
    const NAME: &str = "weir_network_programming_duration_seconds";
    let before = scrape(&site.lab)?;
    let synced_before = synced_took_us(&agent.log()).len();
    let base = topo.defs[topo.change].clone();
    let target = SocketAddr::from((base.vip, SERVICE_PORT));
    let lab = &site.lab;
    let (mut serve_ms, failures) =
        site.client.run(|| -> anyhow::Result<(Vec<f64>, usize)> {
            net::pin();
            let mut serve_ms = Vec::new();
            let mut failures = 0;
            for c in 0..changes {
                let fresh = change_endpoint(c + 1);
                let def = ServiceDef {
                    endpoints: vec![fresh],
                    ..base.clone()
                };
                lab.write_config(&def.own_file(), &def.yaml())?;
                let t = Instant::now();
                loop {
                    if let Ok(ep) = net::connect_once(target, Duration::from_secs(1))
                        && ep == fresh
                    {
                        serve_ms.push(t.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(20) {
                        failures += 1;
                        break;
                    }
                }
                // Past the agent's --min-sync-period, so each change is its own sync.
                std::thread::sleep(Duration::from_millis(150));
            }
            Ok((serve_ms, failures))
        })??;
    let after = scrape(&site.lab)?;
    let mut syncs: Vec<f64> = synced_took_us(&agent.log())
        .into_iter()
        .skip(synced_before)
        .map(|us| us as f64 / 1e3)
        .collect();
    syncs.sort_by(f64::total_cmp);
    serve_ms.sort_by(f64::total_cmp);
    let (b, a) = (buckets(&before, NAME), buckets(&after, NAME));
    let delta = |suffix: &str| {
        let name = format!("{NAME}_{suffix}");
        Some(metric(&after, &name)? - metric(&before, &name).unwrap_or(0.0))
    };
    Ok(E2eChange {
        services: topo.defs.len(),
        changes,
        serve_p50_ms: percentile_sorted(&serve_ms, 0.5),
        serve_p99_ms: percentile_sorted(&serve_ms, 0.99),
        serve_max_ms: serve_ms.last().copied().unwrap_or(f64::NAN),
        failures,
        sync_p50_ms: percentile_sorted(&syncs, 0.5),
        sync_p99_ms: percentile_sorted(&syncs, 0.99),
        programming_p50_le_s: bucket_quantile(&b, &a, 0.5),
        programming_p99_le_s: bucket_quantile(&b, &a, 0.99),
        programming_mean_s: delta("sum")
            .zip(delta("count"))
            .map(|(s, c)| s / c.max(1.0)),
    })
}

/// Which baseline rule sets are in place, and how long nftables's took to load.
struct Loaded {
    ipt_ok: bool,
    nft_ok: bool,
    nft_load_s: Option<f64>,
}

/// kube-proxy's syncs for the same kind of change: a full sync and the partial one each proxier does,
/// alternating the changed service between dedicated endpoints, each followed by a check that a new
/// connection reaches the new endpoint.
fn baseline_syncs(
    ipt: &Site,
    nft: &Site,
    topo: &Topology,
    plan: &Plan,
    loaded: Loaded,
    progress: &Progress,
) -> Vec<SyncTiming> {
    let Loaded {
        ipt_ok,
        nft_ok,
        nft_load_s,
    } = loaded;
    let mut out = Vec::new();
    let n = topo.defs.len();
    type Gen<'a> = Box<dyn Fn(&ServiceDef, &ServiceDef) -> String + 'a>;
    let runs: Vec<(&str, &str, &Site, bool, Duration, Gen<'_>)> = vec![
        (
            "iptables-legacy-restore",
            "partial",
            ipt,
            ipt_ok,
            plan.ipt_cap,
            Box::new(|old, new| {
                rules::iptables_partial(
                    &topo.with_change(new),
                    new,
                    &rules::iptables_stale_chains(old, new),
                )
            }),
        ),
        (
            "iptables-legacy-restore",
            "full",
            ipt,
            ipt_ok,
            plan.ipt_cap,
            Box::new(|old, new| {
                rules::iptables_full(
                    &topo.with_change(new),
                    &rules::iptables_stale_chains(old, new),
                )
            }),
        ),
        (
            "nft",
            "partial",
            nft,
            nft_ok,
            plan.nft_cap,
            Box::new(|old, new| rules::nft_partial(new, &rules::nft_stale_chains(old, new))),
        ),
        (
            "nft",
            "full",
            nft,
            nft_ok,
            plan.nft_cap,
            Box::new(|old, new| {
                rules::nft_full(&topo.with_change(new), &rules::nft_stale_chains(old, new))
            }),
        ),
    ];
    // Each lab's changed service walks through the change endpoints; `state` remembers where it is.
    let mut state: BTreeMap<&str, ServiceDef> = BTreeMap::new();
    for (tool, kind, site, ok, cap, generate) in runs {
        let mut timing = SyncTiming {
            tool: tool.to_owned(),
            kind: kind.to_owned(),
            services: n,
            cap_s: cap.as_secs_f64(),
            ..SyncTiming::default()
        };
        if !ok {
            timing.error = Some("rules were not loaded".into());
            out.push(timing);
            continue;
        }
        if tool == "nft" && kind == "full" && n > plan.nft_resync_max {
            timing.seconds = nft_load_s.and_then(|s| Spread::of(&[s]));
            timing.note = Some(format!(
                "the lab's initial `nft -f` into an empty table at this N; a flush-and-refill resync \
                 is not run above N = {}: on this kernel it kept a CPU busy in the kernel for minutes \
                 at 10k × 10 (179 s, 153 s of it reported as a soft lockup by the watchdog, when \
                 tried), stalling everything else on the machine",
                plan.nft_resync_max
            ));
            out.push(timing);
            continue;
        }
        let reps = if kind == "full" && tool == "nft" {
            1
        } else {
            plan.sync_reps
        };
        let mut secs = Vec::new();
        for _ in 0..reps {
            let old = state
                .get(tool)
                .cloned()
                .unwrap_or_else(|| topo.defs[topo.change].clone());
            let k = old
                .endpoints
                .first()
                .and_then(|ip| (0..CHANGE_IPS).find(|k| change_endpoint(*k) == *ip))
                .map_or(0, |k| k + 1);
            let new = ServiceDef {
                endpoints: vec![change_endpoint(k)],
                ..old.clone()
            };
            let text = generate(&old, &new);
            let load = if tool == "nft" {
                rules::nft_apply(site.lab.node_netns(), &text, cap)
            } else {
                rules::iptables_restore(site.lab.node_netns(), IptBackend::Legacy, &text, cap)
            };
            match load {
                Ok(Load::Done(d)) => {
                    secs.push(d.as_secs_f64());
                    state.insert(tool, new.clone());
                    timing.serving_checked += 1;
                    let target = SocketAddr::from((new.vip, SERVICE_PORT));
                    let fresh = new.endpoints[0];
                    if let Ok(Ok(ep)) = site
                        .client
                        .run(|| net::connect_once(target, Duration::from_secs(2)))
                        && ep == fresh
                    {
                        timing.serving_ok += 1;
                    }
                }
                Ok(Load::TimedOut(_)) => {
                    timing.timed_out += 1;
                    // The killed transaction changed nothing (nft) or left the old rules (iptables).
                    break;
                }
                Err(err) => {
                    timing.error = Some(format!("{err:#}"));
                    break;
                }
            }
        }
        timing.seconds = Spread::of(&secs);
        progress.note(&format!(
            "{tool} {kind} sync at N={n}: {} s{}",
            timing.seconds.map_or("-".into(), |s| s.fmt(3)),
            if timing.timed_out > 0 {
                format!(" (hit the {} s cap)", cap.as_secs())
            } else {
                String::new()
            }
        ));
        out.push(timing);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synced_lines_and_metrics() {
        let log = "2026-01-01T00:00:00Z  INFO weir_agent::agent: synced frontends=3 services_recomputed=3 \
                   written=3 deleted=0 errors=0 took_us=1234\nother line took_us=5\n";
        assert_eq!(synced_took_us(log), vec![1234]);
        let text = "# HELP x\nweir_sync_proxy_rules_duration_seconds_sum 0.5\n\
                    weir_sync_proxy_rules_duration_seconds_count 2\n\
                    weir_network_programming_duration_seconds_bucket{le=\"0.1\"} 1\n\
                    weir_network_programming_duration_seconds_bucket{le=\"0.25\"} 9\n\
                    weir_network_programming_duration_seconds_bucket{le=\"+Inf\"} 10\n";
        assert_eq!(
            metric(text, "weir_sync_proxy_rules_duration_seconds_sum"),
            Some(0.5)
        );
        let b = buckets(text, "weir_network_programming_duration_seconds");
        assert_eq!(b.len(), 3);
        assert_eq!(bucket_quantile(&[], &b, 0.5), Some(0.25));
        assert_eq!(bucket_quantile(&[], &b, 0.99), Some(f64::INFINITY));
        assert_eq!(bucket_quantile(&b, &b, 0.5), None);
    }

    #[test]
    fn topology_keeps_the_changed_service_apart_from_the_probes() {
        let t = Topology::new(1000, 10);
        assert_eq!(t.probes, vec![125, 375, 625, 875]);
        assert!(!t.probes.contains(&t.change));
        assert_eq!(t.defs[t.change].endpoints, vec![change_endpoint(0)]);
        assert_eq!(t.defs[125].endpoints.len(), 10);
        assert_eq!(t.defs[125].endpoints[0], real_endpoint(0, 0));
        assert_eq!(t.defs[375].endpoints[0], real_endpoint(1, 0));
        let one = Topology::new(1, 10);
        assert_eq!((one.probes.clone(), one.change), (vec![0], 0));
    }
}
