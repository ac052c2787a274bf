//! The DaemonSet's capability set (read from `manifests/daemonset.yaml`) is enough and none of it is
//! spare: the real agent, run as root with exactly those capabilities (bounding, permitted, effective
//! and inheritable sets, no_new_privs, as a container runtime sets them for
//! `capabilities: {drop: [ALL], add: [...]}` and `allowPrivilegeEscalation: false`) and a read-only
//! root filesystem (`readOnlyRootFilesystem: true`), starts, programs and serves pods and host-network
//! clients; with any one of them taken away it does not.
//!
//! The bpffs and the cgroup v2 hierarchy are mounted beforehand, as the DaemonSet's hostPath volumes
//! provide them on a node, so the agent has nothing to mount.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_yaml::Value;
use weir_tests::scenario::{self, CLUSTER_IP, TCP_PORT, cluster_addr, parse_greeting};
use weir_tests::{Agent, Lab, client, netns};

const T: Duration = Duration::from_secs(2);

/// Capability names as the manifest writes them (`NET_ADMIN`), from the agent container.
fn manifest_capabilities() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("read the DaemonSet");
    let ds: Value = serde_yaml::from_str(&text).expect("DaemonSet YAML");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    let agent = containers
        .iter()
        .find(|c| c["name"] == "weir-agent")
        .expect("the weir-agent container");
    agent["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .collect()
}

/// A cgroup v2 mount of the host's hierarchy for `--cgroup-root`, unmounted on drop (before the lab,
/// which must never walk into it).
struct Cgroup2(PathBuf);

impl Cgroup2 {
    fn mount(lab: &Lab) -> Self {
        let dir = PathBuf::from(format!("/run/weir-tests-cgroup2-{}", lab.id()));
        std::fs::create_dir_all(&dir).expect("create the cgroup2 mount point");
        netns::run(
            "mount",
            &["-t", "cgroup2", "none", dir.to_str().expect("UTF-8")],
        )
        .expect("mount cgroup2");
        Self(dir)
    }
}

impl Drop for Cgroup2 {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cannot unmount {}: {e}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A wrapper that makes the root filesystem read-only (`readOnlyRootFilesystem`; the mount namespace is
/// the agent's own one from `ip netns exec`, so the host's stays writable) and then execs `setpriv`
/// leaving exactly `caps` (manifest spelling) in every set, with no_new_privs.
fn container_like(caps: &BTreeSet<String>) -> Vec<String> {
    let list: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "mount -o remount,bind,ro / && exec setpriv --bounding-set={list} --inh-caps={list} \
         --no-new-privs -- \"$@\""
    );
    vec!["sh".to_owned(), "-c".to_owned(), script, "sh".to_owned()]
}

/// The first lines of an error (the agent's log tail ends in a long backtrace).
fn headline(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let cut = text.find("Stack backtrace").unwrap_or(text.len());
    text[..cut].trim().to_owned()
}

/// Capability bits as `/proc/PID/status` shows them.
fn cap_bits(caps: &BTreeSet<String>) -> u64 {
    caps.iter()
        .map(|c| match c.as_str() {
            "CHOWN" => 0,
            "DAC_OVERRIDE" => 1,
            "NET_BIND_SERVICE" => 10,
            "NET_RAW" => 13,
            "NET_ADMIN" => 12,
            "IPC_LOCK" => 14,
            "SYS_RESOURCE" => 24,
            "SYS_ADMIN" => 21,
            "PERFMON" => 38,
            "BPF" => 39,
            other => panic!("no bit known for capability {other}"),
        })
        .fold(0, |bits, bit| bits | 1 << bit)
}

fn status_caps(pid: u32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| {
            let (name, hex) = l.split_once(':')?;
            Some((name.to_owned(), u64::from_str_radix(hex.trim(), 16).ok()?))
        })
        .collect()
}

/// What an agent with `caps` managed.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Healthy, and a pod and a host-network client were served through the ClusterIP.
    Served,
    /// Anything less, with why.
    Failed(String),
}

/// Runs the standard scene with the agent limited to `caps`; checks its capability sets are exactly
/// those and what it manages to do.
fn run_with(caps: &BTreeSet<String>) -> Outcome {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    scenario::write_echo_service(&lab, &backends.iter().collect::<Vec<_>>()).expect("echo");
    let cgroup = Cgroup2::mount(&lab);
    let wrapper = container_like(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let cgroup_root = cgroup.0.to_str().expect("UTF-8").to_owned();
    let mut agent = Agent::start_wrapped(
        &lab,
        &wrapper,
        &["--cgroup-root", &cgroup_root, "--keep-datapath-on-exit"],
    )
    .expect("start the agent");
    // The agent's own sets, read while it runs (a failing agent may already be gone).
    std::thread::sleep(Duration::from_millis(300));
    if agent.is_running() {
        let want = cap_bits(caps);
        for (set, bits) in status_caps(agent.pid()) {
            if set != "CapAmb" {
                assert_eq!(bits, want, "{set} of the agent run with {caps:?}");
            }
        }
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid()))
            .expect("agent mountinfo");
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .rfind(|f| f.get(4) == Some(&"/"))
            .expect("a root mount");
        assert!(
            root[5].split(',').any(|o| o == "ro"),
            "the agent's root is not read-only: {root:?}"
        );
    }
    if let Err(e) = agent.wait_healthy(scenario::HEALTHY_TIMEOUT) {
        return Outcome::Failed(headline(&e));
    }
    let served = |line: Result<String, weir_tests::ClientError>| -> Result<String, String> {
        let line = line.map_err(|e| e.to_string())?;
        parse_greeting(&line)
            .map(|(backend, _)| backend)
            .map_err(|e| e.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut pod_served = BTreeSet::new();
    while pod_served.len() < backends.len() && Instant::now() < deadline {
        match served(client.tcp_request(cluster_addr(TCP_PORT.0), T)) {
            Ok(backend) => {
                pod_served.insert(backend);
            }
            Err(e) => return Outcome::Failed(format!("pod through the ClusterIP: {e}")),
        }
    }
    if pod_served.len() < backends.len() {
        return Outcome::Failed(format!("pods reached only {pod_served:?}"));
    }
    // A host-network client: only the cgroup socket hooks translate for it.
    let addr = SocketAddr::from((CLUSTER_IP, TCP_PORT.0));
    let host = lab
        .in_node(|| client::tcp_request(addr, T))
        .expect("enter the node netns");
    if let Err(e) = served(host) {
        return Outcome::Failed(format!("host network through the ClusterIP: {e}"));
    }
    if !agent.log().contains("L7 proxy for HTTPRoutes listening") {
        return Outcome::Failed("no L7 proxy listener".to_owned());
    }
    if !agent.is_running() {
        return Outcome::Failed("exited".to_owned());
    }
    Outcome::Served
}

#[test]
fn the_daemonset_capabilities_suffice_and_each_is_needed() {
    let caps = manifest_capabilities();
    assert!(!caps.is_empty(), "the DaemonSet adds no capability");
    assert_eq!(
        run_with(&caps),
        Outcome::Served,
        "the agent with the DaemonSet's capabilities {caps:?}"
    );
    let mut spare = Vec::new();
    for cap in &caps {
        let fewer: BTreeSet<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let outcome = run_with(&fewer);
        println!("without {cap}: {outcome:?}");
        if outcome == Outcome::Served {
            spare.push(cap.clone());
        }
    }
    assert!(
        spare.is_empty(),
        "the agent works without {spare:?}: the DaemonSet grants more than it needs"
    );
}
