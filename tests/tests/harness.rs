//! Self-tests of the lab harness that need no agent: pod-to-pod traffic through the node, the error
//! classification the datapath tests rely on, and teardown.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use weir_tests::backend::parse_reply;
use weir_tests::{Failure, Lab};

const T: Duration = Duration::from_secs(2);

#[test]
fn pods_reach_each_other_through_the_node_over_tcp_udp_and_http() {
    let lab = Lab::new().expect("lab");
    let server = lab.add_pod("server", [10, 0, 0, 10]).expect("server pod");
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client pod");
    assert_eq!((server.node_iface(), client.node_iface()), ("wp0", "wp1"));
    server.serve_tcp(8080).expect("tcp backend");
    server.serve_udp(5353).expect("udp backend");
    server.serve_http(8081).expect("http backend");

    let reply = client
        .tcp_request(([10, 0, 0, 10], 8080), T)
        .expect("tcp request");
    let (pod, peer) = parse_reply(&reply).expect("reply format");
    assert_eq!(pod, "server");
    let peer: SocketAddr = peer.parse().expect("peer address");
    assert_eq!(peer.ip(), client.ip(), "backend saw {peer}");

    let udp = client
        .udp_request(([10, 0, 0, 10], 5353), T)
        .expect("udp request");
    assert!(udp.line.starts_with("server 10.0.0.20:"), "{udp:?}");
    let udp = client
        .udp_request_unconnected(([10, 0, 0, 10], 5353), T)
        .expect("udp request");
    assert_eq!(udp.from, SocketAddr::from(([10, 0, 0, 10], 5353)));

    let http = client
        .http_get(([10, 0, 0, 10], 8081), "/", T)
        .expect("http get");
    assert_eq!(http.status, 200);
    assert!(http.body.starts_with("server 10.0.0.20:"), "{http:?}");

    // A long-lived connection: greeting, then echoed lines, also from another thread.
    let mut conn = client
        .tcp_connect(([10, 0, 0, 10], 8080), T)
        .expect("connect");
    assert!(conn.read_line().expect("greeting").starts_with("server "));
    assert_eq!(conn.exchange("ping 1").expect("echo"), "server ping 1");
    std::thread::spawn(move || {
        assert_eq!(conn.exchange("ping 2").expect("echo"), "server ping 2");
    })
    .join()
    .expect("echo from another thread");
}

#[test]
fn closed_ports_are_refused_and_silent_ones_time_out() {
    let lab = Lab::new().expect("lab");
    let server = lab.add_pod("server", [10, 0, 0, 10]).expect("server pod");
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client pod");

    let started = Instant::now();
    let err = client
        .tcp_request(([10, 0, 0, 10], 9), T)
        .expect_err("nothing listens on 9");
    assert_eq!(err.failure(), Failure::Refused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "{err}");

    let err = client
        .udp_request(([10, 0, 0, 10], 9), T)
        .expect_err("nothing listens on 9");
    assert_eq!(err.failure(), Failure::Refused, "{err}");
    assert!(err.elapsed < Duration::from_secs(1), "{err}");

    // A bound socket that never answers: no ICMP, so the client times out.
    let _silent: UdpSocket = server
        .run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 7000)))
        .expect("enter netns")
        .expect("bind");
    let err = client
        .udp_request(([10, 0, 0, 10], 7000), Duration::from_millis(300))
        .expect_err("silent socket");
    assert_eq!(err.failure(), Failure::TimedOut, "{err}");

    // The node has no route to an address no pod holds: an ICMP unreachable comes back at once.
    let err = client
        .tcp_request(([10, 0, 0, 99], 80), T)
        .expect_err("no such pod");
    assert_eq!(err.failure(), Failure::Unreachable, "{err}");
}

#[test]
fn dropping_a_lab_removes_its_namespaces_and_temp_dir() {
    let (names, dir) = {
        let lab = Lab::new().expect("lab");
        let pod = lab.add_pod("a", [10, 0, 0, 10]).expect("pod");
        pod.serve_tcp(8080).expect("backend");
        let names = vec![lab.node_netns().to_owned(), pod.netns().to_owned()];
        for name in &names {
            assert!(
                Path::new("/var/run/netns").join(name).exists(),
                "{name} missing"
            );
        }
        (names, lab.dir().to_owned())
    };
    for name in &names {
        assert!(
            !Path::new("/var/run/netns").join(name).exists(),
            "{name} left behind"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new().expect("lab");
        let pod = lab.add_pod("a", [10, 0, 0, 10]).expect("pod");
        if let Ok(mut n) = names.lock() {
            n.extend([lab.node_netns().to_owned(), pod.netns().to_owned()]);
        }
        panic!("deliberate");
    });
    assert!(result.is_err());
    let names = names.into_inner().expect("names");
    assert_eq!(names.len(), 2);
    for name in &names {
        assert!(
            !Path::new("/var/run/netns").join(name).exists(),
            "{name} left behind"
        );
    }
}
