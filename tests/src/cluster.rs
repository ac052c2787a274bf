//! A multi-node cluster: one [`Lab`] per node, the nodes and outside hosts on one L2 segment (a bridge in a
//! "fabric" namespace), each node routing the other nodes' pod ranges via their node IPs, one agent per node.
//!
//! ```text
//!  fabric netns: br0 ── node0 ─┬─ eth0 172.30.0.10  node-0 netns ── wp* ── pods 10.0.0.0/24
//!                   ├── node1 ─┴─ eth0 172.30.0.11  node-1 netns ── wp* ── pods 10.0.1.0/24
//!                   └── out0 ──── eth0 172.30.0.100 outside host (reaches node IPs only)
//! ```
//!
//! Dual stack, by the lab's address plan ([`crate::lab`], [`v6_twin`]): node `i` also holds
//! `fd00:172:30::(10+i)/64` ([`node_ip6`]) on its uplink, its pods `fd00:10:0:<i>::<host>`
//! ([`pod_cidr6`]), every node routes the other nodes' pod `/64`s via their IPv6 node IPs, and outside
//! hosts hold the twin of their IPv4 address in the fabric's `/64` (on-link only, as for IPv4).
//!
//! Everything is torn down on drop, also when a test panics: agents first (they borrow the cluster, so the
//! borrow checker makes them go first), then the host-network and outside backends, the labs (pods, nodes
//! and uplinks), the outside hosts, and the fabric last.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use anyhow::{Context, bail, ensure};

use crate::agent::Agent;
use crate::lab::{Lab, Pod, Shared, add_addr6, no_dad, v6_twin, v6_twin_net64};
use crate::netns::{self, NetNs, ip, sysctl};
use crate::scenario::HEALTHY_TIMEOUT;

/// Each node's interface onto the fabric (the node side of its uplink veth): where its node IP lives, and
/// the agent's `--external-iface`. Named like a real node's NIC; pod interfaces are `wp*`, so the agent's
/// pod-link watcher never mistakes it for a pod.
pub const UPLINK: &str = "eth0";
/// The bridge in the fabric namespace that joins the nodes' uplinks and the outside hosts.
pub const BRIDGE: &str = "br0";
/// The node network (the fabric's one L2 segment), `172.30.0.0/24`.
pub const NODE_NET: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 0);
/// Node `i` is `172.30.0.(10 + i)`, so node IPs stay below the outside hosts' suggested `.100` and up.
pub const MAX_NODES: usize = 80;
/// The first host number handed out in a node's pod range by [`Cluster::add_pod`] (`10.0.<i>.10`).
pub const FIRST_POD_HOST: u8 = 10;
/// A conventional outside client, `(name, address)`, for [`Cluster::add_outside`].
pub const OUTSIDE: (&str, [u8; 4]) = ("outside", [172, 30, 0, 100]);

/// Node `i`'s IP, `172.30.0.(10 + i)`, on its [`UPLINK`]: what NodePorts answer on and other nodes route
/// node `i`'s pod range through.
pub fn node_ip(i: usize) -> Ipv4Addr {
    assert!(i < MAX_NODES, "node {i}: a cluster has at most {MAX_NODES}");
    let [a, b, c, _] = NODE_NET.octets();
    Ipv4Addr::new(a, b, c, 10 + i as u8)
}

/// Node `i`'s IPv6 address, `fd00:172:30::(10+i)` (the twin of [`node_ip`]), on its [`UPLINK`].
pub fn node_ip6(i: usize) -> Ipv6Addr {
    v6_twin(node_ip(i))
}

/// Node `i`'s name, `node-<i>`: its agent's `--node-name` and the `nodeName` of its pods' endpoints.
pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Address `host` in node `i`'s pod range `10.0.<i>.0/24`.
pub fn pod_ip(i: usize, host: u8) -> Ipv4Addr {
    assert!(i < MAX_NODES, "node {i}: a cluster has at most {MAX_NODES}");
    Ipv4Addr::new(10, 0, i as u8, host)
}

/// Node `i`'s pod range, `10.0.<i>.0/24`.
pub fn pod_cidr(i: usize) -> String {
    format!("{}/24", pod_ip(i, 0))
}

/// IPv6 address `host` in node `i`'s pod range (the twin of [`pod_ip`]: `fd00:10:0:<i>::<host>`).
pub fn pod_ip6(i: usize, host: u8) -> Ipv6Addr {
    v6_twin(pod_ip(i, host))
}

/// Node `i`'s IPv6 pod range, `fd00:10:0:<i>::/64`.
pub fn pod_cidr6(i: usize) -> String {
    v6_twin_net64(pod_ip(i, 0))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test must still be able to tear its cluster down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(Debug)]
struct OutsideHost {
    pod: Pod,
    // Dropped (namespace deleted) during the cluster's teardown, after the labs.
    _netns: NetNs,
}

/// N nodes (labs) on a shared L2 fabric with outside hosts. See the module docs.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    labs: Vec<Lab>,
    fabric: Option<NetNs>,
    outside: Mutex<Vec<OutsideHost>>,
    /// Backends served by the outside hosts and the nodes' host networks ([`Cluster::node_host`]).
    shared: Arc<Shared>,
    /// Held while a name or address is checked and taken, so concurrent adds cannot both take it.
    naming: Mutex<()>,
    /// XDP pass programs on the fabric ends of the uplinks (see [`crate::raw_bpf`]); detached when
    /// the cluster drops.
    xdp_pass: Mutex<Vec<crate::raw_bpf::XdpPass>>,
}

impl Cluster {
    /// A cluster of `nodes` nodes (1..=[`MAX_NODES`]) on a fresh fabric, without agents (see
    /// [`Cluster::start_agents`]). Panics when not root.
    pub fn new(nodes: usize) -> anyhow::Result<Self> {
        netns::require_root();
        netns::reap_stale();
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "a cluster has 1..={MAX_NODES} nodes, not {nodes}"
        );
        let mut cluster = Self {
            id: netns::unique_id(),
            labs: Vec::with_capacity(nodes),
            fabric: None,
            outside: Mutex::new(Vec::new()),
            xdp_pass: Mutex::new(Vec::new()),
            shared: Arc::default(),
            naming: Mutex::new(()),
        };
        // From here on, a failure drops `cluster`, which deletes whatever was already created.
        cluster.fabric = Some(NetNs::create(&format!("weir-{}-fabric", cluster.id))?);
        let fabric = cluster.fabric_netns().to_owned();
        no_dad(&fabric)?;
        ip(&["-n", &fabric, "link", "set", "lo", "up"])?;
        // STP stays off (the default), so ports forward as soon as they are up: no 15 s listening delay.
        // No multicast snooping: without an MLD querier it would only add a way for neighbour
        // discovery's multicast to go astray.
        ip(&[
            "-n",
            &fabric,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &fabric, "link", "set", BRIDGE, "up"])?;
        for i in 0..nodes {
            // The lab sets ip_forward=1 and rp_filter=0 (all and default) in its node namespace; the
            // uplink created below inherits rp_filter=0, and accept_local stays at its default.
            cluster.labs.push(Lab::new()?);
            cluster
                .attach_node(i)
                .with_context(|| format!("attaching {} to the fabric", node_name(i)))?;
        }
        for i in 0..nodes {
            let node = cluster.labs[i].node_netns();
            for j in (0..nodes).filter(|&j| j != i) {
                let via = node_ip(j).to_string();
                ip(&[
                    "-n",
                    node,
                    "route",
                    "add",
                    &pod_cidr(j),
                    "via",
                    &via,
                    "dev",
                    UPLINK,
                ])?;
                let via6 = node_ip6(j).to_string();
                ip(&[
                    "-n",
                    node,
                    "-6",
                    "route",
                    "add",
                    &pod_cidr6(j),
                    "via",
                    &via6,
                    "dev",
                    UPLINK,
                ])?;
            }
        }
        Ok(cluster)
    }

    /// Joins node `i` to the bridge: [`UPLINK`] in the node holding `node_ip(i)/24` and
    /// `node_ip6(i)/64`, its peer `node<i>` a bridge port in the fabric.
    fn attach_node(&self, i: usize) -> anyhow::Result<()> {
        let node = self.labs[i].node_netns();
        let port = format!("node{i}");
        let addr = format!("{}/24", node_ip(i));
        self.plug(node, UPLINK, &port, &addr)?;
        add_addr6(node, &format!("{}/64", node_ip6(i)), UPLINK)?;
        // Explicit, like the lab's other links: requests and replies of one flow may use different nodes.
        sysctl(node, &format!("net.ipv4.conf.{UPLINK}.rp_filter"), "0")?;
        ip(&["-n", node, "link", "set", UPLINK, "up"])?;
        Ok(())
    }

    /// Creates the veth `iface` (in namespace `ns`, holding `cidr`) whose peer `port` is a bridge port in
    /// the fabric, with full checksums put on the wire at both ends; leaves `iface` down.
    fn plug(&self, ns: &str, iface: &str, port: &str, cidr: &str) -> anyhow::Result<()> {
        let fabric = self.fabric_netns();
        // Created in `ns` with the peer directly in the fabric: nothing ever appears in the host's
        // own namespace.
        ip(&[
            "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", port, "netns", fabric,
        ])?;
        ip(&["-n", ns, "addr", "add", cidr, "dev", iface])?;
        // As for pods: no checksum offload to a veth that would never compute it, so every receiver
        // verifies what the datapath rewrote.
        netns::run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", iface, "tx", "off"],
        )?;
        netns::run(
            "ip",
            &["netns", "exec", fabric, "ethtool", "-K", port, "tx", "off"],
        )?;
        ip(&["-n", fabric, "link", "set", port, "master", BRIDGE])?;
        ip(&["-n", fabric, "link", "set", port, "up"])?;
        // The agents' XDP fast path sends NodePort traffic for backends on other nodes back out of the
        // uplink (XDP_TX), which a veth delivers only to a peer that runs XDP as well.
        let pass = crate::raw_bpf::pass_on(fabric, port)?;
        self.xdp_pass
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(pass);
        Ok(())
    }

    /// The cluster's unique id (`<pid>-<counter>`), part of the fabric's and the outside hosts' names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The number of nodes.
    pub fn nodes(&self) -> usize {
        self.labs.len()
    }

    /// Node `i`'s lab: its node namespace, pods, config dir and bpffs. Panics if there is no node `i`.
    pub fn node(&self, i: usize) -> &Lab {
        self.ensure_node(i);
        &self.labs[i]
    }

    /// Panics if there is no node `i` (a bug in the test), naming the cluster.
    fn ensure_node(&self, i: usize) {
        assert!(
            i < self.nodes(),
            "cluster {} has no node {i} (it has {})",
            self.id,
            self.nodes()
        );
    }

    /// Every node's lab, node `i` at index `i`.
    pub fn labs(&self) -> &[Lab] {
        &self.labs
    }

    /// The fabric namespace's name (holds [`BRIDGE`] and a port per node and outside host).
    pub fn fabric_netns(&self) -> &str {
        self.fabric.as_ref().map_or("", NetNs::name)
    }

    /// Every namespace this cluster created, nodes' and pods' included: the names a torn-down cluster
    /// must have removed.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.fabric_netns().to_owned()];
        for lab in &self.labs {
            names.push(lab.node_netns().to_owned());
            names.extend(lab.pods().iter().map(|p| p.netns().to_owned()));
        }
        names.extend(lock(&self.outside).iter().map(|h| h.pod.netns().to_owned()));
        names
    }

    /// Node `i`'s own network namespace as a [`Pod`] named `node-<i>` at `node_ip(i)` and `node_ip6(i)`: host-network
    /// backends (`serve_*`) and clients (node-originated traffic). Its backends stop with the cluster.
    pub fn node_host(&self, i: usize) -> Pod {
        Pod::new(
            &node_name(i),
            self.node(i).node_netns(),
            node_ip(i),
            UPLINK,
            self.shared.clone(),
        )
    }

    /// Fails if a pod or outside host of this cluster is already called `name`: backends put their name in
    /// every reply, so a name must identify one pod cluster-wide.
    fn ensure_name_free(&self, name: &str) -> anyhow::Result<()> {
        let taken = self
            .labs
            .iter()
            .enumerate()
            .flat_map(|(i, lab)| lab.pods().into_iter().map(move |p| (node_name(i), p)))
            .chain(
                lock(&self.outside)
                    .iter()
                    .map(|h| ("the fabric".to_owned(), h.pod.clone())),
            )
            .find(|(_, p)| p.name() == name);
        if let Some((place, pod)) = taken {
            bail!("name {name:?} is taken by {} on {place}", pod.ip());
        }
        Ok(())
    }

    /// Adds pod `name` to node `i` at the next free address of its range, from `10.0.<i>.10` up.
    pub fn add_pod(&self, i: usize, name: &str) -> anyhow::Result<Pod> {
        let lab = self.node(i);
        let _naming = lock(&self.naming);
        self.ensure_name_free(name)?;
        let used: Vec<Ipv4Addr> = lab.pods().iter().map(Pod::ip).collect();
        let Some(addr) = (FIRST_POD_HOST..=254)
            .map(|host| pod_ip(i, host))
            .find(|a| !used.contains(a))
        else {
            bail!("{}'s pod range {} is full", node_name(i), pod_cidr(i));
        };
        lab.add_pod(name, addr)
    }

    /// Adds pod `name` to node `i` at `addr`, which must be in the node's range `10.0.<i>.0/24`.
    pub fn add_pod_at(
        &self,
        i: usize,
        name: &str,
        addr: impl Into<Ipv4Addr>,
    ) -> anyhow::Result<Pod> {
        let addr: Ipv4Addr = addr.into();
        let lab = self.node(i);
        ensure!(
            addr.octets()[..3] == pod_ip(i, 0).octets()[..3]
                && !matches!(addr.octets()[3], 0 | 255),
            "{addr} is not a pod address of {} ({})",
            node_name(i),
            pod_cidr(i)
        );
        let _naming = lock(&self.naming);
        self.ensure_name_free(name)?;
        lab.add_pod(name, addr)
    }

    /// Puts an outside host `name` on the fabric at `addr` (in `172.30.0.0/24`, not a node's IP; by
    /// convention `.100` and up, see [`OUTSIDE`]): its own namespace, `eth0` holding `addr/24` and its
    /// twin `/64` ([`v6_twin`], e.g. `fd00:172:30::100`) bridged with the nodes' uplinks. It has no default route and no route to the pod ranges, so like an external
    /// client it reaches node IPs only (add routes to other frontends with [`Cluster::add_outside_route`]).
    /// The returned pod's `node_iface` is its bridge port in the fabric (`out<k>`).
    pub fn add_outside(&self, name: &str, addr: impl Into<Ipv4Addr>) -> anyhow::Result<Pod> {
        let addr: Ipv4Addr = addr.into();
        ensure!(
            is_valid_name(name) && name != "fabric",
            "invalid outside host name {name:?}: use [a-z0-9-], not \"fabric\""
        );
        let [a, b, c, host] = addr.octets();
        ensure!(
            [a, b, c] == NODE_NET.octets()[..3] && !matches!(host, 0 | 255),
            "{addr} is not a host address of {NODE_NET}/24"
        );
        if let Some(i) = (0..self.nodes()).find(|&i| node_ip(i) == addr) {
            bail!("{addr} is {}'s IP", node_name(i));
        }
        let _naming = lock(&self.naming);
        self.ensure_name_free(name)?;
        let mut outside = lock(&self.outside);
        if let Some(h) = outside.iter().find(|h| h.pod.ip() == addr) {
            bail!("{addr} is taken by outside host {}", h.pod.name());
        }
        let port = format!("out{}", outside.len());
        let netns = NetNs::create(&format!("weir-{}-{name}", self.id))?;
        let pod = Pod::new(name, netns.name(), addr, &port, self.shared.clone());
        outside.push(OutsideHost {
            pod: pod.clone(),
            _netns: netns,
        });
        drop(outside);

        let ns = pod.netns();
        no_dad(ns)?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        self.plug(ns, "eth0", &port, &format!("{addr}/24"))?;
        add_addr6(ns, &format!("{}/64", pod.ip6()), "eth0")?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(pod)
    }

    /// Routes `dest` (a CIDR, e.g. a LoadBalancer IP `198.51.100.10/32`, or an IPv6 one, routed via the
    /// node's [`node_ip6`]) from outside host `host` via node `via_node`'s IP, as a router or load
    /// balancer in front of the cluster would.
    pub fn add_outside_route(&self, host: &Pod, dest: &str, via_node: usize) -> anyhow::Result<()> {
        ensure!(
            lock(&self.outside)
                .iter()
                .any(|h| h.pod.netns() == host.netns()),
            "{} is not an outside host of cluster {}",
            host.name(),
            self.id
        );
        self.ensure_node(via_node);
        let via = if dest.contains(':') {
            node_ip6(via_node).to_string()
        } else {
            node_ip(via_node).to_string()
        };
        ip(&["-n", host.netns(), "route", "add", dest, "via", &via])?;
        Ok(())
    }

    /// The arguments that make an agent node `i` of this cluster: `--node-name node-<i>`,
    /// `--external-iface` [`UPLINK`], `--node-ip` [`node_ip`]`(i)` and `--node-ip` [`node_ip6`]`(i)` (a
    /// dual-stack node has both, as kube-proxy is given both). ([`Lab::start_agent`] adds the config dir,
    /// pod interface prefix and bpffs, all per node.)
    pub fn agent_args(&self, i: usize) -> Vec<String> {
        self.ensure_node(i);
        vec![
            "--node-name".to_owned(),
            node_name(i),
            "--external-iface".to_owned(),
            UPLINK.to_owned(),
            "--node-ip".to_owned(),
            node_ip(i).to_string(),
            "--node-ip".to_owned(),
            node_ip6(i).to_string(),
        ]
    }

    /// Starts node `i`'s agent with [`Cluster::agent_args`] and `extra_args`, without waiting for it to be
    /// healthy (to restart one node's agent, or to watch it start).
    pub fn start_agent(&self, i: usize, extra_args: &[&str]) -> anyhow::Result<Agent<'_>> {
        let args = self.agent_args(i);
        let args: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .chain(extra_args.iter().copied())
            .collect();
        self.node(i).start_agent(&args)
    }

    /// Starts one agent per node (node `i` with [`Cluster::agent_args`] plus `extra_args(i)`), then waits
    /// until every one is healthy. Agents start together, so their slow (debug build) loads overlap. Returns
    /// them by node; a failure stops those already started.
    pub fn start_agents(
        &self,
        extra_args: impl Fn(usize) -> Vec<String>,
    ) -> anyhow::Result<Vec<Agent<'_>>> {
        let mut agents = Vec::with_capacity(self.nodes());
        for i in 0..self.nodes() {
            let extra = extra_args(i);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let agent = self
                .start_agent(i, &extra)
                .with_context(|| format!("starting {}'s agent", node_name(i)))?;
            agents.push(agent);
        }
        for (i, agent) in agents.iter_mut().enumerate() {
            agent
                .wait_healthy(HEALTHY_TIMEOUT)
                .with_context(|| format!("{}'s agent", node_name(i)))?;
        }
        Ok(agents)
    }

    /// Writes `file` into every node's config dir (atomically per node, see [`Lab::write_config`]): every
    /// agent sees the same Services and EndpointSlices, as from one API server.
    pub fn write_config_everywhere(&self, file: &str, contents: &str) -> anyhow::Result<()> {
        for (i, lab) in self.labs.iter().enumerate() {
            lab.write_config(file, contents)
                .with_context(|| format!("config of {}", node_name(i)))?;
        }
        Ok(())
    }

    /// Removes `file` from every node's config dir.
    pub fn remove_config_everywhere(&self, file: &str) -> anyhow::Result<()> {
        for (i, lab) in self.labs.iter().enumerate() {
            lab.remove_config(file)
                .with_context(|| format!("config of {}", node_name(i)))?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Backends first: they hold sockets (and so references) in node and outside namespaces.
        self.shared.stop_backends(&format!("cluster {}", self.id));
        // Each lab deletes its pods and node; the node's uplink veth, and so its bridge port, goes with it.
        self.labs.clear();
        lock(&self.outside).clear();
        // Last: nothing is plugged into the bridge any more.
        self.fabric = None;
    }
}
