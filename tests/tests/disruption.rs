//! Conntrack and disruption, as kube-proxy's e2e suites check them: a UDP flow follows its Service to a
//! replacement backend within seconds, and a rolling replacement of every backend keeps serving.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use weir_tests::{
    Lab,
    scenario::{self, CLUSTER_IP, TCP_PORT, UDP_PORT, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

#[test]
fn udp_is_preserved_when_the_server_pod_cycles() {
    let lab = Lab::new().expect("lab");
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    let old = lab.pod("backend-a");
    scenario::write_echo_service(&lab, &[&old]).expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let sock: UdpSocket = client
        .run(|| {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(cluster_addr(UDP_PORT.0))?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("netns")
        .expect("socket");
    let mut buf = [0u8; 256];
    let mut ask = || -> Option<String> {
        sock.send(b"ping").ok()?;
        let n = sock.recv(&mut buf).ok()?;
        Some(parse_greeting(&String::from_utf8_lossy(&buf[..n])).ok()?.0)
    };
    assert_eq!(ask().as_deref(), Some("backend-a"));

    // The server pod is replaced: a new pod with a new address takes its place in the Service.
    let new = scenario::add_backend(&lab, "backend-new", [10, 0, 0, 30]).expect("new pod");
    scenario::write_echo_service(&lab, &[&new]).expect("config");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if ask().as_deref() == Some("backend-new") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the same UDP flow never reached the new pod"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn no_disruption_during_a_rolling_update() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    scenario::write_echo_service(&lab, &backends.iter().collect::<Vec<_>>()).expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = client.clone();
        thread::spawn(move || {
            client
                .run(|| {
                    while !stop.load(Ordering::Relaxed) {
                        match weir_tests::client::tcp_request(cluster_addr(TCP_PORT.0), T) {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                        thread::sleep(Duration::from_millis(5));
                    }
                })
                .expect("enter client netns");
        })
    };

    // Replace each backend by a new pod, one at a time, as a Deployment's rolling update does: the new
    // pod becomes ready, then the old one turns terminating, then it leaves the slice.
    let mut current: Vec<_> = backends.clone();
    for (i, old_name) in ["backend-a", "backend-b", "backend-c"].iter().enumerate() {
        let new = scenario::add_backend(&lab, &format!("backend-v2-{i}"), [10, 0, 0, 40 + i as u8])
            .expect("new pod");
        current.push(new);
        scenario::write_echo_service(&lab, &current.iter().collect::<Vec<_>>()).expect("config");
        thread::sleep(Duration::from_millis(500));
        current.retain(|p| p.name() != *old_name);
        let mut endpoints = scenario::ready(&current.iter().collect::<Vec<_>>());
        endpoints.push((lab.pod(old_name).ip(), false));
        lab.write_config(
            "echo.yaml",
            &scenario::echo_service("echo", CLUSTER_IP, &endpoints),
        )
        .expect("config");
        thread::sleep(Duration::from_millis(500));
        scenario::write_echo_service(&lab, &current.iter().collect::<Vec<_>>()).expect("config");
        thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("rolling update: {ok} requests served, {failed} failed");
    assert!(ok > 100, "the load ran: {ok}");
    assert!(
        ok as f64 / (ok + failed) as f64 >= 0.95,
        "at least 95 % served: {ok} ok, {failed} failed"
    );
}
