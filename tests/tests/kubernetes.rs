//! Kubernetes mode end to end: the real agent (`--kubeconfig`) follows the API server simulator
//! (`weir_tests::apiserver`) inside each lab's node namespace, and every test checks convergence through
//! real traffic from a client pod and through the agent's `/state`: objects added, updated and deleted
//! after start, bookmarks, 410 Gone and re-listing (including deletions missed while disconnected),
//! dropped watch connections, and an API server that is not up yet when the agent starts.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use weir_agent::state::AgentState;
use weir_tests::apiserver::{self, ApiServer, Verb};
use weir_tests::lab::GATEWAY;
use weir_tests::scenario::{
    self, CLUSTER_IP, HEALTHY_TIMEOUT, HTTP_PORT, TCP_PORT, Tally, UDP_PORT, cluster_addr,
    parse_greeting, ready,
};
use weir_tests::{Lab, Pod, agent_binary, client};

const NODE: &str = "node-a";
/// Where the simulator listens inside the node namespace (each lab has its own, so no clashes).
const API_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 6443);
/// The agent's default metrics address, which serves `/state`.
const METRICS_ADDR: &str = "127.0.0.1:10249";
const HEALTH_ADDR: &str = "127.0.0.1:10256";
/// How long a change may take to be programmed: the agent coalesces for `--min-sync-period` (100ms), but
/// after watch errors kube-rs's backoff delays the re-watch or re-list (1–4 s seen after a 410).
const CONVERGE: Duration = Duration::from_secs(20);
const T: Duration = Duration::from_secs(2);
/// A second ClusterIP, for a Service that goes away while the agent is cut off.
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// The agent in Kubernetes mode. `weir_tests::Agent::start` always passes `--config-dir`, which the agent
/// rejects together with `--kubeconfig`, so this is a minimal launcher with the same conventions (log in
/// the lab dir, SIGTERM on drop, log tail when a test fails).
struct KubeAgent<'lab> {
    lab: &'lab Lab,
    child: Child,
    log_path: PathBuf,
}

impl<'lab> KubeAgent<'lab> {
    fn start(lab: &'lab Lab, kubeconfig: &Path) -> Self {
        let bin = agent_binary().expect("agent binary");
        // `agent_binary` prefers target/release: make a stale one fail clearly, not as a usage error.
        let help = Command::new(&bin)
            .arg("--help")
            .output()
            .expect("agent --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("--kubeconfig"),
            "{} has no --kubeconfig: rebuild it or point WEIR_AGENT_BIN at a current build",
            bin.display()
        );
        let bpffs = lab.bpffs_dir().expect("bpffs");
        let log_path = lab.dir().join("kube-agent.log");
        let log = File::create(&log_path).expect("agent log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab.node_netns()])
            .arg(&bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", NODE])
            .args(["--pod-iface-prefix", lab.pod_iface_prefix()])
            .arg("--bpffs-dir")
            .arg(&bpffs)
            .args(["--min-sync-period", "100ms"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,kube=debug")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: prctl is async-signal-safe and touches no parent memory. A test process killed outright
        // takes the agent with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn the agent");
        eprintln!(
            "kubernetes: started {} (pid {}) in {}, log {}",
            bin.display(),
            child.id(),
            lab.node_netns(),
            log_path.display()
        );
        Self {
            lab,
            child,
            log_path,
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn get(&self, addr: &str, path: &str) -> Option<client::HttpResponse> {
        let addr: SocketAddr = addr.parse().expect("address");
        self.lab
            .in_node(|| client::http_get(addr, path, T))
            .ok()
            .and_then(Result::ok)
    }

    /// `/healthz`'s status code, `None` when it does not answer.
    fn healthz(&self) -> Option<u16> {
        self.get(HEALTH_ADDR, "/healthz").map(|r| r.status)
    }

    /// `GET /state` (metrics address), `None` when it does not answer.
    fn state(&self) -> Option<AgentState> {
        let resp = self.get(METRICS_ADDR, "/state")?;
        assert_eq!(resp.status, 200, "/state: {}", resp.body);
        Some(serde_json::from_str(&resp.body).expect("/state is AgentState JSON"))
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("agent exited ({status}); log tail:\n{}", self.log_tail(60));
        }
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        while self.healthz() != Some(200) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "agent not healthy after {HEALTHY_TIMEOUT:?} (last: {:?})",
                self.healthz()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for KubeAgent<'_> {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- weir-agent log tail ({}) -----\n{}\n----- end of agent log -----",
                self.log_path.display(),
                self.log_tail(100)
            );
        }
    }
}

/// A lab with the standard backends and client, the simulator in the node namespace holding this node's
/// Node object, and a kubeconfig for it.
struct Scene {
    api: ApiServer,
    backends: Vec<Pod>,
    client: Pod,
    kubeconfig: PathBuf,
}

fn scene(lab: &Lab) -> Scene {
    let (backends, client) = scenario::add_standard_pods(lab).expect("pods");
    let api = ApiServer::start_in_netns(lab.node_netns(), API_ADDR).expect("API server");
    api.apply(apiserver::node(NODE, GATEWAY)).expect("node");
    let kubeconfig = lab.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    Scene {
        api,
        backends,
        client,
        kubeconfig,
    }
}

/// The echo Service and its slice with `endpoints` ready, at `ip`.
fn echo(name: &str, ip: Ipv4Addr, endpoints: &[&Pod]) -> Vec<Value> {
    apiserver::echo_service(name, ip, &ready(endpoints)).expect("echo objects")
}

/// The echo objects with every `"port": from` of the Service replaced (a port change).
fn with_service_port(mut objects: Vec<Value>, from: u16, to: u16) -> Vec<Value> {
    if let Some(ports) = objects[0]["spec"]["ports"].as_array_mut() {
        for p in ports.iter_mut().filter(|p| p["port"] == from) {
            p["port"] = Value::from(to);
        }
    }
    objects
}

/// Ready backends (`ip:port`) the agent has programmed for `ip:port/proto`, `None` if no such frontend.
fn programmed(
    state: &AgentState,
    ip: Ipv4Addr,
    port: u16,
    proto: &str,
) -> Option<BTreeSet<String>> {
    state
        .frontends
        .iter()
        .find(|f| f.ip == ip.to_string() && f.port == port && f.protocol == proto)
        .map(|f| f.backends.iter().cloned().collect())
}

fn endpoints(pods: &[&Pod], port: u16) -> BTreeSet<String> {
    pods.iter().map(|p| format!("{}:{port}", p.ip())).collect()
}

/// The last simulator requests, for failure messages.
fn recent_requests(api: &ApiServer) -> String {
    let reqs = api.requests();
    reqs[reqs.len().saturating_sub(15)..]
        .iter()
        .map(|r| {
            format!(
                "{:?} {} {}{} -> {}",
                r.verb,
                r.path,
                r.param("resourceVersion").unwrap_or("-"),
                if r.expired { " (410)" } else { "" },
                r.status
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `/state` until `done` holds.
fn wait_state(
    agent: &mut KubeAgent<'_>,
    api: &ApiServer,
    what: &str,
    done: impl Fn(&AgentState) -> bool,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        agent.assert_running();
        let state = agent.state();
        if state.as_ref().is_some_and(&done) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "agent did not converge ({what}) within {CONVERGE:?}; state: {state:#?}\nlast requests:\n{}",
                recent_requests(api)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the TCP frontend of `ip` has exactly `pods` as backends.
fn wait_backends(agent: &mut KubeAgent<'_>, api: &ApiServer, ip: Ipv4Addr, pods: &[&Pod]) {
    let want = endpoints(pods, TCP_PORT.1);
    wait_state(agent, api, &format!("{ip} -> {want:?}"), |s| {
        programmed(s, ip, TCP_PORT.0, "TCP").as_ref() == Some(&want)
    });
}

/// `n` fresh TCP connections from `client` to `addr`; who answered.
fn tcp_tally(client: &Pod, addr: SocketAddr, n: usize) -> Tally {
    client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                let line = client::tcp_request(addr, T)
                    .unwrap_or_else(|e| panic!("connection {i} of {n} to {addr}: {e}"));
                let (backend, _) = parse_greeting(&line).expect("greeting");
                tally.add(&backend);
            }
            tally
        })
        .expect("enter client netns")
}

/// Asserts that 60 connections to `addr` are answered by exactly `pods`, every one of them.
fn assert_served_by(client: &Pod, addr: SocketAddr, pods: &[&Pod]) {
    let tally = tcp_tally(client, addr, 60);
    let got: BTreeSet<&str> = tally.0.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = pods.iter().map(|p| p.name()).collect();
    assert_eq!(got, want, "backends answering {addr}: {tally}");
}

/// Asserts that a TCP connection to `addr` fails (nothing serves it any more).
fn assert_not_served(client: &Pod, addr: SocketAddr) {
    if let Ok(line) = client.tcp_request(addr, Duration::from_secs(1)) {
        panic!("{addr} still answers: {line:?}");
    }
}

fn start_converged<'l>(lab: &'l Lab, s: &Scene, pods: &[&Pod]) -> KubeAgent<'l> {
    s.api
        .apply_all(echo("echo", CLUSTER_IP, pods))
        .expect("echo");
    let mut agent = KubeAgent::start(lab, &s.kubeconfig);
    agent.wait_healthy();
    wait_backends(&mut agent, &s.api, CLUSTER_IP, pods);
    agent
}

/// Waits until the agent watches every kind it follows.
fn wait_watching(api: &ApiServer) {
    for resource in ["services", "endpointslices", "nodes", "httproutes"] {
        api.wait_for_watches(resource, 1, CONVERGE)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn all(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter().collect()
}

#[test]
fn a_service_and_slice_created_after_start_are_served_by_every_backend() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = KubeAgent::start(&lab, &s.kubeconfig);
    agent.wait_healthy();
    let state = agent.state().expect("state");
    assert!(state.synced, "{state:#?}");
    assert!(
        state.frontends.is_empty(),
        "nothing to program yet: {state:#?}"
    );
    assert_eq!(state.node_name, NODE);

    s.api
        .apply_all(echo("echo", CLUSTER_IP, &all(&s.backends)))
        .expect("echo");
    wait_backends(&mut agent, &s.api, CLUSTER_IP, &all(&s.backends));
    let state = agent.state().expect("state");
    assert_eq!(
        programmed(&state, CLUSTER_IP, UDP_PORT.0, "UDP"),
        Some(endpoints(&all(&s.backends), UDP_PORT.1))
    );
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &all(&s.backends));
    let reply = s
        .client
        .udp_request(cluster_addr(UDP_PORT.0), T)
        .expect("UDP through the ClusterIP");
    assert!(reply.line.starts_with("backend-"), "{reply:?}");
    // The agent listed each kind once and is watching it.
    for resource in ["services", "endpointslices", "nodes"] {
        assert_eq!(s.api.count(Verb::List, resource), 1, "{resource}");
        assert!(s.api.open_watches(resource) >= 1, "{resource} watched");
    }
    let node_watch = s
        .api
        .requests()
        .into_iter()
        .find(|r| r.verb == Verb::Watch && r.resource == Some("nodes"))
        .expect("node watch");
    assert_eq!(
        node_watch.param("fieldSelector"),
        Some("metadata.name=node-a"),
        "only its own Node"
    );
}

#[test]
fn an_endpoint_removed_from_its_slice_gets_no_new_connections_and_a_port_change_moves_the_frontend()
{
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = start_converged(&lab, &s, &all(&s.backends));
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &all(&s.backends));

    let (a, b) = (&s.backends[0], &s.backends[1]);
    s.api
        .apply_all(echo("echo", CLUSTER_IP, &[a, b]))
        .expect("slice without backend-c");
    wait_backends(&mut agent, &s.api, CLUSTER_IP, &[a, b]);
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &[a, b]);

    // The Service's TCP port moves from 80 to 81.
    s.api
        .apply_all(with_service_port(
            echo("echo", CLUSTER_IP, &[a, b]),
            TCP_PORT.0,
            81,
        ))
        .expect("port change");
    let want = endpoints(&[a, b], TCP_PORT.1);
    wait_state(&mut agent, &s.api, "port 80 -> 81", |st| {
        programmed(st, CLUSTER_IP, 81, "TCP").as_ref() == Some(&want)
            && programmed(st, CLUSTER_IP, TCP_PORT.0, "TCP").is_none()
    });
    assert_served_by(&s.client, SocketAddr::from((CLUSTER_IP, 81)), &[a, b]);
    assert_not_served(&s.client, cluster_addr(TCP_PORT.0));
}

#[test]
fn a_deleted_service_stops_answering_and_leaves_the_state() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = start_converged(&lab, &s, &all(&s.backends));
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &all(&s.backends));

    s.api.delete("Service", "default", "echo").expect("delete");
    wait_state(&mut agent, &s.api, "echo gone", |st| {
        !st.frontends.iter().any(|f| f.service == "default/echo")
    });
    assert_not_served(&s.client, cluster_addr(TCP_PORT.0));
    // The orphaned slice alone programs nothing; deleting it changes nothing either.
    s.api
        .delete("EndpointSlice", "default", "echo-1")
        .expect("delete slice");
    std::thread::sleep(Duration::from_millis(500));
    let state = agent.state().expect("state");
    assert!(state.frontends.is_empty(), "{state:#?}");
    assert_eq!(agent.healthz(), Some(200));
}

#[test]
fn bookmarks_are_accepted_and_later_changes_still_apply() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = start_converged(&lab, &s, &all(&s.backends));
    wait_watching(&s.api);
    let (lists, watches) = (
        s.api.count(Verb::List, "services"),
        s.api.count(Verb::Watch, "services"),
    );

    // Writes to other kinds move the global version; only bookmarks carry it to the Service watch.
    for i in 0..5 {
        s.api
            .apply(apiserver::node(
                &format!("node-{i}x"),
                Ipv4Addr::new(192, 168, 1, i),
            ))
            .expect("other node");
        s.api.send_bookmarks();
        std::thread::sleep(Duration::from_millis(100));
    }
    let bookmark_rv = s.api.resource_version();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.healthz(), Some(200), "still healthy after bookmarks");
    assert_eq!(s.api.count(Verb::List, "services"), lists, "no re-list");
    assert_eq!(s.api.count(Verb::Watch, "services"), watches, "same watch");
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &all(&s.backends));

    let (a, b) = (&s.backends[0], &s.backends[1]);
    s.api
        .apply_all(echo("echo", CLUSTER_IP, &[a, b]))
        .expect("slice change");
    wait_backends(&mut agent, &s.api, CLUSTER_IP, &[a, b]);
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &[a, b]);

    // The agent's Service watcher kept the bookmark's version: after a cut it resumes from there.
    s.api.drop_watches();
    s.api
        .wait_for_watches("services", 1, CONVERGE)
        .expect("re-watch");
    let rewatch = s
        .api
        .requests()
        .into_iter()
        .rfind(|r| r.verb == Verb::Watch && r.resource == Some("services"))
        .expect("services re-watch");
    assert_eq!(
        rewatch.param("resourceVersion"),
        Some(bookmark_rv.to_string().as_str()),
        "the Service watch resumes from the last bookmark"
    );
    assert!(!rewatch.expired);
}

#[test]
fn after_410_gone_the_agent_relists_and_converges_to_the_new_state() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = start_converged(&lab, &s, &all(&s.backends));
    wait_watching(&s.api);
    let lists = s.api.count(Verb::List, "endpointslices");

    s.api.compact();
    assert_eq!(
        s.api.drop_watches(),
        5,
        "services, slices, node, routes and fault injections were watched"
    );
    let (a, c) = (&s.backends[0], &s.backends[2]);
    s.api
        .apply_all(echo("echo", CLUSTER_IP, &[a, c]))
        .expect("slice change");
    wait_backends(&mut agent, &s.api, CLUSTER_IP, &[a, c]);
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &[a, c]);

    let reqs = s.api.requests();
    for resource in ["services", "endpointslices"] {
        assert!(
            reqs.iter()
                .any(|r| r.verb == Verb::Watch && r.resource == Some(resource) && r.expired),
            "the {resource} re-watch was answered 410:\n{}",
            recent_requests(&s.api)
        );
    }
    assert!(
        s.api.count(Verb::List, "endpointslices") > lists,
        "the agent re-listed EndpointSlices after the 410:\n{}",
        recent_requests(&s.api)
    );
    assert_eq!(agent.healthz(), Some(200));
}

#[test]
fn changes_missed_while_cut_off_including_deletions_are_reconciled_from_the_relist() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let (a, b, c) = (&s.backends[0], &s.backends[1], &s.backends[2]);
    s.api
        .apply_all(echo("other", OTHER_IP, &[b]))
        .expect("other");
    let mut agent = start_converged(&lab, &s, &[a, b, c]);
    wait_backends(&mut agent, &s.api, OTHER_IP, &[b]);
    assert_served_by(&s.client, SocketAddr::from((OTHER_IP, TCP_PORT.0)), &[b]);
    let lists = (
        s.api.count(Verb::List, "services"),
        s.api.count(Verb::List, "endpointslices"),
    );

    // A partition: no watch event reaches the agent. Meanwhile "other" is deleted, echo loses c, and the
    // history of both is compacted away, so the agent can only learn of them by re-listing.
    s.api.set_reachable(false);
    s.api.delete("Service", "default", "other").expect("delete");
    s.api
        .delete("EndpointSlice", "default", "other-1")
        .expect("delete slice");
    s.api
        .apply_all(echo("echo", CLUSTER_IP, &[a, b]))
        .expect("slice change");
    s.api.compact();
    std::thread::sleep(Duration::from_secs(1));
    // The last programmed state keeps serving meanwhile.
    assert_served_by(&s.client, SocketAddr::from((OTHER_IP, TCP_PORT.0)), &[b]);
    s.api.set_reachable(true);

    wait_state(&mut agent, &s.api, "other gone, echo on a and b", |st| {
        programmed(st, OTHER_IP, TCP_PORT.0, "TCP").is_none()
            && programmed(st, CLUSTER_IP, TCP_PORT.0, "TCP") == Some(endpoints(&[a, b], TCP_PORT.1))
    });
    assert_not_served(&s.client, SocketAddr::from((OTHER_IP, TCP_PORT.0)));
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &[a, b]);
    assert!(
        s.api.count(Verb::List, "services") > lists.0
            && s.api.count(Verb::List, "endpointslices") > lists.1,
        "re-listed both:\n{}",
        recent_requests(&s.api)
    );
    assert!(
        s.api
            .requests()
            .iter()
            .any(|r| r.verb == Verb::Watch && r.expired),
        "a watch got 410"
    );
}

#[test]
fn a_dropped_watch_connection_is_resumed_from_the_last_version_without_relisting() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let mut agent = start_converged(&lab, &s, &all(&s.backends));
    wait_watching(&s.api);
    let lists = (
        s.api.count(Verb::List, "services"),
        s.api.count(Verb::List, "endpointslices"),
    );
    let watches = s.api.count(Verb::Watch, "endpointslices");
    let seen_rv = s.api.resource_version();

    // Services, EndpointSlices, the Node, HTTPRoutes and HTTPFaultInjections.
    assert_eq!(s.api.drop_watches(), 5);
    let (b, c) = (&s.backends[1], &s.backends[2]);
    s.api
        .apply_all(echo("echo", CLUSTER_IP, &[b, c]))
        .expect("slice change");
    wait_backends(&mut agent, &s.api, CLUSTER_IP, &[b, c]);
    assert_served_by(&s.client, cluster_addr(TCP_PORT.0), &[b, c]);

    assert_eq!(
        (
            s.api.count(Verb::List, "services"),
            s.api.count(Verb::List, "endpointslices")
        ),
        lists,
        "no re-list:\n{}",
        recent_requests(&s.api)
    );
    let rewatches: Vec<_> = s
        .api
        .requests()
        .into_iter()
        .filter(|r| r.verb == Verb::Watch && r.resource == Some("endpointslices"))
        .skip(watches)
        .collect();
    assert!(!rewatches.is_empty(), "re-watched");
    for r in &rewatches {
        let rv: u64 = r
            .param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("re-watch without a version: {r:?}"));
        assert!(
            rv > 0 && rv <= seen_rv && !r.expired,
            "re-watch from the last version seen ({rv}, server was at {seen_rv}): {r:?}"
        );
    }
}

#[test]
fn an_agent_started_before_the_api_server_is_unhealthy_until_it_is_up_then_converges() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let kubeconfig = lab.dir().join("kubeconfig");
    apiserver::write_kubeconfig(&kubeconfig, &format!("http://{API_ADDR}")).expect("kubeconfig");
    let mut agent = KubeAgent::start(&lab, &kubeconfig);

    // Nothing listens for 3 s: never healthy, and 503 once the health endpoint is up.
    let mut answers = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        agent.assert_running();
        answers.insert(agent.healthz());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !answers.contains(&Some(200)),
        "healthy without an API server: {answers:?}"
    );
    assert!(
        answers.contains(&Some(503)),
        "/healthz answered {answers:?}"
    );

    let api = ApiServer::start_in_netns(lab.node_netns(), API_ADDR).expect("API server");
    api.apply(apiserver::node(NODE, GATEWAY)).expect("node");
    api.apply_all(echo("echo", CLUSTER_IP, &all(&backends)))
        .expect("echo");
    agent.wait_healthy();
    wait_backends(&mut agent, &api, CLUSTER_IP, &all(&backends));
    assert_served_by(&client, cluster_addr(TCP_PORT.0), &all(&backends));
}

/// HTTPRoutes and Weir's HTTPFaultInjection from the API: the fault's abort answers through the
/// steered ClusterIP, and the agent writes `status.parents` (Accepted, ResolvedRefs with the spec's
/// reasons) through a merge patch of the status subresource, keeping other controllers' entries.
#[test]
fn httproutes_from_the_api_get_fault_injection_and_status() {
    let lab = Lab::new().expect("lab");
    let s = scene(&lab);
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default, generation: 3}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8000}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /abort}}]
    filters: [{type: ExtensionRef, extensionRef: {group: weir.dev, kind: HTTPFaultInjection, name: boom}}]
    backendRefs: [{name: echo, port: 8000}]
  - backendRefs: [{name: echo, port: 8000}, {name: nosuch, port: 80, weight: 0}]
status:
  parents:
  - parentRef: {name: some-gateway}
    controllerName: example.com/gateway
    conditions: [{type: Accepted, status: "True", reason: Accepted, message: "", lastTransitionTime: "2024-01-01T00:00:00Z"}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: gone}]
  rules: [{backendRefs: [{name: echo, port: 8000}]}]
---
apiVersion: weir.dev/v1alpha1
kind: HTTPFaultInjection
metadata: {name: boom, namespace: default}
spec: {abort: {httpStatus: 503}}
"#;
    s.api
        .apply_all(apiserver::from_yaml(route).expect("yaml"))
        .expect("routes");
    let _agent = start_converged(&lab, &s, &all(&s.backends));
    let addr = scenario::cluster_addr(HTTP_PORT.0);
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = s.client.http_get(addr, "/abort", T).expect("abort");
        if r.status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "the fault never applied: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ok = s.client.http_get(addr, "/", T).expect("/");
    assert_eq!(ok.status, 200, "{ok:?}");

    let conditions = |route: &str| -> Option<Vec<(String, String, String)>> {
        let obj = s.api.get("HTTPRoute", "default", route).expect("get")?;
        let parents = obj["status"]["parents"].as_array()?.clone();
        let ours = parents
            .iter()
            .find(|p| p["controllerName"] == "weir.dev/l7")?
            .clone();
        Some(
            ours["conditions"]
                .as_array()?
                .iter()
                .map(|c| {
                    let f = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                    (f("type"), f("status"), f("reason"))
                })
                .collect(),
        )
    };
    let c = |a: &str, b: &str, r: &str| (a.to_owned(), b.to_owned(), r.to_owned());
    let deadline = Instant::now() + CONVERGE;
    while conditions("r").is_none() || conditions("orphan").is_none() {
        assert!(
            Instant::now() < deadline,
            "no status written; requests:\n{}",
            recent_requests(&s.api)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        conditions("r").expect("r"),
        [
            c("Accepted", "True", "Accepted"),
            c("ResolvedRefs", "False", "BackendNotFound")
        ]
    );
    assert_eq!(
        conditions("orphan").expect("orphan")[0],
        c("Accepted", "False", "NoMatchingParent")
    );
    let obj = s
        .api
        .get("HTTPRoute", "default", "r")
        .expect("get")
        .expect("r");
    let parents = obj["status"]["parents"].as_array().expect("parents");
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "example.com/gateway"),
        "another controller's entry must be kept: {parents:?}"
    );
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "weir.dev/l7")
        .expect("ours");
    assert_eq!(ours["parentRef"]["name"], "echo");
    assert!(
        s.api.count(Verb::Patch, "httproutes") >= 2,
        "{}",
        recent_requests(&s.api)
    );

    // Fixing the route (dropping the missing backend) turns ResolvedRefs true.
    s.api
        .apply_all(
            apiserver::from_yaml(&route.replace(", {name: nosuch, port: 80, weight: 0}", ""))
                .expect("yaml"),
        )
        .expect("fixed route");
    let deadline = Instant::now() + CONVERGE;
    while conditions("r").and_then(|cs| cs.get(1).cloned())
        != Some(c("ResolvedRefs", "True", "ResolvedRefs"))
    {
        assert!(
            Instant::now() < deadline,
            "status not updated: {:?}",
            conditions("r")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
