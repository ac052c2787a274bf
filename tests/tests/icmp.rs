//! ICMP errors about translated flows are translated back: a backend with nothing listening on the UDP
//! target port answers "port unreachable" about the packet it saw (addressed to itself); the client only
//! learns its request was refused if the error names the ClusterIP it sent to.

use std::time::Duration;

use weir_tests::{
    Failure, Lab,
    scenario::{self, CLUSTER_IP},
    yaml::{documents, endpointslice_yaml, service_yaml},
};

#[test]
fn port_unreachable_from_a_backend_reaches_the_client_as_refused() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    // Port 54/UDP targets 5999, where no backend listens.
    let yaml = documents(&[
        service_yaml(
            "default",
            "closed",
            &CLUSTER_IP.to_string(),
            &[("dns", 54, "UDP", 5999)],
        ),
        endpointslice_yaml(
            "default",
            "closed-1",
            "closed",
            &[("dns", 5999, "UDP")],
            &scenario::ready(&backends.iter().collect::<Vec<_>>()),
        ),
    ]);
    lab.write_config("closed.yaml", &yaml).expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    for i in 0..5 {
        let err = client
            .udp_request(
                std::net::SocketAddr::from((CLUSTER_IP, 54)),
                Duration::from_secs(2),
            )
            .expect_err("nothing listens behind this port");
        assert_eq!(
            err.failure(),
            Failure::Refused,
            "request {i}: the backend's port unreachable must reach the client's socket: {err}"
        );
        assert!(err.elapsed < Duration::from_secs(1), "{err}");
    }
}
