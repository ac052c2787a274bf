//! Restart without disruption: the agent is SIGKILLed and restarted while long-lived TCP streams and UDP
//! flows run through a ClusterIP (from a pod) and a NodePort (from a host outside the node). Pinned maps
//! and pinned program links keep the datapath serving while no agent runs; the new agent adopts them
//! (replacing the program atomically) and keeps conntrack state.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use weir_tests::{
    Lab, Pod,
    scenario::{
        self, EXTERNAL_IFACE, NODE_IP, NODE_PORTS, TCP_PORT, UDP_PORT, cluster_addr, parse_greeting,
    },
};

const T: Duration = Duration::from_secs(2);
/// Pace of every flow: fast enough that the kill and the restart land mid-stream many times over.
const TICK: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
struct FlowReport {
    what: String,
    sent: usize,
    answered: usize,
    backends: BTreeSet<String>,
    errors: Vec<String>,
}

/// A long-lived TCP connection to `addr`: every line must come back, in order, from the same backend.
fn tcp_stream(pod: &Pod, addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<FlowReport> {
    let mut conn = pod.tcp_connect(addr, T).expect("connect");
    let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
    let what = format!("TCP {} -> {addr}", pod.name());
    thread::spawn(move || {
        let mut r = FlowReport {
            what,
            ..FlowReport::default()
        };
        r.backends.insert(backend.clone());
        while !stop.load(Ordering::Relaxed) {
            let line = format!("seq {}", r.sent);
            r.sent += 1;
            match conn.exchange(&line) {
                Ok(reply) if reply == format!("{backend} {line}") => r.answered += 1,
                Ok(reply) => r.errors.push(format!("{line}: wrong reply {reply:?}")),
                Err(e) => {
                    r.errors.push(format!("{line}: {e}"));
                    break;
                }
            }
            thread::sleep(TICK);
        }
        r
    })
}

/// A UDP flow on one connected socket (one 5-tuple): every datagram must be answered.
fn udp_flow(pod: &Pod, addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<FlowReport> {
    let udp: UdpSocket = pod
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(addr)?;
            s.set_read_timeout(Some(T))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("enter netns")
        .expect("udp socket");
    let what = format!("UDP {} -> {addr}", pod.name());
    thread::spawn(move || {
        let mut r = FlowReport {
            what,
            ..FlowReport::default()
        };
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            r.sent += 1;
            match udp.send(b"ping").and_then(|_| udp.recv(&mut buf)) {
                Ok(n) => {
                    r.answered += 1;
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    match parse_greeting(&text) {
                        Ok((backend, _)) => {
                            r.backends.insert(backend);
                        }
                        Err(e) => r.errors.push(format!("bad reply {text:?}: {e}")),
                    }
                }
                Err(e) => r.errors.push(format!("datagram {}: {e}", r.sent)),
            }
            thread::sleep(TICK);
        }
        r
    })
}

#[test]
fn sigkill_and_restart_lose_no_byte_of_established_flows_and_serve_new_connections_within_2s() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, outside, mut agent) =
        scenario::start_with_outside(&lab).expect("scene");
    let node_port = |p: u16| SocketAddr::from((NODE_IP, p));
    let stop = Arc::new(AtomicBool::new(false));
    let flows = vec![
        tcp_stream(&client, cluster_addr(TCP_PORT.0), stop.clone()),
        udp_flow(&client, cluster_addr(UDP_PORT.0), stop.clone()),
        tcp_stream(&outside, node_port(NODE_PORTS.0), stop.clone()),
        udp_flow(&outside, node_port(NODE_PORTS.1), stop.clone()),
    ];

    thread::sleep(Duration::from_millis(500));
    let status = agent.kill().expect("SIGKILL the agent");
    assert!(
        !status.success(),
        "the agent was killed, not stopped: {status}"
    );
    // No agent at all for a while: the pinned links and maps must carry the traffic alone.
    thread::sleep(Duration::from_secs(1));
    client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("new ClusterIP connections are balanced while no agent runs");
    outside
        .tcp_request(node_port(NODE_PORTS.0), T)
        .expect("new NodePort connections are balanced while no agent runs");

    let restarted_at = Instant::now();
    let mut agent = lab
        .start_agent(&["--external-iface", EXTERNAL_IFACE])
        .expect("restart the agent");
    // New connections within 2 s of the restart, on both frontends.
    let mut served = (false, false);
    while restarted_at.elapsed() < Duration::from_secs(2) && !(served.0 && served.1) {
        served.0 |= client
            .tcp_request(cluster_addr(TCP_PORT.0), Duration::from_millis(300))
            .is_ok();
        served.1 |= outside
            .tcp_request(node_port(NODE_PORTS.0), Duration::from_millis(300))
            .is_ok();
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        served.0,
        "no new ClusterIP connection served within 2 s of the restart"
    );
    assert!(
        served.1,
        "no new NodePort connection served within 2 s of the restart"
    );
    agent
        .wait_healthy(Duration::from_secs(5))
        .expect("restarted agent healthy");
    agent
        .wait_for_log("adopted pinned link", Duration::from_secs(2))
        .expect("the restarted agent adopted the pinned links instead of attaching anew");
    // Keep every flow running across the new agent's first syncs.
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    for flow in flows {
        let r = flow.join().expect("flow thread");
        println!(
            "{}: sent {} answered {} backends {:?}",
            r.what, r.sent, r.answered, r.backends
        );
        assert!(r.errors.is_empty(), "{}: {:?}", r.what, r.errors);
        assert_eq!(r.sent, r.answered, "{}: every message answered", r.what);
        assert!(
            r.sent > 200,
            "{}: the flow ran throughout ({})",
            r.what,
            r.sent
        );
        assert_eq!(
            r.backends.len(),
            1,
            "{}: stayed on one backend: {:?}",
            r.what,
            r.backends
        );
    }

    // Fresh connections after the restart still reach every backend.
    let tally = client
        .run(|| {
            let mut t = scenario::Tally::default();
            for _ in 0..60 {
                let line =
                    weir_tests::client::tcp_request(cluster_addr(TCP_PORT.0), T).expect("connect");
                t.add(&parse_greeting(&line).expect("greeting").0);
            }
            t
        })
        .expect("enter client netns");
    assert_eq!(
        tally.0.len(),
        3,
        "all backends serve after the restart: {tally}"
    );
    assert!(agent.stop().expect("stop").success());
}

#[test]
fn sigterm_with_keep_datapath_on_exit_leaves_the_datapath_serving_for_the_next_agent() {
    let lab = Lab::new().expect("lab");
    let (_backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    scenario::write_echo_service(&lab, &[&lab.pod("backend-a"), &lab.pod("backend-b")])
        .expect("config");
    let mut agent = lab
        .start_agent(&["--keep-datapath-on-exit"])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let mut conn = client
        .tcp_connect(cluster_addr(TCP_PORT.0), T)
        .expect("connect");
    let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");

    assert!(agent.stop().expect("SIGTERM").success(), "exits 0");
    // No agent: established and new connections are still served.
    assert_eq!(
        conn.exchange("after").expect("echo"),
        format!("{backend} after")
    );
    client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("new connection with no agent running");

    let mut next = lab.start_agent(&[]).expect("next agent");
    next.wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    next.wait_for_log("adopted pinned link", Duration::from_secs(2))
        .expect("the next agent adopts the links left attached");
    assert_eq!(
        conn.exchange("again").expect("echo"),
        format!("{backend} again")
    );
}
