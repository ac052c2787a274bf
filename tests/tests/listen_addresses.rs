//! The agent's health and metrics endpoints (`/metrics` and `/state` describe every Service and backend)
//! listen on loopback unless told otherwise, so pods cannot read them: checked in the kernel's socket
//! table of the node namespace, and by a pod trying to connect. `--health-addr` and `--metrics-addr`
//! move them. The one listener beyond loopback by default is the L7 proxy's transparent socket, which
//! must accept the connections the datapath steers to it for any ClusterIP.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use weir_tests::lab::GATEWAY;
use weir_tests::scenario::{self, HEALTHY_TIMEOUT};
use weir_tests::{Lab, Pod};

const HEALTH_PORT: u16 = 10256;
const METRICS_PORT: u16 = 10249;
const L7_PROXY_PORT: u16 = 15001;
const T: Duration = Duration::from_secs(1);

/// Listening TCP sockets of the node namespace (`/proc/net/tcp` and `tcp6` as the node sees them).
fn listeners(lab: &Lab) -> BTreeSet<SocketAddr> {
    lab.in_node(|| {
        let mut out = BTreeSet::new();
        for file in ["tcp", "tcp6"] {
            let table = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
                .unwrap_or_else(|e| panic!("read /proc/net/{file}: {e}"));
            for line in table.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // st 0A is TCP_LISTEN.
                if fields.get(3) != Some(&"0A") {
                    continue;
                }
                out.insert(parse_local(fields[1]));
            }
        }
        out
    })
    .expect("enter the node netns")
}

/// `0100007F:2818` (IPv4) or 32 hex digits (IPv6), each 32-bit word in host byte order.
fn parse_local(field: &str) -> SocketAddr {
    let (addr, port) = field.split_once(':').expect("address:port");
    let port = u16::from_str_radix(port, 16).expect("port");
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).expect("hex"))
        .map(u32::from_be)
        .collect();
    match words.as_slice() {
        [v4] => SocketAddr::from((Ipv4Addr::from(*v4), port)),
        [a, b, c, d] => {
            let mut octets = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            SocketAddr::from((std::net::Ipv6Addr::from(octets), port))
        }
        _ => panic!("unexpected local address {field}"),
    }
}

fn on_port(listeners: &BTreeSet<SocketAddr>, port: u16) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter(|a| a.port() == port)
        .copied()
        .collect()
}

/// Whether `pod` can open a TCP connection to the node's gateway address on `port`.
fn pod_reaches(pod: &Pod, port: u16) -> bool {
    pod.tcp_connect(SocketAddrV4::new(GATEWAY, port), T).is_ok()
}

#[test]
fn health_and_metrics_listen_on_loopback_only_unless_told_otherwise() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, mut agent) = scenario::start_standard(&lab).expect("standard scene");

    let all = listeners(&lab);
    let loopback = |port| vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
    assert_eq!(on_port(&all, HEALTH_PORT), loopback(HEALTH_PORT), "{all:?}");
    assert_eq!(
        on_port(&all, METRICS_PORT),
        loopback(METRICS_PORT),
        "{all:?}"
    );
    let beyond_loopback: Vec<&SocketAddr> = all.iter().filter(|a| !a.ip().is_loopback()).collect();
    assert_eq!(
        beyond_loopback,
        vec![&SocketAddr::from((Ipv4Addr::UNSPECIFIED, L7_PROXY_PORT))],
        "only the L7 proxy listens beyond loopback by default"
    );
    // A pod reaches the node (its gateway address) but not the endpoints.
    assert!(!pod_reaches(&client, HEALTH_PORT), "a pod reached /healthz");
    assert!(
        !pod_reaches(&client, METRICS_PORT),
        "a pod reached /metrics"
    );
    // The proxy's listener, dialled directly rather than steered to, proxies nothing: its local
    // address names no Service.
    let direct = client
        .http_get(SocketAddrV4::new(GATEWAY, L7_PROXY_PORT), "/", T)
        .expect("the L7 proxy answers");
    assert_eq!(direct.status, 404, "{direct:?}");
    agent.stop().expect("stop the agent");

    // Told otherwise: health on every address (what the kubelet's probe needs), metrics on one.
    let health = format!("0.0.0.0:{HEALTH_PORT}");
    let metrics = format!("{GATEWAY}:{METRICS_PORT}");
    let mut agent = lab
        .start_agent(&["--health-addr", &health, "--metrics-addr", &metrics])
        .expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");
    let all = listeners(&lab);
    assert_eq!(
        on_port(&all, HEALTH_PORT),
        vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, HEALTH_PORT))],
        "{all:?}"
    );
    assert_eq!(
        on_port(&all, METRICS_PORT),
        vec![SocketAddr::from((GATEWAY, METRICS_PORT))],
        "{all:?}"
    );
    assert!(pod_reaches(&client, HEALTH_PORT), "--health-addr 0.0.0.0");
    assert!(
        pod_reaches(&client, METRICS_PORT),
        "--metrics-addr {metrics}"
    );
}
