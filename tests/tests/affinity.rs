//! sessionAffinity: ClientIP through real packets: one client's connections stick to one backend, the
//! timeout lets them be balanced anew, and switching affinity off and on takes effect for new connections.

use std::time::Duration;

use weir_tests::{
    Lab,
    scenario::{self, CLUSTER_IP, TCP_PORT, Tally, cluster_addr, parse_greeting},
};

const T: Duration = Duration::from_secs(2);

fn echo_with_affinity(timeout: Option<u32>) -> String {
    let pods = [[10, 0, 0, 10], [10, 0, 0, 11], [10, 0, 0, 12]];
    let endpoints: Vec<_> = pods.iter().map(|ip| ((*ip).into(), true)).collect();
    let yaml = scenario::echo_service("echo", CLUSTER_IP, &endpoints);
    match timeout {
        Some(t) => yaml.replacen(
            "  type: ClusterIP\n",
            &format!(
                "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
                 timeoutSeconds: {t}\n"
            ),
            1,
        ),
        None => yaml,
    }
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

#[test]
fn client_ip_affinity_sticks_times_out_and_can_be_switched() {
    let lab = Lab::new().expect("lab");
    let (_b, client) = scenario::add_standard_pods(&lab).expect("pods");
    lab.write_config("echo.yaml", &echo_with_affinity(Some(2)))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let t = tally(&client, 30);
    assert_eq!(
        t.0.len(),
        1,
        "30 connections from one client hit one backend: {t}"
    );

    // After the timeout, new connections are balanced anew: over several idle periods, more than one
    // backend must show up (each period's first connection is a fresh Maglev pick).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(2200));
        let t = tally(&client, 3);
        assert_eq!(t.0.len(), 1, "within a period the client sticks: {t}");
        seen.extend(t.0.keys().cloned());
        if seen.len() > 1 {
            break;
        }
    }
    assert!(
        seen.len() > 1,
        "after the timeout the client was never rebalanced: {seen:?}"
    );

    // Affinity off: connections spread again.
    lab.write_config("echo.yaml", &echo_with_affinity(None))
        .expect("config");
    std::thread::sleep(Duration::from_millis(1500));
    let t = tally(&client, 60);
    assert_eq!(t.0.len(), 3, "without affinity all backends serve: {t}");

    // And on again (long timeout): sticky from the next connection.
    lab.write_config("echo.yaml", &echo_with_affinity(Some(300)))
        .expect("config");
    std::thread::sleep(Duration::from_millis(1500));
    let t = tally(&client, 30);
    assert_eq!(t.0.len(), 1, "affinity switched back on: {t}");
}
