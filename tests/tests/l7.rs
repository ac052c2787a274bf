//! Services with a Gateway API HTTPRoute: pods' connections to the ClusterIP are steered by the datapath to
//! the agent's L7 proxy, which splits per request by the route's weights.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Lab,
    scenario::{self, Tally, parse_greeting},
    yaml::{documents, endpointslice_yaml, service_yaml},
};

const T: Duration = Duration::from_secs(2);
const WEB: [u8; 4] = [10, 96, 0, 50];

fn http_service(name: &str, ip: &str, pod_ip: std::net::Ipv4Addr) -> String {
    documents(&[
        service_yaml("default", name, ip, &[("http", 80, "TCP", 8081)]),
        endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            name,
            &[("http", 8081, "TCP")],
            &[(pod_ip, true)],
        ),
    ])
}

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs:
    - {name: v1, port: 80, weight: 70}
    - {name: v2, port: 80, weight: 30}
"#;

#[test]
fn an_httproute_splits_requests_to_a_cluster_ip_by_weight() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    lab.write_config("web.yaml", &http_service("web", "10.96.0.50", c.ip()))
        .expect("web");
    lab.write_config("v1.yaml", &http_service("v1", "10.96.0.51", a.ip()))
        .expect("v1");
    lab.write_config("v2.yaml", &http_service("v2", "10.96.0.52", b.ip()))
        .expect("v2");
    lab.write_config("route.yaml", ROUTE).expect("route");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let web = SocketAddr::from((WEB, 80));
    let mut tally = Tally::default();
    for i in 0..200 {
        let resp = client
            .http_get(web, "/", T)
            .unwrap_or_else(|e| panic!("request {i} through the route: {e}"));
        assert_eq!(resp.status, 200, "{resp:?}");
        let (backend, _) = parse_greeting(&resp.body).expect("backend reply");
        tally.add(&backend);
    }
    println!("200 requests through a 70/30 HTTPRoute: {tally}");
    assert_eq!(
        tally.get(c.name()),
        0,
        "the route replaces web's own endpoints: {tally}"
    );
    let share = tally.percent(a.name());
    assert!((share - 70.0).abs() <= 5.0, "v1 got {share:.1} %: {tally}");
    assert_eq!(tally.get(a.name()) + tally.get(b.name()), 200);

    // The Service without a route stays L4: its own endpoint answers directly.
    let direct = client
        .http_get(SocketAddr::from(([10, 96, 0, 51], 80)), "/", T)
        .expect("v1 directly");
    assert_eq!(parse_greeting(&direct.body).expect("reply").0, a.name());
}

/// One HTTP/1.1 keep-alive connection: send `n` requests on it, one after another, and return who
/// answered each (the proxy decides per request, so one connection still splits).
fn keep_alive_tally(stream: std::net::TcpStream, n: usize) -> Tally {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut tally = Tally::default();
    for i in 0..n {
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .expect("send request");
        let mut content_length = None;
        let mut chunked = false;
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200"), "request {i}: {line:?}");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                content_length = v.trim().parse::<usize>().ok();
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        let body = if let Some(len) = content_length {
            let mut b = vec![0u8; len];
            reader.read_exact(&mut b).expect("body");
            b
        } else {
            assert!(chunked, "request {i}: neither length nor chunked");
            let mut b = Vec::new();
            loop {
                line.clear();
                reader.read_line(&mut line).expect("chunk size");
                let size = usize::from_str_radix(line.trim(), 16).expect("hex size");
                let mut chunk = vec![0u8; size + 2];
                reader.read_exact(&mut chunk).expect("chunk");
                if size == 0 {
                    break;
                }
                b.extend_from_slice(&chunk[..size]);
            }
            b
        };
        let text = String::from_utf8_lossy(&body).to_string();
        tally.add(&parse_greeting(&text).expect("backend reply").0);
    }
    tally
}

#[test]
fn one_keep_alive_connection_is_split_per_request() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    lab.write_config("web.yaml", &http_service("web", "10.96.0.50", c.ip()))
        .expect("web");
    lab.write_config("v1.yaml", &http_service("v1", "10.96.0.51", a.ip()))
        .expect("v1");
    lab.write_config("v2.yaml", &http_service("v2", "10.96.0.52", b.ip()))
        .expect("v2");
    lab.write_config("route.yaml", ROUTE).expect("route");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let tally = client
        .run(|| {
            let s = std::net::TcpStream::connect_timeout(&SocketAddr::from((WEB, 80)), T)
                .expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            assert_eq!(s.peer_addr().expect("peer"), SocketAddr::from((WEB, 80)));
            keep_alive_tally(s, 500)
        })
        .expect("enter client netns");
    println!("500 requests on one keep-alive connection: {tally}");
    assert_eq!(tally.get(c.name()), 0, "{tally}");
    let share = tally.percent(a.name());
    assert!((share - 70.0).abs() <= 5.0, "v1 got {share:.1} %: {tally}");
}
