//! loadBalancerSourceRanges hold against forged sources: raw TCP SYNs and UDP datagrams to the
//! LoadBalancer IP from addresses outside the ranges, among them ones one bit away from the allowed
//! prefix, another frontend's allowed range, the LB IP and a backend's own address, and thousands of
//! random ones, never reach a backend (the backends' IPv4 receive counters stay put), and every one is
//! counted as `drop_source_range`. The same forgery with an in-range source does reach the backends,
//! which proves the counters would have seen a leak.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_tests::scenario::{self, CLUSTER_IP, TCP_PORT, UDP_PORT, parse_greeting};
use weir_tests::yaml::{TrafficPolicy, documents, endpointslice_yaml, loadbalancer_service_yaml};
use weir_tests::{Lab, Pod, metrics, raw};

const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The only range allowed on [`LB_IP`]: the inside host's link.
const ALLOWED: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 30, 0, 0), 24);
/// A second LoadBalancer Service whose own range must not open the first one.
const OTHER_LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const OTHER_ALLOWED: &str = "10.99.0.0/16";
const RANDOM_SOURCES: usize = 3000;
const DROPS: &str = "weir_datapath_packets_total{reason=\"drop_source_range\"}";

fn lb_service(
    name: &str,
    cluster_ip: Ipv4Addr,
    lb_ip: Ipv4Addr,
    range: &str,
    nodeports: (u16, u16),
    backends: &[Pod],
) -> String {
    let ports = [
        ("tcp", TCP_PORT.0, "TCP", TCP_PORT.1, nodeports.0),
        ("udp", UDP_PORT.0, "UDP", UDP_PORT.1, nodeports.1),
    ];
    let svc = loadbalancer_service_yaml(
        "default",
        name,
        &cluster_ip.to_string(),
        TrafficPolicy::Cluster,
        &ports,
        &[lb_ip],
        None,
    )
    .replacen(
        "  clusterIP: ",
        &format!("  loadBalancerSourceRanges: [{range}]\n  clusterIP: "),
        1,
    );
    let endpoints: Vec<(Ipv4Addr, bool)> = backends.iter().map(|p| (p.ip(), true)).collect();
    documents(&[
        svc,
        endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            name,
            &[("tcp", TCP_PORT.1, "TCP"), ("udp", UDP_PORT.1, "UDP")],
            &endpoints,
        ),
    ])
}

fn in_allowed(ip: Ipv4Addr) -> bool {
    let mask = u32::MAX << (32 - ALLOWED.1);
    u32::from(ip) & mask == u32::from(ALLOWED.0) & mask
}

/// Addresses the stack will put on the wire as a source: not 0/8, loopback or multicast and above.
fn sendable(ip: Ipv4Addr) -> bool {
    let first = ip.octets()[0];
    first != 0 && first != 127 && first < 224
}

/// Forged sources outside [`ALLOWED`]: the allowed prefix with each of its 24 bits flipped in turn,
/// the addresses just outside it, another frontend's range, the LB IP itself, a backend, then random.
fn forged_sources(seed: u64) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(172, 30, 0, 5));
    let mut out: Vec<Ipv4Addr> = (0..ALLOWED.1)
        .map(|bit| Ipv4Addr::from(base ^ (1 << (31 - bit))))
        .collect();
    out.extend([
        Ipv4Addr::new(172, 29, 255, 255),
        Ipv4Addr::new(172, 30, 1, 0),
        Ipv4Addr::new(10, 99, 1, 1),
        LB_IP,
        OTHER_LB_IP,
        Ipv4Addr::new(10, 0, 0, 10),
        Ipv4Addr::new(172, 31, 0, 2),
    ]);
    let mut state = seed | 1;
    while out.len() < RANDOM_SOURCES + 31 {
        // xorshift64: reproducible from the printed seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(Ipv4Addr::from((state >> 16) as u32));
    }
    out.retain(|ip| sendable(*ip) && !in_allowed(*ip));
    out
}

/// A SYN and a datagram to [`LB_IP`] from each source, ports varied so every one is a new flow.
fn packets(sources: &[Ipv4Addr]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(sources.len() * 2);
    for (i, src) in sources.iter().enumerate() {
        let port = 10000 + (i % 50000) as u16;
        out.push(raw::tcp_syn(
            SocketAddrV4::new(*src, port),
            SocketAddrV4::new(LB_IP, TCP_PORT.0),
        ));
        out.push(raw::udp(
            SocketAddrV4::new(*src, port),
            SocketAddrV4::new(LB_IP, UDP_PORT.0),
            b"forged\n",
        ));
    }
    out
}

/// Sends in small batches: a burst larger than the veth's backlog would be dropped by the kernel
/// before the datapath ever saw it, and the drop count would then be short for the wrong reason.
fn send_paced(from: &Pod, packets: &[Vec<u8>]) {
    for batch in packets.chunks(100) {
        from.run(|| raw::send_ipv4(batch))
            .expect("enter the attacker's netns")
            .expect("send forged packets");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn received(backends: &[Pod]) -> u64 {
    backends
        .iter()
        .map(|b| {
            b.run(raw::ipv4_in_receives)
                .expect("enter the backend's netns")
                .expect("read its IPv4 counters")
        })
        .sum()
}

#[test]
fn forged_sources_outside_load_balancer_source_ranges_never_reach_a_backend() {
    let lab = Lab::new().expect("lab");
    let (backends, _client) = scenario::add_standard_pods(&lab).expect("pods");
    let inside = lab
        .add_external_host("inside", [172, 30, 0, 2], "ext0", [172, 30, 0, 1])
        .expect("allowed host");
    let attacker = lab
        .add_external_host("attacker", [172, 31, 0, 2], "ext1", [172, 31, 0, 1])
        .expect("attacker host");
    let config = documents(&[
        lb_service(
            "echo",
            CLUSTER_IP,
            LB_IP,
            &format!("{}/{}", ALLOWED.0, ALLOWED.1),
            (30080, 30053),
            &backends,
        ),
        lb_service(
            "other",
            Ipv4Addr::new(10, 96, 0, 11),
            OTHER_LB_IP,
            OTHER_ALLOWED,
            (30180, 30153),
            &backends[..1],
        ),
    ]);
    lab.write_config("services.yaml", &config).expect("config");
    let mut agent = lab
        .start_agent(&["--external-iface", "ext0", "--external-iface", "ext1"])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let lb = std::net::SocketAddr::from((LB_IP, TCP_PORT.0));
    let line = inside
        .tcp_request(lb, Duration::from_secs(2))
        .expect("the allowed host is served");
    parse_greeting(&line).expect("greeting");
    attacker
        .tcp_request(lb, Duration::from_millis(800))
        .expect_err("the attacker's own address is refused");

    // `WEIR_SPOOF_SEED` replays a run's random sources.
    let seed = std::env::var("WEIR_SPOOF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let sources = forged_sources(seed);
    let forged = packets(&sources);
    println!(
        "seed {seed}: {} forged sources, {} packets",
        sources.len(),
        forged.len()
    );
    // Let the connections above finish closing before counting.
    std::thread::sleep(Duration::from_millis(500));
    let (seen_before, drops_before) = (
        received(&backends),
        metrics::counter(&lab, DROPS).expect("metrics"),
    );
    send_paced(&attacker, &forged);
    std::thread::sleep(Duration::from_millis(500));
    let (seen_after, drops_after) = (
        received(&backends),
        metrics::counter(&lab, DROPS).expect("metrics"),
    );
    assert_eq!(
        seen_after, seen_before,
        "forged packets from outside the ranges reached a backend (seed {seed})"
    );
    assert_eq!(
        drops_after - drops_before,
        forged.len() as f64,
        "every forged packet is a counted drop_source_range (seed {seed})"
    );

    // The control: the same forgery from inside the range is let through, and the backends see it.
    let admitted: Vec<Ipv4Addr> = (77..87).map(|i| Ipv4Addr::new(172, 30, 0, i)).collect();
    let control = packets(&admitted);
    send_paced(&attacker, &control);
    std::thread::sleep(Duration::from_millis(500));
    let seen_control = received(&backends) - seen_after;
    assert!(
        seen_control >= control.len() as u64,
        "in-range forgeries must reach the backends ({seen_control} of {} seen): the counters are blind",
        control.len()
    );
    assert_eq!(
        metrics::counter(&lab, DROPS).expect("metrics"),
        drops_after,
        "in-range sources are not dropped"
    );
    assert!(agent.is_running(), "the agent exited");
}
