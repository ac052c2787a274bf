//! The multi-node topology itself: pods on different nodes reach each other through the nodes' routes, an
//! outside host reaches node IPs (and nothing else), a dropped cluster leaves no namespace or link behind;
//! and, with one agent per node, a NodePort served by a local backend and a ClusterIP with a backend on
//! another node (the reply enters the client's node through its uplink).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use weir_tests::cluster::{BRIDGE, Cluster, OUTSIDE, UPLINK, node_ip, node_name};
use weir_tests::netns::NETNS_RUN_DIR;
use weir_tests::scenario::parse_greeting;
use weir_tests::yaml::{TrafficPolicy, documents, endpointslice_with_nodes, nodeport_service_yaml};
use weir_tests::{Failure, Pod};

const T: Duration = Duration::from_secs(2);
const TCP: u16 = 8080;
const UDP: u16 = 5353;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// `(tcp, udp)` node ports of the "web" Service.
const NODE_PORTS: (u16, u16) = (30080, 30053);

/// Asserts that `client` reaches `server`'s TCP and UDP backends directly, and that the backend saw the
/// client's own address (plain routing: nothing translated on the way).
fn assert_direct(client: &Pod, server: &Pod) {
    let line = client
        .tcp_request((server.ip(), TCP), T)
        .unwrap_or_else(|e| panic!("{} -> {} TCP: {e}", client.name(), server.name()));
    let (name, peer) = parse_greeting(&line).expect("greeting");
    assert_eq!(name, server.name(), "{line}");
    assert_eq!(
        peer.ip(),
        client.ip(),
        "the backend sees the client: {line}"
    );

    let target = SocketAddr::from((server.ip(), UDP));
    let reply = client
        .udp_request_unconnected(target, T)
        .unwrap_or_else(|e| panic!("{} -> {} UDP: {e}", client.name(), server.name()));
    assert_eq!(
        reply.from, target,
        "the reply comes from the backend itself"
    );
    let (name, peer) = parse_greeting(&reply.line).expect("greeting");
    assert_eq!(name, server.name());
    assert_eq!(peer.ip(), client.ip());
}

fn serve(pod: &Pod) {
    pod.serve_tcp(TCP).expect("TCP backend");
    pod.serve_udp(UDP).expect("UDP backend");
}

#[test]
fn pods_on_different_nodes_reach_each_other_through_node_routes() {
    let cluster = Cluster::new(3).expect("cluster");
    let a = cluster.add_pod(0, "pod-a").expect("pod on node 0");
    let b = cluster.add_pod(1, "pod-b").expect("pod on node 1");
    let c = cluster.add_pod(2, "pod-c").expect("pod on node 2");
    let a2 = cluster.add_pod(0, "pod-a2").expect("second pod on node 0");
    assert_eq!(a.ip(), Ipv4Addr::new(10, 0, 0, 10));
    assert_eq!(b.ip(), Ipv4Addr::new(10, 0, 1, 10));
    assert_eq!(c.ip(), Ipv4Addr::new(10, 0, 2, 10));
    assert_eq!(a2.ip(), Ipv4Addr::new(10, 0, 0, 11));
    for pod in [&a, &b, &c, &a2] {
        serve(pod);
    }

    assert_direct(&a, &b);
    assert_direct(&b, &a);
    assert_direct(&c, &a);
    assert_direct(&a, &c);
    // Same node: the node's /32 pod route, no fabric.
    assert_direct(&a2, &a);

    // Names identify a pod cluster-wide; addresses stay in the node's range.
    assert!(cluster.add_pod(1, "pod-a").is_err(), "duplicate name");
    assert!(
        cluster.add_pod_at(1, "pod-x", [10, 0, 0, 50]).is_err(),
        "node 0's range on node 1"
    );
}

#[test]
fn outside_host_reaches_node_ips_but_not_pods() {
    let cluster = Cluster::new(2).expect("cluster");
    let outside = cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
    let pod = cluster.add_pod(1, "pod-b").expect("pod");
    serve(&pod);
    // A host-network listener on node 1 only.
    let node1 = cluster.node_host(1);
    serve(&node1);

    let line = outside
        .tcp_request((node_ip(1), TCP), T)
        .expect("outside -> node 1 IP, TCP");
    let (name, peer) = parse_greeting(&line).expect("greeting");
    assert_eq!(name, node_name(1));
    assert_eq!(peer.ip(), outside.ip(), "{line}");
    let reply = outside
        .udp_request_unconnected((node_ip(1), UDP), T)
        .expect("outside -> node 1 IP, UDP");
    assert_eq!(reply.from, SocketAddr::from((node_ip(1), UDP)));

    // Node 0 is up and answers too, with a refusal: nothing listens on its IP.
    let refused = outside
        .tcp_request((node_ip(0), TCP), T)
        .expect_err("node 0 has no listener");
    assert_eq!(refused.failure(), Failure::Refused, "{refused}");

    // No route to the pod ranges: an external client only knows node IPs.
    let unreachable = outside
        .tcp_request((pod.ip(), TCP), T)
        .expect_err("pods are not routed from outside");
    assert_eq!(unreachable.failure(), Failure::Unreachable, "{unreachable}");

    // Nodes reach each other's IPs, and pods reach other nodes' IPs (node 0 routes via its uplink).
    let line = cluster
        .node_host(0)
        .tcp_request((node_ip(1), TCP), T)
        .expect("node 0 -> node 1");
    assert_eq!(parse_greeting(&line).expect("greeting").1.ip(), node_ip(0));
    let client = cluster.add_pod(0, "client").expect("client");
    let line = client
        .tcp_request((node_ip(1), TCP), T)
        .expect("pod on node 0 -> node 1 IP");
    assert_eq!(parse_greeting(&line).expect("greeting").1.ip(), client.ip());
}

/// Network interfaces of the namespace `netns` refers to, read from a thread inside it (through the
/// descriptor, so it works after the name is gone).
fn links_in(netns: &File) -> Vec<String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            // /proc/thread-self/net shows the calling thread's namespace.
            let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
            dev.lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|name| name.trim().to_owned())
                .collect()
        })
        .join()
        .expect("links thread")
    })
}

#[test]
fn dropping_a_cluster_removes_every_namespace_and_link() {
    let cluster = Cluster::new(2).expect("cluster");
    let a = cluster.add_pod(0, "pod-a").expect("pod");
    let b = cluster.add_pod(1, "pod-b").expect("pod");
    let outside = cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
    // Running backends and a host-network listener: teardown must stop them too.
    serve(&b);
    serve(&cluster.node_host(0));
    assert_direct(&a, &b);
    outside
        .tcp_request((node_ip(0), TCP), T)
        .expect("outside -> node 0");

    let names = cluster.netns_names();
    assert_eq!(names.len(), 1 + 2 * 2 + 1, "{names:?}");
    let listed = weir_tests::netns::ip(&["netns", "list"]).expect("ip netns list");
    for name in &names {
        assert!(listed.contains(name.as_str()), "{name} not in {listed}");
    }
    // Hold the fabric open past the drop: its bridge ports vanish only when the node and outside
    // namespaces are really freed (each port's veth peer lives there), not merely unnamed.
    let fabric = File::open(Path::new(NETNS_RUN_DIR).join(cluster.fabric_netns())).expect("fabric");
    let mut links = links_in(&fabric);
    links.sort();
    let mut expected = [BRIDGE, "lo", "node0", "node1", "out0"];
    expected.sort();
    assert_eq!(links, expected, "fabric links");
    let uplink = cluster
        .node(1)
        .in_node(|| nix::net::if_::if_nametoindex(UPLINK))
        .expect("enter node 1");
    assert!(uplink.is_ok(), "node 1 has its {UPLINK}");

    drop(cluster);

    let listed = weir_tests::netns::ip(&["netns", "list"]).expect("ip netns list");
    for name in &names {
        assert!(
            !listed.contains(&format!("{name} ")) && !listed.lines().any(|l| l == name),
            "{name} still listed: {listed}"
        );
        assert!(
            !Path::new(NETNS_RUN_DIR).join(name).exists(),
            "{name} still mounted"
        );
    }
    // Namespaces are freed asynchronously (cleanup_net), so give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let links = links_in(&fabric);
        if links.iter().all(|l| l == "lo" || l == BRIDGE) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bridge ports still present 20 s after the drop (a node or outside namespace leaked): {links:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_panicking_test_still_tears_its_cluster_and_agents_down() {
    // (namespaces, lab dirs, agent pids) seen inside the test that panics.
    let seen = std::sync::Mutex::new((Vec::new(), Vec::new(), Vec::new()));
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(2).expect("cluster");
        cluster.add_pod(0, "pod-a").expect("pod");
        cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
        let agents = cluster.start_agents(|_| Vec::new()).expect("agents");
        if let Ok(mut seen) = seen.lock() {
            seen.0 = cluster.netns_names();
            seen.1 = cluster.labs().iter().map(|l| l.dir().to_owned()).collect();
            seen.2 = agents.iter().map(|a| a.pid()).collect();
        }
        panic!("deliberate");
    });
    assert!(result.is_err());
    let (names, dirs, pids) = seen.into_inner().expect("seen");
    assert_eq!((names.len(), dirs.len(), pids.len()), (5, 2, 2));
    for name in &names {
        assert!(
            !Path::new(NETNS_RUN_DIR).join(name).exists(),
            "{name} left behind"
        );
    }
    for dir in &dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    // Agent guards reap their process, so the pid is gone (not a zombie).
    for pid in &pids {
        assert!(
            !Path::new("/proc").join(pid.to_string()).exists(),
            "agent {pid} still running"
        );
    }
}

/// Node `i`'s NodePort address for `port`.
fn node_addr(i: usize, port: u16) -> SocketAddr {
    SocketAddr::from((node_ip(i), port))
}

/// Two nodes with agents; "web-0" on node 0 serving TCP and UDP, the only endpoint of the NodePort Service
/// "web" (policy Cluster) that every node knows; an outside host. Returns `(web, outside)`.
fn web_on_node_0(cluster: &Cluster) -> (Pod, Pod) {
    let web = cluster.add_pod(0, "web-0").expect("backend");
    serve(&web);
    let outside = cluster.add_outside(OUTSIDE.0, OUTSIDE.1).expect("outside");
    let config = documents(&[
        nodeport_service_yaml(
            "default",
            "web",
            &CLUSTER_IP.to_string(),
            TrafficPolicy::Cluster,
            &[
                ("tcp", 80, "TCP", TCP, NODE_PORTS.0),
                ("udp", 53, "UDP", UDP, NODE_PORTS.1),
            ],
        ),
        endpointslice_with_nodes(
            "default",
            "web-1",
            "web",
            &[("tcp", TCP, "TCP"), ("udp", UDP, "UDP")],
            &[(web.ip(), &node_name(0), true)],
        ),
    ]);
    cluster
        .write_config_everywhere("web.yaml", &config)
        .expect("config");
    (web, outside)
}

#[test]
fn nodeport_answers_outside_clients_on_the_node_with_the_backend() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, outside) = web_on_node_0(&cluster);
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    for _ in 0..10 {
        let mut conn = outside
            .tcp_connect(node_addr(0, NODE_PORTS.0), T)
            .expect("outside -> node 0 NodePort");
        assert_eq!(
            conn.stream().peer_addr().expect("peer"),
            node_addr(0, NODE_PORTS.0)
        );
        let (name, peer) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(name, web.name());
        assert_eq!(
            peer.ip(),
            outside.ip(),
            "a local backend sees the outside client"
        );
        let reply = outside
            .udp_request_unconnected(node_addr(0, NODE_PORTS.1), T)
            .expect("UDP NodePort");
        assert_eq!(reply.from, node_addr(0, NODE_PORTS.1));
        assert_eq!(
            parse_greeting(&reply.line).expect("greeting").1.ip(),
            outside.ip()
        );
    }
}

#[test]
fn cluster_ip_reaches_a_backend_on_another_node() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, _outside) = web_on_node_0(&cluster);
    let client = cluster.add_pod(1, "client-1").expect("client");
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    // Translated on node 1 (the client's pod interface), routed to node 0 over the fabric; the reply leaves
    // node 0 untranslated and is translated back at node 1's uplink, where it enters.
    for _ in 0..10 {
        let mut conn = client
            .tcp_connect((CLUSTER_IP, 80), T)
            .expect("client on node 1 -> ClusterIP");
        let (name, peer) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(name, web.name());
        assert_eq!(peer.ip(), client.ip(), "no SNAT for pod clients");
        assert_eq!(
            conn.exchange("ping").expect("echo"),
            format!("{} ping", web.name())
        );
        let reply = client
            .udp_request_unconnected((CLUSTER_IP, 53), T)
            .expect("UDP ClusterIP");
        assert_eq!(reply.from, SocketAddr::from((CLUSTER_IP, 53)));
    }
}

#[test]
fn nodeport_on_a_node_without_the_backend_forwards_to_the_remote_backend() {
    let cluster = Cluster::new(2).expect("cluster");
    let (web, outside) = web_on_node_0(&cluster);
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    for _ in 0..10 {
        let mut conn = outside
            .tcp_connect(node_addr(1, NODE_PORTS.0), T)
            .expect("outside -> node 1 NodePort, backend on node 0");
        let (name, peer) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(name, web.name());
        // Policy Cluster through another node: SNAT to that node's IP (as kube-proxy's masquerade), so the
        // reply returns through node 1, which restores the NodePort as its source.
        assert_eq!(peer.ip(), node_ip(1), "the backend sees node 1");
        assert_eq!(
            conn.exchange("ping").expect("echo"),
            format!("{} ping", web.name())
        );
        let reply = outside
            .udp_request_unconnected(node_addr(1, NODE_PORTS.1), T)
            .expect("UDP NodePort on node 1");
        assert_eq!(reply.from, node_addr(1, NODE_PORTS.1));
        assert_eq!(
            parse_greeting(&reply.line).expect("greeting").1.ip(),
            node_ip(1)
        );
    }
    // The node with the backend keeps serving directly, without SNAT.
    let line = outside
        .tcp_request(node_addr(0, NODE_PORTS.0), T)
        .expect("node 0 NodePort");
    assert_eq!(
        parse_greeting(&line).expect("greeting").1.ip(),
        outside.ip()
    );
}
