//! healthCheckNodePort for LoadBalancer Services with externalTrafficPolicy=Local: 200 and the local
//! endpoint count while this node has a ready local endpoint, 503 when it has none or only terminating
//! ones (the load balancer must drain the node while those finish), with kube-proxy's JSON body.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Lab,
    client::HttpResponse,
    scenario::{self, CLUSTER_IP, EXTERNAL_IFACE, NODE_IP, OUTSIDE, TCP_PORT},
};

const T: Duration = Duration::from_secs(2);
const HC_PORT: u16 = 32_000;

/// An ETP=Local LoadBalancer echo Service (TCP port) whose endpoints are `(ip, node, ready, serving,
/// terminating)`.
fn lb_service(endpoints: &[(&str, &str, bool, bool, bool)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n  type: LoadBalancer\n  \
         externalTrafficPolicy: Local\n  healthCheckNodePort: {HC_PORT}\n  clusterIP: {CLUSTER_IP}\n  ports:\n  \
         - {{name: tcp, port: {}, protocol: TCP, targetPort: {}, nodePort: 30080}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {}, protocol: TCP}}\n\
         endpoints:\n",
        TCP_PORT.0, TCP_PORT.1, TCP_PORT.1
    );
    for (ip, node, ready, serving, terminating) in endpoints {
        y.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, \
             terminating: {terminating}}}\n"
        ));
    }
    y
}

fn check(outside: &weir_tests::Pod) -> HttpResponse {
    outside
        .http_get(SocketAddr::from((NODE_IP, HC_PORT)), "/healthz", T)
        .expect("health check node port answers")
}

fn wait_status(outside: &weir_tests::Pod, status: u16) -> HttpResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = check(outside);
        if r.status == status {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} after 3 s: {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_check_node_port_counts_ready_local_endpoints() {
    let lab = Lab::new().expect("lab");
    scenario::add_standard_pods(&lab).expect("pods");
    let outside = lab
        .add_external_host(OUTSIDE.0, OUTSIDE.1, EXTERNAL_IFACE, NODE_IP)
        .expect("outside host");
    lab.write_config(
        "echo.yaml",
        &lb_service(&[
            ("10.0.0.10", "node-a", true, true, false),
            ("10.0.0.11", "node-a", true, true, false),
            ("10.0.0.12", "node-b", true, true, false),
        ]),
    )
    .expect("config");
    let mut agent = lab
        .start_agent(&["--node-name", "node-a", "--external-iface", EXTERNAL_IFACE])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let r = wait_status(&outside, 200);
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["service"]["name"], "echo");
    assert_eq!(body["localEndpoints"], 2);
    assert_eq!(body["serviceProxyHealthy"], true);

    // Only terminating local endpoints (still serving): the node must be drained.
    lab.write_config(
        "echo.yaml",
        &lb_service(&[
            ("10.0.0.10", "node-a", false, true, true),
            ("10.0.0.12", "node-b", true, true, false),
        ]),
    )
    .expect("config");
    let r = wait_status(&outside, 503);
    let body: serde_json::Value = serde_json::from_str(&r.body).expect("JSON body");
    assert_eq!(body["localEndpoints"], 0);

    // Deleting the Service closes the port.
    lab.remove_config("echo.yaml").expect("delete");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while outside
        .http_get(
            SocketAddr::from((NODE_IP, HC_PORT)),
            "/healthz",
            Duration::from_millis(500),
        )
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "health check port still open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
