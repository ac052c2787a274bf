//! Restart without disruption: the agent is SIGKILLed and restarted while a long-lived TCP stream and a
//! UDP flow run through a ClusterIP. Pinned maps and pinned program links keep the datapath serving while
//! no agent runs; the new agent adopts them (replacing the program atomically) and keeps conntrack state.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use weir_tests::{
    Lab,
    scenario::{self, TCP_PORT, UDP_PORT, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);
/// Pace of both flows: fast enough that the kill and the restart land mid-stream many times over.
const TICK: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
struct FlowReport {
    sent: usize,
    answered: usize,
    backends: std::collections::BTreeSet<String>,
    errors: Vec<String>,
}

#[test]
fn sigkill_and_restart_lose_no_byte_of_established_flows_and_serve_new_connections_within_2s() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, mut agent) = scenario::start_standard(&lab).expect("standard scene");
    let stop = Arc::new(AtomicBool::new(false));

    // A long-lived TCP stream: every line must come back, in order, from the same backend.
    let mut conn = client
        .tcp_connect(cluster_addr(TCP_PORT.0), T)
        .expect("connect");
    let (tcp_backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
    let tcp = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut r = FlowReport::default();
            while !stop.load(Ordering::Relaxed) {
                let line = format!("seq {}", r.sent);
                r.sent += 1;
                match conn.exchange(&line) {
                    Ok(reply) if reply == format!("{tcp_backend} {line}") => r.answered += 1,
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
    };

    // A UDP flow on one connected socket (one 5-tuple): every datagram must be answered.
    let udp: UdpSocket = client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(cluster_addr(UDP_PORT.0))?;
            s.set_read_timeout(Some(T))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("enter client netns")
        .expect("udp socket");
    let udp = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut r = FlowReport::default();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                r.sent += 1;
                let res = udp.send(b"ping").and_then(|_| udp.recv(&mut buf));
                match res {
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
    };

    thread::sleep(Duration::from_millis(500));
    let status = agent.kill().expect("SIGKILL the agent");
    assert!(
        !status.success(),
        "the agent was killed, not stopped: {status}"
    );
    // No agent at all for a while: the pinned links and maps must carry the traffic alone.
    thread::sleep(Duration::from_secs(1));
    let dead_check = client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("new connections are balanced even while no agent runs");
    parse_greeting(&dead_check).expect("greeting");

    let restarted_at = Instant::now();
    let mut agent = lab.start_agent(&[]).expect("restart the agent");
    // New connections within 2 s of the restart (they never stopped, but the new agent must not break them
    // while it adopts, replaces and reconciles).
    let mut served = false;
    while restarted_at.elapsed() < Duration::from_secs(2) {
        if client
            .tcp_request(cluster_addr(TCP_PORT.0), Duration::from_millis(300))
            .is_ok()
        {
            served = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(served, "no new connection served within 2 s of the restart");
    agent
        .wait_healthy(Duration::from_secs(5))
        .expect("restarted agent healthy");
    agent
        .wait_for_log("adopted pinned link", Duration::from_secs(2))
        .expect("the restarted agent adopted the pinned links instead of attaching anew");
    // Keep both flows running across the new agent's first syncs.
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    let tcp = tcp.join().expect("tcp thread");
    let udp = udp.join().expect("udp thread");
    println!("TCP: {tcp:?}\nUDP: {udp:?}");
    assert!(tcp.errors.is_empty(), "TCP stream broke: {:?}", tcp.errors);
    assert_eq!(tcp.sent, tcp.answered, "every TCP line echoed");
    assert!(
        tcp.sent > 200,
        "the TCP stream ran throughout: {}",
        tcp.sent
    );
    assert!(
        udp.errors.is_empty(),
        "UDP flow lost datagrams: {:?}",
        udp.errors
    );
    assert_eq!(udp.sent, udp.answered, "every datagram answered");
    assert_eq!(
        udp.backends.len(),
        1,
        "the UDP flow stayed on one backend: {:?}",
        udp.backends
    );

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
