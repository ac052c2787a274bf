//! The agent's own eBPF object, loaded against a private bpffs and programmed by the agent's own
//! `DesiredCache` + `Reconciler` from YAML, run through `BPF_PROG_TEST_RUN` inside a private network
//! namespace (so the FIB lookups the programs make see routes this rig chose, not the host's).
//!
//! The namespace has `pod0` (a veth, no address: the node side of pod interfaces; routes to the pod
//! networks 10.0.0.0/16, 10.244.0.0/24, fd00:10::/64 and fd00:244::/64) and `ext0` (a veth,
//! 192.168.77.1/24 and fd00:77::1/64, the external interface in `WEIR_EXT_IFACES` with both
//! addresses; the other node's pods 10.244.1.0/24 and fd00:244:1::/64 are routed via 192.168.77.2 and
//! fd00:77::2), and forwards both families.
//!
//! Every Service is dual-stack (ClusterIPs of both families, a slice per family), so each IPv4
//! frontend has an IPv6 twin whose backends are the IPv6 twins of its backends.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use weir_agent::datapath::{Capacities, Datapath, StatsReader};
use weir_agent::model::{DesiredCache, NodeContext};
use weir_agent::reconcile::{Adopted, Reconciler};
use weir_agent::standalone::ConfigDir;
use weir_common::{
    Backend, CtKey, CtKey6, CtValue, CtValue6, MAP_BACKENDS, MAP_CONNTRACK, MAP_CONNTRACK6,
    MAP_SERVICES, PROG_EXT_INGRESS, PROG_POD_INGRESS, STAT_COUNT, STAT_NAMES, ServiceKey,
    ServiceValue, addr_of,
};

use crate::bpffs::Bpffs;
use crate::netns::{self, NetNs, ip};
use crate::raw_bpf;
use crate::yaml::{self, IpFamily, TrafficPolicy};

/// TC verdicts as the programs return them.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// This node's address (on `ext0`), where NodePorts answer.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);
/// The hairpin source (weir-common's `HAIRPIN_ADDR`).
pub const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

/// ClusterIP with one TCP (80 → 8080) and one UDP (53 → 5353) port and one endpoint, [`ONE_BACKEND`]:
/// every translation to it is known exactly.
pub const ONE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub const ONE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 41);
/// ClusterIP, TCP 80 → 8080, three endpoints ([`MANY_BACKENDS`]).
pub const MANY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const MANY_BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 11),
    Ipv4Addr::new(10, 244, 0, 12),
    Ipv4Addr::new(10, 244, 0, 13),
];
/// ClusterIP with TCP 80 and UDP 53 and no endpoint: rejected.
pub const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// NodePort 30080/TCP whose one endpoint lives on another node (reached through `ext0`: SNAT).
pub const REMOTE_NODE_PORT: u16 = 30080;
pub const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
pub const REMOTE_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 21);
/// NodePort 30081/TCP and 30053/UDP whose one endpoint is local (no SNAT).
pub const LOCAL_NODE_PORT: u16 = 30081;
pub const LOCAL_NODE_PORT_UDP: u16 = 30053;
pub const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
pub const LOCAL_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 61);
/// Every backend's TCP port; UDP backends listen on [`BACKEND_UDP_PORT`].
pub const BACKEND_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;

/// IPv6 twins of the addresses above: this node's IPv6 address (on `ext0`), the IPv6 hairpin source
/// (weir-common's `HAIRPIN_ADDR6`), and each Service's IPv6 ClusterIP and backends.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
pub const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x5745, 0x4952, 0, 0, 0, 0, 1);
pub const ONE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x40);
pub const ONE_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x41);
pub const MANY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const MANY_BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11),
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x12),
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x13),
];
pub const EMPTY_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30);
pub const REMOTE_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x50);
pub const REMOTE_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x21);
pub const LOCAL_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);
pub const LOCAL_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x61);
/// The `local` Service is a LoadBalancer with an externalIP and an ingress IP of each family (port 80
/// and 53 like its ClusterIP, to [`LOCAL_BACKEND`] / [`LOCAL_BACKEND6`]).
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 60);
pub const EXTERNAL_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x60);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 61);
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x51, 0, 0, 0, 0, 0x61);
/// A router on the pod networks' side, for ICMP errors not sent by a backend.
pub const POD_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
pub const POD_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 1);

/// Which program a frame is run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Prog {
    /// `weir_pod_ingress`, run as if the frame came in on `pod0`.
    Pod,
    /// `weir_ext_ingress`, run as if the frame came in on `ext0`.
    Ext,
}

impl Prog {
    pub const ALL: [Prog; 2] = [Prog::Pod, Prog::Ext];

    pub fn name(self) -> &'static str {
        match self {
            Prog::Pod => PROG_POD_INGRESS,
            Prog::Ext => PROG_EXT_INGRESS,
        }
    }
}

/// What one run returned: the verdict and the frame as the program left it.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

/// The loaded object, its programmed maps, and the namespace it runs in.
pub struct Rig {
    _datapath: Datapath,
    pin_dir: PathBuf,
    stats: StatsReader,
    pod: aya::programs::ProgramFd,
    ext: aya::programs::ProgramFd,
    pod_ifindex: u32,
    ext_ifindex: u32,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    conntrack6: BpfHashMap<MapData, CtKey6, CtValue6>,
    /// Frontends of both families as programmed in `WEIR_SERVICES` (port 0: "any other port" of a
    /// ClusterIP).
    pub frontends: BTreeSet<(IpAddr, u16, u8)>,
    /// Backends of both families as programmed in `WEIR_BACKENDS`.
    pub backends: BTreeSet<(IpAddr, u16, u8)>,
    /// When set, [`Rig::is_frontend`] and [`Rig::is_cluster_ip`] answer false for everything: the
    /// fuzzer's own test uses it to show its judge catches rewrites of traffic that is not ours.
    pub blind: bool,
    program: Program,
}

/// What programs the maps, kept for [`Rig::reprogram`].
struct Program {
    reconciler: Reconciler<weir_agent::datapath::Maps>,
    cache: DesiredCache,
    node: NodeContext,
    config_dir: PathBuf,
}

/// A scratch config dir, removed on drop.
struct ConfigTemp(PathBuf);

impl Drop for ConfigTemp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds a rig (namespace, bpffs, loaded and programmed object) and runs `f` with it on a thread
/// inside the namespace; everything is torn down afterwards, also when `f` panics. Panics when not
/// root: these tests are never skipped.
pub fn with_rig<T: Send>(f: impl FnOnce(&mut Rig) -> T + Send) -> T {
    with_rig_caps(Rig::CAPACITIES, f)
}

/// [`with_rig`] with these map sizes (a small conntrack map makes LRU eviction happen).
pub fn with_rig_caps<T: Send>(caps: Capacities, f: impl FnOnce(&mut Rig) -> T + Send) -> T {
    netns::require_root();
    netns::reap_stale();
    let id = netns::unique_id();
    let ns = NetNs::create(&format!("weir-{id}-pkt")).expect("create the rig's netns");
    setup_netns(ns.name()).expect("set up the rig's netns");
    // Under the harness's root, so the stale-reaper knows the path.
    let bpffs = Bpffs::mount(Path::new(crate::lab::BPFFS_ROOT).join(&id).join("bpf"))
        .expect("mount the rig's bpffs");
    let config = ConfigTemp(std::env::temp_dir().join(format!("weir-tests-{id}-packet")));
    std::fs::create_dir_all(&config.0).expect("create the rig's config dir");
    let result = netns::in_netns(ns.name(), || {
        let mut rig =
            Rig::new(bpffs.dir(), &config.0, caps).expect("load and program the datapath");
        f(&mut rig)
    })
    .expect("enter the rig's netns");
    drop(bpffs);
    drop(ns);
    result
}

fn setup_netns(ns: &str) -> anyhow::Result<()> {
    // Before any interface exists, so every one inherits it: a tentative (DAD) address or route is
    // not usable at once, and nothing here could answer a solicitation anyway.
    netns::sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
    netns::sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")?;
    // Veth pairs (this kernel has no dummy driver), both ends up so the routes are usable.
    let cmds: [&[&str]; 20] = [
        &["link", "set", "lo", "up"],
        &[
            "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
        ],
        &["link", "set", "pod0p", "up"],
        &["link", "set", "pod0", "up"],
        &[
            "link", "add", "ext0", "type", "veth", "peer", "name", "ext0p",
        ],
        &["addr", "add", "192.168.77.1/24", "dev", "ext0"],
        &["-6", "addr", "add", "fd00:77::1/64", "dev", "ext0", "nodad"],
        &["link", "set", "ext0p", "up"],
        &["link", "set", "ext0", "up"],
        &["route", "add", "10.0.0.0/16", "dev", "pod0"],
        &["route", "add", "10.244.0.0/24", "dev", "pod0"],
        &[
            "route",
            "add",
            "10.244.1.0/24",
            "via",
            "192.168.77.2",
            "dev",
            "ext0",
        ],
        &["route", "add", "169.254.42.0/24", "dev", "pod0"],
        &[
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "192.168.77.254",
            "dev",
            "ext0",
        ],
        &["-6", "route", "add", "fd00:10::/64", "dev", "pod0"],
        &["-6", "route", "add", "fd00:244::/64", "dev", "pod0"],
        &[
            "-6",
            "route",
            "add",
            "fd00:244:1::/64",
            "via",
            "fd00:77::2",
            "dev",
            "ext0",
        ],
        &["-6", "route", "add", "fd00:5745:4952::/64", "dev", "pod0"],
        &[
            "-6",
            "route",
            "add",
            "2001:db8:113::/64",
            "via",
            "fd00:77::254",
            "dev",
            "ext0",
        ],
        // Where the IPv6 fixtures' "other host" lives, so a FIB lookup for it has an answer too.
        &["-6", "route", "add", "fd00:200::/64", "dev", "pod0"],
    ];
    for args in cmds {
        let mut full = vec!["-n", ns];
        full.extend_from_slice(args);
        ip(&full)?;
    }
    netns::sysctl(ns, "net.ipv4.ip_forward", "1")?;
    // bpf_fib_lookup answers "forwarding disabled" for an IPv6 ingress device that does not forward.
    netns::sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
}

/// The Services and EndpointSlices the rig programs: every Service dual-stack (IPv4 primary), with one
/// slice per family.
fn config_yaml() -> String {
    let tcp = [("http", 80, "TCP", BACKEND_PORT)];
    let tcp_udp = [
        ("http", 80, "TCP", BACKEND_PORT),
        ("dns", 53, "UDP", BACKEND_UDP_PORT),
    ];
    let slice_tcp = [("http", BACKEND_PORT, "TCP")];
    let slice_tcp_udp = [
        ("http", BACKEND_PORT, "TCP"),
        ("dns", BACKEND_UDP_PORT, "UDP"),
    ];
    let ips = |v4: Ipv4Addr, v6: Ipv6Addr| [IpAddr::V4(v4), IpAddr::V6(v6)];
    // One slice per family, named after the Service.
    let slices = |service: &str, ports: &[(&str, u16, &str)], v4: &[Ipv4Addr], v6: &[Ipv6Addr]| {
        let ready = |ips: Vec<IpAddr>| {
            ips.into_iter()
                .map(|ip| (ip, None, true))
                .collect::<Vec<_>>()
        };
        [
            yaml::endpointslice_yaml_family(
                "fx",
                &format!("{service}-1"),
                service,
                IpFamily::V4,
                ports,
                &ready(v4.iter().map(|&ip| ip.into()).collect()),
            ),
            yaml::endpointslice_yaml_family(
                "fx",
                &format!("{service}-v6"),
                service,
                IpFamily::V6,
                ports,
                &ready(v6.iter().map(|&ip| ip.into()).collect()),
            ),
        ]
    };
    // `local` is a LoadBalancer with an ingress IP and an externalIP of each family.
    let local = {
        let y = yaml::loadbalancer_service_yaml(
            "fx",
            "local",
            &LOCAL_VIP.to_string(),
            TrafficPolicy::Cluster,
            &[
                ("http", 80, "TCP", BACKEND_PORT, LOCAL_NODE_PORT),
                ("dns", 53, "UDP", BACKEND_UDP_PORT, LOCAL_NODE_PORT_UDP),
            ],
            &[LB_IP],
            None,
        );
        let y = format!("{y}    - ip: \"{LB_IP6}\"\n").replacen(
            "spec:\n",
            &format!("spec:\n  externalIPs:\n  - \"{EXTERNAL_IP}\"\n  - \"{EXTERNAL_IP6}\"\n"),
            1,
        );
        yaml::with_cluster_ips(&y, &ips(LOCAL_VIP, LOCAL_VIP6))
    };
    let mut docs = vec![
        yaml::service_yaml_ips("fx", "one", &ips(ONE_VIP, ONE_VIP6), &tcp_udp),
        yaml::service_yaml_ips("fx", "many", &ips(MANY_VIP, MANY_VIP6), &tcp),
        yaml::service_yaml_ips("fx", "empty", &ips(EMPTY_VIP, EMPTY_VIP6), &tcp_udp),
        yaml::nodeport_service_yaml_ips(
            "fx",
            "remote",
            &ips(REMOTE_VIP, REMOTE_VIP6),
            TrafficPolicy::Cluster,
            &[("http", 80, "TCP", BACKEND_PORT, REMOTE_NODE_PORT)],
        ),
        local,
    ];
    docs.extend(slices(
        "one",
        &slice_tcp_udp,
        &[ONE_BACKEND],
        &[ONE_BACKEND6],
    ));
    docs.extend(slices("many", &slice_tcp, &MANY_BACKENDS, &MANY_BACKENDS6));
    docs.extend(slices("empty", &slice_tcp_udp, &[], &[]));
    docs.extend(slices(
        "remote",
        &slice_tcp,
        &[REMOTE_BACKEND],
        &[REMOTE_BACKEND6],
    ));
    docs.extend(slices(
        "local",
        &slice_tcp_udp,
        &[LOCAL_BACKEND],
        &[LOCAL_BACKEND6],
    ));
    yaml::documents(&docs)
}

impl Rig {
    /// Map sizes of [`with_rig`].
    pub const CAPACITIES: Capacities = Capacities {
        services: 1024,
        backends: 1024,
        maglev_chunks: 1024,
        affinity: 1024,
        conntrack: 65536,
        source_ranges: 1024,
        sock_revnat: 1024,
    };

    fn new(pin_dir: &Path, config_dir: &Path, caps: Capacities) -> anyhow::Result<Self> {
        let (mut datapath, maps, stats) =
            Datapath::load(pin_dir, caps).context("loading the agent's eBPF object")?;
        let pod_ifindex = nix::net::if_::if_nametoindex("pod0").context("ifindex of pod0")?;
        let ext_ifindex = nix::net::if_::if_nametoindex("ext0").context("ifindex of ext0")?;
        datapath
            .set_external_address(ext_ifindex, Some(NODE_IP), Some(NODE_IP6))
            .context("WEIR_EXT_IFACES entry for ext0")?;

        std::fs::write(config_dir.join("services.yaml"), config_yaml())
            .context("write the rig's config")?;
        let (snapshot, errors) = ConfigDir::new(config_dir)
            .reload()
            .context("read the rig's config")?;
        ensure!(errors.is_empty(), "config errors: {}", errors.join("; "));
        let node = NodeContext {
            ips: vec![NODE_IP.into(), NODE_IP6.into()],
            name: "fx-node".into(),
            ..NodeContext::default()
        };
        let mut cache = DesiredCache::default();
        let (desired, _) = cache.update(&snapshot, &node);
        let mut reconciler = Reconciler::adopt(maps, Adopted::default());
        let report = reconciler.sync(&desired);
        ensure!(report.errors == 0, "sync had {} map errors", report.errors);

        let open = |name: &str| {
            MapData::from_pin(pin_dir.join(name)).with_context(|| format!("open pinned {name}"))
        };
        let services: BpfHashMap<_, ServiceKey, ServiceValue> =
            BpfHashMap::try_from(Map::HashMap(open(MAP_SERVICES)?))?;
        let mut frontends = BTreeSet::new();
        for entry in services.keys() {
            let k = entry.context("reading WEIR_SERVICES")?;
            frontends.insert((
                weir_common::ip_of(&k.addr_be),
                u16::from_be(k.port_be),
                k.proto,
            ));
        }
        let backends_map: BpfHashMap<_, u32, Backend> =
            BpfHashMap::try_from(Map::HashMap(open(MAP_BACKENDS)?))?;
        let mut backends = BTreeSet::new();
        for entry in backends_map.iter() {
            let (_, b) = entry.context("reading WEIR_BACKENDS")?;
            backends.insert((
                weir_common::ip_of(&b.addr_be),
                u16::from_be(b.port_be),
                b.proto,
            ));
        }
        let conntrack = BpfHashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK)?))?;
        let conntrack6 = BpfHashMap::try_from(Map::LruHashMap(open(MAP_CONNTRACK6)?))?;
        Ok(Self {
            _datapath: datapath,
            pin_dir: pin_dir.to_owned(),
            stats,
            pod: find_program(pin_dir, PROG_POD_INGRESS)?,
            ext: find_program(pin_dir, PROG_EXT_INGRESS)?,
            pod_ifindex,
            ext_ifindex,
            conntrack,
            conntrack6,
            frontends,
            backends,
            blind: false,
            program: Program {
                reconciler,
                cache,
                node,
                config_dir: config_dir.to_owned(),
            },
        })
    }

    /// Writes `file` (YAML) into the rig's config dir and programs the result through the same
    /// reconciler, as the agent does on a change. `frontends`/`backends` are not refreshed.
    pub fn reprogram(&mut self, file: &str, yaml: &str) -> anyhow::Result<()> {
        let p = &mut self.program;
        std::fs::write(p.config_dir.join(file), yaml).with_context(|| format!("write {file}"))?;
        let (snapshot, errors) = ConfigDir::new(&p.config_dir)
            .reload()
            .context("read the rig's config")?;
        ensure!(errors.is_empty(), "config errors: {}", errors.join("; "));
        let (desired, _) = p.cache.update(&snapshot, &p.node);
        let report = p.reconciler.sync(&desired);
        ensure!(report.errors == 0, "sync had {} map errors", report.errors);
        Ok(())
    }

    fn prog(&self, prog: Prog) -> (BorrowedFd<'_>, u32) {
        match prog {
            Prog::Pod => (self.pod.as_fd(), self.pod_ifindex),
            Prog::Ext => (self.ext.as_fd(), self.ext_ifindex),
        }
    }

    /// One `BPF_PROG_TEST_RUN` of `prog` on `frame`.
    pub fn run(&self, prog: Prog, frame: &[u8]) -> io::Result<Outcome> {
        let (fd, ifindex) = self.prog(prog);
        test_run(fd, ifindex, frame)
    }

    /// `WEIR_STATS`, summed over CPUs, in `STAT_*` order.
    pub fn counters(&self) -> Vec<u64> {
        self.stats.counters()
    }

    /// Where the rig's maps are pinned (what the agent's `--bpffs-dir` would be).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The conntrack entry for a 5-tuple as on the wire, if any.
    pub fn conntrack(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Option<CtValue> {
        self.conntrack.get(&ct_key(src, dst, proto), 0).ok()
    }

    /// The IPv6 conntrack entry (`WEIR_CT6`) for a 5-tuple as on the wire, if any.
    pub fn conntrack6(&self, src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> Option<CtValue6> {
        self.conntrack6.get(&ct_key6(src, dst, proto), 0).ok()
    }

    /// Deletes the conntrack entry of a 5-tuple of either family, as an LRU eviction would; true when
    /// there was one.
    pub fn forget(&mut self, src: SocketAddr, dst: SocketAddr, proto: u8) -> bool {
        match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                self.conntrack.remove(&ct_key(s, d, proto)).is_ok()
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                self.conntrack6.remove(&ct_key6(s, d, proto)).is_ok()
            }
            _ => false,
        }
    }

    /// The kind (`CT_FORWARD`, `CT_REVERSE`) of the conntrack entry of a 5-tuple of either family.
    pub fn tracked(&self, src: SocketAddr, dst: SocketAddr, proto: u8) -> Option<u8> {
        match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => self.conntrack(s, d, proto).map(|v| v.kind),
            (SocketAddr::V6(s), SocketAddr::V6(d)) => self.conntrack6(s, d, proto).map(|v| v.kind),
            _ => None,
        }
    }

    /// For the reverse entry of a 5-tuple (either family): the peer its replies are sent back to
    /// (the client of an SNATed or hairpinned flow), `Some(None)` when it has none, `None` when the
    /// tuple has no reverse entry.
    pub fn reverse_peer(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        proto: u8,
    ) -> Option<Option<SocketAddr>> {
        let (kind, addr, port_be) = match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                let v = self.conntrack(s, d, proto)?;
                let addr = (v.peer_addr_be != 0)
                    .then(|| IpAddr::V4(Ipv4Addr::from(u32::from_be(v.peer_addr_be))));
                (v.kind, addr, v.peer_port_be)
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                let v = self.conntrack6(s, d, proto)?;
                let addr = (v.peer_addr_be != [0; 4]).then(|| weir_common::ip_of(&v.peer_addr_be));
                (v.kind, addr, v.peer_port_be)
            }
            _ => return None,
        };
        (kind == weir_common::CT_REVERSE)
            .then(|| addr.map(|a| SocketAddr::new(a, u16::from_be(port_be))))
    }

    pub fn is_frontend(&self, addr: impl Into<SocketAddr>, proto: u8) -> bool {
        let addr = addr.into();
        !self.blind && self.frontends.contains(&(addr.ip(), addr.port(), proto))
    }

    /// A ClusterIP's "any other port" entry exists for `addr`/`proto` (it rejects undefined ports).
    pub fn is_cluster_ip(&self, addr: impl Into<IpAddr>, proto: u8) -> bool {
        !self.blind && self.frontends.contains(&(addr.into(), 0, proto))
    }

    pub fn is_backend(&self, addr: impl Into<SocketAddr>, proto: u8) -> bool {
        let addr = addr.into();
        self.backends.contains(&(addr.ip(), addr.port(), proto))
    }
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> CtKey {
    CtKey {
        saddr_be: u32::from(*src.ip()).to_be(),
        daddr_be: u32::from(*dst.ip()).to_be(),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        pad: [0; 3],
    }
}

fn ct_key6(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> CtKey6 {
    CtKey6 {
        saddr_be: addr_of(IpAddr::V6(*src.ip())),
        daddr_be: addr_of(IpAddr::V6(*dst.ip())),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto,
        pad: [0; 3],
    }
}

/// Per-reason counter deltas between two [`Rig::counters`] readings, as `name=delta` for the non-zero
/// ones (in `STAT_*` order): what a fixture compares.
pub fn stat_delta(before: &[u64], after: &[u64]) -> Vec<(&'static str, u64)> {
    (0..STAT_COUNT as usize)
        .filter_map(|i| {
            let d = after.get(i)?.wrapping_sub(*before.get(i)?);
            (d != 0).then_some((STAT_NAMES[i], d))
        })
        .collect()
}

/// The loaded program named `name` that uses the services map pinned in `pin_dir` (the agent library
/// keeps its programs private; the kernel's program list finds them by the maps they use).
pub fn loaded_program(pin_dir: &Path, name: &str) -> anyhow::Result<aya::programs::ProgramInfo> {
    let services = aya::maps::MapInfo::from_pin(pin_dir.join(MAP_SERVICES))
        .context("reading the pinned services map")?
        .id();
    for info in aya::programs::loaded_programs() {
        let Ok(info) = info else { continue };
        let Ok(Some(ids)) = info.map_ids() else {
            continue;
        };
        // The kernel keeps 15 bytes of a program's name.
        let named = info
            .name_as_str()
            .is_some_and(|n| !n.is_empty() && name.starts_with(n));
        if named && ids.contains(&services) {
            return Ok(info);
        }
    }
    bail!(
        "no loaded {name} uses the maps pinned in {}",
        pin_dir.display()
    )
}

fn find_program(pin_dir: &Path, name: &str) -> anyhow::Result<aya::programs::ProgramFd> {
    loaded_program(pin_dir, name)?
        .fd()
        .context("fd of the loaded program")
}

/// Room for any frame the kernel accepts (it refuses more than a page minus skb overhead).
const OUT_CAPACITY: usize = 8192;

/// What one `BPF_PROG_TEST_RUN` call reports.
#[derive(Clone, Copy, Debug)]
pub struct TestRun {
    /// The program's return code (TC: `TC_ACT_OK` is 0, `TC_ACT_SHOT` 2).
    pub retval: u32,
    /// Mean nanoseconds per run as the kernel measured it.
    pub duration_ns: u32,
    /// Bytes the kernel wrote to `out`.
    pub out_len: usize,
}

/// `BPF_PROG_TEST_RUN`: runs `prog` `repeat` times over one skb built from `data` (with `repeat` > 1
/// every run after the first sees what the previous one left), copying the result into `out` when
/// given; `ctx` is the leading words of `struct __sk_buff` (the kernel zero-fills the rest).
pub fn test_run_raw(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: Option<&mut [u8]>,
    repeat: u32,
    ctx: Option<&[u32]>,
) -> io::Result<TestRun> {
    let mut attr = raw_bpf::TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ..raw_bpf::TestRunAttr::default()
    };
    if let Some(out) = out {
        attr.data_out = out.as_mut_ptr() as u64;
        attr.data_size_out = out.len() as u32;
    }
    if let Some(ctx) = ctx {
        attr.ctx_in = ctx.as_ptr() as u64;
        attr.ctx_size_in = std::mem::size_of_val(ctx) as u32;
    }
    // SAFETY: the buffers `attr` points to (`data`, `out`, `ctx`) outlive the call and have the sizes
    // given.
    unsafe { raw_bpf::prog_test_run(&mut attr) }?;
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
        out_len: attr.data_size_out as usize,
    })
}

/// `BPF_PROG_TEST_RUN` of a TC program on `data`, with `__sk_buff.ifindex` set so the program sees the
/// frame arrive on that interface (the kernel otherwise uses loopback).
pub fn test_run(prog: BorrowedFd<'_>, ifindex: u32, data: &[u8]) -> io::Result<Outcome> {
    // The leading fields of `struct __sk_buff` up to `ifindex` (word 10); the kernel refuses non-zero
    // values in the fields it does not let a test set.
    let mut ctx = [0u32; 11];
    ctx[10] = ifindex;
    let mut out = vec![0u8; OUT_CAPACITY];
    let r = test_run_raw(prog, data, Some(&mut out), 1, Some(&ctx))?;
    out.truncate(r.out_len);
    Ok(Outcome {
        verdict: r.retval,
        frame: out,
    })
}
