//! The lab: a "node" network namespace, Calico-style "pod" namespaces wired to it by veth pairs, the
//! per-lab temp dir (agent config dir, logs) and bpffs, and the pod handles tests drive backends and
//! clients through.
//!
//! # Dual stack: the IPv6 address plan
//!
//! Every pod, node and outside host is dual-stack. Its IPv6 address is the IPv4 one's *twin*
//! ([`v6_twin`]): `a.b.c.d` becomes `fd00:a:b:c::d`, each decimal octet written as hex digits, so the
//! two read alike in logs and captures (`10.0.1.12` ↔ `fd00:10:0:1::12`), and a `/24` becomes a `/64`.
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | pod (`eth0`) | `10.0.<node>.<host>/32` | `fd00:10:0:<node>::<host>/128` |
//! | pod default route | `via 169.254.1.1` ([`GATEWAY`], proxy ARP) | `via fe80::1 dev eth0` ([`GATEWAY6`]) |
//! | node side of a pod veth (`wp<i>`) | proxy_arp, no address | `fe80::1/64` (link-local gateway) |
//! | node route to a pod | `<ip>/32 dev wp<i>` | `<ip6>/128 dev wp<i>` |
//! | node's own (`lo`) | `169.254.1.1/32` | `fd00:169:254:1::1/128` ([`NODE_LO6`]) |
//! | lone lab's outside link ([`Lab::add_external_host`]) | node `172.30.0.1/24`, host `.2/24` | node `fd00:172:30::1/64`, host `::2/64` |
//! | cluster fabric ([`crate::cluster`]) | node `i`: `172.30.0.(10+i)/24` | node `i`: `fd00:172:30::(10+i)/64` |
//! | cluster pod range of node `i` | `10.0.<i>.0/24` via node `i` | `fd00:10:0:<i>::/64` via node `i`'s v6 |
//! | ClusterIPs tests pick (convention) | `10.96.0.<n>` | `fd00:10:96::<n>` |
//!
//! Node namespaces forward IPv6 (`net.ipv6.conf.all.forwarding=1`). Duplicate address detection is off
//! in every namespace (`accept_dad=0` for `all` and `default`, set before any interface exists) and every
//! address is added `nodad`: a tentative address makes `bind` and `connect` fail, and nothing in a lab can
//! clash anyway. Backends ([`Pod::serve`]) listen on `0.0.0.0:port` and, beside it, on IPv6-only
//! `[::]:port`, and name the peer they saw in every reply, so tests can check a client's own IPv6
//! address arrived.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::agent::Agent;
use crate::backend::{self, Protocol};
use crate::client::{self, ClientError, HttpResponse, TcpConn, UdpReply};
use crate::netns::{self, NetNs, in_netns, ip, sysctl};

/// The pods' default gateway. It exists only as an address on the node's `lo`: pods ARP for it on
/// `eth0` and the node answers (its own address) with the MAC of the pod's veth peer, like Calico's
/// proxy-ARP gateway. The node needs a local address anyway, as the source of its ARP requests and ICMP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The pods' IPv6 default gateway: a link-local address on the node side of every pod veth (the same on
/// each, as link-local addresses are per link). Pods route `default via fe80::1 dev eth0`; the node
/// answers neighbour solicitations for it on that veth.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The node's own IPv6 address on `lo` ([`v6_twin`] of [`GATEWAY`]). Like [`GATEWAY`] for IPv4, it gives a
/// lone node a global source for what it sends itself (host-network clients, ICMPv6 errors); without it
/// the kernel would pick a link-local one, which a pod could answer only on that one link. Unlike
/// 169.254.1.1 it is not link-local, so an agent reading node IPs from netlink (no `--node-ip`) counts it.
pub const NODE_LO6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x169, 0x254, 1, 0, 0, 0, 1);

/// The IPv6 twin of an IPv4 address in the lab's address plan (see the module docs): `a.b.c.d` →
/// `fd00:a:b:c::d`, each decimal octet written as hex digits (`10.0.1.12` → `fd00:10:0:1::12`).
/// Distinct IPv4 addresses have distinct twins, and addresses in one IPv4 `/24` share one IPv6 `/64`.
pub fn v6_twin(v4: Ipv4Addr) -> Ipv6Addr {
    // "12" read as hex is 0x12: the twin reads like the original. Three decimal digits fit a u16.
    let digits = |octet: u8| u16::from_str_radix(&octet.to_string(), 16).unwrap_or_default();
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(0xfd00, digits(a), digits(b), digits(c), 0, 0, 0, digits(d))
}

/// The IPv6 `/64` twin of the IPv4 `/24` holding `v4`, as a CIDR string (`10.0.1.0` → `fd00:10:0:1::/64`).
pub fn v6_twin_net64(v4: Ipv4Addr) -> String {
    let [a, b, c, _] = v4.octets();
    format!("{}/64", v6_twin(Ipv4Addr::new(a, b, c, 0)))
}

/// Turns duplicate address detection off in namespace `ns` for every interface it has and will have. A
/// tentative address cannot be bound or used as a source, and DAD takes a second per address.
pub(crate) fn no_dad(ns: &str) -> anyhow::Result<()> {
    sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
    sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
}

/// `ip -n NS addr add CIDR dev IFACE nodad`: an IPv6 address usable at once (see [`no_dad`]).
pub(crate) fn add_addr6(ns: &str, cidr: &str, iface: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "addr", "add", cidr, "dev", iface, "nodad"])?;
    Ok(())
}

/// Default prefix of the node-side pod interfaces (`wp0`, `wp1`, ...).
pub const DEFAULT_POD_IFACE_PREFIX: &str = "wp";

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

/// Where per-lab bpffs instances are mounted: outside /sys, because `ip netns exec` gives the agent a
/// fresh /sys in which a bpffs mounted under /sys/fs/bpf would not be visible.
pub(crate) const BPFFS_ROOT: &str = "/run/weir-tests";

/// State shared by a lab and its pod handles: the teardown flag and the backend threads to join. A
/// [`crate::cluster::Cluster`] has one too, for the hosts it owns outside any lab.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Stops the backends started through pods sharing this state and joins their threads, so their
    /// sockets are closed before the namespaces they live in are deleted. `owner` names them in messages.
    pub(crate) fn stop_backends(&self, owner: &str) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in lock(&self.threads).drain(..) {
            if handle.join().is_err() {
                eprintln!("weir-tests: a backend thread of {owner} panicked");
            }
        }
    }
}

#[derive(Debug)]
struct PodEntry {
    pod: Pod,
    // Dropped (namespace deleted) during the lab's teardown.
    _netns: NetNs,
}

/// One node namespace plus pod namespaces, all removed on drop. See the crate docs.
#[derive(Debug)]
pub struct Lab {
    id: String,
    node: Option<NetNs>,
    prefix: String,
    pods: Mutex<Vec<PodEntry>>,
    next_index: AtomicUsize,
    next_agent: AtomicUsize,
    shared: Arc<Shared>,
    dir: PathBuf,
    config_dir: PathBuf,
    bpffs: Mutex<Option<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test must still be able to tear its lab down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lab {
    /// A lab whose node-side pod interfaces are named `wp<index>`. Panics when not root.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_pod_iface_prefix(DEFAULT_POD_IFACE_PREFIX)
    }

    /// A lab whose node-side pod interfaces are named `<prefix><index>`. Panics when not root.
    pub fn with_pod_iface_prefix(prefix: &str) -> anyhow::Result<Self> {
        netns::require_root();
        netns::reap_stale();
        ensure!(
            !prefix.is_empty() && prefix.len() <= MAX_IFNAME - 3,
            "pod interface prefix {prefix:?} must be 1..={} bytes",
            MAX_IFNAME - 3
        );
        let id = netns::unique_id();
        let dir = std::env::temp_dir().join(format!("weir-tests-{id}"));
        // A leftover of an earlier process with the same pid: ours now.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("remove stale {}", dir.display()))?;
        }
        let config_dir = dir.join("config");
        std::fs::create_dir_all(&config_dir)
            .with_context(|| format!("create {}", config_dir.display()))?;
        let mut lab = Self {
            node: None,
            prefix: prefix.to_owned(),
            pods: Mutex::new(Vec::new()),
            next_index: AtomicUsize::new(0),
            next_agent: AtomicUsize::new(0),
            shared: Arc::default(),
            dir,
            config_dir,
            bpffs: Mutex::new(None),
            id,
        };
        // From here on, a failure drops `lab`, which deletes whatever was already created.
        let node = NetNs::create(&format!("weir-{}-node", lab.id))?;
        let n = node.name().to_owned();
        lab.node = Some(node);
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{GATEWAY}/32"),
            "dev",
            "lo",
        ])?;
        sysctl(&n, "net.ipv4.ip_forward", "1")?;
        // Before any interface but lo exists, so every later one inherits the defaults.
        no_dad(&n)?;
        sysctl(&n, "net.ipv6.conf.all.forwarding", "1")?;
        sysctl(&n, "net.ipv6.conf.default.forwarding", "1")?;
        add_addr6(&n, &format!("{NODE_LO6}/128"), "lo")?;
        // Pod traffic arrives on one veth and leaves by another; rp_filter must not judge that. The
        // default value is inherited by the veths created later.
        sysctl(&n, "net.ipv4.conf.all.rp_filter", "0")?;
        sysctl(&n, "net.ipv4.conf.default.rp_filter", "0")?;
        Ok(lab)
    }

    /// The lab's unique id (`<pid>-<counter>`), part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node namespace's name (for `ip -n`, `ip netns exec`, [`in_netns`]).
    pub fn node_netns(&self) -> &str {
        self.node.as_ref().map_or("", NetNs::name)
    }

    /// The prefix of the node-side pod interfaces, to pass to the agent as `--pod-iface-prefix`.
    pub fn pod_iface_prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's temp dir (config dir, agent logs), removed on drop unless `WEIR_TESTS_KEEP` is set.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's `--config-dir`.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }

    /// Runs `f` in the node namespace (see [`in_netns`]).
    pub fn in_node<F: FnOnce() -> T + Send, T: Send>(&self, f: F) -> std::io::Result<T> {
        in_netns(self.node_netns(), f)
    }

    /// Creates pod `name` with address `ip` and its IPv6 twin ([`v6_twin`]): its own namespace, `eth0`
    /// holding `ip/32` and `ip6/128`, routes `169.254.1.1 dev eth0`, `default via 169.254.1.1` and
    /// `default via fe80::1 dev eth0`; on the node `<prefix><index>` with proxy_arp and `fe80::1/64`,
    /// and routes `ip/32` and `ip6/128` to it. Pod names are lower-case letters, digits and dashes.
    pub fn add_pod(&self, name: &str, ip_addr: impl Into<Ipv4Addr>) -> anyhow::Result<Pod> {
        let addr: Ipv4Addr = ip_addr.into();
        self.add_pod_with_iface(name, addr, v6_twin(addr), None)
    }

    /// [`Lab::add_pod`] with an explicit IPv6 address instead of the twin.
    pub fn add_pod_dual(&self, name: &str, addr: Ipv4Addr, addr6: Ipv6Addr) -> anyhow::Result<Pod> {
        self.add_pod_with_iface(name, addr, addr6, None)
    }

    /// Deletes pod `name` as a CNI DEL does: its node-side veth (which takes the peer with it), then its
    /// namespace. Backends it served keep their sockets in the orphaned namespace, unreachable, until
    /// the lab drops. Returns the deleted pod's handle.
    pub fn delete_pod(&self, name: &str) -> anyhow::Result<Pod> {
        let mut pods = lock(&self.pods);
        let Some(at) = pods.iter().position(|e| e.pod.name == name) else {
            bail!("lab {} has no pod named {name:?}", self.id);
        };
        let pod = pods[at].pod.clone();
        // The veth first: the namespace itself lives on while the old backends' sockets hold it.
        ip(&["-n", self.node_netns(), "link", "del", &pod.node_iface])?;
        // Dropping the entry deletes the namespace's name, so a new pod can take it.
        pods.remove(at);
        Ok(pod)
    }

    /// Creates a deleted pod again with the same name, addresses and node-side interface name (CNI
    /// plugins derive it from the pod's identity), but a new namespace and veth, so a new ifindex.
    pub fn recreate_pod(&self, old: &Pod) -> anyhow::Result<Pod> {
        self.add_pod_with_iface(&old.name, old.ip, old.ip6, Some(old.node_iface.clone()))
    }

    fn add_pod_with_iface(
        &self,
        name: &str,
        addr: Ipv4Addr,
        addr6: Ipv6Addr,
        iface: Option<String>,
    ) -> anyhow::Result<Pod> {
        ensure!(
            !name.is_empty()
                && name != "node"
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "invalid pod name {name:?}: use [a-z0-9-], not \"node\""
        );
        let mut pods = lock(&self.pods);
        if let Some(e) = pods
            .iter()
            .find(|e| e.pod.name == name || e.pod.ip == addr || e.pod.ip6 == addr6)
        {
            bail!(
                "pod {name} {addr} {addr6} clashes with existing pod {} {} {}",
                e.pod.name,
                e.pod.ip,
                e.pod.ip6
            );
        }
        let iface = iface.unwrap_or_else(|| {
            let index = self.next_index.fetch_add(1, Ordering::Relaxed);
            format!("{}{index}", self.prefix)
        });
        ensure!(
            iface.len() <= MAX_IFNAME,
            "interface name {iface} is too long"
        );
        let node = self.node_netns();
        let netns = NetNs::create(&format!("weir-{}-{name}", self.id))?;
        let pod = Pod {
            name: name.to_owned(),
            netns: netns.name().to_owned(),
            ip: addr,
            ip6: addr6,
            node_iface: iface.clone(),
            shared: self.shared.clone(),
        };
        let ns = pod.netns.clone();
        pods.push(PodEntry {
            pod: pod.clone(),
            _netns: netns,
        });
        drop(pods);

        let cidr = format!("{addr}/32");
        let cidr6 = format!("{addr6}/128");
        let gw = GATEWAY.to_string();
        let gw6 = GATEWAY6.to_string();
        // Before eth0 arrives in the namespace, so it inherits accept_dad=0.
        no_dad(&ns)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // Created directly in the node namespace with its peer directly in the pod's: nothing ever appears
        // in the host's own namespace.
        ip(&[
            "-n", node, "link", "add", &iface, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        sysctl(node, &format!("net.ipv4.conf.{iface}.proxy_arp"), "1")?;
        sysctl(node, &format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        ip(&["-n", node, "link", "set", &iface, "up"])?;
        add_addr6(node, &format!("{gw6}/64"), &iface)?;
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        add_addr6(&ns, &cidr6, "eth0")?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        // Pods put complete checksums on the wire (no offload to a veth that would never compute them),
        // so every receiver verifies them: a translation that breaks a checksum makes tests fail.
        netns::run(
            "ip",
            &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"],
        )?;
        netns::run(
            "ip",
            &["netns", "exec", node, "ethtool", "-K", &iface, "tx", "off"],
        )?;
        ip(&[
            "-n", &ns, "route", "add", &gw, "dev", "eth0", "scope", "link",
        ])?;
        ip(&[
            "-n", &ns, "route", "add", "default", "via", &gw, "dev", "eth0",
        ])?;
        // IPv6 routes need their device up (ENETDOWN otherwise): added after eth0 and the veth are.
        ip(&[
            "-n", &ns, "-6", "route", "add", "default", "via", &gw6, "dev", "eth0",
        ])?;
        ip(&["-n", node, "route", "add", &cidr, "dev", &iface])?;
        ip(&["-n", node, "-6", "route", "add", &cidr6, "dev", &iface])?;
        Ok(pod)
    }

    /// Creates a host outside the node, `name`, joined to it by a link: the node side is `iface`
    /// holding `node_ip/24` and its twin `/64` ([`v6_twin`]), the host side `eth0` holding `host_ip/24`
    /// and its twin `/64`, with default routes via `node_ip` and its twin. It is a [`Pod`] for the
    /// test's purposes (run code in it, serve, connect); traffic from it
    /// reaches the node the way traffic from another machine would, through `iface`.
    pub fn add_external_host(
        &self,
        name: &str,
        host_ip: impl Into<Ipv4Addr>,
        iface: &str,
        node_ip: impl Into<Ipv4Addr>,
    ) -> anyhow::Result<Pod> {
        let host_ip: Ipv4Addr = host_ip.into();
        let node_ip: Ipv4Addr = node_ip.into();
        ensure!(
            iface.len() <= MAX_IFNAME,
            "interface name {iface} is too long"
        );
        let node = self.node_netns().to_owned();
        let netns = NetNs::create(&format!("weir-{}-{name}", self.id))?;
        let pod = Pod {
            name: name.to_owned(),
            netns: netns.name().to_owned(),
            ip: host_ip,
            ip6: v6_twin(host_ip),
            node_iface: iface.to_owned(),
            shared: self.shared.clone(),
        };
        let ns = pod.netns.clone();
        lock(&self.pods).push(PodEntry {
            pod: pod.clone(),
            _netns: netns,
        });
        no_dad(&ns)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &node, "link", "add", iface, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            iface,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            "eth0",
        ])?;
        sysctl(&node, &format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        ip(&["-n", &node, "link", "set", iface, "up"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        // Full checksums on the wire here too, so every receiver verifies the translated packets.
        netns::run(
            "ip",
            &["netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off"],
        )?;
        netns::run(
            "ip",
            &["netns", "exec", &node, "ethtool", "-K", iface, "tx", "off"],
        )?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &node_ip.to_string(),
        ])?;
        add_addr6(&node, &format!("{}/64", v6_twin(node_ip)), iface)?;
        add_addr6(&ns, &format!("{}/64", pod.ip6), "eth0")?;
        ip(&[
            "-n",
            &ns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &v6_twin(node_ip).to_string(),
        ])?;
        Ok(pod)
    }

    /// The handle of pod `name`. Panics if the lab has no such pod (a bug in the test).
    pub fn pod(&self, name: &str) -> Pod {
        let pods = lock(&self.pods);
        match pods.iter().find(|e| e.pod.name == name) {
            Some(e) => e.pod.clone(),
            None => panic!("lab {} has no pod named {name:?}", self.id),
        }
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.pods).iter().map(|e| e.pod.clone()).collect()
    }

    /// Writes `file` in the config dir atomically: a dotfile the agent ignores, then a rename, so the
    /// agent never reads half a file.
    pub fn write_config(&self, file: &str, contents: &str) -> anyhow::Result<()> {
        ensure!(
            !file.contains('/') && !file.starts_with('.'),
            "bad config file name {file:?}"
        );
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        let dest = self.config_dir.join(file);
        std::fs::write(&tmp, contents).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("rename to {}", dest.display()))
    }

    /// Removes `file` from the config dir.
    pub fn remove_config(&self, file: &str) -> anyhow::Result<()> {
        let path = self.config_dir.join(file);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
    }

    /// This lab's bpffs, mounted on first use and unmounted with the lab, so an agent restarted in the
    /// same lab finds its pins again, as on a real node.
    pub fn bpffs_dir(&self) -> anyhow::Result<PathBuf> {
        let mut bpffs = lock(&self.bpffs);
        if let Some(dir) = bpffs.as_ref() {
            return Ok(dir.clone());
        }
        let dir = Path::new(BPFFS_ROOT).join(&self.id).join("bpf");
        crate::bpffs::mount(&dir)?;
        *bpffs = Some(dir.clone());
        Ok(dir)
    }

    /// Starts the agent in the node namespace with this lab's config dir, prefix and bpffs, plus
    /// `extra_args`. See [`Agent::start`].
    pub fn start_agent(&self, extra_args: &[&str]) -> anyhow::Result<Agent<'_>> {
        Agent::start(self, extra_args)
    }

    /// A fresh log path for the next agent started in this lab.
    pub(crate) fn next_agent_log(&self) -> PathBuf {
        let n = self.next_agent.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("agent-{n}.log"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Backends first: they hold sockets (and so references) in the pod namespaces.
        self.shared.stop_backends(&format!("lab {}", self.id));
        // Deleting a pod namespace destroys its veth pair, node side included.
        lock(&self.pods).clear();
        self.node = None;
        if let Some(dir) = lock(&self.bpffs).take() {
            match nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
                // remove_dir (not remove_dir_all): never walk into a bpffs that is still mounted.
                Ok(()) => {
                    let _ = std::fs::remove_dir(&dir);
                    if let Some(parent) = dir.parent() {
                        let _ = std::fs::remove_dir(parent);
                    }
                }
                Err(e) => eprintln!("weir-tests: cannot unmount {}: {e}", dir.display()),
            }
        }
        if std::env::var_os("WEIR_TESTS_KEEP").is_some() {
            eprintln!(
                "weir-tests: keeping {} (WEIR_TESTS_KEEP is set)",
                self.dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("weir-tests: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// A pod of a [`Lab`]: cheap to clone, usable from any thread. Backends it serves run until the lab drops.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    node_iface: String,
    shared: Arc<Shared>,
}

impl Pod {
    /// A handle on an existing namespace `netns` whose backends belong to `shared`: how a
    /// [`crate::cluster::Cluster`] hands out its outside hosts and node host networks as pods. Its IPv6
    /// address is `ip`'s twin ([`v6_twin`]).
    pub(crate) fn new(
        name: &str,
        netns: &str,
        ip: Ipv4Addr,
        node_iface: &str,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            netns: netns.to_owned(),
            ip,
            ip6: v6_twin(ip),
            node_iface: node_iface.to_owned(),
            shared,
        }
    }

    /// The pod's name, which its backends put in every reply.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's address (on its `eth0`).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address (on its `eth0`; see the address plan in the module docs).
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
    }

    /// The pod's address of `ip`'s family: [`Pod::ip`] for IPv4, [`Pod::ip6`] for IPv6. Lets a test
    /// written once for both families check "the backend saw the client's own address".
    pub fn ip_like(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => self.ip.into(),
            IpAddr::V6(_) => self.ip6.into(),
        }
    }

    /// The pod's namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The node-side veth (`wp0`, ...), where the agent attaches its programs.
    pub fn node_iface(&self) -> &str {
        &self.node_iface
    }

    /// Runs `f` inside the pod's namespace (see [`in_netns`]): the way to run many client calls (from
    /// [`crate::client`]) without a thread per call.
    pub fn run<F: FnOnce() -> T + Send, T: Send>(&self, f: F) -> std::io::Result<T> {
        in_netns(&self.netns, f)
    }

    /// Starts a `protocol` backend on `0.0.0.0:port` and IPv6-only `[::]:port` (one thread serves both),
    /// already listening when this returns.
    pub fn serve(&self, protocol: Protocol, port: u16) -> anyhow::Result<()> {
        let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let (name, stop) = (self.name.clone(), self.shared.stop.clone());
        let context = || format!("{protocol:?} backend on {}:{port}", self.name);
        let handle = match protocol {
            Protocol::Udp => {
                let sockets = self
                    .run(|| -> std::io::Result<_> {
                        Ok(vec![
                            std::net::UdpSocket::bind(bind)?,
                            backend::bind_udp_v6only(port)?,
                        ])
                    })
                    .and_then(|r| r);
                backend::spawn_udp_sockets(sockets.with_context(context)?, name, stop)
            }
            Protocol::Tcp | Protocol::Http => {
                let listeners = self
                    .run(|| -> std::io::Result<_> {
                        Ok(vec![
                            std::net::TcpListener::bind(bind)?,
                            backend::listen_tcp_v6only(port)?,
                        ])
                    })
                    .and_then(|r| r);
                backend::spawn_tcp_listeners(listeners.with_context(context)?, name, stop, protocol)
            }
        }
        .with_context(context)?;
        lock(&self.shared.threads).push(handle);
        Ok(())
    }

    /// Runs `body` on a new thread named `name`, joined when the lab is torn down; `body` gets the
    /// lab's stop flag and must return soon after it is set. For backends the [`Protocol`] kinds do
    /// not cover (the HTTP echo server of [`crate::http`]).
    pub(crate) fn spawn_backend(
        &self,
        name: String,
        body: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> anyhow::Result<()> {
        let stop = self.shared.stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || body(stop))
            .with_context(|| format!("spawn {name}"))?;
        lock(&self.shared.threads).push(handle);
        Ok(())
    }

    /// [`Pod::serve`] with [`Protocol::Tcp`].
    pub fn serve_tcp(&self, port: u16) -> anyhow::Result<()> {
        self.serve(Protocol::Tcp, port)
    }

    /// [`Pod::serve`] with [`Protocol::Udp`].
    pub fn serve_udp(&self, port: u16) -> anyhow::Result<()> {
        self.serve(Protocol::Udp, port)
    }

    /// [`Pod::serve`] with [`Protocol::Http`].
    pub fn serve_http(&self, port: u16) -> anyhow::Result<()> {
        self.serve(Protocol::Http, port)
    }

    fn client<T: Send>(
        &self,
        op: &'static str,
        addr: SocketAddr,
        f: impl FnOnce() -> Result<T, ClientError> + Send,
    ) -> Result<T, ClientError> {
        let started = Instant::now();
        self.run(f)
            .map_err(|e| ClientError::new(op, addr, started, e))
            .and_then(|r| r)
    }

    /// [`client::tcp_connect`] from this pod; the connection can then be used from any thread.
    pub fn tcp_connect(
        &self,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<TcpConn, ClientError> {
        let addr = addr.into();
        self.client("tcp connect", addr, || client::tcp_connect(addr, timeout))
    }

    /// [`client::tcp_request`] from this pod: connect, read the greeting line, close.
    pub fn tcp_request(
        &self,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<String, ClientError> {
        let addr = addr.into();
        self.client("tcp request", addr, || client::tcp_request(addr, timeout))
    }

    /// [`client::udp_request`] from this pod (fresh connected socket).
    pub fn udp_request(
        &self,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<UdpReply, ClientError> {
        let addr = addr.into();
        self.client("udp request", addr, || client::udp_request(addr, timeout))
    }

    /// [`client::udp_request_unconnected`] from this pod (fresh unconnected socket).
    pub fn udp_request_unconnected(
        &self,
        addr: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<UdpReply, ClientError> {
        let addr = addr.into();
        self.client("udp request", addr, || {
            client::udp_request_unconnected(addr, timeout)
        })
    }

    /// [`client::http_get`] from this pod.
    pub fn http_get(
        &self,
        addr: impl Into<SocketAddr>,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let addr = addr.into();
        self.client("http get", addr, || client::http_get(addr, path, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_twins_read_like_their_ipv4_addresses() {
        let twin = |v4: [u8; 4]| v6_twin(v4.into()).to_string();
        assert_eq!(twin([10, 0, 1, 12]), "fd00:10:0:1::12");
        assert_eq!(twin([10, 0, 0, 10]), "fd00:10::10");
        assert_eq!(twin([172, 30, 0, 100]), "fd00:172:30::100");
        assert_eq!(twin([255, 255, 255, 255]), "fd00:255:255:255::255");
        assert_eq!(v6_twin_net64([10, 0, 3, 0].into()), "fd00:10:0:3::/64");
        assert_eq!(v6_twin(GATEWAY), NODE_LO6);
        assert_eq!(
            v6_twin(crate::scenario::CLUSTER_IP),
            crate::scenario::CLUSTER_IP6
        );
        assert_eq!(v6_twin(crate::scenario::NODE_IP), crate::scenario::NODE_IP6);
        // Distinct addresses, distinct twins (digits, not values: 10 and 16 must not meet at 0x10).
        assert_ne!(twin([10, 0, 0, 16]), twin([10, 0, 0, 10]));
    }
}
