//! The API server goes away for 60 s (stopped: every connection closed, new ones refused) and comes back
//! on the same address. The agent must keep the datapath serving the last programmed state throughout,
//! stay up, and once the server is back pick up a change made there, within kube-rs's watch backoff.
//!
//! `/healthz` semantics under an outage (kube-proxy's): health means "every change received was
//! programmed in time", so an unreachable API server, which delivers no change, leaves the agent healthy
//! (200). A 503 would make the kubelet restart an agent that is serving correctly, and a restarted agent
//! could not list anything either.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weir_tests::apiserver::{self, ApiServer, Verb};
use weir_tests::lab::GATEWAY;
use weir_tests::scenario::{self, CLUSTER_IP, TCP_PORT, Tally, cluster_addr, parse_greeting};
use weir_tests::{Agent, Lab, Pod, client};

const NODE: &str = "node-a";
const API_ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 6443);
const T: Duration = Duration::from_secs(2);
const OUTAGE: Duration = Duration::from_secs(60);
/// How often traffic and health are checked while the server is down.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// kube-rs's default watcher backoff (client-go's) doubles from 0.8 s to at most 30 s and adds jitter
/// of up to the delay itself, so after a minute of failures the next attempt can be up to 60 s away.
/// Then the watch resumes and the change is programmed: a generous deadline on top.
const RECONNECT: Duration = Duration::from_secs(90);

/// `n` fresh connections to the ClusterIP from `client`; who answered. Every connection must succeed.
fn tally(client: &Pod, n: usize) -> Tally {
    let addr = cluster_addr(TCP_PORT.0);
    client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                let line = client::tcp_request(addr, T)
                    .unwrap_or_else(|e| panic!("connection {i} of {n} to {addr}: {e}"));
                tally.add(&parse_greeting(&line).expect("greeting").0);
            }
            tally
        })
        .expect("enter the client's netns")
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_owned()).collect()
}

fn assert_running(agent: &mut Agent<'_>, when: &str) {
    assert!(
        agent.is_running(),
        "the agent exited {when}; log tail:\n{}",
        agent.log_tail(60)
    );
}

#[test]
fn api_server_outage_of_60s_keeps_serving_and_reconnects() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    let mut api = ApiServer::start_in_netns(lab.node_netns(), API_ADDR).expect("API server");
    api.apply(apiserver::node(NODE, GATEWAY)).expect("node");
    api.apply_all(
        apiserver::echo_service("echo", CLUSTER_IP, &scenario::ready(&[a, b, c])).expect("echo"),
    )
    .expect("apply echo");
    let kubeconfig = lab.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let kubeconfig = kubeconfig.to_str().expect("UTF-8 path").to_owned();
    let mut agent = lab
        .start_agent(&["--kubeconfig", &kubeconfig, "--node-name", NODE])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tally(&client, 30).0.len() < 3 {
        assert!(Instant::now() < deadline, "echo never served by a, b and c");
        std::thread::sleep(Duration::from_millis(200));
    }
    for resource in ["services", "endpointslices"] {
        api.wait_for_watches(resource, 1, Duration::from_secs(20))
            .expect("the agent watches");
    }
    let watches_before = api.count(Verb::Watch, "endpointslices");

    api.stop();
    let down_since = Instant::now();
    // Connections are refused, as with a stopped process (not a partition that accepts and closes).
    let refused = lab
        .in_node(|| std::net::TcpStream::connect_timeout(&API_ADDR, T))
        .expect("enter the node netns");
    assert!(refused.is_err(), "the stopped API server still accepts");

    let mut health = BTreeSet::new();
    let mut probes = 0;
    loop {
        assert_running(&mut agent, "during the API server outage");
        let served = tally(&client, 30);
        let got: BTreeSet<String> = served.0.keys().cloned().collect();
        assert_eq!(
            got,
            names(&[a, b, c]),
            "{:?} into the outage the last state must keep serving: {served}",
            down_since.elapsed()
        );
        health.insert(agent.healthz().map_err(|e| e.to_string()));
        probes += 1;
        if down_since.elapsed() >= OUTAGE {
            break;
        }
        std::thread::sleep(PROBE_EVERY.min(OUTAGE.saturating_sub(down_since.elapsed())));
    }
    println!(
        "{probes} checks during {:?} of outage",
        down_since.elapsed()
    );
    assert!(probes >= 6, "only {probes} checks during the outage");
    assert_eq!(
        health,
        BTreeSet::from([Ok(200)]),
        "/healthz during the outage: nothing was received, so nothing is overdue"
    );
    let log = agent.log();
    assert!(
        log.contains("watch failed, retrying"),
        "the agent logs the failing watches"
    );
    assert!(
        !log.contains("panicked"),
        "a panic in the agent's log:\n{}",
        agent.log_tail(60)
    );

    api.restart_in_netns(lab.node_netns())
        .expect("API server back on the same address");
    let back_at = Instant::now();
    // The change is written once the server is back, so only a reconnected agent can learn it.
    api.apply_all(
        apiserver::echo_service("echo", CLUSTER_IP, &scenario::ready(&[a, b])).expect("echo"),
    )
    .expect("slice without c");
    let want = names(&[a, b]);
    let converged_after = loop {
        assert_running(&mut agent, "after the API server came back");
        let served = tally(&client, 30);
        let got: BTreeSet<String> = served.0.keys().cloned().collect();
        if got == want {
            break back_at.elapsed();
        }
        assert!(
            back_at.elapsed() < RECONNECT,
            "backend-c still served {RECONNECT:?} after the API server came back: {served}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("the change made after the outage was served after {converged_after:?}");
    // Served only by a and b from now on, and healthy.
    let served = tally(&client, 60);
    assert_eq!(served.get(c.name()), 0, "{served}");
    assert_eq!(agent.healthz().ok(), Some(200), "healthy after the outage");
    assert!(
        api.count(Verb::Watch, "endpointslices") > watches_before,
        "the slices were watched again"
    );
    assert_running(&mut agent, "at the end");
}
