//! NodePort through the TC datapath on the external interface, with backends on this node: every node IP
//! answers, replies come from the node IP and NodePort, and a deleted Service releases its NodePorts.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Failure, Lab,
    scenario::{self, NODE_IP, NODE_PORTS, Tally, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

fn node_addr(port: u16) -> SocketAddr {
    SocketAddr::from((NODE_IP, port))
}

#[test]
fn functioning_nodeport_balances_outside_clients_over_local_backends() {
    let lab = Lab::new().expect("lab");
    let (backends, client, outside, _agent) = scenario::start_with_outside(&lab).expect("scene");

    let tally = outside
        .run(|| {
            let mut t = Tally::default();
            for i in 0..150 {
                let mut conn = weir_tests::client::tcp_connect(node_addr(NODE_PORTS.0), T)
                    .unwrap_or_else(|e| panic!("connection {i} to the NodePort: {e}"));
                assert_eq!(
                    conn.stream().peer_addr().expect("peer"),
                    node_addr(NODE_PORTS.0)
                );
                let (backend, peer) =
                    parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
                assert_eq!(
                    peer.ip(),
                    outside.ip(),
                    "local backends see the outside client's address"
                );
                t.add(&backend);
            }
            t
        })
        .expect("enter outside netns");
    println!("150 NodePort connections: {tally}");
    for b in &backends {
        assert!(
            tally.get(b.name()) > 20,
            "{} under-served: {tally}",
            b.name()
        );
    }

    // UDP: replies come from the node IP and NodePort the client sent to.
    for _ in 0..20 {
        let reply = outside
            .udp_request_unconnected(node_addr(NODE_PORTS.1), T)
            .expect("UDP through the NodePort");
        assert_eq!(reply.from, node_addr(NODE_PORTS.1));
    }
    // A pod reaches the NodePort on the node IP too.
    client
        .tcp_request(node_addr(NODE_PORTS.0), T)
        .expect("pod to NodePort");
    // The ClusterIP keeps working alongside.
    client
        .tcp_request(scenario::cluster_addr(scenario::TCP_PORT.0), T)
        .expect("ClusterIP");
}

#[test]
fn nodeports_are_released_when_the_service_is_deleted() {
    let lab = Lab::new().expect("lab");
    let (_backends, _client, outside, _agent) = scenario::start_with_outside(&lab).expect("scene");
    outside
        .tcp_request(node_addr(NODE_PORTS.0), T)
        .expect("served before the delete");
    lab.remove_config("echo.yaml").expect("delete the Service");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match outside.tcp_request(node_addr(NODE_PORTS.0), T) {
            Err(e) if e.failure() == Failure::Refused => break,
            Ok(_) | Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => {
                panic!("NodePort still answering 3 s after the Service was deleted: {other:?}")
            }
        }
    }
}

#[test]
fn external_ips_not_assigned_to_a_node_are_balanced() {
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
    let yaml = scenario::echo_service(
        "echo",
        scenario::CLUSTER_IP,
        &scenario::ready(&backends.iter().collect::<Vec<_>>()),
    )
    .replacen(
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  externalIPs: [203.0.113.5]\n",
        1,
    );
    lab.write_config("echo.yaml", &yaml).expect("config");
    let mut agent = lab
        .start_agent(&["--external-iface", scenario::EXTERNAL_IFACE])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    // The outside host reaches 203.0.113.5 through the node (its default route): the address is
    // assigned nowhere, only the datapath answers it.
    let mut tally = Tally::default();
    for _ in 0..60 {
        let line = outside
            .tcp_request(
                SocketAddr::from(([203, 0, 113, 5], scenario::TCP_PORT.0)),
                T,
            )
            .expect("externalIP served");
        tally.add(&parse_greeting(&line).expect("greeting").0);
    }
    assert_eq!(tally.0.len(), 3, "balanced over every backend: {tally}");
}

#[test]
fn nodeport_listens_on_the_same_number_for_tcp_and_udp_after_a_type_change() {
    let lab = Lab::new().expect("lab");
    let (backends, _client, outside, _agent) = scenario::start_with_outside(&lab).expect("scene");
    // From the NodePort scene's Service to one whose TCP and UDP ports share nodePort 31000.
    let yaml = scenario::echo_service(
        "echo",
        scenario::CLUSTER_IP,
        &scenario::ready(&backends.iter().collect::<Vec<_>>()),
    )
    .replacen("type: ClusterIP", "type: NodePort", 1)
    .replacen(
        &format!("targetPort: {}\n", scenario::TCP_PORT.1),
        &format!(
            "targetPort: {}\n    nodePort: 31000\n",
            scenario::TCP_PORT.1
        ),
        1,
    )
    .replacen(
        &format!("targetPort: {}\n", scenario::UDP_PORT.1),
        &format!(
            "targetPort: {}\n    nodePort: 31000\n",
            scenario::UDP_PORT.1
        ),
        1,
    );
    lab.write_config("echo.yaml", &yaml).expect("config");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while outside.tcp_request(node_addr(31000), T).is_err() {
        assert!(std::time::Instant::now() < deadline, "TCP 31000 not served");
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = outside
        .udp_request_unconnected(node_addr(31000), T)
        .expect("UDP 31000 served");
    assert_eq!(reply.from, node_addr(31000));
}
