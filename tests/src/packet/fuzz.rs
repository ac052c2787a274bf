//! The packet fuzzer: random and mutated frames through each TC program, every run judged against the
//! invariants a load balancer on every packet of the node must keep:
//!
//! 1. a frame that is not addressed to a programmed frontend, not a packet of a tracked flow (either
//!    direction), not an ICMP/ICMPv6 error quoting a tracked flow and not a fragment to a ClusterIP
//!    leaves with `TC_ACT_OK` and every byte unchanged;
//! 2. a rewritten frame keeps its family and protocol and goes to a programmed backend (its source
//!    unchanged, or the hairpin address, or this node's address for SNAT, each of the frame's family),
//!    or is a reverse translation whose source is a frontend, or is a reject (RST / ICMP or ICMPv6
//!    port unreachable from the frontend to the client), or an ICMP/ICMPv6 error whose quote now names
//!    a frontend (and whose outer source, when the backend sent it, is that frontend);
//! 3. no rewrite breaks a checksum: a checksum valid on the way in (IPv4 header, TCP/UDP over the
//!    length the header states with either family's pseudo-header, ICMP, ICMPv6, the quoted IPv4
//!    header) is valid on the way out, a UDP zero checksum stays zero, and a built reply has valid
//!    checksums;
//!
//! 4. every `TC_ACT_SHOT` moves a drop counter in `WEIR_STATS` (a RST to a rejecting frontend used to
//!    be dropped silently: this invariant found it);
//! 5. an ICMP/ICMPv6 error about a flow that was SNATed or hairpinned goes back to the flow's client:
//!    its quote's source and its outer destination are the client again.
//!
//! Datapath bugs this fuzzer found (each now pinned by a fixture in `packet_fixtures.rs`) are
//! recognised by name (`KNOWN_BUG_*`) and reported as regressions, i.e. violations.
//!
//! Frames come from a seeded RNG (`WEIR_FUZZ_SEED` replays a run): valid frames to frontends, backends,
//! ClusterIPs' other ports, the node and unrelated hosts; replies to and ICMP errors about flows the
//! run itself translated; ARP, IPv6 extension chains, VLAN, GRE, fragments of both families; and random
//! bytes; most then mutated (bit flips, bytes, truncation, extension, length/IHL/version/fragment/
//! protocol/next-header/port/address/flag fields, checksums broken or recomputed). Every kind of frame
//! comes in both families, the IPv6 ones aimed at the IPv6 frontends and backends; outcome classes of
//! IPv6 frames carry a `_v6` suffix.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use weir_common::{
    CT_REVERSE, STAT_DROP_FRAGMENT, STAT_DROP_L7_NO_PROXY, STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_LOCAL_ENDPOINT, STAT_DROP_REJECT_FAILED, STAT_DROP_RESET_TO_REJECTING,
    STAT_DROP_REWRITE_FAILED, STAT_DROP_SNAT_EXHAUSTED, STAT_DROP_SOURCE_RANGE,
};

use super::frame::{
    self, ETH_HLEN, ETH_P_IPV6, ICMP6_QUOTE, IPV6_HLEN, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, Packet, Sum, TCP_RST,
};
use super::rig::{
    self, HAIRPIN, HAIRPIN6, NODE_IP, NODE_IP6, POD_ROUTER, POD_ROUTER6, Prog, Rig, TC_ACT_OK,
    TC_ACT_SHOT,
};

/// The drop reasons: a `TC_ACT_SHOT` must move one of them.
const DROP_STATS: [u32; 9] = [
    STAT_DROP_NO_BACKEND,
    STAT_DROP_REJECT_FAILED,
    STAT_DROP_REWRITE_FAILED,
    STAT_DROP_NO_LOCAL_ENDPOINT,
    STAT_DROP_SOURCE_RANGE,
    STAT_DROP_SNAT_EXHAUSTED,
    STAT_DROP_FRAGMENT,
    STAT_DROP_L7_NO_PROXY,
    STAT_DROP_RESET_TO_REJECTING,
];

/// Violations kept (with their frames) per program; the rest are only counted.
const KEEP_VIOLATIONS: usize = 20;

/// xorshift64* (Vigna): small, fast, and reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so 0 and small seeds give a good non-zero state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The seed to use: `WEIR_FUZZ_SEED` (decimal or 0x-hex) when set, else one from the clock.
pub fn seed_from_env() -> u64 {
    if let Ok(s) = std::env::var("WEIR_FUZZ_SEED") {
        let s = s.trim();
        let parsed = match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        };
        match parsed {
            Ok(seed) => return seed,
            Err(e) => panic!("WEIR_FUZZ_SEED={s:?} is not a number: {e}"),
        }
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One broken invariant, with the frames to replay it.
#[derive(Clone, Debug)]
pub struct Violation {
    pub what: String,
    pub input: Vec<u8>,
    pub verdict: u32,
    pub output: Vec<u8>,
}

/// One program's run.
#[derive(Clone, Debug, Default)]
pub struct ProgReport {
    pub program: &'static str,
    pub frames: u64,
    pub seconds: f64,
    /// Runs by TC verdict.
    pub verdicts: BTreeMap<u32, u64>,
    /// Runs by what the judge saw (unchanged, forward, reverse, reject, …).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// `WEIR_STATS` deltas by reason.
    pub stats: BTreeMap<&'static str, u64>,
    /// Frames BPF_PROG_TEST_RUN refused (EINVAL): IPv4-typed frames shorter than 34 bytes and IPv6-typed
    /// ones shorter than 54 (the kernel pulls the network header when it builds the skb).
    pub refused: u64,
    pub violation_count: u64,
    pub violations: Vec<Violation>,
}

impl ProgReport {
    pub fn frames_per_second(&self) -> f64 {
        self.frames as f64 / self.seconds.max(1e-9)
    }

    /// A human summary, one line per fact, the kept violations with their frames in hex.
    pub fn render(&self) -> String {
        let mut s = format!(
            "{}: {} frames in {:.1} s ({:.0} frames/s), {} violations, {} refused by the kernel\n",
            self.program,
            self.frames,
            self.seconds,
            self.frames_per_second(),
            self.violation_count,
            self.refused
        );
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .map(|(v, n)| format!("{}={n}", verdict_name(*v)))
            .collect();
        s.push_str(&format!("  verdicts: {}\n", verdicts.join(" ")));
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        s.push_str(&format!("  outcomes: {}\n", outcomes.join(" ")));
        let stats: Vec<String> = self.stats.iter().map(|(k, n)| format!("{k}={n}")).collect();
        s.push_str(&format!("  WEIR_STATS: {}\n", stats.join(" ")));
        for v in &self.violations {
            s.push_str(&format!(
                "  VIOLATION: {}\n    input:  {}\n    verdict {}, output: {}\n",
                v.what,
                frame::hex(&v.input),
                verdict_name(v.verdict),
                frame::hex(&v.output)
            ));
        }
        s
    }
}

pub fn verdict_name(v: u32) -> String {
    match v {
        0 => "TC_ACT_OK".into(),
        2 => "TC_ACT_SHOT".into(),
        7 => "TC_ACT_REDIRECT".into(),
        other => format!("verdict_{other}"),
    }
}

/// Runs `frames` frames through `prog`, judging each; `progress` is called every 2^20 frames.
pub fn fuzz(
    rig: &Rig,
    prog: Prog,
    frames: u64,
    seed: u64,
    mut progress: impl FnMut(&ProgReport),
) -> ProgReport {
    let mut rng = Rng::new(seed ^ prog as u64);
    let mut frames_gen = Generator::new(rig, prog);
    let mut report = ProgReport {
        program: prog.name(),
        ..ProgReport::default()
    };
    let start_counters = rig.counters();
    let mut last_drops = drops(&start_counters);
    let started = Instant::now();
    for n in 0..frames {
        let input = frames_gen.frame(&mut rng);
        let allowed = may_touch(rig, &input);
        let outcome = match rig.run(prog, &input) {
            Ok(o) => o,
            Err(_) => {
                report.refused += 1;
                continue;
            }
        };
        report.frames += 1;
        *report.verdicts.entry(outcome.verdict).or_default() += 1;
        let mut silent = None;
        if outcome.verdict == TC_ACT_SHOT {
            let now = drops(&rig.counters());
            if now == last_drops {
                silent = Some("TC_ACT_SHOT without a drop counter moving".to_owned());
            }
            last_drops = now;
        }
        let verdict = match silent {
            Some(what) => Err(what),
            None => judge(rig, &input, allowed, outcome.verdict, &outcome.frame),
        };
        match verdict {
            Ok(class) => {
                *report.outcomes.entry(class).or_default() += 1;
                let base = class.strip_suffix("_v6").unwrap_or(class);
                if base == "forward" || base == "snat" || base == "hairpin" {
                    frames_gen.remember(input, outcome.frame);
                }
            }
            Err(what) => {
                report.violation_count += 1;
                if report.violations.len() < KEEP_VIOLATIONS {
                    report.violations.push(Violation {
                        what,
                        input,
                        verdict: outcome.verdict,
                        output: outcome.frame,
                    });
                }
            }
        }
        if (n + 1) % (1 << 20) == 0 {
            report.seconds = started.elapsed().as_secs_f64();
            progress(&report);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    let end_counters = rig.counters();
    for (name, d) in rig::stat_delta(&start_counters, &end_counters) {
        report.stats.insert(name, d);
    }
    report
}

fn drops(counters: &[u64]) -> u64 {
    DROP_STATS
        .iter()
        .map(|&i| counters.get(i as usize).copied().unwrap_or(0))
        .sum()
}

/// What may the datapath touch, judged before the run (the run itself adds conntrack entries)?
#[derive(Clone, Copy, Debug)]
enum Allowed {
    /// Nothing: must pass unchanged.
    No,
    /// A TCP/UDP packet (either family) to a frontend or of a tracked flow.
    L4(Packet),
    /// An ICMP/ICMPv6 error quoting a tracked flow, and that flow's peer (SNAT, hairpin) if any.
    IcmpError(frame::IcmpErrorAny, Option<SocketAddr>),
    /// A fragment to a ClusterIP: dropped.
    Fragment,
}

fn may_touch(rig: &Rig, input: &[u8]) -> Allowed {
    if let Some(p) = frame::parse(input) {
        let ours = rig.is_frontend(p.dst, p.proto)
            || rig.is_cluster_ip(p.dst.ip(), p.proto)
            || rig.tracked(p.src, p.dst, p.proto).is_some();
        return if ours { Allowed::L4(p) } else { Allowed::No };
    }
    if let Some(e) = frame::parse_icmp_error_any(input) {
        return match rig.reverse_peer(e.inner_dst, e.inner_src, e.inner_proto) {
            Some(peer) => Allowed::IcmpError(e, peer),
            None => Allowed::No,
        };
    }
    match frame::fragment_destination_any(input) {
        Some((proto, daddr)) if rig.is_cluster_ip(daddr, proto) => Allowed::Fragment,
        _ => Allowed::No,
    }
}

/// `class`, or its `_v6` twin for an IPv6 frame.
fn family(class: &'static str, v6: bool) -> &'static str {
    if !v6 {
        return class;
    }
    match class {
        "not_ours_unchanged" => "not_ours_unchanged_v6",
        "dropped" => "dropped_v6",
        "ours_unchanged" => "ours_unchanged_v6",
        "reject_icmp" => "reject_icmp_v6",
        "reject_rst" => "reject_rst_v6",
        "reverse" => "reverse_v6",
        "forward" => "forward_v6",
        "hairpin" => "hairpin_v6",
        "snat" => "snat_v6",
        "icmp_translated" => "icmp_translated_v6",
        other => other,
    }
}

fn is_v6_frame(f: &[u8]) -> bool {
    f.len() >= ETH_HLEN && u16::from_be_bytes([f[12], f[13]]) == ETH_P_IPV6
}

/// The invariants, for one run: `Ok(outcome class)` or `Err(what broke)`.
fn judge(
    rig: &Rig,
    input: &[u8],
    allowed: Allowed,
    verdict: u32,
    output: &[u8],
) -> Result<&'static str, String> {
    let unchanged = output == input;
    let v6 = is_v6_frame(input);
    let class = match allowed {
        Allowed::No => {
            if verdict == TC_ACT_OK && unchanged {
                "not_ours_unchanged"
            } else if let Some(bug) = known_bug_not_ours(rig, input, verdict, unchanged) {
                return known(bug);
            } else if verdict != TC_ACT_OK {
                return Err(format!("not ours, yet verdict {}", verdict_name(verdict)));
            } else {
                return Err("not ours, yet modified".into());
            }
        }
        _ if verdict == TC_ACT_SHOT => "dropped",
        _ if unchanged => "ours_unchanged",
        Allowed::Fragment => return Err("a fragment was modified".into()),
        Allowed::IcmpError(e, peer) => judge_icmp(rig, input, &e, peer, output)?,
        Allowed::L4(p) => judge_l4(rig, input, &p, output)?,
    };
    Ok(family(class, v6))
}

/// The outcome of a datapath bug this fuzzer found once (since fixed): a violation, named, so a
/// regression says which.
fn known(bug: &'static str) -> Result<&'static str, String> {
    Err(format!("regression of the fixed datapath bug {bug}"))
}

/// Traffic that is not ours, touched by a known datapath bug (see `packet_fixtures.rs`' ignored
/// fixtures): the name of the bug.
fn known_bug_not_ours(
    rig: &Rig,
    input: &[u8],
    verdict: u32,
    unchanged: bool,
) -> Option<&'static str> {
    if !is_v6_frame(input) || input.len() < ETH_HLEN + IPV6_HLEN + 8 {
        return None;
    }
    let ip = &input[ETH_HLEN..];
    let (version, next, inner_next) = (ip[0] >> 4, ip[6], ip[IPV6_HLEN]);
    let dst = IpAddr::V6(frame::ipv6_dst(input));
    // `fragment_destination` does not check the IPv6 version nibble.
    if version != 6
        && next == frame::IPV6_FRAGMENT
        && (inner_next == PROTO_TCP || inner_next == PROTO_UDP)
        && rig.is_cluster_ip(dst, inner_next)
        && verdict == TC_ACT_SHOT
        && unchanged
    {
        return Some("KNOWN_BUG_v6_fragment_version_unchecked");
    }
    // `translate_error6` checks neither that the payload length covers the quote nor the quote's
    // version.
    const NEEDED: usize = ICMP6_QUOTE + IPV6_HLEN + 8;
    if version == 6
        && next == PROTO_ICMPV6
        && input.len() >= NEEDED
        && (1..=3).contains(&ip[IPV6_HLEN])
    {
        let q = &input[ICMP6_QUOTE..];
        let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let proto = q[6];
        let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
        let port = |at: usize| u16::from_be_bytes([q[IPV6_HLEN + at], q[IPV6_HLEN + at + 1]]);
        let inner_src = SocketAddr::new(addr(&q[8..24]).into(), port(0));
        let inner_dst = SocketAddr::new(addr(&q[24..40]).into(), port(2));
        let unchecked = payload < NEEDED - ETH_HLEN - IPV6_HLEN || q[0] >> 4 != 6;
        if unchecked
            && (proto == PROTO_TCP || proto == PROTO_UDP)
            && rig.tracked(inner_dst, inner_src, proto) == Some(CT_REVERSE)
        {
            return Some("KNOWN_BUG_icmp6_quote_unchecked");
        }
    }
    None
}

fn ip_sum_kept(input: &[u8], output: &[u8]) -> Result<(), String> {
    if frame::ip_header_sum_any(input) == Sum::Valid
        && frame::ip_header_sum_any(output) != Sum::Valid
    {
        return Err("IPv4 header checksum broken by the rewrite".into());
    }
    Ok(())
}

fn judge_l4(rig: &Rig, input: &[u8], p: &Packet, output: &[u8]) -> Result<&'static str, String> {
    // A reject is a new packet: ICMP/ICMPv6 port unreachable (UDP) or RST (TCP), frontend → client.
    if let Some(e) = frame::parse_icmp_error_any(output)
        && p.proto == PROTO_UDP
        && e.outer_src == p.dst.ip()
        && e.outer_dst == p.src.ip()
    {
        let port_unreachable = if p.v6 { (1, 4) } else { (3, 3) };
        if (e.kind, e.code) != port_unreachable {
            return Err(format!("reject as ICMP type {} code {}", e.kind, e.code));
        }
        if is_v6_frame(output) != p.v6 {
            return Err("reject of another family".into());
        }
        if frame::ip_header_sum_any(output) == Sum::Invalid
            || frame::icmp_sum_any(output) != Sum::Valid
        {
            return Err("ICMP port unreachable built with a bad checksum".into());
        }
        return Ok("reject_icmp");
    }
    let Some(o) = frame::parse(output) else {
        return Err("rewritten into something that is no TCP/UDP packet".into());
    };
    if o.v6 != p.v6 {
        return Err("family changed".into());
    }
    if o.proto != p.proto {
        return Err("protocol changed".into());
    }
    if o.proto == PROTO_TCP
        && output[o.l4_off + 13] & TCP_RST != 0
        && o.src == p.dst
        && o.dst == p.src
        && rig.tracked(p.src, p.dst, p.proto) != Some(CT_REVERSE)
    {
        if frame::ip_header_sum_any(output) == Sum::Invalid
            || frame::packet_sum(output, &o) != Sum::Valid
        {
            return Err("RST built with a bad checksum".into());
        }
        return Ok("reject_rst");
    }
    ip_sum_kept(input, output)?;
    match (frame::packet_sum(input, p), frame::packet_sum(output, &o)) {
        (Sum::Valid, Sum::Valid) | (Sum::Absent, Sum::Absent) => {}
        (Sum::Valid | Sum::Absent, after) => {
            return Err(format!("L4 checksum broken by the rewrite ({after:?})"));
        }
        _ => {}
    }
    // A reply (hairpin replies included: their destination, the client, is a backend too).
    if o.src != p.src && rig.is_frontend(o.src, o.proto) {
        return Ok("reverse");
    }
    if rig.is_backend(o.dst, o.proto) {
        let (hairpin, node) = if o.v6 {
            (IpAddr::V6(HAIRPIN6), IpAddr::V6(NODE_IP6))
        } else {
            (IpAddr::V4(HAIRPIN), IpAddr::V4(NODE_IP))
        };
        if o.src == p.src {
            return Ok("forward");
        }
        if o.src.ip() == hairpin && o.src.port() == p.src.port() {
            return Ok("hairpin");
        }
        if o.src.ip() == node {
            return Ok("snat");
        }
        return Err(format!("to a backend, but the source became {}", o.src));
    }
    Err(format!(
        "rewritten to {} -> {}: neither to a backend nor from a frontend",
        o.src, o.dst
    ))
}

fn judge_icmp(
    rig: &Rig,
    input: &[u8],
    before: &frame::IcmpErrorAny,
    peer: Option<SocketAddr>,
    output: &[u8],
) -> Result<&'static str, String> {
    let Some(e) = frame::parse_icmp_error_any(output) else {
        return Err("an ICMP error rewritten into something else".into());
    };
    if !rig.is_frontend(e.inner_dst, e.inner_proto) {
        return Err(format!(
            "ICMP error translated, but its quote names {} (no frontend)",
            e.inner_dst
        ));
    }
    // The flow's client must get it: with a peer (SNAT, hairpin) the quote's source and the outer
    // destination are the client's again.
    let (want_inner_src, want_dst) = match peer {
        Some(peer) => (peer, peer.ip()),
        None => (before.inner_src, before.outer_dst),
    };
    if e.inner_src != want_inner_src || e.outer_dst != want_dst {
        if peer.is_some() && e.inner_src == before.inner_src && e.outer_dst == before.outer_dst {
            return known("KNOWN_BUG_icmp_error_about_snat_flow_not_restored");
        }
        return Err(format!(
            "ICMP error sent to {} quoting {} (expected to {want_dst} quoting {want_inner_src})",
            e.outer_dst, e.inner_src
        ));
    }
    // The outer source is the frontend when the backend itself sent the error, else untouched.
    let from_backend = before.outer_src == before.inner_dst.ip();
    let want_src = if from_backend {
        e.inner_dst.ip()
    } else {
        before.outer_src
    };
    if e.outer_src != want_src {
        return Err(format!(
            "ICMP error translated from {} (expected {want_src})",
            e.outer_src
        ));
    }
    ip_sum_kept(input, output)?;
    if frame::icmp_sum_any(input) == Sum::Valid && frame::icmp_sum_any(output) != Sum::Valid {
        return Err("ICMP checksum broken by the translation".into());
    }
    if !is_v6_frame(input) {
        let inner = |f: &[u8]| frame::checksum(&[&f[ETH_HLEN + 28..ETH_HLEN + 48]]) == 0;
        if inner(input) && !inner(output) {
            return Err("quoted IPv4 header checksum broken by the translation".into());
        }
    }
    Ok("icmp_translated")
}

/// Makes the frames: seeds, replies to what was translated, random bytes; then mutations.
struct Generator {
    prog: Prog,
    /// Destinations worth aiming at (both families): frontends, ClusterIPs' other ports, backends,
    /// the node, others.
    targets: Vec<(SocketAddr, u8)>,
    addresses: Vec<Ipv4Addr>,
    addresses6: Vec<Ipv6Addr>,
    /// Recent translations (forward direction) as (input, output): the input to send again (an
    /// established flow), the output to reply to and to quote in ICMP errors.
    recent: Vec<(Vec<u8>, Vec<u8>)>,
    next_recent: usize,
}

const OTHER_HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
const POD_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x20);

impl Generator {
    fn new(rig: &Rig, prog: Prog) -> Self {
        let mut targets = Vec::new();
        let mut addresses = vec![NODE_IP, HAIRPIN, Ipv4Addr::new(10, 200, 0, 1)];
        let mut addresses6 = vec![NODE_IP6, HAIRPIN6, OTHER_HOST6, POD_CLIENT6];
        for &(addr, port, proto) in rig.frontends.iter().chain(rig.backends.iter()) {
            targets.push((SocketAddr::new(addr, port), proto));
            // Another port of the same address.
            targets.push((SocketAddr::new(addr, port.wrapping_add(1)), proto));
            match addr {
                IpAddr::V4(a) => addresses.push(a),
                IpAddr::V6(a) => addresses6.push(a),
            }
        }
        for (addr, port, proto) in [
            (IpAddr::V4(NODE_IP), 22, PROTO_TCP),
            (Ipv4Addr::new(10, 200, 0, 1).into(), 80, PROTO_TCP),
            (Ipv4Addr::new(8, 8, 8, 8).into(), 53, PROTO_UDP),
            (Ipv4Addr::new(10, 0, 0, 20).into(), 40000, PROTO_TCP),
            (NODE_IP6.into(), 22, PROTO_TCP),
            (OTHER_HOST6.into(), 80, PROTO_TCP),
            (
                Ipv6Addr::new(0x2001, 0x4860, 0, 0, 0, 0, 0, 0x8888).into(),
                53,
                PROTO_UDP,
            ),
            (POD_CLIENT6.into(), 40000, PROTO_TCP),
        ] {
            targets.push((SocketAddr::new(addr, port), proto));
        }
        addresses.sort();
        addresses.dedup();
        addresses6.sort();
        addresses6.dedup();
        Self {
            prog,
            targets,
            addresses,
            addresses6,
            recent: Vec::new(),
            next_recent: 0,
        }
    }

    fn remember(&mut self, input: Vec<u8>, output: Vec<u8>) {
        const RECENT: usize = 64;
        if self.recent.len() < RECENT {
            self.recent.push((input, output));
        } else {
            self.recent[self.next_recent] = (input, output);
            self.next_recent = (self.next_recent + 1) % RECENT;
        }
    }

    /// A client address of the family of `like`.
    fn client(&self, rng: &mut Rng, like: IpAddr) -> SocketAddr {
        let ip: IpAddr = if like.is_ipv4() {
            match (self.prog, rng.below(10)) {
                (_, 0) => (*rng.pick(&self.addresses)).into(),
                (_, 1) => Ipv4Addr::from(rng.next_u64() as u32).into(),
                (Prog::Pod, _) => Ipv4Addr::new(10, 0, rng.byte() % 4, rng.byte()).into(),
                (Prog::Ext, _) => Ipv4Addr::new(203, 0, 113, rng.byte()).into(),
            }
        } else {
            let low = u16::from(rng.byte());
            match (self.prog, rng.below(10)) {
                (_, 0) => (*rng.pick(&self.addresses6)).into(),
                (_, 1) => {
                    Ipv6Addr::from(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                        .into()
                }
                (Prog::Pod, _) => {
                    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, u16::from(rng.byte() % 4), low).into()
                }
                (Prog::Ext, _) => Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, low).into(),
            }
        };
        SocketAddr::new(ip, 1024 + rng.below(64_000) as u16)
    }

    /// A valid TCP or UDP frame from `src` to `dst` (one family).
    fn l4(&self, rng: &mut Rng, src: SocketAddr, dst: SocketAddr, proto: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..rng.below(48)).map(|_| rng.byte()).collect();
        let seg = if proto == PROTO_TCP {
            let mut tcp = frame::Tcp::new(src.port(), dst.port(), rng.byte());
            tcp.seq = rng.next_u64() as u32;
            tcp.ack = rng.next_u64() as u32;
            tcp.payload = payload;
            tcp.segment(src.ip(), dst.ip())
        } else {
            let mut s = frame::udp_segment(src, dst, &payload);
            if rng.chance(10) {
                s[6] = 0;
                s[7] = 0;
            }
            s
        };
        let (IpAddr::V4(s4), IpAddr::V4(d4)) = (src.ip(), dst.ip()) else {
            let (IpAddr::V6(s6), IpAddr::V6(d6)) = (src.ip(), dst.ip()) else {
                unreachable!("one family");
            };
            let mut ip = frame::Ip6::new(s6, d6, proto);
            ip.hop_limit = 1 + rng.byte() % 255;
            if rng.chance(20) {
                ip.class_flow = rng.next_u64() as u32;
            }
            return frame::ethernet(ETH_P_IPV6, &ip.packet(&seg));
        };
        let options = if rng.chance(5) {
            // NOPs, or a record-route option with room for addresses.
            let n = 1 + rng.below(10) * 4;
            if rng.chance(50) {
                vec![1u8; n]
            } else {
                let mut rr = vec![7u8, n.min(39) as u8, 4];
                rr.resize(n, 0);
                rr
            }
        } else {
            Vec::new()
        };
        let mut ip = frame::Ip4::new(s4, d4, proto);
        ip.options = options;
        ip.ttl = 1 + rng.byte() % 255;
        if rng.chance(10) {
            ip.frag = 0;
        }
        frame::ethernet(frame::ETH_P_IP, &ip.packet(&seg))
    }

    fn seed_frame(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            0..60 => {
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng, dst.ip());
                self.l4(rng, src, dst, proto)
            }
            60..66 if !self.recent.is_empty() => rng.pick(&self.recent).0.clone(),
            66..78 if !self.recent.is_empty() => {
                // A reply to a translated flow: backend → the translated source.
                let out = &rng.pick(&self.recent).1;
                match frame::parse(out) {
                    Some(o) => self.l4(rng, o.dst, o.src, o.proto),
                    None => out.to_vec(),
                }
            }
            78..86 if !self.recent.is_empty() => {
                // An ICMP error about a translated flow, from the backend or a router.
                let out = &rng.pick(&self.recent).1;
                let o = frame::parse(out);
                let from_backend = rng.chance(50);
                if is_v6_frame(out) {
                    let from = match o {
                        Some(o) if from_backend => match o.dst.ip() {
                            IpAddr::V6(a) => a,
                            IpAddr::V4(_) => POD_ROUTER6,
                        },
                        _ => POD_ROUTER6,
                    };
                    let (kind, code, rest) = match rng.below(3) {
                        0 => (2, 0, 1280u32.to_be_bytes()),
                        1 => (1, *rng.pick(&[0u8, 1, 3, 4]), [0; 4]),
                        _ => (3, 0, [0; 4]),
                    };
                    let quote = if rng.chance(50) { 48 } else { usize::MAX };
                    frame::icmp6_error(kind, code, rest, from, out, quote)
                } else {
                    let from = match o {
                        Some(o) if from_backend => match o.dst.ip() {
                            IpAddr::V4(a) => a,
                            IpAddr::V6(_) => POD_ROUTER,
                        },
                        _ => POD_ROUTER,
                    };
                    let mut f = frame::icmp_frag_needed(from, out);
                    if rng.chance(30) {
                        // Time exceeded instead.
                        f[ETH_HLEN + 20] = 11;
                        f[ETH_HLEN + 21] = 0;
                        fix_icmp_sum(&mut f);
                    }
                    f
                }
            }
            86..90 => {
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng, dst.ip());
                let mut f = self.l4(rng, src, dst, proto);
                // A fragment: first (MF) or a later one.
                let frag: u16 = if rng.chance(50) {
                    0x2000
                } else {
                    (1 + rng.below(400)) as u16 | if rng.chance(50) { 0x2000 } else { 0 }
                };
                if is_v6_frame(&f) {
                    // IPv6 keeps offset and M in the fragment header's second word (offset in
                    // 8-byte units in the top 13 bits, M the lowest bit).
                    let off_m = ((frag & 0x1fff) << 3) | u16::from(frag & 0x2000 != 0);
                    insert_fragment_header(&mut f, off_m, rng.next_u64() as u32);
                } else {
                    f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&frag.to_be_bytes());
                    fix_ip_sum(&mut f);
                }
                f
            }
            90..93 => {
                // Encapsulated in VLAN, GRE or VXLAN.
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng, dst.ip());
                let inner = self.l4(rng, src, dst, proto);
                let inner_type = [inner[12], inner[13]];
                match rng.below(3) {
                    0 => {
                        let mut f = inner[..12].to_vec();
                        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
                        f.extend_from_slice(&inner[12..]);
                        f
                    }
                    1 => {
                        let mut gre = vec![0, 0, inner_type[0], inner_type[1]];
                        gre.extend_from_slice(&inner[ETH_HLEN..]);
                        frame::ethernet(
                            frame::ETH_P_IP,
                            &frame::Ip4::new(Ipv4Addr::new(203, 0, 113, 9), NODE_IP, 47)
                                .packet(&gre),
                        )
                    }
                    _ => {
                        let mut vx = vec![0x08, 0, 0, 0, 0, 0, 0x2a, 0];
                        vx.extend_from_slice(&inner);
                        frame::udp4(
                            std::net::SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 4789),
                            std::net::SocketAddrV4::new(NODE_IP, 4789),
                            &vx,
                        )
                    }
                }
            }
            93..96 => {
                // IPv6 with a small extension chain (hop-by-hop, routing, fragment, destination
                // options), to a target of either family's port (the addresses of an IPv6 one).
                let &(dst, proto) = rng.pick(&self.targets);
                let dst = match dst {
                    SocketAddr::V6(d) => d,
                    SocketAddr::V4(d) => {
                        std::net::SocketAddrV6::new(*rng.pick(&self.addresses6), d.port(), 0, 0)
                    }
                };
                let src = match self.client(rng, IpAddr::V6(Ipv6Addr::UNSPECIFIED)) {
                    SocketAddr::V6(s) => s,
                    SocketAddr::V4(_) => unreachable!("asked for IPv6"),
                };
                let l4 = self.l4(rng, src.into(), dst.into(), proto);
                let mut payload = l4[ETH_HLEN + IPV6_HLEN..].to_vec();
                let mut next = proto;
                for _ in 0..rng.below(4) {
                    let ext = vec![next, 0, 1, 4, 0, 0, 0, 0];
                    payload.splice(0..0, ext);
                    next = *rng.pick(&[0u8, 43, 44, 60]);
                }
                frame::ethernet(
                    ETH_P_IPV6,
                    &frame::ipv6(next, src.ip().octets(), dst.ip().octets(), &payload),
                )
            }
            96..98 => {
                if rng.chance(50) {
                    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
                    arp.extend((0..20).map(|_| rng.byte()));
                    frame::ethernet(frame::ETH_P_ARP, &arp)
                } else {
                    // Neighbour discovery (solicitation or advertisement) for one of our addresses.
                    let target = *rng.pick(&self.addresses6);
                    let kind = *rng.pick(&[135u8, 136]);
                    let mut body = target.octets().to_vec();
                    body.extend_from_slice(&[1, 1, 0x02, 0, 0, 0, 0, 0x01]);
                    let src = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
                    frame::icmp6(src, target, kind, 0, [0; 4], &body)
                }
            }
            _ => {
                let len = ETH_HLEN + rng.below(120);
                let mut f: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                match rng.below(10) {
                    0..5 => {
                        f[12] = 0x08;
                        f[13] = 0x00;
                        if rng.chance(50) && f.len() > ETH_HLEN {
                            f[ETH_HLEN] = 0x45;
                        }
                    }
                    5..8 => {
                        f[12] = 0x86;
                        f[13] = 0xdd;
                        if rng.chance(50) && f.len() > ETH_HLEN {
                            f[ETH_HLEN] = 0x60;
                        }
                    }
                    _ => {}
                }
                f
            }
        }
    }

    fn frame(&self, rng: &mut Rng) -> Vec<u8> {
        let mut f = self.seed_frame(rng);
        if rng.chance(20) {
            return f;
        }
        for _ in 0..1 + rng.below(4) {
            if is_v6_frame(&f) && rng.chance(80) {
                self.mutate6(rng, &mut f);
            } else {
                self.mutate(rng, &mut f);
            }
        }
        if rng.chance(50) {
            fix_ip_sum(&mut f);
            fix_l4_sum(&mut f);
        }
        f
    }

    fn mutate(&self, rng: &mut Rng, f: &mut Vec<u8>) {
        let ip = ETH_HLEN;
        let len = f.len();
        let has_ip = len >= ip + 20;
        let l4 = if has_ip {
            ip + usize::from(f[ip] & 0x0f) * 4
        } else {
            len
        };
        match rng.below(16) {
            0 => {
                let bit = rng.below(len * 8);
                f[bit / 8] ^= 1 << (bit % 8);
            }
            1 => {
                let i = rng.below(len);
                f[i] = rng.byte();
            }
            2 if len > ETH_HLEN => f.truncate(ETH_HLEN + rng.below(len - ETH_HLEN)),
            3 => f.extend((0..1 + rng.below(32)).map(|_| rng.byte())),
            4 if has_ip => {
                let tot = (len - ip) as i64 + rng.below(41) as i64 - 20;
                let tot = if rng.chance(20) {
                    rng.below(65536) as u16
                } else {
                    tot.clamp(0, 65535) as u16
                };
                f[ip + 2..ip + 4].copy_from_slice(&tot.to_be_bytes());
            }
            5 if has_ip => f[ip] = (f[ip] & 0xf0) | rng.byte() & 0x0f,
            6 if has_ip => f[ip] = (f[ip] & 0x0f) | (rng.byte() << 4),
            7 if has_ip => {
                let v = *rng.pick(&[0x2000u16, 0x0001, 0x3fff, 0x4000, 0x0000, 0x8000]);
                f[ip + 6..ip + 8].copy_from_slice(&v.to_be_bytes());
            }
            8 if has_ip => f[ip + 9] = *rng.pick(&[PROTO_TCP, PROTO_UDP, PROTO_ICMP, 47, 0, 255]),
            9 if len >= l4 + 4 => {
                let at = l4 + 2 * rng.below(2);
                let &(t, _) = rng.pick(&self.targets);
                let port = if rng.chance(50) {
                    t.port()
                } else {
                    rng.byte().into()
                };
                f[at..at + 2].copy_from_slice(&port.to_be_bytes());
            }
            10 if has_ip => {
                let at = ip + 12 + 4 * rng.below(2);
                f[at..at + 4].copy_from_slice(&rng.pick(&self.addresses).octets());
            }
            11 => {
                let t = *rng.pick(&[0x0800u16, 0x0806, 0x86dd, 0x8100, 0x88a8, 0x0000]);
                f[12..14].copy_from_slice(&t.to_be_bytes());
            }
            12 if len >= l4 + 14 => f[l4 + 13] = rng.byte(),
            13 if len >= l4 + 13 => f[l4 + 12] = rng.byte(),
            14 if has_ip => {
                let i = ip + 10 + rng.below(2);
                f[i] = rng.byte();
            }
            15 if len >= ip + 52 => {
                // Inside an ICMP quote: the quoted address or port.
                let at = ip + 28 + *rng.pick(&[12usize, 14, 16, 18, 20, 22]);
                let i = at + rng.below(2);
                f[i] = rng.byte();
            }
            _ => {
                let i = rng.below(len);
                f[i] ^= 0xff;
            }
        }
    }

    /// Mutations of the IPv6 header's fields (and the L4 or quote behind it).
    fn mutate6(&self, rng: &mut Rng, f: &mut Vec<u8>) {
        let ip = ETH_HLEN;
        let len = f.len();
        let has_ip = len >= ip + IPV6_HLEN;
        let l4 = ip + IPV6_HLEN;
        match rng.below(12) {
            0 if has_ip => {
                // Payload length: near the truth, or anything.
                let truth = (len - l4) as i64;
                let v = if rng.chance(20) {
                    rng.below(65536) as u16
                } else {
                    (truth + rng.below(81) as i64 - 40).clamp(0, 65535) as u16
                };
                f[ip + 4..ip + 6].copy_from_slice(&v.to_be_bytes());
            }
            1 if has_ip => f[ip] = (f[ip] & 0x0f) | (rng.byte() << 4),
            2 if has_ip => {
                // Traffic class and flow label: never ours to look at.
                let i = ip + rng.below(4);
                f[i] = rng.byte();
                f[ip] = 0x60 | (f[ip] & 0x0f);
            }
            3 if has_ip => {
                f[ip + 6] = *rng.pick(&[
                    PROTO_TCP,
                    PROTO_UDP,
                    PROTO_ICMPV6,
                    frame::IPV6_FRAGMENT,
                    frame::IPV6_HOP_BY_HOP,
                    frame::IPV6_ROUTING,
                    frame::IPV6_DEST_OPTS,
                    frame::IPV6_NO_NEXT,
                    PROTO_ICMP,
                ])
            }
            4 if has_ip => f[ip + 7] = *rng.pick(&[0u8, 1, 2, 64, 255]),
            5 if has_ip => {
                let at = ip + 8 + 16 * rng.below(2);
                f[at..at + 16].copy_from_slice(&rng.pick(&self.addresses6).octets());
            }
            6 if len >= l4 + 4 => {
                let at = l4 + 2 * rng.below(2);
                let &(t, _) = rng.pick(&self.targets);
                let port = if rng.chance(50) {
                    t.port()
                } else {
                    rng.byte().into()
                };
                f[at..at + 2].copy_from_slice(&port.to_be_bytes());
            }
            7 if has_ip => {
                // A fragment header in front of whatever follows.
                let off_m = *rng.pick(&[0x0001u16, 0x0000, 0x0008, 0xfff9, 0x0100]);
                insert_fragment_header(f, off_m, rng.next_u64() as u32);
            }
            8 if len >= l4 + 14 => f[l4 + 13] = rng.byte(),
            9 if len >= ICMP6_QUOTE + 48 => {
                // Inside an ICMPv6 quote: version, next header, an address byte or a port.
                let at = ICMP6_QUOTE + *rng.pick(&[0usize, 6, 8, 23, 24, 39, 40, 41, 42, 43]);
                f[at] = rng.byte();
            }
            10 if len >= l4 + 4 && f[ip + 6] == PROTO_ICMPV6 => {
                // The ICMPv6 type and code.
                f[l4] = *rng.pick(&[1u8, 2, 3, 4, 128, 129, 135, 136]);
                f[l4 + 1] = rng.byte() % 5;
            }
            11 if len > ETH_HLEN => f.truncate(ETH_HLEN + rng.below(len - ETH_HLEN)),
            _ => self.mutate(rng, f),
        }
    }
}

/// Puts an IPv6 fragment header (`off_m`: offset and M flag word) right after the fixed header of an
/// IPv6 frame, taking over its next header; the payload length grows by 8.
fn insert_fragment_header(f: &mut Vec<u8>, off_m: u16, id: u32) {
    let ip = ETH_HLEN;
    if f.len() < ip + IPV6_HLEN {
        return;
    }
    let mut h = vec![f[ip + 6], 0];
    h.extend_from_slice(&off_m.to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    f.splice(ip + IPV6_HLEN..ip + IPV6_HLEN, h);
    f[ip + 6] = frame::IPV6_FRAGMENT;
    let payload = u16::from_be_bytes([f[ip + 4], f[ip + 5]]).wrapping_add(8);
    f[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
}

/// Recomputes the IPv4 header checksum of an IPv4 frame whose header is all there.
fn fix_ip_sum(f: &mut [u8]) {
    if f.len() < ETH_HLEN + 20 || is_v6_frame(f) {
        return;
    }
    let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
    if ihl < 20 || f.len() < ETH_HLEN + ihl {
        return;
    }
    f[ETH_HLEN + 10] = 0;
    f[ETH_HLEN + 11] = 0;
    let c = frame::checksum(&[&f[ETH_HLEN..ETH_HLEN + ihl]]);
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

/// Recomputes the TCP/UDP checksum of a parseable frame (either family) whose segment is all there,
/// or the ICMP/ICMPv6 one of an error.
fn fix_l4_sum(f: &mut [u8]) {
    let Some(p) = frame::parse(f) else {
        if frame::parse_icmp_error_any(f).is_some() {
            fix_icmp_sum(f);
        }
        return;
    };
    let end = p.ip_end;
    if end < p.l4_off + 8 || end > f.len() {
        return;
    }
    let at = p.l4_off + if p.proto == PROTO_TCP { 16 } else { 6 };
    if at + 2 > end {
        return;
    }
    f[at] = 0;
    f[at + 1] = 0;
    let pseudo = frame::pseudo(p.src.ip(), p.dst.ip(), p.proto, end - p.l4_off);
    let mut c = frame::checksum(&[&pseudo, &f[p.l4_off..end]]);
    if p.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn fix_icmp_sum(f: &mut [u8]) {
    if is_v6_frame(f) {
        let at = ETH_HLEN + IPV6_HLEN;
        if f.len() < at + 8 {
            return;
        }
        let payload = usize::from(u16::from_be_bytes([f[ETH_HLEN + 4], f[ETH_HLEN + 5]]));
        let end = (at + payload).min(f.len());
        if end < at + 8 {
            return;
        }
        f[at + 2] = 0;
        f[at + 3] = 0;
        let pseudo = frame::pseudo_header6(
            frame::ipv6_src(f),
            frame::ipv6_dst(f),
            PROTO_ICMPV6,
            payload,
        );
        let c = frame::checksum(&[&pseudo, &f[at..end]]);
        f[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
        return;
    }
    let at = ETH_HLEN + 20;
    if f.len() < at + 8 {
        return;
    }
    let tot = usize::from(u16::from_be_bytes([f[ETH_HLEN + 2], f[ETH_HLEN + 3]]));
    let end = (ETH_HLEN + tot).min(f.len());
    if end < at + 8 {
        return;
    }
    f[at + 2] = 0;
    f[at + 3] = 0;
    let c = frame::checksum(&[&f[at..end]]);
    f[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;

    #[test]
    fn rng_is_reproducible_and_spread() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut seen = [0u32; 10];
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            seen[r.below(10)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }

    #[test]
    fn fixing_checksums_makes_them_valid() {
        let mut f = frame::tcp4(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80),
            frame::TCP_SYN,
        );
        f[ETH_HLEN + 8] = 3;
        f[40] ^= 0x55;
        fix_ip_sum(&mut f);
        fix_l4_sum(&mut f);
        let p = frame::parse_l4(&f).expect("parses");
        assert_eq!(frame::ipv4_header_sum(&f), Sum::Valid);
        assert_eq!(frame::l4_sum(&f, &p), Sum::Valid);

        let src = "fd00:10::20".parse().unwrap();
        let dst = "fd00:96::40".parse().unwrap();
        let mut f = frame::udp6(
            std::net::SocketAddrV6::new(src, 40000, 0, 0),
            std::net::SocketAddrV6::new(dst, 53, 0, 0),
            b"query",
        );
        f[ETH_HLEN + 39] = 0x41;
        fix_l4_sum(&mut f);
        let p = frame::parse(&f).expect("parses");
        assert_eq!(frame::packet_sum(&f, &p), Sum::Valid);
        let mut e = frame::icmp6_packet_too_big(dst, &f);
        e[ICMP6_QUOTE + 39] = 0x42;
        assert_eq!(frame::icmp6_sum(&e), Sum::Invalid);
        fix_icmp_sum(&mut e);
        assert_eq!(frame::icmp6_sum(&e), Sum::Valid);
    }

    #[test]
    fn an_inserted_fragment_header_is_one_to_the_frame_parser() {
        let src = "fd00:10::20".parse().unwrap();
        let dst: Ipv6Addr = "fd00:96::40".parse().unwrap();
        let mut f = frame::udp6(
            std::net::SocketAddrV6::new(src, 40000, 0, 0),
            std::net::SocketAddrV6::new(dst, 53, 0, 0),
            b"query",
        );
        insert_fragment_header(&mut f, 0x0001, 7);
        assert_eq!(
            frame::fragment_destination_any(&f),
            Some((PROTO_UDP, IpAddr::V6(dst)))
        );
        assert!(frame::parse(&f).is_none());
    }
}
