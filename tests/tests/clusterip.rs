//! ClusterIP load balancing through the real agent: spread over backends, reply addresses, refusal when
//! a Service has no ready endpoint, and endpoint removal. Every test builds its own lab and agent.

use std::time::{Duration, Instant};

use weir_tests::scenario::{
    self, CLUSTER_IP, HTTP_PORT, TCP_PORT, Tally, UDP_PORT, cluster_addr, echo_service,
    parse_greeting,
};
use weir_tests::{Failure, Lab, Pod};

const T: Duration = Duration::from_secs(2);

/// Asserts that `pod`'s TCP and (connected) UDP requests to `cluster_ip` are actively refused, each in
/// under a second.
fn assert_refused(pod: &Pod, cluster_ip: std::net::Ipv4Addr, what: &str) {
    let err = pod
        .tcp_request((cluster_ip, TCP_PORT.0), Duration::from_secs(3))
        .expect_err(&format!("{what}: TCP connect must fail"));
    assert_eq!(
        err.failure(),
        Failure::Refused,
        "{what}: TCP must be refused (RST), got {err}"
    );
    assert!(
        err.elapsed < Duration::from_secs(1),
        "{what}: TCP refusal too slow: {err}"
    );
    let err = pod
        .udp_request((cluster_ip, UDP_PORT.0), Duration::from_secs(3))
        .expect_err(&format!("{what}: UDP request must fail"));
    assert_eq!(
        err.failure(),
        Failure::Refused,
        "{what}: UDP must get ICMP port unreachable, got {err}"
    );
    assert!(
        err.elapsed < Duration::from_secs(1),
        "{what}: UDP refusal too slow: {err}"
    );
}

/// `n` fresh TCP connections from `client` to the echo ClusterIP; checks each backend saw the client's
/// own address and returns who answered.
fn tcp_tally(client: &Pod, n: usize) -> Tally {
    let addr = cluster_addr(TCP_PORT.0);
    let ip = client.ip();
    client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                let line = weir_tests::client::tcp_request(addr, T)
                    .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}"));
                let (backend, peer) = parse_greeting(&line).expect("greeting");
                assert_eq!(
                    peer.ip(),
                    ip,
                    "backend {backend} must see the client's own address"
                );
                tally.add(&backend);
            }
            tally
        })
        .expect("enter client netns")
}

#[test]
fn tcp_connections_to_a_cluster_ip_are_spread_evenly_over_all_backends() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");

    // The socket is connected to the ClusterIP, so replies that come back from anywhere else would
    // never reach it: a working connection proves the reverse translation.
    let mut conn = client
        .tcp_connect(cluster_addr(TCP_PORT.0), T)
        .expect("connect");
    assert_eq!(
        conn.stream().peer_addr().expect("peer"),
        cluster_addr(TCP_PORT.0)
    );
    let (_, peer) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
    assert_eq!(
        peer,
        conn.local_addr().expect("local addr"),
        "backend saw the client's own ip:port"
    );

    let n = 600;
    let tally = tcp_tally(&client, n);
    println!("{n} TCP connections: {tally}");
    for b in &backends {
        let share = tally.percent(b.name());
        assert!(
            (100.0 / 3.0 - share).abs() <= 10.0,
            "{} got {share:.1}% of connections, expected 33.3% ± 10: {tally}",
            b.name()
        );
    }
    assert_eq!(tally.total(), n);
}

#[test]
fn udp_to_a_cluster_ip_reaches_every_backend_and_replies_come_from_the_cluster_ip() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    let addr = cluster_addr(UDP_PORT.0);
    let ip = client.ip();
    let n = 300;
    let tally = client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                // Unconnected, so a reply from a backend's own address would be seen (and rejected) here.
                let reply = weir_tests::client::udp_request_unconnected(addr, T)
                    .unwrap_or_else(|e| panic!("datagram {i} of {n}: {e}"));
                assert_eq!(
                    reply.from, addr,
                    "reply must come from the ClusterIP: {reply:?}"
                );
                let (backend, peer) = parse_greeting(&reply.line).expect("reply");
                assert_eq!(
                    peer.ip(),
                    ip,
                    "backend {backend} must see the client's own address"
                );
                tally.add(&backend);
            }
            tally
        })
        .expect("enter client netns");
    println!("{n} UDP requests from fresh sockets: {tally}");
    for b in &backends {
        assert!(
            tally.get(b.name()) > 0,
            "{} never answered: {tally}",
            b.name()
        );
    }
    // A connected socket too (the kind that would see an ICMP error).
    let reply = client.udp_request(addr, T).expect("connected UDP request");
    assert_eq!(reply.from, addr);
}

#[test]
fn http_to_a_cluster_ip_is_answered_by_a_backend() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    for _ in 0..10 {
        let resp = client
            .http_get(cluster_addr(HTTP_PORT.0), "/", T)
            .expect("HTTP GET through the ClusterIP");
        assert_eq!(resp.status, 200, "{resp:?}");
        let (backend, peer) = parse_greeting(&resp.body).expect("body");
        assert!(backends.iter().any(|b| b.name() == backend), "{resp:?}");
        assert_eq!(peer.ip(), client.ip(), "{resp:?}");
    }
}

#[test]
fn services_without_ready_endpoints_refuse_tcp_and_udp_at_once() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    let not_ready: Vec<_> = backends.iter().map(|b| (b.ip(), false)).collect();
    let idle_ip = [10, 96, 0, 11].into();
    let orphan_ip = [10, 96, 0, 12].into();
    lab.write_config("idle.yaml", &echo_service("idle", idle_ip, &not_ready))
        .expect("idle.yaml");
    // A Service with no EndpointSlice at all: only its first document.
    lab.write_config(
        "orphan.yaml",
        &scenario::echo_service_only("orphan", "10.96.0.12"),
    )
    .expect("orphan.yaml");

    // The agent re-applies within a second; give it a little more before judging.
    std::thread::sleep(Duration::from_millis(1500));
    client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("the working Service still works");
    assert_refused(
        &client,
        idle_ip,
        "Service whose endpoints are all not ready",
    );
    assert_refused(&client, orphan_ip, "Service without EndpointSlice");
}

#[test]
fn removing_the_last_endpoint_makes_the_service_refuse() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    client
        .tcp_request(cluster_addr(TCP_PORT.0), T)
        .expect("works before the change");
    scenario::write_echo_service(&lab, &[]).expect("echo.yaml without endpoints");
    let deadline = Instant::now() + Duration::from_secs(3);
    while client.tcp_request(cluster_addr(TCP_PORT.0), T).is_ok() {
        assert!(
            Instant::now() < deadline,
            "still answering 3 s after the last endpoint was removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_refused(
        &client,
        CLUSTER_IP,
        "Service whose last endpoint was removed",
    );
}

#[test]
fn removing_a_backend_keeps_established_connections_and_sends_new_ones_elsewhere() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    let removed = backends[2].name().to_owned();

    // Long-lived connections to each of the backends that stay.
    let mut kept = Vec::new();
    for _ in 0..200 {
        let mut conn = client
            .tcp_connect(cluster_addr(TCP_PORT.0), T)
            .expect("connect");
        let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        if backend != removed && !kept.iter().any(|(b, _)| *b == backend) {
            kept.push((backend, conn));
        }
        if kept.len() == 2 {
            break;
        }
    }
    assert_eq!(
        kept.len(),
        2,
        "could not get a connection to both remaining backends"
    );

    scenario::write_echo_service(&lab, &[&backends[0], &backends[1]]).expect("echo.yaml without c");
    std::thread::sleep(Duration::from_secs(2));

    for (backend, conn) in &mut kept {
        for i in 0..3 {
            let reply = conn
                .exchange(&format!("still there {i}"))
                .unwrap_or_else(|e| panic!("established connection to {backend} broke: {e}"));
            assert_eq!(reply, format!("{backend} still there {i}"));
        }
    }
    let tally = tcp_tally(&client, 100);
    println!("100 new connections after removing {removed}: {tally}");
    assert_eq!(
        tally.get(&removed),
        0,
        "{removed} was removed but still got new connections: {tally}"
    );
    assert_eq!(tally.total(), 100);
    // The old connections still work after all that traffic, too.
    for (backend, conn) in &mut kept {
        assert_eq!(
            conn.exchange("bye").expect("echo"),
            format!("{backend} bye")
        );
    }
}
