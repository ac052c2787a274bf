//! Endpoint selection as kube-proxy does it, through real packets: terminating endpoints as a fallback,
//! internalTrafficPolicy=Local (and its silent drop), topology hints.

use std::time::Duration;

use weir_tests::{
    Failure, Lab,
    scenario::{self, CLUSTER_IP, TCP_PORT, Tally, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

/// The echo Service (TCP port only) with `extra_spec` lines, and a slice whose endpoints are given as
/// `(ip, node, zone, ready, serving, terminating)`.
fn scene(extra_spec: &str, endpoints: &[(&str, &str, &str, bool, bool, bool)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: echo, namespace: default}}\nspec:\n{extra_spec}  \
         clusterIP: {CLUSTER_IP}\n  ports:\n  - {{name: tcp, port: {}, protocol: TCP, targetPort: {}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports:\n- {{name: tcp, port: {}, protocol: TCP}}\n\
         endpoints:\n",
        TCP_PORT.0, TCP_PORT.1, TCP_PORT.1
    );
    for (ip, node, zone, ready, serving, terminating) in endpoints {
        y.push_str(&format!(
            "- addresses: [{ip}]\n  nodeName: {node}\n  conditions: {{ready: {ready}, serving: {serving}, \
             terminating: {terminating}}}\n  hints: {{forZones: [{{name: {zone}}}]}}\n"
        ));
    }
    y
}

fn tally(client: &weir_tests::Pod, n: usize) -> Tally {
    client
        .run(|| {
            let mut t = Tally::default();
            for i in 0..n {
                let line = weir_tests::client::tcp_request(cluster_addr(TCP_PORT.0), T)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                t.add(&parse_greeting(&line).expect("greeting").0);
            }
            t
        })
        .expect("enter client netns")
}

fn wait_for<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not reached within 3 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fallback_to_terminating_endpoints_when_no_endpoint_is_ready() {
    let lab = Lab::new().expect("lab");
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    lab.write_config(
        "echo.yaml",
        &scene(
            "",
            &[
                ("10.0.0.10", "node-a", "z", false, false, true),
                ("10.0.0.11", "node-a", "z", false, true, true),
                ("10.0.0.12", "node-a", "z", false, false, false),
            ],
        ),
    )
    .expect("config");
    let mut agent = lab.start_agent(&["--node-name", "node-a"]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let t = tally(&client, 30);
    assert_eq!(
        t.get("backend-b"),
        30,
        "only the serving, terminating endpoint serves: {t}"
    );
}

#[test]
fn internal_traffic_policy_local_serves_only_local_endpoints_and_drops_when_there_is_none() {
    let lab = Lab::new().expect("lab");
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    let itp = "  internalTrafficPolicy: Local\n";
    lab.write_config(
        "echo.yaml",
        &scene(
            itp,
            &[
                ("10.0.0.10", "node-b", "z", true, true, false),
                ("10.0.0.11", "node-b", "z", true, true, false),
            ],
        ),
    )
    .expect("config");
    let mut agent = lab.start_agent(&["--node-name", "node-a"]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    // kube-proxy drops (the client times out); it does not reject.
    let err = client
        .tcp_request(cluster_addr(TCP_PORT.0), Duration::from_millis(800))
        .expect_err("no local endpoint: no answer");
    assert_eq!(
        err.failure(),
        Failure::TimedOut,
        "dropped, not refused: {err}"
    );

    lab.write_config(
        "echo.yaml",
        &scene(
            itp,
            &[
                ("10.0.0.10", "node-b", "z", true, true, false),
                ("10.0.0.11", "node-a", "z", true, true, false),
                ("10.0.0.12", "node-a", "z", true, true, false),
            ],
        ),
    )
    .expect("config");
    wait_for("local endpoints serving", || {
        client.tcp_request(cluster_addr(TCP_PORT.0), T).is_ok()
    });
    let t = tally(&client, 60);
    assert_eq!(t.get("backend-a"), 0, "backend-a is on another node: {t}");
    assert!(t.get("backend-b") > 0 && t.get("backend-c") > 0, "{t}");
}

#[test]
fn prefer_close_keeps_traffic_in_the_nodes_zone() {
    let lab = Lab::new().expect("lab");
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    lab.write_config(
        "echo.yaml",
        &scene(
            "  trafficDistribution: PreferClose\n",
            &[
                ("10.0.0.10", "node-a", "zone-a", true, true, false),
                ("10.0.0.11", "node-b", "zone-b", true, true, false),
                ("10.0.0.12", "node-c", "zone-b", true, true, false),
            ],
        ),
    )
    .expect("config");
    let mut agent = lab
        .start_agent(&["--node-name", "node-b", "--node-zone", "zone-b"])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let t = tally(&client, 60);
    assert_eq!(
        t.get("backend-a"),
        0,
        "backend-a is hinted for another zone: {t}"
    );
    assert!(t.get("backend-b") > 0 && t.get("backend-c") > 0, "{t}");
}
