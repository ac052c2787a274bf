//! The agent over time: bad files in its config dir, pod interfaces that appear after it started, and
//! SIGTERM. Every test builds its own lab and runs the real agent.

use std::time::{Duration, Instant};

use weir_tests::scenario::{self, TCP_PORT, Tally, UDP_PORT, cluster_addr, parse_greeting};
use weir_tests::{Lab, Pod};

const T: Duration = Duration::from_secs(2);

/// Retries a TCP request from `pod` to the echo ClusterIP until it succeeds or `within` passes; returns
/// the answering backend.
fn first_success(pod: &Pod, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match pod.tcp_request(cluster_addr(TCP_PORT.0), Duration::from_millis(500)) {
            Ok(line) => return parse_greeting(&line).expect("greeting").0,
            Err(e) if Instant::now() > deadline => {
                panic!(
                    "{} cannot reach the ClusterIP within {within:?}: {e}",
                    pod.name()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `n` TCP requests from `pod` through the ClusterIP, all of which must succeed and show `pod`'s address.
fn requests(pod: &Pod, n: usize) -> Tally {
    let mut tally = Tally::default();
    for i in 0..n {
        let line = pod
            .tcp_request(cluster_addr(TCP_PORT.0), T)
            .unwrap_or_else(|e| panic!("request {i} of {n} from {}: {e}", pod.name()));
        let (backend, peer) = parse_greeting(&line).expect("greeting");
        assert_eq!(
            peer.ip(),
            pod.ip(),
            "backend must see {}'s own address",
            pod.name()
        );
        tally.add(&backend);
    }
    tally
}

#[test]
fn broken_yaml_and_invalid_objects_do_not_disturb_a_working_service() {
    let lab = Lab::new().expect("lab");
    let (backends, client, mut agent) = scenario::start_standard(&lab).expect("standard scene");
    let mut conn = client
        .tcp_connect(cluster_addr(TCP_PORT.0), T)
        .expect("connect");
    let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");

    lab.write_config(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: broken\n  labels: {unclosed: [\nspec: :\n",
    )
    .expect("broken.yaml");
    lab.write_config(
        "invalid.yaml",
        &scenario::echo_service_only("invalid", "not-an-ip"),
    )
    .expect("invalid.yaml");
    std::thread::sleep(Duration::from_secs(2));

    assert!(agent.is_running(), "agent exited after bad config files");
    assert_eq!(
        agent.healthz().expect("healthz answers"),
        200,
        "agent unhealthy after bad files"
    );
    assert_eq!(
        conn.exchange("after bad files")
            .expect("established connection survives"),
        format!("{backend} after bad files")
    );
    let tally = requests(&client, 60);
    println!("60 connections after adding bad files: {tally}");
    for b in &backends {
        assert!(
            tally.get(b.name()) > 0,
            "{} no longer gets connections: {tally}",
            b.name()
        );
    }
    client
        .udp_request(cluster_addr(UDP_PORT.0), T)
        .expect("UDP still works");
    agent
        .wait_for_log("broken.yaml", Duration::from_secs(3))
        .expect("the log names the file with the syntax error");
    agent
        .wait_for_log("invalid.yaml", Duration::from_secs(3))
        .expect("the log names the file with the invalid Service");
}

#[test]
fn pod_interfaces_created_after_the_agent_started_are_handled() {
    let lab = Lab::new().expect("lab");
    let (backends, _client, _agent) = scenario::start_standard(&lab).expect("standard scene");

    // A client whose veth appears only now.
    let late = lab
        .add_pod("late-client", [10, 0, 0, 30])
        .expect("late pod");
    first_success(&late, Duration::from_secs(3));
    let tally = requests(&late, 60);
    println!("60 connections from a pod created after the agent: {tally}");
    for b in &backends {
        assert!(
            tally.get(b.name()) > 0,
            "{} never reached from the late pod: {tally}",
            b.name()
        );
    }
    let reply = late
        .udp_request(cluster_addr(UDP_PORT.0), T)
        .expect("UDP from the late pod");
    assert_eq!(
        parse_greeting(&reply.line).expect("reply").1.ip(),
        late.ip()
    );

    // A backend whose veth appears only now: its replies must be translated back too.
    let d = scenario::add_backend(&lab, "backend-d", [10, 0, 0, 13]).expect("late backend");
    let mut all: Vec<&Pod> = backends.iter().collect();
    all.push(&d);
    scenario::write_echo_service(&lab, &all).expect("echo.yaml with backend-d");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let tally = requests(&late, 20);
        if tally.get("backend-d") > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend-d (created after the agent) never answers: {tally}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigterm_exits_zero_and_detaches_the_datapath() {
    let lab = Lab::new().expect("lab");
    let (backends, client, mut agent) = scenario::start_standard(&lab).expect("standard scene");
    client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("works while the agent runs");

    let status = agent.stop().expect("agent stops");
    assert_eq!(
        status.code(),
        Some(0),
        "agent must exit 0 on SIGTERM, got {status}"
    );

    let err = client
        .tcp_request(cluster_addr(TCP_PORT.0), Duration::from_secs(1))
        .expect_err("the ClusterIP must no longer answer TCP once the agent is gone");
    println!("TCP after SIGTERM: {err}");
    let err = client
        .udp_request(cluster_addr(UDP_PORT.0), Duration::from_secs(1))
        .expect_err("the ClusterIP must no longer answer UDP once the agent is gone");
    println!("UDP after SIGTERM: {err}");

    // Plain pod-to-pod routing through the node is untouched.
    for b in &backends {
        let line = client
            .tcp_request((b.ip(), TCP_PORT.1), T)
            .unwrap_or_else(|e| panic!("direct connection to {} after SIGTERM: {e}", b.name()));
        let (backend, peer) = parse_greeting(&line).expect("greeting");
        assert_eq!(
            (backend.as_str(), peer.ip()),
            (b.name(), client.ip().into())
        );
    }
}
