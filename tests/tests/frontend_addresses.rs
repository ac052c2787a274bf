//! NodePort, externalIP and LoadBalancer frontends answer only where they are configured: the nodePort on
//! node IPs, the service port on the externalIPs and LoadBalancer ingress IPs. The same ports on any
//! other address arriving on the external interface are not translated: nothing answers and no backend
//! sees a packet (checked with the backends' own IPv4 receive counters, not only the client's view).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use weir_tests::scenario::{self, CLUSTER_IP, NODE_IP, TCP_PORT, UDP_PORT, parse_greeting};
use weir_tests::yaml::{TrafficPolicy, documents, endpointslice_yaml, loadbalancer_service_yaml};
use weir_tests::{Lab, Pod, raw};

const T: Duration = Duration::from_secs(1);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const NODE_PORT_TCP: u16 = 30080;
const NODE_PORT_UDP: u16 = 30053;

fn service(backends: &[Pod]) -> String {
    let ports = [
        ("tcp", TCP_PORT.0, "TCP", TCP_PORT.1, NODE_PORT_TCP),
        ("udp", UDP_PORT.0, "UDP", UDP_PORT.1, NODE_PORT_UDP),
    ];
    let svc = loadbalancer_service_yaml(
        "default",
        "echo",
        &CLUSTER_IP.to_string(),
        TrafficPolicy::Cluster,
        &ports,
        &[LB_IP],
        None,
    )
    .replacen(
        "  clusterIP: ",
        &format!("  externalIPs: [{EXTERNAL_IP}]\n  clusterIP: "),
        1,
    );
    let endpoints: Vec<(Ipv4Addr, bool)> = backends.iter().map(|p| (p.ip(), true)).collect();
    documents(&[
        svc,
        endpointslice_yaml(
            "default",
            "echo-1",
            "echo",
            &[("tcp", TCP_PORT.1, "TCP"), ("udp", UDP_PORT.1, "UDP")],
            &endpoints,
        ),
    ])
}

/// IPv4 packets every backend's stack has received so far.
fn received(backends: &[Pod]) -> Vec<u64> {
    backends
        .iter()
        .map(|b| {
            b.run(raw::ipv4_in_receives)
                .expect("enter the backend's netns")
                .expect("read its IPv4 counters")
        })
        .collect()
}

#[test]
fn nodeports_and_external_frontends_answer_only_on_their_own_addresses() {
    let lab = Lab::new().expect("lab");
    let (backends, _client) = scenario::add_standard_pods(&lab).expect("pods");
    let outside = lab
        .add_external_host(
            scenario::OUTSIDE.0,
            scenario::OUTSIDE.1,
            scenario::EXTERNAL_IFACE,
            NODE_IP,
        )
        .expect("outside host");
    lab.write_config("echo.yaml", &service(&backends))
        .expect("config");
    let mut agent = lab
        .start_agent(&["--external-iface", scenario::EXTERNAL_IFACE])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    // Where each frontend is configured, it answers (through the external interface).
    for addr in [
        SocketAddr::from((NODE_IP, NODE_PORT_TCP)),
        SocketAddr::from((EXTERNAL_IP, TCP_PORT.0)),
        SocketAddr::from((LB_IP, TCP_PORT.0)),
    ] {
        let line = outside
            .tcp_request(addr, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{addr} must be served: {e}"));
        parse_greeting(&line).expect("a backend's greeting");
    }
    let reply = outside
        .udp_request_unconnected(SocketAddr::from((NODE_IP, NODE_PORT_UDP)), T)
        .expect("UDP nodePort on the node IP");
    assert_eq!(reply.from, SocketAddr::from((NODE_IP, NODE_PORT_UDP)));

    // The same ports on addresses that are not theirs: another host's address routed through the
    // node, the externalIP's and LB IP's neighbours, the nodePort on the externalIP, LB IP and
    // ClusterIP, and the service port on the node IP.
    let elsewhere = Ipv4Addr::new(192, 0, 2, 7);
    let not_frontends = [
        SocketAddr::from((elsewhere, NODE_PORT_TCP)),
        SocketAddr::from((Ipv4Addr::new(203, 0, 113, 6), TCP_PORT.0)),
        SocketAddr::from((Ipv4Addr::new(198, 51, 100, 11), TCP_PORT.0)),
        SocketAddr::from((EXTERNAL_IP, NODE_PORT_TCP)),
        SocketAddr::from((LB_IP, NODE_PORT_TCP)),
        SocketAddr::from((CLUSTER_IP, NODE_PORT_TCP)),
        SocketAddr::from((NODE_IP, TCP_PORT.0)),
    ];
    // Let the served connections' closing segments land before counting.
    std::thread::sleep(Duration::from_millis(500));
    let before = received(&backends);
    for addr in not_frontends {
        if let Ok(line) = outside.tcp_request(addr, T) {
            panic!("{addr} is no frontend but answered {line:?}");
        }
    }
    for addr in [
        SocketAddr::from((elsewhere, NODE_PORT_UDP)),
        SocketAddr::from((EXTERNAL_IP, NODE_PORT_UDP)),
        SocketAddr::from((LB_IP, NODE_PORT_UDP)),
    ] {
        if let Ok(reply) = outside.udp_request_unconnected(addr, T) {
            panic!("{addr} is no frontend but answered {reply:?}");
        }
    }
    // Raw SYNs too, which no client socket retries or gives up on: one per address, from the
    // outside host's own address.
    let syns: Vec<Vec<u8>> = not_frontends
        .iter()
        .filter_map(|a| match a {
            SocketAddr::V4(v4) => Some(raw::tcp_syn(
                std::net::SocketAddrV4::new(outside.ip(), 40000),
                *v4,
            )),
            SocketAddr::V6(_) => None,
        })
        .collect();
    outside
        .run(|| raw::send_ipv4(&syns))
        .expect("enter the outside netns")
        .expect("send raw SYNs");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        received(&backends),
        before,
        "a backend received packets sent to addresses that are no frontend"
    );
    assert!(agent.is_running(), "the agent exited");
}
