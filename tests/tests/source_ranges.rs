//! loadBalancerSourceRanges: clients outside the ranges get nothing on the LoadBalancer IP, clients inside
//! are served, and the NodePort of the same Service ignores the ranges (as with kube-proxy).

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Failure, Lab,
    scenario::{self, CLUSTER_IP, TCP_PORT, parse_greeting},
};

const T: Duration = Duration::from_secs(2);
const LB_IP: [u8; 4] = [198, 51, 100, 10];

fn lb_service() -> String {
    let endpoints: Vec<_> = [[10, 0, 0, 10], [10, 0, 0, 11], [10, 0, 0, 12]]
        .iter()
        .map(|ip| ((*ip).into(), true))
        .collect();
    let mut services = scenario::echo_service("echo", CLUSTER_IP, &endpoints);
    services = services.replacen(
        "type: ClusterIP",
        "type: LoadBalancer\n  loadBalancerSourceRanges: [172.30.0.0/24]",
        1,
    );
    services = services.replacen(
        &format!("targetPort: {}\n", TCP_PORT.1),
        &format!("targetPort: {}\n    nodePort: 30080\n", TCP_PORT.1),
        1,
    );
    // The status sits at the end of the Service document, before the slice's.
    services.replacen(
        "---\napiVersion: discovery.k8s.io/v1",
        &format!(
            "status:\n  loadBalancer:\n    ingress:\n    - ip: {}.{}.{}.{}\n---\napiVersion: discovery.k8s.io/v1",
            LB_IP[0], LB_IP[1], LB_IP[2], LB_IP[3]
        ),
        1,
    )
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients_and_nodeports_bypass_them() {
    let lab = Lab::new().expect("lab");
    scenario::add_standard_pods(&lab).expect("pods");
    let inside = lab
        .add_external_host("inside", [172, 30, 0, 2], "ext0", [172, 30, 0, 1])
        .expect("allowed host");
    let outside = lab
        .add_external_host("outside", [172, 31, 0, 2], "ext1", [172, 31, 0, 1])
        .expect("denied host");
    lab.write_config("echo.yaml", &lb_service())
        .expect("config");
    let mut agent = lab
        .start_agent(&["--external-iface", "ext0", "--external-iface", "ext1"])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let lb = SocketAddr::from((LB_IP, TCP_PORT.0));
    for _ in 0..10 {
        let line = inside
            .tcp_request(lb, T)
            .expect("a client inside the ranges is served");
        let (_, peer) = parse_greeting(&line).expect("greeting");
        assert_eq!(peer.ip(), inside.ip(), "the client address is preserved");
    }
    let err = outside
        .tcp_request(lb, Duration::from_millis(800))
        .expect_err("a client outside the ranges gets nothing");
    assert_eq!(
        err.failure(),
        Failure::TimedOut,
        "dropped, not refused: {err}"
    );

    // The NodePort of the same Service is not filtered.
    outside
        .tcp_request(SocketAddr::from(([172, 31, 0, 1], 30080)), T)
        .expect("NodePort bypasses loadBalancerSourceRanges");
}
