//! Service shapes kube-proxy handles, through real packets: several ports, ports added and removed, the
//! same port on TCP and UDP, Services recreated with a new ClusterIP, the service-proxy-name and headless
//! labels.

use std::{net::SocketAddr, time::Duration};

use weir_tests::{
    Failure, Lab, Pod,
    scenario::{self, CLUSTER_IP, parse_greeting},
    yaml::{documents, endpointslice_yaml, service_yaml},
};

const T: Duration = Duration::from_secs(2);

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 3 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Service "svc" at `ip` with `ports` `(name, port, proto, target)` and one slice with all backends.
fn svc(ip: &str, ports: &[(&str, u16, &str, u16)], backends: &[Pod], labels: &str) -> String {
    let slice_ports: Vec<(&str, u16, &str)> =
        ports.iter().map(|(n, _, p, t)| (*n, *t, *p)).collect();
    let mut service = service_yaml("default", "svc", ip, ports);
    if !labels.is_empty() {
        service = service.replacen(
            "  namespace: \"default\"\n",
            &format!("  namespace: \"default\"\n  labels: {labels}\n"),
            1,
        );
    }
    documents(&[
        service,
        endpointslice_yaml(
            "default",
            "svc-1",
            "svc",
            &slice_ports,
            &scenario::ready(&backends.iter().collect::<Vec<_>>()),
        ),
    ])
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

#[test]
fn serve_multiport_endpoints_and_ports_added_or_deleted() {
    let lab = Lab::new().expect("lab");
    // Backends serve TCP lines on 8080 and HTTP on 8081 (see scenario::add_backend).
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let two = [("line", 80, "TCP", 8080), ("web", 8000, "TCP", 8081)];
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &two, &backends, ""),
    )
    .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    // Each port reaches its own targetPort.
    parse_greeting(&client.tcp_request(addr(80), T).expect("port 80")).expect("line server");
    let resp = client.http_get(addr(8000), "/", T).expect("port 8000");
    assert_eq!(resp.status, 200, "the HTTP server behind port 8000");

    // A port added is served within a second; a port removed is refused at once.
    let changed = [("line", 80, "TCP", 8080), ("again", 81, "TCP", 8080)];
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &changed, &backends, ""),
    )
    .expect("config");
    wait_for("port 81 served", || client.tcp_request(addr(81), T).is_ok());
    wait_for("port 8000 refused", || {
        client
            .tcp_request(addr(8000), T)
            .is_err_and(|e| e.failure() == Failure::Refused)
    });
    let err = client.tcp_request(addr(8000), T).expect_err("removed port");
    assert!(
        err.elapsed < Duration::from_secs(1),
        "refused at once: {err}"
    );
}

#[test]
fn serve_endpoints_on_same_port_and_different_protocols() {
    let lab = Lab::new().expect("lab");
    let ports = [("tcp", 53, "TCP", 8080), ("udp", 53, "UDP", 5353)];
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    let backends = [
        lab.pod("backend-a"),
        lab.pod("backend-b"),
        lab.pod("backend-c"),
    ];
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &ports, &backends, ""),
    )
    .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    parse_greeting(&client.tcp_request(addr(53), T).expect("TCP 53")).expect("TCP line server");
    let reply = client.udp_request(addr(53), T).expect("UDP 53");
    parse_greeting(&reply.line).expect("UDP server");
}

#[test]
fn work_after_the_service_has_been_recreated_with_a_new_cluster_ip() {
    let lab = Lab::new().expect("lab");
    let ports = [("tcp", 80, "TCP", 8080)];
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    let backends = [
        lab.pod("backend-a"),
        lab.pod("backend-b"),
        lab.pod("backend-c"),
    ];
    lab.write_config("svc.yaml", &svc("10.96.0.20", &ports, &backends, ""))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let old = SocketAddr::from(([10, 96, 0, 20], 80));
    client.tcp_request(old, T).expect("served");

    lab.remove_config("svc.yaml").expect("delete");
    wait_for("old ClusterIP gone", || {
        client.tcp_request(old, Duration::from_millis(300)).is_err()
    });
    lab.write_config("svc.yaml", &svc("10.96.0.21", &ports, &backends, ""))
        .expect("recreate");
    let new = SocketAddr::from(([10, 96, 0, 21], 80));
    wait_for("new ClusterIP served", || {
        client.tcp_request(new, T).is_ok()
    });
    assert!(
        client.tcp_request(old, Duration::from_millis(300)).is_err(),
        "old ClusterIP stays gone"
    );
}

#[test]
fn service_proxy_name_and_headless_labels_decide_who_serves() {
    let lab = Lab::new().expect("lab");
    let ports = [("tcp", 80, "TCP", 8080)];
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    let backends = [
        lab.pod("backend-a"),
        lab.pod("backend-b"),
        lab.pod("backend-c"),
    ];
    let other = "{service.kubernetes.io/service-proxy-name: other}";
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &ports, &backends, other),
    )
    .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    assert!(
        client
            .tcp_request(addr(80), Duration::from_millis(500))
            .is_err(),
        "a Service of another proxy is not programmed"
    );
    // Removing the label programs it.
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &ports, &backends, ""),
    )
    .expect("config");
    wait_for("programmed once the label is gone", || {
        client.tcp_request(addr(80), T).is_ok()
    });
    // The headless label un-programs it.
    let headless = "{service.kubernetes.io/headless: \"\"}";
    lab.write_config(
        "svc.yaml",
        &svc(&CLUSTER_IP.to_string(), &ports, &backends, headless),
    )
    .expect("config");
    wait_for("headless is not programmed", || {
        client
            .tcp_request(addr(80), Duration::from_millis(300))
            .is_err()
    });
}

#[test]
fn deleting_a_udp_service_ends_its_established_flows() {
    let lab = Lab::new().expect("lab");
    let (backends, client, _agent) = scenario::start_standard(&lab).expect("scene");
    // Another Service on the same backends keeps them programmed, so only the purge can end the flow.
    lab.write_config(
        "other.yaml",
        &scenario::echo_service(
            "other",
            [10, 96, 0, 30].into(),
            &scenario::ready(&backends.iter().collect::<Vec<_>>()),
        ),
    )
    .expect("config");
    let sock = client
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(scenario::cluster_addr(scenario::UDP_PORT.0))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("netns")
        .expect("socket");
    let mut buf = [0u8; 256];
    sock.send(b"1").expect("send");
    sock.recv(&mut buf)
        .expect("served while the Service exists");

    lab.remove_config("echo.yaml").expect("delete the Service");
    // Same 5-tuple: without the purge its conntrack entry would keep reaching the old backend.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let _ = sock.send(b"2");
        if sock.recv(&mut buf).is_err() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "UDP flow still served 3 s after the delete"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
