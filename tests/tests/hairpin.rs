//! Pods hairpin back to themselves: a backend reaching its own Service through the ClusterIP is answered,
//! by itself when it is the only endpoint, over TCP and UDP.

use std::time::Duration;

use weir_tests::{
    Lab,
    scenario::{self, CLUSTER_IP, TCP_PORT, UDP_PORT, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

#[test]
fn pods_hairpin_back_to_themselves() {
    let lab = Lab::new().expect("lab");
    let (backends, _client) = scenario::add_standard_pods(&lab).expect("pods");
    let me = &backends[0];
    lab.write_config(
        "echo.yaml",
        &scenario::echo_service("echo", CLUSTER_IP, &scenario::ready(&[me])),
    )
    .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    for i in 0..20 {
        let mut conn = me
            .tcp_connect(cluster_addr(TCP_PORT.0), T)
            .unwrap_or_else(|e| panic!("hairpin connection {i}: {e}"));
        let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(backend, me.name(), "answered by itself");
        assert_eq!(
            conn.exchange("ping").expect("echo"),
            format!("{} ping", me.name()),
            "a long exchange works both ways"
        );
    }
    let reply = me
        .udp_request_unconnected(cluster_addr(UDP_PORT.0), T)
        .expect("hairpin UDP");
    assert_eq!(
        reply.from,
        cluster_addr(UDP_PORT.0),
        "the reply comes from the ClusterIP"
    );
    assert_eq!(parse_greeting(&reply.line).expect("reply").0, me.name());
}
