//! A backend pod's interface is deleted and recreated (same pod name, address and interface name, new
//! namespace and ifindex, as when a pod is deleted and its replacement lands on the node) while a client
//! streams connections through the ClusterIP. The agent must attach to the new interface: the recreated
//! backend's replies must be reverse-translated, so the client gets answers from it through the
//! ClusterIP. The other backends keep serving throughout, established connections to them survive, and
//! the agent never dies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_tests::client::{self, TcpConn};
use weir_tests::scenario::{self, HTTP_PORT, TCP_PORT, UDP_PORT, cluster_addr, parse_greeting};
use weir_tests::{Agent, Lab, Pod, metrics, netns};

/// Short, so a connection sent to the missing backend does not hold the stream up for long.
const T: Duration = Duration::from_secs(1);
/// How long the recreated backend may take to answer through the ClusterIP.
const REATTACH: Duration = Duration::from_secs(10);
/// The most time allowed between two answers from a backend that stays: the stream is serial, so a
/// connection towards the missing backend can block it for one timeout.
const MAX_GAP: Duration = Duration::from_secs(3);

/// Stops the client stream when dropped, also when the test fails half-way.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One connection of the stream: when it ended and who answered (or why it failed).
#[derive(Debug, Clone)]
struct Outcome {
    at: Instant,
    answer: Result<String, String>,
}

fn ifindex(lab: &Lab, iface: &str) -> u32 {
    let out = netns::ip(&["-n", lab.node_netns(), "-o", "link", "show", "dev", iface])
        .unwrap_or_else(|e| panic!("ip link show {iface}: {e:#}"));
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
}

fn pin(lab: &Lab, index: u32) -> std::path::PathBuf {
    lab.bpffs_dir()
        .expect("bpffs")
        .join("links")
        .join(format!("pod-ingress-{index}"))
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_running(agent: &mut Agent<'_>) {
    assert!(
        agent.is_running(),
        "the agent exited; log tail:\n{}",
        agent.log_tail(60)
    );
}

/// Established connections through the ClusterIP to each of `want`, kept open.
fn connections_to(client: &Pod, want: &[&Pod]) -> BTreeMap<String, TcpConn> {
    let mut conns = BTreeMap::new();
    for _ in 0..200 {
        if conns.len() == want.len() {
            return conns;
        }
        let mut conn = client
            .tcp_connect(cluster_addr(TCP_PORT.0), Duration::from_secs(2))
            .expect("connect through the ClusterIP");
        let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        if want.iter().any(|p| p.name() == backend) {
            conns.entry(backend).or_insert(conn);
        }
    }
    panic!("no connection to each of the kept backends in 200 tries");
}

#[test]
fn a_backend_interface_deleted_and_recreated_under_load_is_attached_again() {
    let lab = Lab::new().expect("lab");
    let (backends, client, mut agent) = scenario::start_standard(&lab).expect("standard scene");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    let mut kept = connections_to(&client, &[a, b]);

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let stream = {
        let (client, stop, outcomes) = (client.clone(), stop.clone(), outcomes.clone());
        std::thread::spawn(move || {
            client
                .run(|| {
                    let addr = cluster_addr(TCP_PORT.0);
                    while !stop.load(Ordering::Relaxed) {
                        let answer = client::tcp_request(addr, T)
                            .map_err(|e| e.to_string())
                            .and_then(|line| {
                                parse_greeting(&line)
                                    .map(|(backend, _)| backend)
                                    .map_err(|e| e.to_string())
                            });
                        let outcome = Outcome {
                            at: Instant::now(),
                            answer,
                        };
                        outcomes.lock().expect("outcomes").push(outcome);
                    }
                })
                .expect("enter the client's netns");
        })
    };
    let answered_by = |who: &str, after: Instant| {
        outcomes
            .lock()
            .expect("outcomes")
            .iter()
            .any(|o| o.at > after && o.answer.as_deref() == Ok(who))
    };
    let started = Instant::now();
    wait_until("the stream reaches every backend", REATTACH, || {
        [a, b, c].iter().all(|p| answered_by(p.name(), started))
    });

    // (deleted at, answered again at): failures are allowed only inside these windows.
    let mut windows = Vec::new();
    let mut current = c.clone();
    // The last cycle recreates at once, racing the agent's handling of the deletion.
    for pause in [
        Duration::from_millis(500),
        Duration::from_millis(200),
        Duration::ZERO,
    ] {
        let old_index = ifindex(&lab, current.node_iface());
        assert!(
            pin(&lab, old_index).exists(),
            "{} is attached",
            current.node_iface()
        );
        let deleted_at = Instant::now();
        lab.delete_pod(c.name()).expect("delete backend-c");
        std::thread::sleep(pause);
        current = lab.recreate_pod(&current).expect("recreate backend-c");
        current.serve_tcp(TCP_PORT.1).expect("serve TCP");
        current.serve_udp(UDP_PORT.1).expect("serve UDP");
        current.serve_http(HTTP_PORT.1).expect("serve HTTP");
        let recreated_at = Instant::now();
        let new_index = ifindex(&lab, current.node_iface());
        assert_ne!(new_index, old_index, "a new interface");

        wait_until(
            "the recreated backend answers through the ClusterIP",
            REATTACH,
            || answered_by(c.name(), recreated_at),
        );
        windows.push((deleted_at, Instant::now()));
        // Its replies come back translated on UDP too (a fresh connected socket accepts only replies
        // from the ClusterIP).
        wait_until(
            "UDP through the ClusterIP reaches backend-c",
            REATTACH,
            || {
                (0..10).any(|_| {
                    client
                        .udp_request(cluster_addr(UDP_PORT.0), T)
                        .is_ok_and(|r| r.line.starts_with(c.name()))
                })
            },
        );
        assert!(
            pin(&lab, new_index).exists(),
            "the new interface's link is pinned"
        );
        wait_until("the deleted interface's pin is removed", REATTACH, || {
            !pin(&lab, old_index).exists()
        });
        assert_running(&mut agent);
        for (backend, conn) in &mut kept {
            let echoed = conn
                .exchange("still there")
                .unwrap_or_else(|e| panic!("established connection to {backend}: {e}"));
            assert_eq!(echoed, format!("{backend} still there"));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    stream.join().expect("stream thread");
    let outcomes = outcomes.lock().expect("outcomes").clone();

    let inside = |at: Instant| {
        windows
            .iter()
            .any(|(from, to)| at >= *from && at <= *to + T)
    };
    let stray: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.answer.is_err() && !inside(o.at))
        .collect();
    assert!(
        stray.is_empty(),
        "failures outside the disruptions: {stray:#?}"
    );
    for kept_backend in [a, b] {
        let times: Vec<Instant> = outcomes
            .iter()
            .filter(|o| o.answer.as_deref() == Ok(kept_backend.name()))
            .map(|o| o.at)
            .collect();
        let gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(Duration::MAX);
        assert!(
            gap < MAX_GAP,
            "{} went {gap:?} without answering ({} answers)",
            kept_backend.name(),
            times.len()
        );
    }
    let failures = outcomes.iter().filter(|o| o.answer.is_err()).count();
    println!(
        "{} connections, {failures} failed inside {} disruptions",
        outcomes.len(),
        windows.len()
    );
    // Three backends and the client pod: the deleted interfaces are gone from the count.
    wait_until("weir_attached_interfaces is 4", REATTACH, || {
        metrics::scrape(&lab)
            .ok()
            .and_then(|m| metrics::sample(&m, "weir_attached_interfaces"))
            == Some(4.0)
    });
    assert!(
        !agent.log().contains("panicked"),
        "no panic in the agent's log"
    );
    assert_running(&mut agent);
}
