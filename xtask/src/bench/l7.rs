//! L7: requests through a 90/10 weighted HTTPRoute, Weir's proxy against nginx doing the same split.
//!
//! One lab serves both: two backend pods (`be-a`, `be-b`, a small HTTP/1.1 keep-alive server each that
//! answers every request with its name) and one client pod. Weir: the agent runs in the node namespace
//! with a Service `web` whose HTTPRoute sends 90 % of the requests to Service `v1` (be-a) and 10 % to
//! `v2` (be-b); the client dials web's ClusterIP and the TC program steers the connection to the agent's
//! proxy. nginx (the Debian package, its own config, pid and log files under a temp dir, never the system
//! service) runs in the same node namespace with `upstream { server be-a weight=9; server be-b weight=1;
//! keepalive }`, and the client dials its listen address on the node (the pods' gateway address), so its
//! packets cross the same veths and the same TC programs (as traffic that is not Weir's). Same backends,
//! same load generator (`Load`), same client pod; within each repetition the proxies alternate, rotating
//! which goes first. Every response is counted per backend, so the report shows both proxies did the
//! split they were asked for.
//!
//! CPUs: both proxies get CPU 0 alone (every thread of the agent is pinned there, nginx runs one worker
//! with `worker_cpu_affinity` on it); the load generator and the backends share the other CPU
//! ([`net::load_cpu`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weir_tests::yaml::{documents, endpointslice_yaml, service_yaml};
use weir_tests::{Lab, Pod, lab::GATEWAY};

use super::report::{Target, num};
use super::stats::{Spread, paired_ratio, percentile_sorted};
use super::{Progress, TempDir, net};

/// Backend pods: name, address. The first takes 90 %.
const BACKENDS: [(&str, [u8; 4]); 2] = [("be-a", [10, 0, 0, 10]), ("be-b", [10, 0, 0, 11])];
const BACKEND_PORT: u16 = 8080;
/// The routed Service's ClusterIP and port.
const WEB: ([u8; 4], u16) = ([10, 96, 0, 50], 80);
/// nginx's listen port on the node's gateway address.
const NGINX_PORT: u16 = 8081;
/// The weights of the split (Weir's route and nginx's upstream alike).
const WEIGHTS: [u32; 2] = [90, 10];
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\nUser-Agent: weir-bench\r\n\r\n";
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Plan {
    pub reps: usize,
    /// One measured round of one proxy.
    pub round: Duration,
    /// Concurrent client connections.
    pub connections: usize,
    /// Also measure a new connection per request.
    pub fresh: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L7Results {
    pub reps: usize,
    pub round_s: f64,
    pub connections: usize,
    pub weights: Vec<u32>,
    pub nginx_version: String,
    pub proxy_cpu: usize,
    pub load_cpu: usize,
    /// `persistent`, then `fresh` when measured.
    pub kinds: Vec<L7Kind>,
    /// VmRSS after the rounds: the whole agent (datapath loader, reconciler and proxy); nginx's master
    /// and worker together.
    pub weir_agent_rss_mb: Option<f64>,
    pub nginx_rss_mb: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L7Kind {
    /// `persistent` (keep-alive) or `fresh` (connect, one request, close).
    pub kind: String,
    pub proxies: Vec<L7Proxy>,
    /// Weir/nginx per repetition.
    pub ratios: Vec<L7Ratio>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L7Proxy {
    /// `Weir`, `nginx`, or `direct` (the client to be-a, no proxy: what the rig serves alone).
    pub proxy: String,
    /// Per repetition.
    pub rps: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// Responses per backend over every repetition.
    pub responses: BTreeMap<String, u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl L7Proxy {
    fn new(proxy: &str) -> Self {
        Self {
            proxy: proxy.to_owned(),
            ..Self::default()
        }
    }

    pub fn spread(&self, metric: &str) -> Option<Spread> {
        Spread::of(match metric {
            "rps" => &self.rps,
            "p50_us" => &self.p50_us,
            "p99_us" => &self.p99_us,
            _ => &[],
        })
    }

    /// The first backend's share of the responses, percent.
    pub fn first_share(&self) -> Option<f64> {
        let total: u64 = self.responses.values().sum();
        let first = self.responses.get(BACKENDS[0].0).copied().unwrap_or(0);
        (total > 0).then(|| first as f64 * 100.0 / total as f64)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct L7Ratio {
    pub metric: String,
    pub ratio: Option<Spread>,
}

// ---------------------------------------------------------------------------------------------------
// Backends

// ---------------------------------------------------------------------------------------------------
// Load generator

/// One round of the load generator.
#[derive(Debug, Default)]
struct Round {
    /// Microseconds per successful request (for fresh connections: connect included), unsorted.
    latencies_us: Vec<f64>,
    responses: BTreeMap<String, u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

impl Round {
    fn merge(&mut self, other: Round) {
        self.latencies_us.extend(other.latencies_us);
        for (k, v) in other.responses {
            *self.responses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }
}

/// Where a complete response ends in `buf` and its body: `Ok(None)` while incomplete.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(usize, &[u8])>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        ensure!(buf.len() < 16 * 1024, "response headers over 16 KiB");
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(status.starts_with("HTTP/1.1 200"), "status line {status:?}");
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .context("response without Content-Length")?
        .context("bad Content-Length")?;
    let end = head_end + 4 + length;
    Ok((buf.len() >= end).then(|| (end, &buf[head_end + 4..end])))
}

/// Sends one request and reads its response; returns the backend name in the body.
async fn exchange(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<String> {
    stream.write_all(REQUEST).await.context("send request")?;
    buf.clear();
    loop {
        if let Some((end, body)) = parse_response(buf)? {
            ensure!(end == buf.len(), "bytes after the response");
            return Ok(String::from_utf8_lossy(body).trim().to_owned());
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.context("read response")?;
        ensure!(n > 0, "connection closed before the response ended");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connect(target: SocketAddr) -> anyhow::Result<tokio::net::TcpStream> {
    let stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(target))
        .await
        .context("connect timed out")?
        .context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One client connection's loop until `deadline`. `stream` is an established, warmed-up connection
/// (persistent) or `None` (fresh: connect, one request, close, for each request).
async fn client_loop(
    target: SocketAddr,
    mut stream: Option<tokio::net::TcpStream>,
    deadline: Instant,
) -> Round {
    let fresh = stream.is_none();
    let mut round = Round::default();
    let mut buf = Vec::with_capacity(512);
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut s = match stream.take() {
            Some(s) => s,
            None => match connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    round.error(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match tokio::time::timeout(TIMEOUT, exchange(&mut s, &mut buf)).await {
            Ok(Ok(backend)) => {
                round
                    .latencies_us
                    .push(started.elapsed().as_secs_f64() * 1e6);
                *round.responses.entry(backend).or_default() += 1;
                if fresh {
                    net::set_linger_zero(&s);
                } else {
                    stream = Some(s);
                }
            }
            Ok(Err(e)) => {
                round.error(format!("{e:#}"));
                net::set_linger_zero(&s);
            }
            Err(_) => {
                round.error("request timed out");
                net::set_linger_zero(&s);
            }
        }
        // A persistent connection that failed is replaced (outside the latency figures).
        if !fresh && stream.is_none() {
            match connect(target).await {
                Ok(s) => stream = Some(s),
                Err(e) => round.error(format!("{e:#}")),
            }
        }
    }
    round
}

/// The load generator: `connections` concurrent HTTP/1.1 connections to `target` from the calling
/// thread (which must be in the client pod's namespace), for `duration`, on a current-thread tokio
/// runtime pinned to the load CPU.
fn load(target: SocketAddr, connections: usize, fresh: bool, duration: Duration) -> Round {
    net::pin();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut r = Round::default();
            r.error(format!("tokio runtime: {e}"));
            return r;
        }
    };
    rt.block_on(async {
        let mut total = Round::default();
        // Warm-up, outside the figures: persistent connections are opened and used once; for fresh
        // connections a few requests let the proxies fill their upstream pools.
        let mut streams = Vec::new();
        for _ in 0..connections {
            let warm = async {
                let mut s = connect(target).await?;
                exchange(&mut s, &mut Vec::new()).await?;
                anyhow::Ok(s)
            };
            match warm.await {
                Ok(s) if !fresh => streams.push(Some(s)),
                Ok(s) => {
                    net::set_linger_zero(&s);
                    streams.push(None);
                }
                Err(e) => total.error(format!("warm-up: {e:#}")),
            }
        }
        if streams.is_empty() {
            return total;
        }
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|s| tokio::spawn(client_loop(target, s, deadline)))
            .collect();
        for t in tasks {
            match t.await {
                Ok(r) => total.merge(r),
                Err(e) => total.error(format!("client task: {e}")),
            }
        }
        total.elapsed = started.elapsed();
        total
    })
}

// ---------------------------------------------------------------------------------------------------
// nginx

/// nginx's configuration: one worker pinned to `cpu`, the 90/10 upstream with keep-alive, every path
/// under `dir`, keep-alive limits out of the way (nginx closes a client or upstream connection after
/// 1,000 requests by default), and the header a proxy usually adds (`X-Forwarded-For`, which Weir adds).
fn nginx_conf(
    dir: &Path,
    listen: SocketAddr,
    cpu: usize,
    backends: &[(SocketAddr, u32)],
) -> String {
    let d = dir.display();
    let mut upstream = String::new();
    for (addr, weight) in backends {
        let _ = writeln!(upstream, "        server {addr} weight={weight};");
    }
    let mask = format!("1{}", "0".repeat(cpu));
    format!(
        "# Written by cargo xtask bench (L7 experiment).\n\
         worker_processes 1;\n\
         worker_cpu_affinity {mask};\n\
         user root;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log error;\n\
         events {{\n    worker_connections 4096;\n}}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/client_body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   keepalive_requests 100000000;\n\
         \x20   keepalive_timeout 300s;\n\
         \x20   upstream split {{\n\
         {upstream}\
         \x20       keepalive 256;\n\
         \x20       keepalive_requests 100000000;\n\
         \x20       keepalive_timeout 300s;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen {listen};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://split;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n"
    )
}

/// nginx in the lab's node namespace, killed on drop.
struct Nginx {
    child: Child,
    _dir: TempDir,
    error_log: std::path::PathBuf,
}

impl Nginx {
    fn start(lab: &Lab, listen: SocketAddr, cpu: usize) -> anyhow::Result<Self> {
        let dir = TempDir::new("nginx")?;
        let backends: Vec<(SocketAddr, u32)> = BACKENDS
            .iter()
            .zip(WEIGHTS)
            .map(|((_, ip), w)| (SocketAddr::from((*ip, BACKEND_PORT)), w / 10))
            .collect();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir.path(), listen, cpu, &backends))
            .with_context(|| format!("write {}", conf.display()))?;
        let error_log = dir.path().join("error.log");
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Spawned from a thread in the node namespace: nginx lives there.
        let child = lab
            .in_node(|| cmd.spawn())
            .and_then(|r| r)
            .context("spawn nginx (is it installed? `cargo xtask setup` installs it)")?;
        Ok(Self {
            child,
            _dir: dir,
            error_log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the client can connect to `listen`.
    fn wait_ready(&mut self, client: &Pod, listen: SocketAddr) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                let log = std::fs::read_to_string(&self.error_log).unwrap_or_default();
                bail!("nginx exited ({status}): {stderr}{log}");
            }
            let ok = client
                .run(|| TcpStream::connect_timeout(&listen, Duration::from_millis(200)))
                .is_ok_and(|r| r.is_ok());
            if ok {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("nginx did not listen on {listen} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    /// SIGTERM (nginx's fast shutdown: the master stops its worker and exits); SIGKILL to whatever is
    /// left after 5 s, the worker by its pid (a SIGKILLed master leaves its worker running).
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let master = self.child.id();
        let workers: Vec<i32> =
            std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
        if let Ok(pid) = i32::try_from(master) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            // Still ours only if it is still an nginx whose master was ours (now gone: reparented).
            let comm = std::fs::read_to_string(format!("/proc/{w}/cmdline")).unwrap_or_default();
            if comm.starts_with("nginx: worker") {
                let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
            }
        }
    }
}

fn nginx_version() -> String {
    Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------
// The experiment

fn weir_config(lab: &Lab) -> anyhow::Result<()> {
    let service = |name: &str, ip: &str, pod: Ipv4Addr| {
        documents(&[
            service_yaml("default", name, ip, &[("http", WEB.1, "TCP", BACKEND_PORT)]),
            endpointslice_yaml(
                "default",
                &format!("{name}-1"),
                name,
                &[("http", BACKEND_PORT, "TCP")],
                &[(pod, true)],
            ),
        ])
    };
    let (a, b) = (Ipv4Addr::from(BACKENDS[0].1), Ipv4Addr::from(BACKENDS[1].1));
    lab.write_config("web.yaml", &service("web", "10.96.0.50", a))?;
    lab.write_config("v1.yaml", &service("v1", "10.96.0.51", a))?;
    lab.write_config("v2.yaml", &service("v2", "10.96.0.52", b))?;
    lab.write_config(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: split, namespace: default}}\nspec:\n  \
             parentRefs: [{{group: \"\", kind: Service, name: web, port: {port}}}]\n  rules:\n  \
             - backendRefs:\n    - {{name: v1, port: {port}, weight: {w1}}}\n    \
             - {{name: v2, port: {port}, weight: {w2}}}\n",
            port = WEB.1,
            w1 = WEIGHTS[0],
            w2 = WEIGHTS[1],
        ),
    )?;
    Ok(())
}

/// Pins every thread of `pid` to `cpu`.
fn pin_process(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("CPU out of range")?;
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        let tid: i32 = entry?
            .file_name()
            .to_string_lossy()
            .parse()
            .context("task id")?;
        // A thread that exited meanwhile is no longer ours to pin.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set);
    }
    Ok(())
}

fn rss_mb(pid: u32) -> Option<f64> {
    super::e2e::proc_status_mb(pid, "VmRSS:")
}

/// A process and its children (nginx's master and worker).
fn tree_rss_mb(pid: u32) -> Option<f64> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let kids: f64 = children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .filter_map(rss_mb)
        .sum();
    rss_mb(pid).map(|own| own + kids)
}

/// One measured round from the client pod.
fn measure(client: &Pod, target: SocketAddr, plan: &Plan, fresh: bool) -> anyhow::Result<Round> {
    let (n, d) = (plan.connections, plan.round);
    client
        .run(move || load(target, n, fresh, d))
        .context("run the load generator in the client pod")
}

fn record(p: &mut L7Proxy, mut round: Round) {
    round.latencies_us.sort_by(f64::total_cmp);
    let ok = round.latencies_us.len();
    p.rps
        .push(ok as f64 / round.elapsed.as_secs_f64().max(1e-9));
    p.p50_us.push(percentile_sorted(&round.latencies_us, 0.5));
    p.p99_us.push(percentile_sorted(&round.latencies_us, 0.99));
    for (k, v) in round.responses {
        *p.responses.entry(k).or_default() += v;
    }
    p.errors += round.errors;
    if p.first_error.is_none() {
        p.first_error = round.first_error;
    }
}

/// Runs the L7 experiment.
pub fn run(plan: &Plan, progress: &Progress) -> anyhow::Result<L7Results> {
    let proxy_cpu = 0;
    let load_cpu = net::load_cpu();
    progress.step(&format!(
        "L7: {}/{} HTTPRoute vs nginx, {} connections, {} × {:.1} s rounds",
        WEIGHTS[0],
        WEIGHTS[1],
        plan.connections,
        plan.reps,
        plan.round.as_secs_f64()
    ));
    let lab = Lab::new().context("L7 lab")?;
    let pods = BACKENDS
        .iter()
        .map(|(name, ip)| lab.add_pod(name, *ip))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = lab.add_pod("client", [10, 0, 0, 20])?;
    let _backends = net::Servers::start_with(&pods, BACKEND_PORT, net::Framing::Http)?;

    weir_config(&lab)?;
    let mut agent = lab.start_agent(&[])?;
    agent
        .wait_healthy(weir_tests::scenario::HEALTHY_TIMEOUT)
        .context("agent healthy")?;
    pin_process(agent.pid(), proxy_cpu).context("pin the agent")?;
    let weir = SocketAddr::from(WEB);
    // The route is programmed once the proxy answers through the ClusterIP.
    let started = Instant::now();
    loop {
        let reply = client.run(|| load(weir, 1, true, Duration::from_millis(1)));
        match reply {
            Ok(r) if r.errors == 0 => break,
            Ok(r) if started.elapsed() > Duration::from_secs(10) => bail!(
                "no answer through the route within 10 s: {}\n{}",
                r.first_error.unwrap_or_default(),
                agent.log_tail(30)
            ),
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e).context("client pod"),
        }
    }

    let listen = SocketAddr::from((GATEWAY, NGINX_PORT));
    let mut nginx = Nginx::start(&lab, listen, proxy_cpu)?;
    nginx.wait_ready(&client, listen)?;
    let direct = SocketAddr::from((BACKENDS[0].1, BACKEND_PORT));

    let mut kinds = vec![("persistent", false)];
    if plan.fresh {
        kinds.push(("fresh", true));
    }
    let mut results = L7Results {
        reps: plan.reps,
        round_s: plan.round.as_secs_f64(),
        connections: plan.connections,
        weights: WEIGHTS.to_vec(),
        nginx_version: nginx_version(),
        proxy_cpu,
        load_cpu,
        ..L7Results::default()
    };
    for (kind, fresh) in kinds {
        let mut targets = vec![("Weir", weir), ("nginx", listen)];
        if !fresh {
            targets.push(("direct", direct));
        }
        let mut proxies: Vec<L7Proxy> = targets.iter().map(|(p, _)| L7Proxy::new(p)).collect();
        for rep in 0..plan.reps {
            for k in 0..targets.len() {
                let i = (k + rep) % targets.len();
                let round = measure(&client, targets[i].1, plan, fresh)?;
                record(&mut proxies[i], round);
            }
            progress.note(&format!(
                "{kind} rep {}/{}: {}",
                rep + 1,
                plan.reps,
                proxies
                    .iter()
                    .map(|p| format!(
                        "{} {:.0} req/s p99 {:.0} µs",
                        p.proxy,
                        p.rps.last().copied().unwrap_or(f64::NAN),
                        p.p99_us.last().copied().unwrap_or(f64::NAN)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let ratios = ["rps", "p50_us", "p99_us"]
            .iter()
            .map(|m| {
                let of = |p: &L7Proxy| match *m {
                    "rps" => p.rps.clone(),
                    "p50_us" => p.p50_us.clone(),
                    _ => p.p99_us.clone(),
                };
                L7Ratio {
                    metric: (*m).to_owned(),
                    ratio: paired_ratio(&of(&proxies[0]), &of(&proxies[1])),
                }
            })
            .collect();
        results.kinds.push(L7Kind {
            kind: kind.to_owned(),
            proxies,
            ratios,
        });
    }
    results.weir_agent_rss_mb = rss_mb(agent.pid());
    results.nginx_rss_mb = tree_rss_mb(nginx.pid());
    drop(nginx);
    agent.stop()?;
    Ok(results)
}

// ---------------------------------------------------------------------------------------------------
// Report

fn ratio_of(k: &L7Kind, metric: &str) -> Option<Spread> {
    k.ratios.iter().find(|r| r.metric == metric)?.ratio
}

/// The L7 targets: a 90/10 route serves ≥ 1.0× nginx's requests per second (judged on the worse
/// of keep-alive and fresh connections), adds ≤ 0.2 ms at p50 and ≤ 1 ms at p99 over going direct (on
/// keep-alive connections, where direct is measured; paired per repetition), in ≤ 30 MB (the whole
/// agent's RSS, proxy included).
pub fn targets(r: Option<&L7Results>) -> Vec<Target> {
    let kind = |name: &str| r.and_then(|r| r.kinds.iter().find(|k| k.kind == name));
    let rps: Vec<(&str, Spread)> = ["persistent", "fresh"]
        .into_iter()
        .filter_map(|name| Some((name, ratio_of(kind(name)?, "rps")?)))
        .collect();
    let worst = rps
        .iter()
        .min_by(|a, b| a.1.median.total_cmp(&b.1.median))
        .map(|(_, s)| s.median);
    let mut throughput = super::report::judge_min(
        "L7 requests/s vs nginx (90/10 split)",
        "≥ 1.0×",
        worst,
        1.0,
        &r.map_or(String::new(), |r| {
            format!(
                "Weir/nginx paired per repetition, {} connections, one CPU per proxy; judged on the \
                 worse connection kind",
                r.connections
            )
        }),
    );
    if !rps.is_empty() {
        throughput.measured = rps
            .iter()
            .map(|(name, s)| format!("{}× {name}", s.fmt(2)))
            .collect::<Vec<_>>()
            .join("; ");
    }
    // Weir's latency minus direct's, repetition by repetition, in ms.
    let added = |metric: &str| {
        let k = kind("persistent")?;
        let of = |name: &str| k.proxies.iter().find(|p| p.proxy == name);
        let (weir, direct) = (of("Weir")?, of("direct")?);
        let (w, d) = match metric {
            "p50" => (&weir.p50_us, &direct.p50_us),
            _ => (&weir.p99_us, &direct.p99_us),
        };
        let diffs: Vec<f64> = w.iter().zip(d).map(|(w, d)| (w - d) / 1e3).collect();
        Spread::of(&diffs).map(|s| s.median)
    };
    let basis =
        "Weir minus direct (client to backend A, no proxy), paired per repetition, keep-alive";
    let p50 = super::report::judge_max(
        "L7 latency added over direct, p50",
        "≤ 0.2 ms",
        added("p50"),
        0.2,
        "ms",
        basis,
    );
    let p99 = super::report::judge_max(
        "L7 latency added over direct, p99",
        "≤ 1 ms",
        added("p99"),
        1.0,
        "ms",
        basis,
    );
    let memory = super::report::judge_max(
        "L7 proxy memory",
        "≤ 30 MB",
        r.and_then(|r| r.weir_agent_rss_mb),
        30.0,
        "MB",
        "VmRSS of the whole agent (loader, reconciler and proxy) after the rounds",
    );
    vec![throughput, p50, p99, memory]
}

fn cell(s: Option<Spread>, digits: usize) -> String {
    s.map_or_else(|| "–".to_owned(), |s| s.fmt(digits))
}

/// The report's L7 section.
pub fn section(md: &mut String, r: &L7Results) {
    let _ = writeln!(md, "## 5. L7: weighted HTTPRoute vs nginx\n");
    let _ = writeln!(
        md,
        "A client pod sends HTTP/1.1 GETs over {} concurrent connections through a {}/{} split between \
         two backend pods. **Weir**: an HTTPRoute on a Service; the client dials the ClusterIP and the TC \
         program steers the connection to the agent's L7 proxy, which picks a backend per request and \
         pools its backend connections. **nginx** ({}): the same split as `upstream {{ server A weight=9; \
         server B weight=1; keepalive 256; }}` (`proxy_http_version 1.1`, keep-alive limits raised, \
         `X-Forwarded-For` set as Weir sets it), run from the Debian package as its own process with its \
         own config in the lab's node namespace, dialled at its listen address on the node. Same \
         backends, same client pod, same load generator (a Rust HTTP/1.1 client on one thread, in xtask); \
         the proxies alternate within each repetition, rotating which goes first; repetitions: {}, of \
         {:.1} s per proxy and connection kind. **direct** is the client to backend A with no proxy: \
         what the load generator and backends serve on their own.\n",
        r.connections,
        r.weights.first().copied().unwrap_or(0),
        r.weights.get(1).copied().unwrap_or(0),
        r.nginx_version,
        r.reps,
        r.round_s
    );
    let _ = writeln!(
        md,
        "CPUs: each proxy gets CPU {} alone — every thread of the Weir agent is pinned there (its tokio \
         runtime has 2 workers, sharing that CPU), nginx runs `worker_processes 1` with \
         `worker_cpu_affinity` on it; the load generator and both backends share CPU {}. Latency is per \
         request at that concurrency (for fresh connections it includes connect and close).\n",
        r.proxy_cpu, r.load_cpu
    );
    for k in &r.kinds {
        let title = if k.kind == "fresh" {
            "New connection per request (connect, one request, close)"
        } else {
            "Persistent (keep-alive) connections"
        };
        let _ = writeln!(md, "### {title}\n");
        let _ = writeln!(
            md,
            "| proxy | requests/s | p50 µs | p99 µs | responses A / B | A share | errors |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for p in &k.proxies {
            let a = p.responses.get(BACKENDS[0].0).copied().unwrap_or(0);
            let b = p.responses.get(BACKENDS[1].0).copied().unwrap_or(0);
            let other: u64 = p
                .responses
                .iter()
                .filter(|(n, _)| !BACKENDS.iter().any(|(b, _)| b == n))
                .map(|(_, v)| *v)
                .sum();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {a} / {b}{} | {} | {}{} |",
                p.proxy,
                cell(p.spread("rps"), 0),
                cell(p.spread("p50_us"), 0),
                cell(p.spread("p99_us"), 0),
                if other > 0 {
                    format!(" (+{other} other)")
                } else {
                    String::new()
                },
                p.first_share()
                    .map_or_else(|| "–".to_owned(), |s| format!("{s:.1} %")),
                p.errors,
                p.first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (first: {e})")),
            );
        }
        let _ = writeln!(
            md,
            "\nWeir/nginx per repetition: requests/s {}×, p50 {}×, p99 {}×.\n",
            cell(ratio_of(k, "rps"), 2),
            cell(ratio_of(k, "p50_us"), 2),
            cell(ratio_of(k, "p99_us"), 2)
        );
    }
    let _ = writeln!(
        md,
        "Memory after the rounds (VmRSS): Weir agent {} MB (the whole agent: datapath loader, \
         reconciler and proxy); nginx {} MB (master and worker).\n",
        r.weir_agent_rss_mb.map_or_else(|| "–".to_owned(), num),
        r.nginx_rss_mb.map_or_else(|| "–".to_owned(), num)
    );
    let _ = writeln!(
        md,
        "The split: nginx's smooth weighted round robin sends exactly 9 in every 10 requests to A; \
         Weir deals each round of 10 requests as a shuffled deck of 9 A and 1 B (`l7/balance.rs`), so \
         both land on 90 % up to the rounds in flight when a run stops. The machine is shared: other \
         processes scheduled on the proxies' CPU show up as the long p99 tails, in both columns alike; \
         the paired ratios are the better guide.\n"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_incrementally() {
        let full = net::Framing::Http.reply("be-a", std::net::Ipv4Addr::UNSPECIFIED.into());
        for cut in 0..full.len() {
            assert_eq!(parse_response(&full[..cut]).unwrap(), None);
        }
        let (end, body) = parse_response(&full).unwrap().unwrap();
        assert_eq!((end, body), (full.len(), &b"be-a\n"[..]));
        assert!(parse_response(b"HTTP/1.1 503 Unavailable\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn nginx_conf_has_the_split_and_private_paths() {
        let conf = nginx_conf(
            Path::new("/tmp/x"),
            "169.254.1.1:8081".parse().unwrap(),
            0,
            &[
                ("10.0.0.10:8080".parse().unwrap(), 9),
                ("10.0.0.11:8080".parse().unwrap(), 1),
            ],
        );
        assert!(conf.contains("server 10.0.0.10:8080 weight=9;"));
        assert!(conf.contains("server 10.0.0.11:8080 weight=1;"));
        assert!(conf.contains("worker_processes 1;"));
        assert!(conf.contains("worker_cpu_affinity 1;"));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
        assert!(conf.contains("listen 169.254.1.1:8081;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
}
