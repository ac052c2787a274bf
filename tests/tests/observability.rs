//! What an operator sees: /metrics counts the datapath's work per frontend and per verdict and reports
//! sync health; /state names what is programmed.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Lab,
    client::{HttpResponse, http_get},
    scenario::{self, TCP_PORT, cluster_addr},
};

const T: Duration = Duration::from_secs(2);

fn get(lab: &Lab, path: &str) -> HttpResponse {
    let addr: SocketAddr = "127.0.0.1:10249".parse().expect("addr");
    lab.in_node(|| http_get(addr, path, T))
        .expect("enter node netns")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of the first sample line starting with `prefix` (name plus labels).
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_packets_per_frontend_and_verdict_and_state_names_the_service() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");
    for _ in 0..20 {
        client
            .tcp_request(cluster_addr(TCP_PORT.0), T)
            .expect("connection through the ClusterIP");
    }

    let resp = get(&lab, "/metrics");
    assert_eq!(resp.status, 200);
    let m = resp.body;
    let frontend = format!(
        "frontend=\"{}\"",
        cluster_addr(TCP_PORT.0).to_string() + "/TCP"
    );
    let packets_line = m
        .lines()
        .find(|l| l.starts_with("weir_service_packets_total{") && l.contains(&frontend))
        .unwrap_or_else(|| panic!("no per-service packet counter for {frontend}:\n{m}"));
    assert!(
        packets_line.contains("service=\"default/echo\""),
        "{packets_line}"
    );
    let packets: f64 = packets_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    // 20 connections: at least SYN, ACK and FIN each way per connection.
    assert!(packets >= 20.0 * 4.0, "{packets_line}");
    assert!(
        sample(&m, "weir_datapath_packets_total{reason=\"forward_new\"}").unwrap_or(0.0) >= 20.0,
        "new flows counted:\n{m}"
    );
    assert!(sample(&m, "weir_datapath_packets_total{reason=\"reverse_nat\"}").unwrap_or(0.0) > 0.0);
    assert!(
        sample(&m, "weir_conntrack_entries").unwrap_or(0.0) >= 40.0,
        "two entries per flow"
    );
    assert!(sample(&m, "weir_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(sample(&m, "weir_network_programming_duration_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(
        sample(&m, "weir_programmed_frontends").unwrap_or(0.0) >= 3.0,
        "echo has 3 ports"
    );
    let fill = sample(&m, "weir_map_fill_ratio{map=\"WEIR_SERVICES\"}").expect("fill ratio");
    assert!(fill > 0.0 && fill < 0.01, "{fill}");
    assert!(sample(&m, "weir_map_fill_ratio{map=\"WEIR_CT\"}").unwrap_or(0.0) > 0.0);

    let state = get(&lab, "/state");
    assert_eq!(state.status, 200);
    let state: weir_agent::state::AgentState =
        serde_json::from_str(&state.body).expect("state is AgentState JSON");
    assert!(state.synced);
    let f = state
        .frontends
        .iter()
        .find(|f| f.ip == "10.96.0.10" && f.port == TCP_PORT.0 && f.protocol == "TCP")
        .expect("echo's TCP frontend in /state");
    assert_eq!(f.service, "default/echo");
    assert_eq!(f.backends.len(), 3);
    assert!(f.table_base.is_some() && f.table_size >= 3000);
}
