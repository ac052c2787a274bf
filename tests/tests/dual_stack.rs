//! IPv6 and dual-stack Services, as kube-proxy serves them: an IPv6 ClusterIP (single-stack IPv6 or the
//! second ClusterIP of a dual-stack Service) is balanced over the endpoints of the Service's
//! `addressType: IPv6` EndpointSlices, an IPv4 one over its IPv4 slices only; NodePorts answer on the
//! node's IPv6 addresses for Services with an IPv6 ClusterIP, and only for those. Every pod, node and
//! outside host of the lab is dual-stack (address plan in `weir_tests::lab`); every test builds its own
//! lab and agent.
//!
//! Where cheap, a test first checks the IPv4 side of the same scene, so a failure on the IPv6 side
//! says "IPv6 not served", not "the lab or the agent is broken".

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use weir_tests::client::{ClientError, tcp_connect, tcp_request};
use weir_tests::cluster::{Cluster, OUTSIDE as FABRIC_OUTSIDE, node_ip, node_ip6, node_name};
use weir_tests::scenario::{self, HEALTHY_TIMEOUT, Tally, parse_greeting};
use weir_tests::yaml::{
    IpFamily, TrafficPolicy, documents, endpointslice_yaml_family, nodeport_service_yaml_ips,
    service_yaml_ips,
};
use weir_tests::{Failure, Lab, Pod};

/// Per client operation.
const T: Duration = Duration::from_secs(2);
/// How long a change (or a fresh agent's first sync) may take to be served.
const PROGRAMMING: Duration = Duration::from_secs(5);

const CLUSTER_IP4: Ipv4Addr = scenario::CLUSTER_IP;
/// [`CLUSTER_IP4`]'s twin. Assigned nowhere: only the datapath answers it.
const CLUSTER_IP6: Ipv6Addr = scenario::CLUSTER_IP6;
/// Service port → backend port.
const TCP_PORT: (u16, u16) = (80, 8080);
const UDP_PORT: (u16, u16) = (53, 5353);
/// Node ports of the TCP and UDP ports when the Service is of type NodePort.
const NODE_PORTS: (u16, u16) = (30080, 30053);

fn ports() -> [(&'static str, u16, &'static str, u16); 2] {
    [
        ("tcp", TCP_PORT.0, "TCP", TCP_PORT.1),
        ("udp", UDP_PORT.0, "UDP", UDP_PORT.1),
    ]
}

fn node_ports() -> [(&'static str, u16, &'static str, u16, u16); 2] {
    [
        ("tcp", TCP_PORT.0, "TCP", TCP_PORT.1, NODE_PORTS.0),
        ("udp", UDP_PORT.0, "UDP", UDP_PORT.1, NODE_PORTS.1),
    ]
}

fn slice_ports() -> [(&'static str, u16, &'static str); 2] {
    [("tcp", TCP_PORT.1, "TCP"), ("udp", UDP_PORT.1, "UDP")]
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// An EndpointSlice `<service>-<v4|v6>` of `family` with `endpoints` (address, node, ready).
fn slice(service: &str, family: IpFamily, endpoints: &[(IpAddr, Option<&str>, bool)]) -> String {
    let suffix = match family {
        IpFamily::V4 => "v4",
        IpFamily::V6 => "v6",
    };
    endpointslice_yaml_family(
        "default",
        &format!("{service}-{suffix}"),
        service,
        family,
        &slice_ports(),
        endpoints,
    )
}

/// Ready endpoints at `pods`' IPv6 addresses (no node names).
fn ready6(pods: &[&Pod]) -> Vec<(IpAddr, Option<&'static str>, bool)> {
    pods.iter().map(|p| (p.ip6().into(), None, true)).collect()
}

/// Ready endpoints at `pods`' IPv4 addresses (no node names).
fn ready4(pods: &[&Pod]) -> Vec<(IpAddr, Option<&'static str>, bool)> {
    pods.iter().map(|p| (p.ip().into(), None, true)).collect()
}

/// A single-stack IPv6 Service `echo` at [`CLUSTER_IP6`] with one IPv6 slice of `endpoints`.
fn ipv6_echo(endpoints: &[&Pod]) -> String {
    documents(&[
        service_yaml_ips("default", "echo", &[CLUSTER_IP6.into()], &ports()),
        slice("echo", IpFamily::V6, &ready6(endpoints)),
    ])
}

/// Adds pods that serve [`TCP_PORT`] and [`UDP_PORT`] backends (both families), named `names`, at
/// `10.0.0.10` and up (IPv6 `fd00:10::10` and up).
fn add_backends(lab: &Lab, names: &[&str]) -> Vec<Pod> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pod = lab
                .add_pod(name, [10, 0, 0, 10 + i as u8])
                .unwrap_or_else(|e| panic!("pod {name}: {e:#}"));
            pod.serve_tcp(TCP_PORT.1).expect("TCP backend");
            pod.serve_udp(UDP_PORT.1).expect("UDP backend");
            pod
        })
        .collect()
}

/// Retries `attempt` until it succeeds or [`PROGRAMMING`] has passed; panics naming `what` and the last
/// error, which is the useful part of a failure ("unreachable", "refused", "timed out").
fn eventually<R>(what: &str, mut attempt: impl FnMut() -> Result<R, ClientError>) -> R {
    let deadline = Instant::now() + PROGRAMMING;
    loop {
        match attempt() {
            Ok(r) => return r,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: not served within {PROGRAMMING:?}; last attempt: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits until `client` gets a TCP greeting from `addr`, then makes `n` connections and checks each one:
/// the socket's peer is `addr` itself (the reply came from the frontend), and the backend saw the client's
/// own address and port (`seen_as`: the client's address of `addr`'s family, or whatever is expected
/// after SNAT). Returns who answered.
fn tcp_tally(client: &Pod, addr: SocketAddr, seen_as: IpAddr, n: usize) -> Tally {
    eventually(&format!("TCP {} -> {addr}", client.name()), || {
        client.tcp_request(addr, T)
    });
    client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                let mut conn = tcp_connect(addr, T)
                    .unwrap_or_else(|e| panic!("connection {i} of {n} to {addr}: {e}"));
                assert_eq!(
                    conn.stream().peer_addr().expect("getpeername"),
                    addr,
                    "the connection's peer is the frontend"
                );
                let line = conn.read_line().unwrap_or_else(|e| panic!("greeting: {e}"));
                let (backend, peer) = parse_greeting(&line).expect("greeting");
                assert_eq!(
                    peer.ip(),
                    seen_as,
                    "{backend} saw {peer}, expected {seen_as}: {line}"
                );
                if seen_as == conn.local_addr().expect("local addr").ip() {
                    assert_eq!(
                        peer,
                        conn.local_addr().expect("local addr"),
                        "the backend saw the client's own address and port"
                    );
                }
                tally.add(&backend);
            }
            tally
        })
        .expect("enter the client's netns")
}

/// Waits until `client`'s UDP request to `addr` is answered, then sends `n` from fresh unconnected
/// sockets (which report a reply's source) and checks each reply comes from `addr` and names `seen_as` as
/// the sender the backend saw; one more from a connected socket. Returns who answered.
fn udp_tally(client: &Pod, addr: SocketAddr, seen_as: IpAddr, n: usize) -> Tally {
    eventually(&format!("UDP {} -> {addr}", client.name()), || {
        client.udp_request_unconnected(addr, T)
    });
    let tally = client
        .run(|| {
            let mut tally = Tally::default();
            for i in 0..n {
                let reply = weir_tests::client::udp_request_unconnected(addr, T)
                    .unwrap_or_else(|e| panic!("datagram {i} of {n} to {addr}: {e}"));
                assert_eq!(
                    reply.from, addr,
                    "the reply comes from the frontend: {reply:?}"
                );
                let (backend, peer) = parse_greeting(&reply.line).expect("reply");
                assert_eq!(
                    peer.ip(),
                    seen_as,
                    "{backend} saw {peer}, expected {seen_as}"
                );
                tally.add(&backend);
            }
            tally
        })
        .expect("enter the client's netns");
    let reply = client
        .udp_request(addr, T)
        .unwrap_or_else(|e| panic!("connected UDP socket to {addr}: {e}"));
    assert_eq!(reply.from, addr);
    tally
}

fn names(tally: &Tally) -> BTreeSet<String> {
    tally.0.keys().cloned().collect()
}

fn set(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name().to_owned()).collect()
}

/// `client` reaches `server`'s TCP and UDP backends at `server`'s IPv6 address directly (plain routing,
/// nothing translated), and the backend sees `seen_as`.
fn assert_direct6(client: &Pod, server: &Pod, seen_as: Ipv6Addr) {
    let what = format!("{} -> {} over IPv6", client.name(), server.name());
    let line = client
        .tcp_request(at(server.ip6(), TCP_PORT.1), T)
        .unwrap_or_else(|e| panic!("{what}, TCP: {e}"));
    let (name, peer) = parse_greeting(&line).expect("greeting");
    assert_eq!(
        (name.as_str(), peer.ip()),
        (server.name(), seen_as.into()),
        "{what}: {line}"
    );
    let target = at(server.ip6(), UDP_PORT.1);
    let reply = client
        .udp_request_unconnected(target, T)
        .unwrap_or_else(|e| panic!("{what}, UDP: {e}"));
    assert_eq!(
        reply.from, target,
        "{what}: the reply comes from the backend itself"
    );
    let (name, peer) = parse_greeting(&reply.line).expect("greeting");
    assert_eq!(
        (name.as_str(), peer.ip()),
        (server.name(), seen_as.into()),
        "{what}"
    );
}

/// Not a Service behaviour: the lab's own IPv6 plumbing, with no agent, so a failure of the tests below
/// can be told apart from a broken lab. Pods reach pods on the same and on other nodes, outside hosts
/// reach node IPs (and, in a lone lab, pods through the node), the node reaches its pods from its own
/// address, and every backend sees the sender's own IPv6 address.
#[test]
fn dual_stack_lab_routes_ipv6_between_pods_nodes_and_outside_hosts() {
    let cluster = Cluster::new(2).expect("cluster");
    let serve = |pod: &Pod| {
        pod.serve_tcp(TCP_PORT.1).expect("TCP backend");
        pod.serve_udp(UDP_PORT.1).expect("UDP backend");
    };
    let a = cluster.add_pod(0, "pod-a").expect("pod on node 0");
    let a2 = cluster.add_pod(0, "pod-a2").expect("second pod on node 0");
    let b = cluster.add_pod(1, "pod-b").expect("pod on node 1");
    assert_eq!(a.ip6(), "fd00:10::10".parse::<Ipv6Addr>().expect("ip"));
    assert_eq!(b.ip6(), "fd00:10:0:1::10".parse::<Ipv6Addr>().expect("ip"));
    assert_eq!(
        node_ip6(1),
        "fd00:172:30::11".parse::<Ipv6Addr>().expect("ip")
    );
    let outside = cluster
        .add_outside(FABRIC_OUTSIDE.0, FABRIC_OUTSIDE.1)
        .expect("outside host");
    let node1 = cluster.node_host(1);
    for pod in [&a, &a2, &b, &node1] {
        serve(pod);
    }
    assert_direct6(&a, &b, a.ip6());
    assert_direct6(&b, &a, b.ip6());
    assert_direct6(&a2, &a, a2.ip6());
    assert_direct6(&outside, &node1, outside.ip6());
    assert_direct6(&a, &node1, a.ip6());
    let err = outside
        .tcp_request(at(b.ip6(), TCP_PORT.1), T)
        .expect_err("pods are not routed from the fabric's outside hosts");
    assert_eq!(err.failure(), Failure::Unreachable, "{err}");

    let lab = Lab::new().expect("lab");
    let pod = lab.add_pod("pod", [10, 0, 0, 10]).expect("pod");
    serve(&pod);
    let host = lab
        .add_external_host(
            scenario::OUTSIDE.0,
            scenario::OUTSIDE.1,
            scenario::EXTERNAL_IFACE,
            scenario::NODE_IP,
        )
        .expect("outside host");
    assert_direct6(&host, &pod, host.ip6());
    let line = lab
        .in_node(|| tcp_request(at(pod.ip6(), TCP_PORT.1), T))
        .expect("enter node netns")
        .expect("node -> pod over IPv6");
    assert_eq!(
        parse_greeting(&line).expect("greeting").1.ip(),
        IpAddr::from(weir_tests::lab::NODE_LO6),
        "the node speaks from its own address on lo"
    );
}

#[test]
fn ipv6_clusterip_serves_tcp_and_udp_and_replies_from_the_clusterip() {
    let lab = Lab::new().expect("lab");
    let backends = add_backends(&lab, &["backend-a", "backend-b"]);
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client");
    let all: Vec<&Pod> = backends.iter().collect();
    lab.write_config("echo.yaml", &ipv6_echo(&all))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    let tcp = tcp_tally(
        &client,
        at(CLUSTER_IP6, TCP_PORT.0),
        client.ip6().into(),
        60,
    );
    println!(
        "60 TCP connections to [{CLUSTER_IP6}]:{}: {tcp}",
        TCP_PORT.0
    );
    assert_eq!(names(&tcp), set(&all), "balanced over both backends: {tcp}");

    let udp = udp_tally(
        &client,
        at(CLUSTER_IP6, UDP_PORT.0),
        client.ip6().into(),
        60,
    );
    println!("60 UDP requests to [{CLUSTER_IP6}]:{}: {udp}", UDP_PORT.0);
    assert_eq!(names(&udp), set(&all), "balanced over both backends: {udp}");
}

#[test]
fn dual_stack_service_serves_both_families() {
    let lab = Lab::new().expect("lab");
    // Different pods in each family's slice, so "each family to its own endpoints" is visible.
    let backends = add_backends(&lab, &["v4-a", "v4-b", "v6-a", "v6-b"]);
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client");
    let (v4, v6) = ([&backends[0], &backends[1]], [&backends[2], &backends[3]]);
    let config = documents(&[
        service_yaml_ips(
            "default",
            "echo",
            &[CLUSTER_IP4.into(), CLUSTER_IP6.into()],
            &ports(),
        ),
        slice("echo", IpFamily::V4, &ready4(&v4)),
        slice("echo", IpFamily::V6, &ready6(&v6)),
    ]);
    lab.write_config("echo.yaml", &config).expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    // IPv4 first: the primary family, served today; it also shows the lab and agent work.
    let tcp4 = tcp_tally(&client, at(CLUSTER_IP4, TCP_PORT.0), client.ip().into(), 40);
    assert_eq!(
        names(&tcp4),
        set(&v4),
        "IPv4 ClusterIP to the IPv4 slice only: {tcp4}"
    );
    let udp4 = udp_tally(&client, at(CLUSTER_IP4, UDP_PORT.0), client.ip().into(), 40);
    assert_eq!(
        names(&udp4),
        set(&v4),
        "IPv4 ClusterIP to the IPv4 slice only: {udp4}"
    );

    let tcp6 = tcp_tally(
        &client,
        at(CLUSTER_IP6, TCP_PORT.0),
        client.ip6().into(),
        40,
    );
    assert_eq!(
        names(&tcp6),
        set(&v6),
        "IPv6 ClusterIP to the IPv6 slice only: {tcp6}"
    );
    let udp6 = udp_tally(
        &client,
        at(CLUSTER_IP6, UDP_PORT.0),
        client.ip6().into(),
        40,
    );
    assert_eq!(
        names(&udp6),
        set(&v6),
        "IPv6 ClusterIP to the IPv6 slice only: {udp6}"
    );
}

#[test]
fn ipv6_clusterip_without_endpoints_is_refused() {
    let lab = Lab::new().expect("lab");
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client");
    lab.write_config("echo.yaml", &ipv6_echo(&[]))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    let tcp = at(CLUSTER_IP6, TCP_PORT.0);
    let udp = at(CLUSTER_IP6, UDP_PORT.0);
    // Until programmed, a refusal may still be something else (the node has no route to a ClusterIP).
    let refused = |r: Result<String, ClientError>| match r {
        Err(e) if e.failure() == Failure::Refused => Ok(()),
        Err(e) => Err(e),
        Ok(line) => panic!("answered although the Service has no endpoint: {line}"),
    };
    eventually(&format!("a refusal of TCP to {tcp}"), || {
        refused(client.tcp_request(tcp, Duration::from_secs(1)))
    });
    eventually(&format!("a refusal of UDP to {udp}"), || {
        refused(
            client
                .udp_request(udp, Duration::from_secs(1))
                .map(|r| r.line),
        )
    });

    // At once, every time: a RST / an ICMPv6 port unreachable, never a timeout.
    for i in 0..5 {
        let err = client
            .tcp_request(tcp, Duration::from_secs(3))
            .expect_err("TCP must fail");
        assert_eq!(err.failure(), Failure::Refused, "TCP attempt {i}: {err}");
        assert!(
            err.elapsed < Duration::from_secs(1),
            "TCP refusal too slow: {err}"
        );
        let err = client
            .udp_request(udp, Duration::from_secs(3))
            .expect_err("UDP must fail");
        assert_eq!(
            err.failure(),
            Failure::Refused,
            "UDP attempt {i}: the connected socket's recv must fail with ECONNREFUSED: {err}"
        );
        assert!(
            err.elapsed < Duration::from_secs(1),
            "UDP refusal too slow: {err}"
        );
    }
}

#[test]
fn ipv6_nodeport_answers_on_the_node_ipv6_address_for_local_and_remote_backends() {
    let cluster = Cluster::new(2).expect("cluster");
    let web0 = cluster.add_pod(0, "web-0").expect("pod on node 0");
    let web1 = cluster.add_pod(1, "web-1").expect("pod on node 1");
    for pod in [&web0, &web1] {
        pod.serve_tcp(TCP_PORT.1).expect("TCP backend");
        pod.serve_udp(UDP_PORT.1).expect("UDP backend");
    }
    let outside = cluster
        .add_outside(FABRIC_OUTSIDE.0, FABRIC_OUTSIDE.1)
        .expect("outside host");
    let config = |backend: &Pod, node: usize| {
        let node = node_name(node);
        documents(&[
            nodeport_service_yaml_ips(
                "default",
                "web",
                &[CLUSTER_IP4.into(), CLUSTER_IP6.into()],
                TrafficPolicy::Cluster,
                &node_ports(),
            ),
            slice(
                "web",
                IpFamily::V4,
                &[(backend.ip().into(), Some(node.as_str()), true)],
            ),
            slice(
                "web",
                IpFamily::V6,
                &[(backend.ip6().into(), Some(node.as_str()), true)],
            ),
        ])
    };
    // Cluster::agent_args gives each agent both node IPs (`--node-ip` twice).
    cluster
        .write_config_everywhere("web.yaml", &config(&web0, 0))
        .expect("config");
    let _agents = cluster.start_agents(|_| Vec::new()).expect("agents");

    // IPv4 first (served today): the cluster, the Service and the agents work.
    let tcp4 = tcp_tally(
        &outside,
        at(node_ip(0), NODE_PORTS.0),
        outside.ip().into(),
        5,
    );
    assert_eq!(names(&tcp4), set(&[&web0]), "{tcp4}");

    // A backend on the same node: the outside client's own IPv6 address reaches it (no SNAT).
    let node6 = |port| at(node_ip6(0), port);
    let tcp6 = tcp_tally(&outside, node6(NODE_PORTS.0), outside.ip6().into(), 10);
    assert_eq!(names(&tcp6), set(&[&web0]), "local backend: {tcp6}");
    let udp6 = udp_tally(&outside, node6(NODE_PORTS.1), outside.ip6().into(), 10);
    assert_eq!(names(&udp6), set(&[&web0]), "local backend: {udp6}");

    // Only a backend on the other node: node 0 forwards, SNATed to its own IPv6 address so the reply
    // comes back through it; the client still sees the node's address and nodePort as the source.
    cluster
        .write_config_everywhere("web.yaml", &config(&web1, 1))
        .expect("config with only a remote backend");
    let remote = |attempt: Result<String, ClientError>| {
        let line = attempt?;
        match parse_greeting(&line) {
            Ok((name, _)) if name == web1.name() => Ok(()),
            _ => Err(ClientError {
                failure: Failure::Other,
                op: "wait for the remote backend",
                addr: node6(NODE_PORTS.0),
                elapsed: Duration::ZERO,
                source: std::io::Error::other(format!("still answered as {line:?}")),
            }),
        }
    };
    eventually("the NodePort's switch to the remote backend", || {
        remote(outside.tcp_request(node6(NODE_PORTS.0), T))
    });
    let tcp6 = tcp_tally(&outside, node6(NODE_PORTS.0), node_ip6(0).into(), 10);
    assert_eq!(names(&tcp6), set(&[&web1]), "remote backend: {tcp6}");
    let udp6 = udp_tally(&outside, node6(NODE_PORTS.1), node_ip6(0).into(), 10);
    assert_eq!(names(&udp6), set(&[&web1]), "remote backend: {udp6}");
}

#[test]
fn single_stack_ipv4_service_is_not_served_on_ipv6_node_address() {
    let lab = Lab::new().expect("lab");
    let backends = add_backends(&lab, &["backend-a", "backend-b"]);
    let outside = lab
        .add_external_host(
            scenario::OUTSIDE.0,
            scenario::OUTSIDE.1,
            scenario::EXTERNAL_IFACE,
            scenario::NODE_IP,
        )
        .expect("outside host");
    let node_ip6 = scenario::NODE_IP6;
    let all: Vec<&Pod> = backends.iter().collect();
    let config = documents(&[
        nodeport_service_yaml_ips(
            "default",
            "echo",
            &[CLUSTER_IP4.into()],
            TrafficPolicy::Cluster,
            &node_ports(),
        ),
        slice("echo", IpFamily::V4, &ready4(&all)),
    ]);
    lab.write_config("echo.yaml", &config).expect("config");
    let (node4, node6) = (scenario::NODE_IP.to_string(), node_ip6.to_string());
    let mut agent = lab
        .start_agent(&[
            "--external-iface",
            scenario::EXTERNAL_IFACE,
            "--node-ip",
            &node4,
            "--node-ip",
            &node6,
        ])
        .expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    // The Service is served where it should be: on the node's IPv4 address.
    tcp_tally(
        &outside,
        at(scenario::NODE_IP, NODE_PORTS.0),
        outside.ip().into(),
        5,
    );
    // And the node's IPv6 address is reachable from outside: a host-network listener answers there.
    let probe = lab
        .in_node(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, 9099)))
        .expect("enter node netns")
        .expect("host-network IPv6 listener");
    outside
        .run(|| std::net::TcpStream::connect_timeout(&at(node_ip6, 9099), T))
        .expect("enter outside netns")
        .expect("the outside host reaches the node's IPv6 address");
    drop(probe);

    // The nodePort on the IPv6 address is the node's own port: nothing listens, so its stack refuses
    // (or, if dropped, it times out). Never a backend.
    for i in 0..5 {
        match outside.tcp_request(at(node_ip6, NODE_PORTS.0), T) {
            Ok(line) => {
                panic!("attempt {i}: an IPv4-only Service answered on [{node_ip6}]: {line}")
            }
            Err(e) => assert!(
                matches!(e.failure(), Failure::Refused | Failure::TimedOut),
                "attempt {i}: not translated means refused by the node or dropped, got {e}"
            ),
        }
        match outside
            .udp_request_unconnected(at(node_ip6, NODE_PORTS.1), Duration::from_millis(500))
        {
            Ok(reply) => {
                panic!("attempt {i}: an IPv4-only Service answered UDP on [{node_ip6}]: {reply:?}")
            }
            Err(e) => assert_eq!(e.failure(), Failure::TimedOut, "attempt {i}: {e}"),
        }
    }
}

#[test]
fn ipv6_host_network_client_reaches_clusterip() {
    let lab = Lab::new().expect("lab");
    let backends = add_backends(&lab, &["backend-a", "backend-b", "backend-c"]);
    let all: Vec<&Pod> = backends.iter().collect();
    let config = documents(&[
        service_yaml_ips(
            "default",
            "echo",
            &[CLUSTER_IP4.into(), CLUSTER_IP6.into()],
            &ports(),
        ),
        slice("echo", IpFamily::V4, &ready4(&all)),
        slice("echo", IpFamily::V6, &ready6(&all)),
    ]);
    lab.write_config("echo.yaml", &config).expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    // IPv4 first: the socket hooks are in place for host-network clients.
    let tcp4 = at(CLUSTER_IP4, TCP_PORT.0);
    eventually(&format!("host-network TCP -> {tcp4}"), || {
        lab.in_node(|| tcp_request(tcp4, T))
            .expect("enter node netns")
    });

    let tcp6 = at(CLUSTER_IP6, TCP_PORT.0);
    let udp6 = at(CLUSTER_IP6, UDP_PORT.0);
    eventually(&format!("host-network TCP -> {tcp6}"), || {
        lab.in_node(|| tcp_request(tcp6, T))
            .expect("enter node netns")
    });
    let tally = lab
        .in_node(|| {
            let mut tally = Tally::default();
            for i in 0..60 {
                let mut conn =
                    tcp_connect(tcp6, T).unwrap_or_else(|e| panic!("host connection {i}: {e}"));
                assert_eq!(
                    conn.stream().peer_addr().expect("getpeername"),
                    tcp6,
                    "getpeername shows the ClusterIP"
                );
                let line = conn.read_line().expect("greeting");
                let (backend, peer) = parse_greeting(&line).expect("greeting");
                assert!(peer.is_ipv6(), "reached {backend} over IPv6: {line}");
                tally.add(&backend);
            }
            tally
        })
        .expect("enter node netns");
    assert_eq!(
        names(&tally),
        set(&all),
        "balanced over every backend: {tally}"
    );

    // UDP from an unconnected socket: recvfrom shows the ClusterIP as the sender.
    lab.in_node(|| {
        let s = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).expect("bind");
        s.set_read_timeout(Some(T)).expect("timeout");
        for i in 0..10 {
            s.send_to(b"ping", udp6)
                .unwrap_or_else(|e| panic!("sendto {udp6} ({i}): {e}"));
            let mut buf = [0u8; 256];
            let (n, from) = s
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("reply {i} from {udp6}: {e}"));
            assert_eq!(from, udp6, "recvfrom shows the ClusterIP");
            parse_greeting(&String::from_utf8_lossy(&buf[..n])).expect("backend reply");
        }
    })
    .expect("enter node netns");
}

#[test]
fn ipv6_pod_hairpins_back_to_itself() {
    let lab = Lab::new().expect("lab");
    let backends = add_backends(&lab, &["backend-a", "backend-b"]);
    let me = &backends[0];
    lab.write_config("echo.yaml", &ipv6_echo(&[me]))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    let tcp = at(CLUSTER_IP6, TCP_PORT.0);
    eventually(&format!("hairpin TCP {} -> {tcp}", me.name()), || {
        me.tcp_request(tcp, T)
    });
    for i in 0..20 {
        let mut conn = me
            .tcp_connect(tcp, T)
            .unwrap_or_else(|e| panic!("hairpin connection {i}: {e}"));
        let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        assert_eq!(backend, me.name(), "answered by itself");
        assert_eq!(
            conn.exchange("ping").expect("echo"),
            format!("{} ping", me.name()),
            "a long exchange works both ways"
        );
    }
    let udp = at(CLUSTER_IP6, UDP_PORT.0);
    let reply = eventually(&format!("hairpin UDP {} -> {udp}", me.name()), || {
        me.udp_request_unconnected(udp, T)
    });
    assert_eq!(reply.from, udp, "the reply comes from the ClusterIP");
    assert_eq!(parse_greeting(&reply.line).expect("reply").0, me.name());
}

#[test]
fn ipv6_service_with_a_removed_endpoint_keeps_established_flows() {
    let lab = Lab::new().expect("lab");
    let backends = add_backends(&lab, &["backend-a", "backend-b"]);
    let client = lab.add_pod("client", [10, 0, 0, 20]).expect("client");
    let (keep, remove) = (&backends[0], &backends[1]);
    lab.write_config("echo.yaml", &ipv6_echo(&[keep, remove]))
        .expect("config");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent.wait_healthy(HEALTHY_TIMEOUT).expect("healthy");

    let tcp = at(CLUSTER_IP6, TCP_PORT.0);
    eventually(&format!("TCP -> {tcp}"), || client.tcp_request(tcp, T));
    // Open connections until a few land on the backend that stays.
    let mut kept = Vec::new();
    for i in 0..40 {
        let mut conn = client
            .tcp_connect(tcp, T)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let (backend, _) = parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
        if backend == keep.name() {
            kept.push(conn);
        }
        if kept.len() == 5 {
            break;
        }
    }
    assert_eq!(kept.len(), 5, "40 connections, under 5 to {}", keep.name());

    lab.write_config("echo.yaml", &ipv6_echo(&[keep]))
        .expect("remove an endpoint");
    // Programmed when 20 new connections in a row all go to the remaining backend.
    let deadline = Instant::now() + PROGRAMMING;
    let mut in_a_row = 0;
    while in_a_row < 20 {
        assert!(
            Instant::now() < deadline,
            "new connections still reach {} {PROGRAMMING:?} after its removal",
            remove.name()
        );
        let line = client.tcp_request(tcp, T).expect("new connection");
        in_a_row = if parse_greeting(&line).expect("greeting").0 == keep.name() {
            in_a_row + 1
        } else {
            0
        };
    }
    for (i, conn) in kept.iter_mut().enumerate() {
        assert_eq!(
            conn.exchange(&format!("still {i}"))
                .unwrap_or_else(|e| panic!("established connection {i}: {e}")),
            format!("{} still {i}", keep.name()),
            "an established flow to a remaining backend survives the change"
        );
    }
}
