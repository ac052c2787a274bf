//! `--only forward`: how many packets per second a node forwards to a NodePort whose backend is on
//! another node. Weir's XDP fast path (`weir_ext_xdp`, DNAT + SNAT + XDP_TX) next to an empty XDP_TX
//! program (the ceiling: the same frames sent back out untouched) and kube-proxy's iptables and nftables
//! rule sets doing the same DNAT + masquerade in the stack, alternating within each repetition.
//!
//! ```text
//!  node netns fxdp ── eth0 172.30.0.11 ══ veth ══ sxdp ┐
//!  node netns fipt ── eth0 172.30.0.11 ══ veth ══ sipt ├─ sink netns: XDP_DROP on each, counted by
//!  node netns fnft ── eth0 172.30.0.11 ══ veth ══ snft ┘  the veth (ethtool `rx_queue_*_xdp_drops`)
//! ```
//!
//! Each node routes the backend's pod range (10.0.0.0/24) via "node 0" (172.30.0.10), whose MAC is
//! the sink's (a permanent neighbour entry), so a forwarded packet leaves through `eth0` and is counted
//! and dropped at the far end; nothing answers, and every frame is a new flow (a SYN from a random
//! source) for Weir and netfilter alike: kube-proxy's rules are walked for every packet, as they are
//! for every new connection, and both conntrack tables are full and evicting (see [`ENDPOINTS`]).
//!
//! The generator is BPF_PROG_TEST_RUN with live frames (`sys::xdp::live_frames`), run as if the frames
//! arrived on `eth0`, pinned to the load CPU (veth NAPI runs on the sending CPU, so one CPU does it all).
//! The program it runs is a small raw one that restores the frame (the kernel recycles pages without
//! refilling them, and the program under test rewrote the last one), gives it a random source address
//! and port with the checksums kept valid, and tail-calls the program under test: `weir_ext_xdp`,
//! `XDP_TX`, or `XDP_PASS` into the stack for the netfilter modes. Every mode pays the same generator.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use weir_agent::datapath::{Capacities, Datapath, Maps, StatsReader};
use weir_agent::model::{DesiredCache, NodeContext};
use weir_agent::reconcile::{Adopted, Reconciler};
use weir_agent::standalone::ConfigDir;
use weir_common::{
    DEFAULT_AFFINITY_MAX, DEFAULT_CONNTRACK_MAX, PROG_EXT_XDP, STAT_NAMES, STAT_XDP_FORWARDED,
    STAT_XDP_PASS, TABLE_CHUNK_SLOTS,
};
use weir_tests::netns::{NetNs, ip, sysctl};
use weir_tests::yaml::{
    IpFamily, TrafficPolicy, documents, endpointslice_yaml_family, nodeport_service_yaml_ips,
};

use super::rules::{self, IptBackend};
use super::scenario::{self, NAMESPACE, PORT_NAME, SERVICE_PORT, ServiceDef, TARGET_PORT};
use super::stats::{Spread, paired_ratio};
use super::sys::xdp::{self as bpf, insn};
use super::{Bpffs, Progress, TempDir};

/// The node under test's address on `eth0` (node 1 of a cluster), where the NodePort answers.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
/// Node 0, where the backend lives: the next hop towards the pod range.
const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
/// The NodePort service's first backend pod on node 0.
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// Its endpoints (all on node 0, from [`BACKEND`] up). Every flow is SNATed to the node's one address,
/// which gives ~28k–64k source ports per endpoint address and port: with one endpoint a flood of new
/// flows exhausts them within a second, after which Weir drops (`drop_snat_exhausted`) and netfilter's
/// masquerade fails alike. Sixteen give more ports than either conntrack table holds flows, so both
/// run with full tables that evict (Weir's LRU, netfilter's early drop), the steady state of a flood.
const ENDPOINTS: u8 = 16;

fn backends() -> Vec<Ipv4Addr> {
    (0..ENDPOINTS)
        .map(|i| Ipv4Addr::from(u32::from(BACKEND) + u32::from(i)))
        .collect()
}
const POD_RANGE: &str = "10.0.0.0/24";
const NODE_PORT: u16 = 30080;
const UPLINK: &str = "eth0";
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x11];
/// The sink's MAC: node 0's (and the default gateway's) as far as the node knows.
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x10];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x64];
const FRAME_LEN: usize = 54;
/// Frame offsets of the fields the generator varies (Ethernet + IPv4 without options + TCP).
const OFF_IP_ID: i16 = 18;
const OFF_SADDR_LO: i16 = 28;
const OFF_SPORT: i16 = 34;
const OFF_SEQ_LO: i16 = 40;

/// What the experiment does at each profile.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ns: Vec<usize>,
    pub reps: usize,
    /// Frames per BPF_PROG_TEST_RUN call.
    pub chunk: u32,
    pub batch: u32,
    /// Calls go on until a round has lasted this long (at least one call).
    pub round: Duration,
    /// One unrecorded round per mode at each N first (fills the conntrack tables).
    pub warmup: bool,
    /// Rule loads that take longer are killed (that baseline is not measured at that N and above).
    pub load_cap: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FwdMode {
    WeirXdp,
    EmptyXdpTx,
    Iptables,
    Nftables,
}

impl FwdMode {
    pub const ALL: [FwdMode; 4] = [
        FwdMode::WeirXdp,
        FwdMode::EmptyXdpTx,
        FwdMode::Iptables,
        FwdMode::Nftables,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FwdMode::WeirXdp => "Weir XDP (weir_ext_xdp)",
            FwdMode::EmptyXdpTx => "empty XDP_TX",
            FwdMode::Iptables => "kube-proxy iptables (legacy)",
            FwdMode::Nftables => "kube-proxy nftables",
        }
    }

    /// The node namespace (tag) it runs in: Weir and the empty program share one without rules.
    fn tag(self) -> &'static str {
        match self {
            FwdMode::WeirXdp | FwdMode::EmptyXdpTx => "xdp",
            FwdMode::Iptables => "ipt",
            FwdMode::Nftables => "nft",
        }
    }
}

/// One mode at one N: a value per repetition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModeRounds {
    pub mode: Option<FwdMode>,
    /// Frames the sink counted per second of generator time.
    pub delivered_pps: Vec<f64>,
    /// Frames generated per second.
    pub generated_pps: Vec<f64>,
    pub generated: Vec<u64>,
    pub delivered: Vec<u64>,
    /// Weir only: what its `xdp_forwarded` counter says it sent, per round.
    pub counted_forwarded: Vec<u64>,
    /// Weir only: frames it passed to the stack instead (`xdp_pass`), per round.
    pub counted_passed: Vec<u64>,
    /// Weir only: every datapath counter that moved in a round, per round (which paths the frames took).
    pub weir_counters: Vec<BTreeMap<String, u64>>,
    pub pps: Option<Spread>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FwdRatio {
    /// "weir_xdp / empty_xdp_tx" and the like.
    pub name: String,
    pub ratio: Option<Spread>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FwdPoint {
    pub services: usize,
    pub flows: Option<Flows>,
    pub modes: Vec<ModeRounds>,
    pub ratios: Vec<FwdRatio>,
    /// Seconds to program the N services: Weir's sync, iptables-legacy-restore, nft -f.
    pub load_s: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ForwardResults {
    pub reps: usize,
    pub chunk: u32,
    pub batch: u32,
    pub round_s: f64,
    pub cpu: usize,
    pub points: Vec<FwdPoint>,
    pub errors: Vec<String>,
}

impl ForwardResults {
    pub fn mode(&self, n: usize, flows: Flows, mode: FwdMode) -> Option<&ModeRounds> {
        self.points
            .iter()
            .find(|p| p.services == n && p.flows == Some(flows))?
            .modes
            .iter()
            .find(|m| m.mode == Some(mode) && m.error.is_none())
    }

    pub fn ratio(&self, n: usize, flows: Flows, name: &str) -> Option<Spread> {
        self.points
            .iter()
            .find(|p| p.services == n && p.flows == Some(flows))?
            .ratios
            .iter()
            .find(|r| r.name == name)?
            .ratio
    }
}

/// Which flows the frames belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flows {
    /// 16,384 flows (1,024 source ports × 16 addresses), all tracked after the warm-up round: every
    /// frame a conntrack hit (netfilter's rules are not walked for them).
    Established,
    /// A random source of 2^30 for every frame: every frame a new flow, both conntrack tables full and
    /// evicting (the steady state of a SYN flood; kube-proxy's rules walked for every frame).
    New,
}

impl Flows {
    pub const ALL: [Flows; 2] = [Flows::Established, Flows::New];

    /// Masks of the random source port and address offsets.
    fn masks(self) -> (i32, i32) {
        match self {
            Flows::Established => (0x3ff, 0xf),
            Flows::New => (0x7fff, 0x7fff),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Flows::Established => "established (16k flows)",
            Flows::New => "new flows (SYN flood)",
        }
    }
}

/// The raw programs: the sink's drop, the targets (`XDP_TX`, `XDP_PASS`), the generator and its
/// program array.
struct Programs {
    drop: OwnedFd,
    tx: OwnedFd,
    pass: OwnedFd,
    /// One per [`Flows`], sharing `slot`.
    generators: BTreeMap<Flows, OwnedFd>,
    slot: OwnedFd,
}

fn ret(action: i32) -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, action), insn(0x95, 0, 0, 0, 0)]
}

/// The frame every run of `flows` starts from: from an outside client to the NodePort, checksums
/// valid; a SYN for new flows, an ACK for established ones (as their traffic is: a SYN on a tracked
/// tuple is a new connection reusing it, which Weir checks against its reverse entry).
pub fn template(flows: Flows) -> [u8; FRAME_LEN] {
    let flags = match flows {
        Flows::Established => 0x10,
        Flows::New => 0x02,
    };
    let mut f = super::packet::tcp_frame(
        SocketAddrV4::new(Ipv4Addr::new(172, 30, 0x80, 0), 40000),
        SocketAddrV4::new(NODE_IP, NODE_PORT),
        flags,
    );
    f[0..6].copy_from_slice(&NODE_MAC);
    f[6..12].copy_from_slice(&CLIENT_MAC);
    f
}

fn word(f: &[u8], off: i16) -> i32 {
    let o = off as usize;
    i32::from(u16::from_be_bytes([f[o], f[o + 1]]))
}

/// The generator's two constants: the sums (mod 0xffff) that the varied words must keep so that the
/// IPv4 and TCP checksums stay valid. The source address's low word `L` changes both; the IP ID `I`
/// makes up for it in the IPv4 header (L + I constant), the low word of the sequence number `S` in the
/// TCP checksum (L + P + S constant, P the source port). Biased by multiples of 0xffff so the
/// generator's subtractions never go negative.
fn invariants(t: &[u8]) -> (i32, i32) {
    let (l, i, p, s) = (
        word(t, OFF_SADDR_LO),
        word(t, OFF_IP_ID),
        word(t, OFF_SPORT),
        word(t, OFF_SEQ_LO),
    );
    (l + i + 0xffff, l + p + s + 2 * 0xffff)
}

/// What the generator writes for random `r`: (source port, source address low word, IP ID, sequence
/// low word). The program computes the same (see [`generator`]); the tests check the checksums.
#[cfg(test)]
fn vary(t: &[u8], r: u32) -> (u16, u16, u16, u16) {
    let (k_id, k_seq) = invariants(t);
    let p = (r & 0x7fff) + 1024;
    let l = ((r >> 16) & 0x7fff) + 0x4000;
    let id = (k_id as u32 - l) % 0xffff;
    let seq = (k_seq as u32 - l - p) % 0xffff;
    (p as u16, l as u16, id as u16, seq as u16)
}

/// The generator: restore the template, vary the source (see [`vary`]), tail-call slot 0 of `slot`.
fn generator(t: &[u8; FRAME_LEN], slot: BorrowedFd<'_>, flows: Flows) -> Vec<u64> {
    let (pmask, lmask) = flows.masks();
    use std::os::fd::AsRawFd as _;
    let (k_id, k_seq) = invariants(t);
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),                // r6 = ctx
        insn(0x61, 7, 1, 0, 0),                // r7 = ctx->data
        insn(0x61, 3, 1, 4, 0),                // r3 = ctx->data_end
        insn(0xbf, 2, 7, 0, 0),                // r2 = r7
        insn(0x07, 2, 0, 0, FRAME_LEN as i32), // r2 += 54
        0,                                     // if r2 > r3 goto out (patched below)
    ];
    let bounds = p.len() - 1;
    for off in (0..FRAME_LEN - 2).step_by(4) {
        let imm = i32::from_le_bytes([t[off], t[off + 1], t[off + 2], t[off + 3]]);
        p.push(insn(0x62, 7, 0, off as i16, imm)); // *(u32 *)(r7 + off) = imm
    }
    let last = FRAME_LEN - 2;
    p.push(insn(
        0x6a,
        7,
        0,
        last as i16,
        i32::from(u16::from_le_bytes([t[last], t[last + 1]])),
    ));
    p.extend([
        insn(0x85, 0, 0, 0, 7),      // r0 = bpf_get_prandom_u32()
        insn(0xbf, 8, 0, 0, 0),      // r8 = r0
        insn(0x57, 8, 0, 0, pmask),  // r8 &= pmask
        insn(0x07, 8, 0, 0, 1024),   // r8 += 1024: P
        insn(0xbf, 9, 0, 0, 0),      // r9 = r0
        insn(0x77, 9, 0, 0, 16),     // r9 >>= 16
        insn(0x57, 9, 0, 0, lmask),  // r9 &= lmask
        insn(0x07, 9, 0, 0, 0x4000), // r9 += 0x4000: L
        insn(0xbf, 1, 8, 0, 0),      // r1 = P
        insn(0xdc, 1, 0, 0, 16),     // be16
        insn(0x6b, 7, 1, OFF_SPORT, 0),
        insn(0xbf, 1, 9, 0, 0), // r1 = L
        insn(0xdc, 1, 0, 0, 16),
        insn(0x6b, 7, 1, OFF_SADDR_LO, 0),
        insn(0xb7, 1, 0, 0, k_id),   // r1 = k_id
        insn(0x1f, 1, 9, 0, 0),      // r1 -= L
        insn(0x97, 1, 0, 0, 0xffff), // r1 %= 0xffff
        insn(0xdc, 1, 0, 0, 16),
        insn(0x6b, 7, 1, OFF_IP_ID, 0),
        insn(0xb7, 1, 0, 0, k_seq),  // r1 = k_seq
        insn(0x1f, 1, 9, 0, 0),      // r1 -= L
        insn(0x1f, 1, 8, 0, 0),      // r1 -= P
        insn(0x97, 1, 0, 0, 0xffff), // r1 %= 0xffff
        insn(0xdc, 1, 0, 0, 16),
        insn(0x6b, 7, 1, OFF_SEQ_LO, 0),
        insn(0xbf, 1, 6, 0, 0), // r1 = ctx
        // r2 = the program array (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD: two instructions)
        insn(0x18, 2, 1, 0, slot.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(0xb7, 3, 0, 0, 0),  // r3 = 0
        insn(0x85, 0, 0, 0, 12), // bpf_tail_call(ctx, slot, 0)
    ]);
    // An empty slot: drop (counted nowhere, so it would show as a shortfall).
    p.extend(ret(1));
    let out = p.len();
    p.extend(ret(1));
    p[bounds] = insn(0x2d, 2, 3, (out - bounds - 1) as i16, 0);
    p
}

impl Programs {
    fn load() -> anyhow::Result<Self> {
        let slot = bpf::prog_array(1).context("creating the generator's program array")?;
        let mut generators = BTreeMap::new();
        for flows in Flows::ALL {
            let insns = generator(&template(flows), slot.as_fd(), flows);
            generators.insert(flows, bpf::load(&insns, "bench_fwd_gen")?);
        }
        Ok(Self {
            drop: bpf::load(&ret(1), "bench_fwd_sink")?,
            tx: bpf::load(&ret(3), "bench_fwd_tx")?,
            pass: bpf::load(&ret(2), "bench_fwd_pass")?,
            generators,
            slot,
        })
    }
}

/// The namespaces: three nodes and the sink.
struct Lab {
    nodes: BTreeMap<&'static str, NetNs>,
    sink: NetNs,
    /// The sink's XDP links (detached when dropped, before the namespaces go).
    links: Vec<OwnedFd>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.links.clear();
    }
}

fn ifindex(ns: &str, dev: &str) -> anyhow::Result<u32> {
    let dev_owned = dev.to_owned();
    weir_tests::in_netns(ns, move || {
        nix::net::if_::if_nametoindex(dev_owned.as_str())
    })?
    .with_context(|| format!("ifindex of {dev} in {ns}"))
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    fn new(progs: &Programs) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let sink = NetNs::create(&format!("weir-bench-{pid}-fsink"))?;
        let mut lab = Self {
            nodes: BTreeMap::new(),
            sink,
            links: Vec::new(),
        };
        let s = lab.sink.name().to_owned();
        ip(&["-n", &s, "link", "set", "lo", "up"])?;
        for tag in ["xdp", "ipt", "nft"] {
            let node = NetNs::create(&format!("weir-bench-{pid}-f{tag}"))?;
            let n = node.name().to_owned();
            lab.nodes.insert(tag, node);
            let peer = format!("s{tag}");
            ip(&["-n", &n, "link", "set", "lo", "up"])?;
            // A router: forwards, and (as the cluster lab's nodes) no reverse-path filter, since the
            // random client addresses are routed back through the default route anyway.
            sysctl(&n, "net.ipv4.ip_forward", "1")?;
            sysctl(&n, "net.ipv4.conf.all.rp_filter", "0")?;
            sysctl(&n, "net.ipv4.conf.default.rp_filter", "0")?;
            // No IPv6 on the uplink: its router solicitations and MLD reports would be counted at the
            // sink as forwarded frames.
            sysctl(&n, "net.ipv6.conf.default.disable_ipv6", "1")?;
            ip(&[
                "-n", &n, "link", "add", UPLINK, "type", "veth", "peer", "name", &peer, "netns", &s,
            ])?;
            ip(&["-n", &n, "link", "set", UPLINK, "address", &mac(NODE_MAC)])?;
            ip(&["-n", &s, "link", "set", &peer, "address", &mac(SINK_MAC)])?;
            ip(&[
                "-n",
                &n,
                "addr",
                "add",
                &format!("{NODE_IP}/24"),
                "dev",
                UPLINK,
            ])?;
            ip(&["-n", &n, "link", "set", UPLINK, "up"])?;
            ip(&["-n", &s, "link", "set", &peer, "up"])?;
            for (addr, route) in [
                (NEXT_HOP, POD_RANGE),
                (Ipv4Addr::new(172, 30, 0, 1), "default"),
            ] {
                let a = addr.to_string();
                ip(&[
                    "-n",
                    &n,
                    "neigh",
                    "add",
                    &a,
                    "lladdr",
                    &mac(SINK_MAC),
                    "dev",
                    UPLINK,
                    "nud",
                    "permanent",
                ])?;
                ip(&["-n", &n, "route", "add", route, "via", &a, "dev", UPLINK])?;
            }
            // The sink end runs XDP: a veth delivers what its peer transmits in XDP only then, and it
            // counts what it drops.
            let index = ifindex(&s, &peer)?;
            let prog = progs.drop.as_fd();
            let link = weir_tests::in_netns(&s, move || bpf::attach(prog, index))?
                .with_context(|| format!("attaching the sink program to {peer}"))?;
            lab.links.push(link);
        }
        Ok(lab)
    }

    fn node(&self, tag: &str) -> &str {
        self.nodes.get(tag).map_or("", NetNs::name)
    }

    /// Frames the sink end `s<tag>` dropped in XDP so far (its veth's per-queue counters).
    fn delivered(&self, tag: &str) -> anyhow::Result<u64> {
        let peer = format!("s{tag}");
        let out = weir_tests::netns::run(
            "ip",
            &["netns", "exec", self.sink.name(), "ethtool", "-S", &peer],
        )?;
        parse_xdp_drops(&out).with_context(|| format!("no rx_queue_*_xdp_drops in {out:?}"))
    }
}

/// Sums `rx_queue_<i>_xdp_drops` of `ethtool -S` output.
fn parse_xdp_drops(out: &str) -> Option<u64> {
    let mut found = None;
    for line in out.lines() {
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        if k.starts_with("rx_queue_") && k.ends_with("_xdp_drops") {
            *found.get_or_insert(0) += v.trim().parse::<u64>().ok()?;
        }
    }
    found
}

/// Weir's datapath, in this process, programmed as node 1's agent would be.
struct Weir {
    _datapath: Datapath,
    reconciler: Reconciler<Maps>,
    cache: DesiredCache,
    stats: StatsReader,
    prog: aya::programs::ProgramFd,
    config: ConfigDir,
    config_dir: TempDir,
    node: NodeContext,
    _bpffs: Bpffs,
}

impl Weir {
    fn new(max_n: usize, ext_ifindex: u32) -> anyhow::Result<Self> {
        let bpffs = Bpffs::mount("forward")?;
        let cap = |n: usize| {
            (n + 1024)
                .next_power_of_two()
                .max(weir_common::DEFAULT_SERVICES_MAX as usize) as u32
        };
        let caps = Capacities {
            // A ClusterIP frontend, "any other port" entries and NodePort frontends per service.
            services: cap(4 * max_n + 64),
            backends: cap(max_n + 64),
            maglev_chunks: u32::try_from(
                super::e2e::maglev_slots(max_n + 1, 1) / u64::from(TABLE_CHUNK_SLOTS),
            )?,
            affinity: DEFAULT_AFFINITY_MAX,
            conntrack: DEFAULT_CONNTRACK_MAX,
            source_ranges: weir_common::DEFAULT_SOURCE_RANGES_MAX,
            sock_revnat: weir_common::DEFAULT_SOCK_REVNAT_MAX,
        };
        let pin_dir = bpffs.dir().to_path_buf();
        let (mut datapath, maps, stats) =
            Datapath::load(&pin_dir, caps).context("loading the agent's eBPF object")?;
        datapath
            .set_external_address(ext_ifindex, Some(NODE_IP), None)
            .context("WEIR_EXT_IFACES entry for eth0")?;
        let prog = weir_tests::packet::rig::loaded_program(&pin_dir, PROG_EXT_XDP)?
            .fd()
            .context("fd of weir_ext_xdp")?;
        let config_dir = TempDir::new("forward-config")?;
        Ok(Self {
            _datapath: datapath,
            reconciler: Reconciler::adopt(maps, Adopted::default()),
            cache: DesiredCache::default(),
            stats,
            prog,
            config: ConfigDir::new(config_dir.path()),
            config_dir,
            node: NodeContext {
                ips: vec![IpAddr::V4(NODE_IP)],
                name: "node-1".to_owned(),
                ..NodeContext::default()
            },
            _bpffs: bpffs,
        })
    }

    /// Programs `defs` (the first is the NodePort probe, its backend on node 0) through the agent's
    /// own config parser, cache and reconciler; returns the seconds it took.
    fn program(&mut self, defs: &[ServiceDef]) -> anyhow::Result<f64> {
        let t = Instant::now();
        let probe = &defs[0];
        let ports = [(PORT_NAME, TARGET_PORT, "TCP")];
        let yaml = documents(&[
            nodeport_service_yaml_ips(
                NAMESPACE,
                &probe.name,
                &[IpAddr::V4(probe.vip)],
                TrafficPolicy::Cluster,
                &[(PORT_NAME, SERVICE_PORT, "TCP", TARGET_PORT, NODE_PORT)],
            ),
            endpointslice_yaml_family(
                NAMESPACE,
                &format!("{}-1", probe.name),
                &probe.name,
                IpFamily::V4,
                &ports,
                &backends()
                    .into_iter()
                    .map(|ip| (IpAddr::V4(ip), Some("node-0"), true))
                    .collect::<Vec<_>>(),
            ),
        ]);
        std::fs::write(self.config_dir.path().join("probe.yaml"), yaml)?;
        scenario::write_config_dir(self.config_dir.path(), &defs[1..], &[])?;
        let snapshot = scenario::load_snapshot(&mut self.config)?;
        let (desired, _) = self.cache.update(&snapshot, &self.node);
        let report = self.reconciler.sync(&desired);
        ensure!(report.errors == 0, "sync had {} map errors", report.errors);
        Ok(t.elapsed().as_secs_f64())
    }

    fn counters(&self) -> Vec<u64> {
        self.stats.counters()
    }
}

/// One round's raw figures.
struct Round {
    generated: u64,
    delivered: u64,
    secs: f64,
    forwarded: u64,
    passed: u64,
    /// Weir's counters that moved, by name.
    moved: BTreeMap<String, u64>,
}

struct Bench<'a> {
    plan: &'a Plan,
    lab: Lab,
    progs: Programs,
    weir: Weir,
    eth0: BTreeMap<&'static str, u32>,
}

impl Bench<'_> {
    fn round(&self, mode: FwdMode, flows: Flows, budget: Duration) -> anyhow::Result<Round> {
        let target = match mode {
            FwdMode::WeirXdp => self.weir.prog.as_fd(),
            FwdMode::EmptyXdpTx => self.progs.tx.as_fd(),
            FwdMode::Iptables | FwdMode::Nftables => self.progs.pass.as_fd(),
        };
        bpf::prog_array_set(self.progs.slot.as_fd(), 0, target)
            .with_context(|| format!("putting {} into the generator's slot", mode.label()))?;
        let tag = mode.tag();
        let index = self.eth0.get(tag).copied().unwrap_or(0);
        let before = self.lab.delivered(tag)?;
        let c0 = self.weir.counters();
        let frame = template(flows);
        let generator = self
            .progs
            .generators
            .get(&flows)
            .context("no generator")?
            .as_fd();
        let (chunk, batch) = (self.plan.chunk, self.plan.batch);
        let (mut generated, mut secs) = (0u64, 0.0f64);
        let mut frames = chunk;
        loop {
            // Wall time of the whole call: the kernel's own timer (`duration`) leaves out work the
            // frames cause (with XDP_TX it said 16 Mpps, the sink's NAPI evidently outside it). A call
            // also costs a fixed ~20 ms of setup and teardown, so calls are sized to last about a
            // quarter of a round whatever the mode, and that cost weighs the same on every mode.
            let wall = weir_tests::in_netns(self.lab.node(tag), move || {
                super::net::pin();
                let started = Instant::now();
                bpf::live_frames(generator, &frame, index, frames, batch)?;
                Ok::<_, std::io::Error>(started.elapsed().as_secs_f64())
            })?
            .context("BPF_PROG_TEST_RUN with live frames")?;
            secs += wall;
            generated += u64::from(frames);
            if secs >= budget.as_secs_f64() {
                break;
            }
            let rate = f64::from(frames) / wall.max(1e-6);
            frames = (rate * budget.as_secs_f64() / 4.0).clamp(f64::from(chunk), 16e6) as u32;
        }
        // The sink's NAPI runs when each batch ends, on this CPU; a moment for any straggler.
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.lab.delivered(tag)? - before;
        let c1 = self.weir.counters();
        let moved: BTreeMap<String, u64> = c1
            .iter()
            .zip(&c0)
            .enumerate()
            .filter(|(_, (a, b))| a > b)
            .map(|(i, (a, b))| {
                let name = STAT_NAMES.get(i).copied().unwrap_or("?");
                (name.to_owned(), a - b)
            })
            .collect();
        Ok(Round {
            generated,
            delivered,
            secs,
            forwarded: moved
                .get(STAT_NAMES[STAT_XDP_FORWARDED as usize])
                .copied()
                .unwrap_or(0),
            passed: moved
                .get(STAT_NAMES[STAT_XDP_PASS as usize])
                .copied()
                .unwrap_or(0),
            moved,
        })
    }
}

/// kube-proxy's iptables rule set for `defs` (the first a NodePort) into `ns`; the seconds the full
/// restore took. The jumps from the built-in chains go in once.
fn load_iptables(
    ns: &str,
    defs: &[ServiceDef],
    cap: Duration,
    jumps_loaded: &mut bool,
) -> anyhow::Result<f64> {
    let full = rules::iptables_full(defs, &[]);
    let secs = rules::iptables_restore(ns, IptBackend::Legacy, &full, cap)?
        .seconds()
        .with_context(|| format!("not loaded within {cap:?}"))?;
    if !*jumps_loaded {
        rules::iptables_restore(ns, IptBackend::Legacy, &rules::iptables_jumps(), cap)?;
        *jumps_loaded = true;
    }
    rules::iptables_restore(
        ns,
        IptBackend::Legacy,
        &rules::iptables_nodeport(&defs[0], NODE_PORT),
        cap,
    )?;
    Ok(secs)
}

/// kube-proxy's nftables rule set for `defs` (the first a NodePort) into `ns`; the seconds `nft -f` of
/// the full set took.
fn load_nft(ns: &str, defs: &[ServiceDef], cap: Duration) -> anyhow::Result<f64> {
    let secs = rules::nft_apply(ns, &rules::nft_full(defs, &[]), cap)?
        .seconds()
        .with_context(|| format!("not loaded within {cap:?}"))?;
    rules::nft_apply(ns, &rules::nft_nodeport(&defs[0], NODE_PORT, NODE_IP), cap)?;
    Ok(secs)
}

/// Runs the forwarding experiment.
pub fn run(plan: &Plan, progress: &Progress) -> anyhow::Result<ForwardResults> {
    progress.step(&format!(
        "NodePort forwarding rate (XDP live frames) at N = {:?}",
        plan.ns
    ));
    let progs = Programs::load()?;
    let lab = Lab::new(&progs)?;
    let mut eth0 = BTreeMap::new();
    for tag in ["xdp", "ipt", "nft"] {
        eth0.insert(tag, ifindex(lab.node(tag), UPLINK)?);
    }
    let max_n = plan.ns.iter().copied().max().unwrap_or(1);
    let weir = Weir::new(max_n, eth0.get("xdp").copied().unwrap_or(0))?;
    let mut bench = Bench {
        plan,
        lab,
        progs,
        weir,
        eth0,
    };
    let mut results = ForwardResults {
        reps: plan.reps,
        chunk: plan.chunk,
        batch: plan.batch,
        round_s: plan.round.as_secs_f64(),
        cpu: super::net::load_cpu(),
        ..ForwardResults::default()
    };
    let mut broken: BTreeMap<FwdMode, String> = BTreeMap::new();
    let mut jumps_loaded = false;
    for &n in &plan.ns {
        let mut defs = scenario::catalog(n, 1, &BTreeMap::new());
        defs[0].endpoints = backends();
        let mut load_s = BTreeMap::new();
        progress.note(&format!("N = {n}: programming Weir, iptables and nftables"));
        match bench.weir.program(&defs) {
            Ok(s) => {
                load_s.insert("weir_sync".to_owned(), s);
            }
            Err(e) => {
                broken.insert(FwdMode::WeirXdp, format!("programming at N = {n}: {e:#}"));
            }
        }
        if let Entry::Vacant(slot) = broken.entry(FwdMode::Iptables) {
            let ns = bench.lab.node("ipt").to_owned();
            match load_iptables(&ns, &defs, plan.load_cap, &mut jumps_loaded) {
                Ok(s) => {
                    load_s.insert("iptables_restore".to_owned(), s);
                }
                Err(e) => {
                    slot.insert(format!("rules at N = {n}: {e:#}"));
                }
            }
        }
        if let Entry::Vacant(slot) = broken.entry(FwdMode::Nftables) {
            let ns = bench.lab.node("nft").to_owned();
            match load_nft(&ns, &defs, plan.load_cap) {
                Ok(s) => {
                    load_s.insert("nft_f".to_owned(), s);
                }
                Err(e) => {
                    slot.insert(format!("rules at N = {n}: {e:#}"));
                }
            }
        }
        // Established flows first: the new-flow phase fills both conntrack tables with other flows.
        for flows in Flows::ALL {
            let mut point = FwdPoint {
                services: n,
                flows: Some(flows),
                load_s: load_s.clone(),
                ..FwdPoint::default()
            };
            let mut modes: BTreeMap<FwdMode, ModeRounds> = FwdMode::ALL
                .iter()
                .map(|m| {
                    (
                        *m,
                        ModeRounds {
                            mode: Some(*m),
                            error: broken.get(m).cloned(),
                            ..ModeRounds::default()
                        },
                    )
                })
                .collect();
            let live: Vec<FwdMode> = FwdMode::ALL
                .iter()
                .copied()
                .filter(|m| !broken.contains_key(m))
                .collect();
            if plan.warmup {
                for &m in &live {
                    if let Err(e) = bench.round(m, flows, plan.round) {
                        broken.insert(m, format!("warm-up at N = {n}, {}: {e:#}", flows.label()));
                    }
                }
            }
            for rep in 0..plan.reps {
                // Rotated each repetition, so no mode always follows the same one.
                for k in 0..live.len() {
                    let m = live[(k + rep) % live.len()];
                    if broken.contains_key(&m) {
                        continue;
                    }
                    match bench.round(m, flows, plan.round) {
                        Ok(r) => {
                            let e = modes.get_mut(&m).unwrap_or_else(|| unreachable!());
                            e.generated.push(r.generated);
                            e.delivered.push(r.delivered);
                            e.generated_pps.push(r.generated as f64 / r.secs);
                            e.delivered_pps.push(r.delivered as f64 / r.secs);
                            if m == FwdMode::WeirXdp {
                                e.counted_forwarded.push(r.forwarded);
                                e.counted_passed.push(r.passed);
                                e.weir_counters.push(r.moved);
                            }
                        }
                        Err(e) => {
                            broken.insert(m, format!("round at N = {n}, {}: {e:#}", flows.label()));
                        }
                    }
                }
            }
            for (m, e) in &mut modes {
                if e.error.is_none() {
                    e.error = broken.get(m).cloned();
                }
                e.pps = Spread::of(&e.delivered_pps);
                if let Some(err) = &e.error {
                    results.errors.push(format!("{}: {err}", m.label()));
                }
            }
            let pps = |m: FwdMode| {
                modes
                    .get(&m)
                    .filter(|e| e.error.is_none())
                    .map(|e| e.delivered_pps.clone())
                    .unwrap_or_default()
            };
            for (name, a, b) in [
                (
                    "weir_xdp / empty_xdp_tx",
                    FwdMode::WeirXdp,
                    FwdMode::EmptyXdpTx,
                ),
                ("weir_xdp / iptables", FwdMode::WeirXdp, FwdMode::Iptables),
                ("weir_xdp / nftables", FwdMode::WeirXdp, FwdMode::Nftables),
            ] {
                point.ratios.push(FwdRatio {
                    name: name.to_owned(),
                    ratio: paired_ratio(&pps(a), &pps(b)),
                });
            }
            point.modes = modes.into_values().collect();
            let show = |m: FwdMode| {
                point
                    .modes
                    .iter()
                    .find(|x| x.mode == Some(m))
                    .and_then(|x| x.pps)
                    .map_or("–".to_owned(), |s| format!("{:.3}", s.median / 1e6))
            };
            progress.note(&format!(
                "N = {n}, {}: Mpps delivered: Weir {}, empty XDP_TX {}, iptables {}, nftables {}",
                flows.label(),
                show(FwdMode::WeirXdp),
                show(FwdMode::EmptyXdpTx),
                show(FwdMode::Iptables),
                show(FwdMode::Nftables)
            ));
            results.points.push(point);
        }
    }
    if results.points.is_empty() {
        bail!("nothing measured");
    }
    Ok(results)
}

fn n_label(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

fn spread_text(s: Spread) -> String {
    if s.n > 1 {
        format!(" (min–max {:.2}–{:.2}, {} reps)", s.min, s.max, s.n)
    } else {
        String::new()
    }
}

/// The issue's forwarding targets: Weir at ≥ 0.8× an empty XDP_TX program, and ≥ 4× / ≥ 10× kube-proxy's
/// iptables mode at 1 / 10k services. Each is judged on the worse of the two kinds of flows (and, for
/// the first, of every N); the measured text gives both with their spreads.
pub fn targets(f: Option<&ForwardResults>) -> Vec<super::report::Target> {
    use super::report::judge_min;
    // (flows, N, ratio) for every point that has `name`, optionally at one N.
    let ratios = |name: &str, at: Option<usize>| -> Vec<(Flows, usize, Spread)> {
        f.map_or_else(Vec::new, |f| {
            f.points
                .iter()
                .filter(|p| at.is_none_or(|n| p.services == n))
                .filter_map(|p| Some((p.flows?, p.services, f.ratio(p.services, p.flows?, name)?)))
                .collect()
        })
    };
    let describe = |rs: &[(Flows, usize, Spread)], with_n: bool| -> String {
        rs.iter()
            .map(|(fl, n, s)| {
                let at = if with_n {
                    format!(" at N = {}", n_label(*n))
                } else {
                    String::new()
                };
                let short = match fl {
                    Flows::Established => "established",
                    Flows::New => "new flows",
                };
                format!("{short}{at} {:.2}×{}", s.median, spread_text(*s))
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let top = f.and_then(|f| f.points.iter().map(|p| p.services).max());
    let mut out = Vec::new();
    for (name, goal, limit, ratio, at) in [
        (
            "NodePort forwarding rate vs an empty XDP_TX program",
            "≥ 0.8×",
            0.8,
            "weir_xdp / empty_xdp_tx",
            None,
        ),
        (
            "NodePort forwarding rate vs iptables at 1 service",
            "≥ 4×",
            4.0,
            "weir_xdp / iptables",
            Some(1),
        ),
        (
            "NodePort forwarding rate vs iptables at 10k services",
            "≥ 10×",
            10.0,
            "weir_xdp / iptables",
            Some(top.filter(|&n| n > 1).unwrap_or(usize::MAX)),
        ),
    ] {
        let rs = ratios(ratio, at);
        let worst = rs
            .iter()
            .min_by(|a, b| a.2.median.total_cmp(&b.2.median))
            .copied();
        let mut t = judge_min(
            name,
            goal,
            worst.map(|w| w.2.median),
            limit,
            &worst.map_or(String::new(), |(fl, n, _)| {
                format!(
                    "frames delivered per second, paired per repetition; judged on the worst ({}, N = {}){}",
                    fl.label(),
                    n_label(n),
                    if limit > 4.0 && n < 10_000 {
                        " (10k not in this run)"
                    } else {
                        ""
                    }
                )
            }),
        );
        if !rs.is_empty() {
            t.measured = describe(&rs, at.is_none());
        }
        out.push(t);
    }
    out
}

/// The report's section.
pub fn section(md: &mut String, f: &ForwardResults) {
    use std::fmt::Write as _;
    let _ = writeln!(md, "## 6. NodePort forwarding rate (XDP live frames)\n");
    let _ = writeln!(
        md,
        "Node 1 of a two-node layout forwards TCP segments to its NodePort {NODE_PORT} whose endpoints \
         ({BACKEND}:{TARGET_PORT} and up) are on node 0: DNAT to the endpoint, SNAT to the node's address \
         {NODE_IP}, out of the interface they came in on. BPF_PROG_TEST_RUN with \
         `BPF_F_TEST_XDP_LIVE_FRAMES` is the generator ({} frames a call, batches of {}, calls repeated \
         at first, then sized to last a quarter of a round, calls repeated until they add up to {:.1} s \
         of wall time a round, pinned to CPU {}; a call's fixed ~20 ms of setup and teardown is inside \
         and weighs alike on every mode), running as if the frames arrived on the \
         node's `eth0` (a veth); what leaves `eth0` is counted and dropped by XDP on the far end of the \
         veth. A raw generator program restores each frame, gives it a random source address \
         (172.30.64.0–172.30.191.255) and port with valid checksums, and tail-calls the program under \
         test, so every mode pays the same generator. Two kinds of flows, measured one after the other \
         (modes alternating within each): **established**, 16,384 flows (1,024 source ports × 16 \
         addresses) of ACK segments, all tracked after the warm-up round (Weir and netfilter, with its \
         default `nf_conntrack_tcp_loose`, pick flows up mid-stream), so every frame is a conntrack hit \
         in Weir and in netfilter (whose NAT rules are then not walked at all); and **new flows**, SYNs \
         from a random source of 2^30 for every frame, so every frame is a new flow for everyone and kube-proxy's rules are \
         walked for each, as for every new connection. The NodePort \
         service has {} endpoints, all on node 0: every flow is SNATed to the node's one address, and \
         with one endpoint a flood exhausts that address's source ports towards it within a second \
         (then Weir drops, `drop_snat_exhausted`, and netfilter's masquerade fails); with {} there are \
         more ports than either conntrack table holds flows, so after the unrecorded warm-up round both \
         tables are full and evict (Weir's LRU, netfilter's early drop): the steady state of a SYN \
         flood. In iptables mode the {} endpoints mean a walk through up to {} `statistic` rules per \
         new flow. Modes: \
         Weir's `weir_ext_xdp` (programmed in this process by the agent's own config parser, cache and \
         reconciler, `eth0` in `WEIR_EXT_IFACES`); an empty program returning `XDP_TX` (the ceiling: \
         the same frames sent back out untouched); and `XDP_PASS` into the stack of a node namespace \
         holding kube-proxy's iptables (legacy) or nftables rule set for N ClusterIP services, one of \
         them also a NodePort (externalTrafficPolicy Cluster: KUBE-NODEPORTS / `service-nodeports`, \
         masquerade). Everything runs on one CPU (veth NAPI runs on the sending CPU), so these are \
         per-CPU rates. {} repetitions, modes rotated within each.\n",
        f.chunk,
        f.batch,
        f.round_s,
        f.cpu,
        ENDPOINTS,
        ENDPOINTS,
        ENDPOINTS,
        ENDPOINTS - 1,
        f.reps
    );
    let _ = writeln!(
        md,
        "| N | flows | mode | delivered Mpps | generated Mpps | delivered / generated | Weir: `xdp_forwarded` = delivered |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for p in &f.points {
        for m in &p.modes {
            let label = m.mode.map_or("?", FwdMode::label);
            if let Some(err) = &m.error {
                let _ = writeln!(
                    md,
                    "| {} | {} | {label} | not measured: {} | | | |",
                    n_label(p.services),
                    p.flows.map_or("?", Flows::label),
                    err.replace('\n', " ").replace('|', "/")
                );
                continue;
            }
            let mpps = |v: &[f64]| {
                let v: Vec<f64> = v.iter().map(|x| x / 1e6).collect();
                Spread::of(&v).map_or("–".to_owned(), |s| s.fmt(3))
            };
            let share: Vec<f64> = m
                .delivered
                .iter()
                .zip(&m.generated)
                .map(|(d, g)| *d as f64 / (*g).max(1) as f64)
                .collect();
            let check = if m.mode == Some(FwdMode::WeirXdp) {
                let equal = m
                    .counted_forwarded
                    .iter()
                    .zip(&m.delivered)
                    .filter(|(c, d)| c == d)
                    .count();
                let passed: u64 = m.counted_passed.iter().sum();
                format!(
                    "{equal}/{} rounds; {passed} frames passed to the stack",
                    m.delivered.len()
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {label} | {} | {} | {} | {check} |",
                n_label(p.services),
                p.flows.map_or("?", Flows::label),
                mpps(&m.delivered_pps),
                mpps(&m.generated_pps),
                Spread::of(&share).map_or("–".to_owned(), |s| s.fmt(3)),
            );
        }
    }
    md.push('\n');
    // Frames Weir neither sent nor passed: say why, from its own counters.
    for p in &f.points {
        for m in p.modes.iter().filter(|m| m.mode == Some(FwdMode::WeirXdp)) {
            let mut lost: BTreeMap<&str, u64> = BTreeMap::new();
            for c in &m.weir_counters {
                for (k, v) in c.iter().filter(|(k, _)| k.starts_with("drop")) {
                    *lost.entry(k.as_str()).or_default() += v;
                }
            }
            if lost.is_empty() {
                continue;
            }
            let total: u64 = m.generated.iter().sum();
            let parts: Vec<String> = lost
                .iter()
                .map(|(k, v)| {
                    format!(
                        "`{k}` {v} ({:.1} %)",
                        *v as f64 * 100.0 / total.max(1) as f64
                    )
                })
                .collect();
            let _ = writeln!(
                md,
                "- N = {}, {}: Weir dropped {} of the {total} frames generated.",
                n_label(p.services),
                p.flows.map_or("?", Flows::label),
                parts.join(", ")
            );
        }
    }
    let _ = writeln!(
        md,
        "\n`drop_snat_exhausted` is Weir finding no free source port for a new flow's SNAT: in the new-flow \
         rounds because the flood fills its conntrack table (LRU) with flows holding ports (the agent's \
         collector forgets an unanswered SYN after 120 s, `--conntrack-tcp-timeout-syn`, as the kernel \
         does; a run lasts less than that, and the bench programs the maps without the agent); in the established rounds at N ≥ 1k because those follow the previous N's \
         new-flow rounds, whose stale entries still hold ports, so the established flows the flood \
         evicted cannot be tracked again and are dropped frame after frame (each after a full port \
         search, which also slows the rest). Netfilter's table, whose unreplied entries time out and are \
         early-dropped, delivered every frame in the same order. Weir's established figures at 1k and \
         10k therefore measure Weir after a flood, not a clean conntrack-hit path (N = 1 does).\n"
    );
    let _ = writeln!(
        md,
        "Weir / baseline, delivered frames per second paired per repetition (goals: ≥ 0.8× the empty \
         program, ≥ 4× iptables at 1 service, ≥ 10× at 10k):\n"
    );
    let _ = writeln!(
        md,
        "| N | flows | Weir / empty XDP_TX | Weir / iptables | Weir / nftables | Weir sync s | iptables-legacy-restore s | nft -f s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for p in &f.points {
        let r = |name: &str| {
            p.ratios
                .iter()
                .find(|x| x.name == name)
                .and_then(|x| x.ratio)
                .map_or("–".to_owned(), |s| format!("{}×", s.fmt(2)))
        };
        let load = |k: &str| {
            p.load_s
                .get(k)
                .map_or("–".to_owned(), |s| format!("{s:.3}"))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            n_label(p.services),
            p.flows.map_or("?", Flows::label),
            r("weir_xdp / empty_xdp_tx"),
            r("weir_xdp / iptables"),
            r("weir_xdp / nftables"),
            load("weir_sync"),
            load("iptables_restore"),
            load("nft_f")
        );
    }
    md.push('\n');
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn fold(mut sum: u32) -> u16 {
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn sum16(b: &[u8]) -> u32 {
        b.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum()
    }

    #[test]
    fn varied_frames_keep_valid_checksums() {
        let t = template(Flows::New);
        let mut seen = std::collections::BTreeSet::new();
        for r in [
            0u32,
            1,
            0x7fff,
            0xffff_ffff,
            0x1234_5678,
            0x8001_0002,
            0xdead_beef,
        ] {
            let (p, l, id, seq) = vary(&t, r);
            let mut f = t;
            f[34..36].copy_from_slice(&p.to_be_bytes());
            f[28..30].copy_from_slice(&l.to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            f[40..42].copy_from_slice(&seq.to_be_bytes());
            assert_eq!(fold(sum16(&f[14..34])), 0xffff, "IPv4 header, r = {r:#x}");
            let mut pseudo = [0u8; 12];
            pseudo[0..8].copy_from_slice(&f[26..34]);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
            assert_eq!(
                fold(sum16(&pseudo) + sum16(&f[34..54])),
                0xffff,
                "TCP, r = {r:#x}"
            );
            assert!(p >= 1024 && (0x4000..0xc000).contains(&l));
            seen.insert((p, l));
        }
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn generator_is_well_formed() {
        let slot = std::fs::File::open("/dev/null").expect("an fd");
        let p = generator(&template(Flows::New), slot.as_fd(), Flows::New);
        // Bounds check jumps forward to the last two instructions.
        let jump = p[5].to_le_bytes();
        assert_eq!(jump[0], 0x2d);
        let off = i16::from_le_bytes([jump[2], jump[3]]) as usize;
        assert_eq!(5 + 1 + off, p.len() - 2);
    }

    #[test]
    fn parses_veth_xdp_drops() {
        let out = "NIC statistics:\n     peer_ifindex: 5\n     rx_queue_0_xdp_packets: 10\n     \
                   rx_queue_0_xdp_drops: 7\n     rx_queue_1_xdp_drops: 3\n     tx_queue_0_xdp_xmit: 9\n";
        assert_eq!(parse_xdp_drops(out), Some(10));
        assert_eq!(parse_xdp_drops("peer_ifindex: 5\n"), None);
    }
}
