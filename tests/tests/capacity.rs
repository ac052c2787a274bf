//! Full maps (issue 7, item 4): with a frontend map too small for every Service, the Services that
//! do not fit are refused with an error and a metric, every other one keeps answering, and the refused
//! one comes in as soon as room appears.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use weir_tests::client::{HttpResponse, http_get};
use weir_tests::scenario::{self, BACKENDS, CLIENT, TCP_PORT, parse_greeting};
use weir_tests::yaml::{documents, endpointslice_yaml, service_yaml};
use weir_tests::{Lab, Pod};

const T: Duration = Duration::from_secs(2);

fn get(lab: &Lab, path: &str) -> HttpResponse {
    let addr: SocketAddr = "127.0.0.1:10249".parse().expect("addr");
    lab.in_node(|| http_get(addr, path, T))
        .expect("enter node netns")
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of the sample line starting with `prefix` (name plus labels).
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{metrics}"))
}

fn vip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, 100 + n)
}

/// Service `name` at `vip(n)`, TCP 80 → 8080 on `backend`: three frontend entries (the port, and the
/// ClusterIP's "any other port" entries for TCP and UDP).
fn service(name: &str, n: u8, backend: &Pod) -> String {
    documents(&[
        service_yaml(
            "default",
            name,
            &vip(n).to_string(),
            &[("tcp", TCP_PORT.0, "TCP", TCP_PORT.1)],
        ),
        endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            name,
            &[("tcp", TCP_PORT.1, "TCP")],
            &[(backend.ip(), true)],
        ),
    ])
}

fn answers(client: &Pod, n: u8) -> bool {
    client
        .tcp_request(
            SocketAddr::from((vip(n), TCP_PORT.0)),
            Duration::from_millis(500),
        )
        .ok()
        .and_then(|l| parse_greeting(&l).ok())
        .is_some()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_service_that_does_not_fit_is_refused_with_an_error_and_a_metric_and_comes_in_when_room_appears()
 {
    let lab = Lab::new().expect("lab");
    let backend = scenario::add_backend(&lab, BACKENDS[0].0, BACKENDS[0].1).expect("backend");
    let client = lab.add_pod(CLIENT.0, CLIENT.1).expect("client");
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        lab.write_config(&format!("{name}.yaml"), &service(name, i as u8, &backend))
            .expect("write");
    }
    // Room for exactly three Services of one port.
    let mut agent = lab
        .start_agent(&["--max-services", "9"])
        .expect("start agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    for n in 0..3 {
        wait_until(&format!("service {n} answers"), T * 3, || {
            answers(&client, n)
        });
    }

    lab.write_config("d.yaml", &service("d", 3, &backend))
        .expect("write d");
    agent
        .wait_for_log("cannot program frontend", Duration::from_secs(5))
        .expect("the refusal is logged");
    let log = agent.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("cannot program frontend"))
        .expect("refusal line");
    assert!(
        refusal.contains("default/d") && refusal.contains("WEIR_SERVICES"),
        "the error names the Service and the map: {refusal}"
    );
    let metrics = get(&lab, "/metrics").body;
    assert!(
        sample(&metrics, "weir_refused_frontends ") >= 1.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "weir_sync_errors_total ") >= 1.0);
    assert_eq!(
        sample(&metrics, "weir_map_fill_ratio{map=\"WEIR_SERVICES\"}"),
        1.0
    );
    assert!(!answers(&client, 3), "the refused Service must not answer");
    // Everything programmed before keeps answering, and the agent stays up and healthy.
    for n in 0..3 {
        assert!(
            answers(&client, n),
            "service {n} still answers beside the full map"
        );
    }
    assert!(agent.is_running());
    assert_eq!(agent.healthz().expect("healthz"), 200);

    // Room appears: c goes, d comes in, without a restart.
    let started = Instant::now();
    lab.remove_config("c.yaml").expect("remove c");
    wait_until(
        "d answers once c is deleted",
        Duration::from_secs(5),
        || answers(&client, 3),
    );
    println!("d programmed {:?} after c was deleted", started.elapsed());
    wait_until("refused_frontends back to 0", T, || {
        sample(&get(&lab, "/metrics").body, "weir_refused_frontends ") == 0.0
    });
    assert!(!answers(&client, 2), "c is gone");
    for n in [0, 1, 3] {
        assert!(answers(&client, n), "service {n} answers");
    }
}
