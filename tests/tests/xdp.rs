//! The XDP fast path of external interfaces (`weir_ext_xdp`, native mode): NodePort traffic whose backend
//! is on another node is translated and sent back out in the driver, both ways, for IPv4 and IPv6;
//! the program is attached natively and goes with SIGTERM; `--no-xdp` leaves the work to TC, which
//! serves the same traffic. The counters prove which path carried the packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use weir_tests::Pod;
use weir_tests::cluster::{Cluster, OUTSIDE, UPLINK, node_ip, node_ip6, node_name};
use weir_tests::metrics::{sample, scrape};
use weir_tests::scenario::parse_greeting;
use weir_tests::yaml::{
    IpFamily, TrafficPolicy, documents, endpointslice_yaml_family, nodeport_service_yaml_ips,
};

const T: Duration = Duration::from_secs(2);
const TCP: u16 = 8080;
const UDP: u16 = 5353;
const NODE_PORTS: (u16, u16) = (30080, 30053);
const CLUSTER_IP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x30);

fn xdp_forwarded(cluster: &Cluster, node: usize) -> f64 {
    let m = scrape(cluster.node(node)).expect("metrics");
    sample(&m, r#"weir_datapath_packets_total{reason="xdp_forwarded"}"#).unwrap_or(0.0)
}

/// A dual-stack NodePort Service "web" whose only endpoint, `web`, runs on node 0; every node knows it.
fn web_on_node_0(cluster: &Cluster) -> (Pod, Pod) {
    let web = cluster.add_pod(0, "web-0").expect("backend");
    web.serve_tcp(TCP).expect("TCP backend");
    web.serve_udp(UDP).expect("UDP backend");
    let outside = cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
    let node = node_name(0);
    let ports = [("tcp", TCP, "TCP"), ("udp", UDP, "UDP")];
    let config = documents(&[
        nodeport_service_yaml_ips(
            "default",
            "web",
            &[CLUSTER_IP4.into(), CLUSTER_IP6.into()],
            TrafficPolicy::Cluster,
            &[
                ("tcp", 80, "TCP", TCP, NODE_PORTS.0),
                ("udp", 53, "UDP", UDP, NODE_PORTS.1),
            ],
        ),
        endpointslice_yaml_family(
            "default",
            "web-v4",
            "web",
            IpFamily::V4,
            &ports,
            &[(web.ip().into(), Some(node.as_str()), true)],
        ),
        endpointslice_yaml_family(
            "default",
            "web-v6",
            "web",
            IpFamily::V6,
            &ports,
            &[(web.ip6().into(), Some(node.as_str()), true)],
        ),
    ]);
    cluster
        .write_config_everywhere("web.yaml", &config)
        .expect("config");
    (web, outside)
}

/// From `outside` to node 1's `node_addr` (TCP and UDP NodePorts), served by `web` on node 0: SNATed
/// to node 1's address of that family, replies from the NodePort.
fn assert_remote_nodeport(outside: &Pod, web: &Pod, node_addr: IpAddr) {
    for _ in 0..5 {
        let tcp = SocketAddr::new(node_addr, NODE_PORTS.0);
        let mut conn = outside
            .tcp_connect(tcp, T)
            .expect("TCP to node 1's NodePort");
        assert_eq!(conn.stream().peer_addr().expect("peer"), tcp);
        let (name, peer) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(name, web.name());
        assert_eq!(
            peer.ip(),
            node_addr,
            "the remote backend sees node 1 (SNAT)"
        );
        assert_eq!(
            conn.exchange("ping").expect("echo"),
            format!("{} ping", web.name())
        );
        let udp = SocketAddr::new(node_addr, NODE_PORTS.1);
        let reply = outside
            .udp_request_unconnected(udp, T)
            .expect("UDP to node 1's NodePort");
        assert_eq!(reply.from, udp);
        assert_eq!(
            parse_greeting(&reply.line).expect("greeting").1.ip(),
            node_addr
        );
    }
}

#[test]
fn nodeport_traffic_to_a_backend_on_another_node_is_forwarded_by_xdp_both_ways() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, outside) = web_on_node_0(&cluster);
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    let before = xdp_forwarded(&cluster, 1);
    assert_remote_nodeport(&outside, &web, node_ip(1).into());
    let v4 = xdp_forwarded(&cluster, 1) - before;
    assert_remote_nodeport(&outside, &web, node_ip6(1).into());
    let v6 = xdp_forwarded(&cluster, 1) - before - v4;
    // Per round trip the driver forwards the request and the reply; the first packet of a flow may go
    // through TC while the neighbour entry is unknown, so require most, not all.
    assert!(v4 >= 20.0, "IPv4: only {v4} packets took the XDP path");
    assert!(v6 >= 20.0, "IPv6: only {v6} packets took the XDP path");
    // Node 0 has the backend: its fast path passes the traffic to the stack (TC delivers it).
    assert_eq!(xdp_forwarded(&cluster, 0), 0.0);
}

#[test]
fn xdp_is_attached_natively_and_released_on_sigterm() {
    let cluster = Cluster::new(1).expect("cluster");
    let mut agents = cluster.start_agents(|_| Vec::new()).expect("agents");
    let show = || {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                cluster.node(0).node_netns(),
                "-d",
                "link",
                "show",
                UPLINK,
            ])
            .output()
            .expect("ip link show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let attached = show();
    assert!(
        attached.contains("prog/xdp") && attached.contains("weir_ext_xdp"),
        "native XDP on {UPLINK}: {attached}"
    );
    let status = agents[0].stop().expect("SIGTERM");
    assert!(status.success(), "agent exit: {status}");
    let released = show();
    assert!(
        !released.contains("weir_ext_xdp"),
        "still attached after SIGTERM: {released}"
    );
}

#[test]
fn with_no_xdp_tc_alone_serves_nodeports_to_other_nodes() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, outside) = web_on_node_0(&cluster);
    let _agents = cluster
        .start_agents(|_| vec!["--no-xdp".to_owned()])
        .expect("agents");
    assert_remote_nodeport(&outside, &web, node_ip(1).into());
    assert_remote_nodeport(&outside, &web, node_ip6(1).into());
    assert_eq!(
        xdp_forwarded(&cluster, 1),
        0.0,
        "--no-xdp attached no fast path"
    );
}
