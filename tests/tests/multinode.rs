//! Behaviours that involve another node: externalTrafficPolicy=Local serves only where a local endpoint
//! is (client address preserved), drops elsewhere, and the health check node port tells load balancers
//! which nodes those are.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use weir_tests::cluster::{Cluster, OUTSIDE, node_ip, node_name};
use weir_tests::scenario::parse_greeting;
use weir_tests::yaml::{TrafficPolicy, documents, endpointslice_with_nodes, nodeport_service_yaml};
use weir_tests::{Failure, Pod};

const T: Duration = Duration::from_secs(2);
const TCP: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const NODE_PORT: u16 = 30080;
const HC_PORT: u16 = 32_100;

fn node_addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::from((node_ip(i), port))
}

/// An ETP=Local LoadBalancer-like NodePort Service with a health check node port, one endpoint on node 0.
fn local_service(cluster: &Cluster) -> (Pod, Pod) {
    let web = cluster.add_pod(0, "web-0").expect("backend");
    web.serve_tcp(TCP).expect("serve");
    let outside = cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
    let service = nodeport_service_yaml(
        "default",
        "web",
        &CLUSTER_IP.to_string(),
        TrafficPolicy::Local,
        &[("tcp", 80, "TCP", TCP, NODE_PORT)],
    )
    .replacen("type: NodePort", "type: LoadBalancer", 1)
    .replacen(
        "spec:\n",
        &format!("spec:\n  healthCheckNodePort: {HC_PORT}\n"),
        1,
    );
    let config = documents(&[
        service,
        endpointslice_with_nodes(
            "default",
            "web-1",
            "web",
            &[("tcp", TCP, "TCP")],
            &[(web.ip(), &node_name(0), true)],
        ),
    ]);
    cluster
        .write_config_everywhere("web.yaml", &config)
        .expect("config");
    (web, outside)
}

#[test]
fn external_traffic_policy_local_serves_only_where_an_endpoint_is_and_preserves_the_client() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, outside) = local_service(&cluster);
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    // Node 0 has the endpoint: served, and the backend sees the outside client itself (no SNAT).
    for _ in 0..5 {
        let line = outside
            .tcp_request(node_addr(0, NODE_PORT), T)
            .expect("node 0 serves");
        let (name, peer) = parse_greeting(&line).expect("greeting");
        assert_eq!(name, web.name());
        assert_eq!(peer.ip(), outside.ip(), "client address preserved");
    }
    // Node 1 has none: it drops (no forwarding to node 0, no reject).
    let err = outside
        .tcp_request(node_addr(1, NODE_PORT), Duration::from_millis(800))
        .expect_err("node 1 must not serve");
    assert_eq!(err.failure(), Failure::TimedOut, "dropped: {err}");

    // The health check node port tells which node to use.
    let hc0 = outside
        .http_get(node_addr(0, HC_PORT), "/healthz", T)
        .expect("node 0 health check");
    assert_eq!(hc0.status, 200, "{}", hc0.body);
    assert!(hc0.body.contains("\"localEndpoints\":1"), "{}", hc0.body);
    let hc1 = outside
        .http_get(node_addr(1, HC_PORT), "/healthz", T)
        .expect("node 1 health check");
    assert_eq!(hc1.status, 503, "{}", hc1.body);
    assert!(hc1.body.contains("\"localEndpoints\":0"), "{}", hc1.body);
}
