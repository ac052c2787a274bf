//! The standard scene shared by the integration tests and `cargo xtask demo`: three echo backends, a
//! client pod, an "echo" Service with TCP, UDP and HTTP ports, and tallies of which backend answered.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;

use crate::backend::parse_reply;
use crate::lab::{Lab, Pod};
use crate::yaml::{documents, endpointslice_yaml, service_yaml};

/// The ClusterIP of the standard Service. It exists nowhere: only the datapath answers it.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Service port → backend port, TCP echo.
pub const TCP_PORT: (u16, u16) = (80, 8080);
/// Service port → backend port, UDP.
pub const UDP_PORT: (u16, u16) = (53, 5353);
/// Service port → backend port, HTTP.
pub const HTTP_PORT: (u16, u16) = (8000, 8081);
/// The backend pods: name and address.
pub const BACKENDS: [(&str, [u8; 4]); 3] = [
    ("backend-a", [10, 0, 0, 10]),
    ("backend-b", [10, 0, 0, 11]),
    ("backend-c", [10, 0, 0, 12]),
];
/// The client pod: name and address.
pub const CLIENT: (&str, [u8; 4]) = ("client", [10, 0, 0, 20]);

/// `ip:port` on the standard ClusterIP.
pub fn cluster_addr(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP, port))
}

/// The IPv6 ClusterIP that IPv6 and dual-stack tests give the standard Service: [`CLUSTER_IP`]'s twin in the
/// lab's address plan ([`crate::lab::v6_twin`]). Like it, assigned nowhere.
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

/// `[ip6]:port` on [`CLUSTER_IP6`].
pub fn cluster_addr6(port: u16) -> SocketAddr {
    SocketAddr::from((CLUSTER_IP6, port))
}

/// Adds a pod that serves the standard TCP, UDP and HTTP backend ports.
pub fn add_backend(lab: &Lab, name: &str, ip: impl Into<Ipv4Addr>) -> anyhow::Result<Pod> {
    let pod = lab.add_pod(name, ip)?;
    pod.serve_tcp(TCP_PORT.1)?;
    pod.serve_udp(UDP_PORT.1)?;
    pod.serve_http(HTTP_PORT.1)?;
    Ok(pod)
}

/// Adds the three [`BACKENDS`] and the [`CLIENT`] pod; returns `(backends, client)`.
pub fn add_standard_pods(lab: &Lab) -> anyhow::Result<(Vec<Pod>, Pod)> {
    let backends = BACKENDS
        .iter()
        .map(|(name, ip)| add_backend(lab, name, *ip))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = lab.add_pod(CLIENT.0, CLIENT.1)?;
    Ok((backends, client))
}

/// The Service `name` alone, with the standard three ports. `cluster_ip` is a string so tests can write
/// invalid ones.
pub fn echo_service_only(name: &str, cluster_ip: &str) -> String {
    service_yaml(
        "default",
        name,
        cluster_ip,
        &[
            ("tcp", TCP_PORT.0, "TCP", TCP_PORT.1),
            ("udp", UDP_PORT.0, "UDP", UDP_PORT.1),
            ("http", HTTP_PORT.0, "TCP", HTTP_PORT.1),
        ],
    )
}

/// A Service `name` at `cluster_ip` with the standard three ports, and its EndpointSlice `<name>-1` with
/// `endpoints` (address, ready), as one multi-document YAML.
pub fn echo_service(name: &str, cluster_ip: Ipv4Addr, endpoints: &[(Ipv4Addr, bool)]) -> String {
    documents(&[
        echo_service_only(name, &cluster_ip.to_string()),
        endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            name,
            &[
                ("tcp", TCP_PORT.1, "TCP"),
                ("udp", UDP_PORT.1, "UDP"),
                ("http", HTTP_PORT.1, "TCP"),
            ],
            endpoints,
        ),
    ])
}

/// Ready endpoints for `pods`.
pub fn ready(pods: &[&Pod]) -> Vec<(Ipv4Addr, bool)> {
    pods.iter().map(|p| (p.ip(), true)).collect()
}

/// Writes `echo.yaml`: the standard Service "echo" at [`CLUSTER_IP`] with `endpoints` ready.
pub fn write_echo_service(lab: &Lab, endpoints: &[&Pod]) -> anyhow::Result<()> {
    lab.write_config(
        "echo.yaml",
        &echo_service("echo", CLUSTER_IP, &ready(endpoints)),
    )
}

/// A backend reply split into backend name and the peer address the backend saw.
pub fn parse_greeting(line: &str) -> anyhow::Result<(String, SocketAddr)> {
    let (pod, peer) =
        parse_reply(line).with_context(|| format!("malformed backend reply {line:?}"))?;
    let peer = peer
        .parse()
        .with_context(|| format!("bad peer address in backend reply {line:?}"))?;
    Ok((pod.to_owned(), peer))
}

/// Counts of answers per backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(pub BTreeMap<String, usize>);

impl Tally {
    /// Counts one answer from `backend`.
    pub fn add(&mut self, backend: &str) {
        *self.0.entry(backend.to_owned()).or_default() += 1;
    }

    /// Answers from `backend` (0 if none).
    pub fn get(&self, backend: &str) -> usize {
        self.0.get(backend).copied().unwrap_or(0)
    }

    /// All answers.
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// `backend`'s share of all answers, in percent.
    pub fn percent(&self, backend: &str) -> f64 {
        match self.total() {
            0 => 0.0,
            total => 100.0 * self.get(backend) as f64 / total as f64,
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, n)| format!("{name}={n} ({:.1}%)", self.percent(name)))
            .collect();
        write!(f, "{} of {}", parts.join(", "), self.total())
    }
}

/// The node's address on the link to [`OUTSIDE`], where NodePorts answer for outside clients.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
/// The node's IPv6 address on the link to [`OUTSIDE`] ([`NODE_IP`]'s twin), given to that link by
/// [`Lab::add_external_host`].
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 1);
/// A host outside the node, `(name, address)`, reached through [`EXTERNAL_IFACE`].
pub const OUTSIDE: (&str, [u8; 4]) = ("outside", [172, 30, 0, 2]);
/// The node's interface towards [`OUTSIDE`] (the agent's `--external-iface`).
pub const EXTERNAL_IFACE: &str = "ext0";
/// NodePorts of the echo Service's `(tcp, udp, http)` ports when it is of type NodePort.
pub const NODE_PORTS: (u16, u16, u16) = (30080, 30053, 30081);

/// [`echo_service`] as type NodePort, with [`NODE_PORTS`].
pub fn echo_nodeport_service(
    name: &str,
    cluster_ip: Ipv4Addr,
    endpoints: &[(Ipv4Addr, bool)],
) -> String {
    echo_service(name, cluster_ip, endpoints)
        .replacen("type: ClusterIP", "type: NodePort", 1)
        .replacen(
            &format!("targetPort: {}\n", TCP_PORT.1),
            &format!(
                "targetPort: {}\n    nodePort: {}\n",
                TCP_PORT.1, NODE_PORTS.0
            ),
            1,
        )
        .replacen(
            &format!("targetPort: {}\n", UDP_PORT.1),
            &format!(
                "targetPort: {}\n    nodePort: {}\n",
                UDP_PORT.1, NODE_PORTS.1
            ),
            1,
        )
        .replacen(
            &format!("targetPort: {}\n", HTTP_PORT.1),
            &format!(
                "targetPort: {}\n    nodePort: {}\n",
                HTTP_PORT.1, NODE_PORTS.2
            ),
            1,
        )
}

/// The standard scene with an outside host: the three backends, the client pod, [`OUTSIDE`] behind
/// [`EXTERNAL_IFACE`], `echo.yaml` as a NodePort Service, and a healthy agent attached to the external
/// interface. Returns `(backends, client, outside, agent)`.
pub fn start_with_outside(lab: &Lab) -> anyhow::Result<(Vec<Pod>, Pod, Pod, crate::Agent<'_>)> {
    let (backends, client) = add_standard_pods(lab)?;
    let outside = lab.add_external_host(OUTSIDE.0, OUTSIDE.1, EXTERNAL_IFACE, NODE_IP)?;
    let ready_all = ready(&backends.iter().collect::<Vec<_>>());
    lab.write_config(
        "echo.yaml",
        &echo_nodeport_service("echo", CLUSTER_IP, &ready_all),
    )?;
    let mut agent = lab.start_agent(&["--external-iface", EXTERNAL_IFACE])?;
    agent.wait_healthy(HEALTHY_TIMEOUT)?;
    Ok((backends, client, outside, agent))
}

/// How long an agent may take from start to its first healthy answer (debug builds load slowly).
pub const HEALTHY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The whole standard scene: [`add_standard_pods`], `echo.yaml` with all three backends ready, and an
/// agent that is healthy. Returns `(backends, client, agent)`.
pub fn start_standard(lab: &Lab) -> anyhow::Result<(Vec<Pod>, Pod, crate::Agent<'_>)> {
    let (backends, client) = add_standard_pods(lab)?;
    write_echo_service(lab, &backends.iter().collect::<Vec<_>>())?;
    let mut agent = lab.start_agent(&[])?;
    agent.wait_healthy(HEALTHY_TIMEOUT)?;
    Ok((backends, client, agent))
}
