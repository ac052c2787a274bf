//! The packet fuzzer: random and mutated frames through each TC program, every run judged against the
//! invariants a load balancer on every packet of the node must keep:
//!
//! 1. a frame that is not addressed to a programmed frontend, not a packet of a tracked flow (either
//!    direction), not an ICMP error quoting a tracked flow and not a fragment to a ClusterIP leaves with
//!    `TC_ACT_OK` and every byte unchanged;
//! 2. a rewritten frame goes to a programmed backend (its source unchanged, or the hairpin address, or
//!    this node's address for SNAT), or is a reverse translation whose source is a frontend, or is a
//!    reject (RST / ICMP port unreachable from the frontend to the client), or an ICMP error whose quote
//!    now names a frontend;
//! 3. no rewrite breaks a checksum: a checksum valid on the way in (IPv4 header, TCP/UDP over the
//!    length the header states, ICMP, the quoted IPv4 header) is valid on the way out, a UDP zero
//!    checksum stays zero, and a built reply has valid checksums;
//!
//! 4. every `TC_ACT_SHOT` moves a drop counter in `WEIR_STATS` (a RST to a rejecting frontend used to
//!    be dropped silently: this invariant found it).
//!
//! Frames come from a seeded RNG (`WEIR_FUZZ_SEED` replays a run): valid frames to frontends, backends,
//! ClusterIPs' other ports, the node and unrelated hosts; replies to and ICMP errors about flows the
//! run itself translated; ARP, IPv6, VLAN, GRE, fragments; and random bytes; most then mutated (bit
//! flips, bytes, truncation, extension, length/IHL/version/fragment/protocol/port/address/flag fields,
//! checksums broken or recomputed).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use weir_common::{
    CT_REVERSE, STAT_DROP_FRAGMENT, STAT_DROP_L7_NO_PROXY, STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_LOCAL_ENDPOINT, STAT_DROP_REJECT_FAILED, STAT_DROP_RESET_TO_REJECTING,
    STAT_DROP_REWRITE_FAILED, STAT_DROP_SNAT_EXHAUSTED, STAT_DROP_SOURCE_RANGE,
};

use super::frame::{self, ETH_HLEN, L4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Sum, TCP_RST};
use super::rig::{self, HAIRPIN, NODE_IP, Prog, Rig, TC_ACT_OK, TC_ACT_SHOT};

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
                if class == "forward" || class == "snat" || class == "hairpin" {
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
    /// An IPv4 TCP/UDP packet to a frontend or of a tracked flow.
    L4(L4Packet),
    /// An ICMP error quoting a tracked flow.
    IcmpError,
    /// A fragment to a ClusterIP: dropped.
    Fragment,
}

fn may_touch(rig: &Rig, input: &[u8]) -> Allowed {
    if let Some(p) = frame::parse_l4(input) {
        let ours = rig.is_frontend(p.dst, p.proto)
            || rig.is_cluster_ip(*p.dst.ip(), p.proto)
            || rig.conntrack(p.src, p.dst, p.proto).is_some();
        return if ours { Allowed::L4(p) } else { Allowed::No };
    }
    if let Some(e) = frame::parse_icmp_error(input) {
        let tracked = rig
            .conntrack(e.inner_dst, e.inner_src, e.inner_proto)
            .is_some_and(|ct| ct.kind == CT_REVERSE);
        return if tracked {
            Allowed::IcmpError
        } else {
            Allowed::No
        };
    }
    match frame::fragment_destination(input) {
        Some((proto, daddr)) if rig.is_cluster_ip(daddr, proto) => Allowed::Fragment,
        _ => Allowed::No,
    }
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
    match allowed {
        Allowed::No => {
            if verdict != TC_ACT_OK {
                return Err(format!("not ours, yet verdict {}", verdict_name(verdict)));
            }
            if !unchanged {
                return Err("not ours, yet modified".into());
            }
            Ok("not_ours_unchanged")
        }
        _ if verdict == TC_ACT_SHOT => Ok("dropped"),
        _ if unchanged => Ok("ours_unchanged"),
        Allowed::Fragment => Err("a fragment was modified".into()),
        Allowed::IcmpError => judge_icmp(rig, input, output),
        Allowed::L4(p) => judge_l4(rig, input, &p, output),
    }
}

fn ip_sum_kept(input: &[u8], output: &[u8]) -> Result<(), String> {
    if frame::ipv4_header_sum(input) == Sum::Valid && frame::ipv4_header_sum(output) != Sum::Valid {
        return Err("IPv4 header checksum broken by the rewrite".into());
    }
    Ok(())
}

fn judge_l4(rig: &Rig, input: &[u8], p: &L4Packet, output: &[u8]) -> Result<&'static str, String> {
    // A reject is a new packet: ICMP port unreachable (UDP) or RST (TCP), frontend → client.
    if let Some(e) = frame::parse_icmp_error(output)
        && p.proto == PROTO_UDP
        && e.outer_src == *p.dst.ip()
        && e.outer_dst == *p.src.ip()
    {
        if frame::ipv4_header_sum(output) != Sum::Valid || frame::icmp_sum(output) != Sum::Valid {
            return Err("ICMP port unreachable built with a bad checksum".into());
        }
        return Ok("reject_icmp");
    }
    let Some(o) = frame::parse_l4(output) else {
        return Err("rewritten into something that is no IPv4 TCP/UDP packet".into());
    };
    if o.proto != p.proto {
        return Err("protocol changed".into());
    }
    if o.proto == PROTO_TCP
        && output[o.l4_off + 13] & TCP_RST != 0
        && o.src == p.dst
        && o.dst == p.src
        && rig
            .conntrack(p.src, p.dst, p.proto)
            .is_none_or(|c| c.kind != CT_REVERSE)
    {
        if frame::ipv4_header_sum(output) != Sum::Valid || frame::l4_sum(output, &o) != Sum::Valid {
            return Err("RST built with a bad checksum".into());
        }
        return Ok("reject_rst");
    }
    ip_sum_kept(input, output)?;
    match (frame::l4_sum(input, p), frame::l4_sum(output, &o)) {
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
        if o.src == p.src {
            return Ok("forward");
        }
        if *o.src.ip() == HAIRPIN && o.src.port() == p.src.port() {
            return Ok("hairpin");
        }
        if *o.src.ip() == NODE_IP {
            return Ok("snat");
        }
        return Err(format!("to a backend, but the source became {}", o.src));
    }
    Err(format!(
        "rewritten to {} -> {}: neither to a backend nor from a frontend",
        o.src, o.dst
    ))
}

fn judge_icmp(rig: &Rig, input: &[u8], output: &[u8]) -> Result<&'static str, String> {
    let Some(e) = frame::parse_icmp_error(output) else {
        return Err("an ICMP error rewritten into something else".into());
    };
    if !rig.is_frontend(e.inner_dst, e.inner_proto) {
        return Err(format!(
            "ICMP error translated, but its quote names {} (no frontend)",
            e.inner_dst
        ));
    }
    ip_sum_kept(input, output)?;
    if frame::icmp_sum(input) == Sum::Valid && frame::icmp_sum(output) != Sum::Valid {
        return Err("ICMP checksum broken by the translation".into());
    }
    let inner = |f: &[u8]| frame::checksum(&[&f[ETH_HLEN + 28..ETH_HLEN + 48]]) == 0;
    if inner(input) && !inner(output) {
        return Err("quoted IPv4 header checksum broken by the translation".into());
    }
    Ok("icmp_translated")
}

/// Makes the frames: seeds, replies to what was translated, random bytes; then mutations.
struct Generator {
    prog: Prog,
    /// Destinations worth aiming at: frontends, ClusterIPs' other ports, backends, the node, others.
    targets: Vec<(SocketAddrV4, u8)>,
    addresses: Vec<Ipv4Addr>,
    /// Recent translations (forward direction) as (input, output): the input to send again (an
    /// established flow), the output to reply to and to quote in ICMP errors.
    recent: Vec<(Vec<u8>, Vec<u8>)>,
    next_recent: usize,
}

impl Generator {
    fn new(rig: &Rig, prog: Prog) -> Self {
        let mut targets = Vec::new();
        let mut addresses = vec![NODE_IP, HAIRPIN, Ipv4Addr::new(10, 200, 0, 1)];
        for &(addr, port, proto) in rig.frontends.iter().chain(rig.backends.iter()) {
            targets.push((SocketAddrV4::new(addr, port), proto));
            // Another port of the same address.
            targets.push((SocketAddrV4::new(addr, port.wrapping_add(1)), proto));
            addresses.push(addr);
        }
        for (addr, port, proto) in [
            (NODE_IP, 22, PROTO_TCP),
            (Ipv4Addr::new(10, 200, 0, 1), 80, PROTO_TCP),
            (Ipv4Addr::new(8, 8, 8, 8), 53, PROTO_UDP),
            (Ipv4Addr::new(10, 0, 0, 20), 40000, PROTO_TCP),
        ] {
            targets.push((SocketAddrV4::new(addr, port), proto));
        }
        addresses.sort();
        addresses.dedup();
        Self {
            prog,
            targets,
            addresses,
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

    fn client(&self, rng: &mut Rng) -> SocketAddrV4 {
        let ip = match (self.prog, rng.below(10)) {
            (_, 0) => *rng.pick(&self.addresses),
            (_, 1) => Ipv4Addr::from(rng.next_u64() as u32),
            (Prog::Pod, _) => Ipv4Addr::new(10, 0, rng.byte() % 4, rng.byte()),
            (Prog::Ext, _) => Ipv4Addr::new(203, 0, 113, rng.byte()),
        };
        SocketAddrV4::new(ip, 1024 + rng.below(64_000) as u16)
    }

    /// A valid TCP or UDP frame from `src` to `dst`.
    fn l4(&self, rng: &mut Rng, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> Vec<u8> {
        let payload: Vec<u8> = (0..rng.below(48)).map(|_| rng.byte()).collect();
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
        let mut ip = frame::Ip4::new(*src.ip(), *dst.ip(), proto);
        ip.options = options;
        ip.ttl = 1 + rng.byte() % 255;
        if rng.chance(10) {
            ip.frag = 0;
        }
        let seg = if proto == PROTO_TCP {
            let mut tcp = frame::Tcp::new(src.port(), dst.port(), rng.byte());
            tcp.seq = rng.next_u64() as u32;
            tcp.ack = rng.next_u64() as u32;
            tcp.payload = payload;
            tcp.segment(*src.ip(), *dst.ip())
        } else {
            let mut s = frame::udp_segment(src, dst, &payload);
            if rng.chance(10) {
                s[6] = 0;
                s[7] = 0;
            }
            s
        };
        frame::ethernet(frame::ETH_P_IP, &ip.packet(&seg))
    }

    fn seed_frame(&self, rng: &mut Rng) -> Vec<u8> {
        match rng.below(100) {
            0..60 => {
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng);
                self.l4(rng, src, dst, proto)
            }
            60..66 if !self.recent.is_empty() => rng.pick(&self.recent).0.clone(),
            66..78 if !self.recent.is_empty() => {
                // A reply to a translated flow: backend → the translated source.
                let out = &rng.pick(&self.recent).1;
                match frame::parse_l4(out) {
                    Some(o) => self.l4(rng, o.dst, o.src, o.proto),
                    None => out.to_vec(),
                }
            }
            78..86 if !self.recent.is_empty() => {
                // An ICMP error about a translated flow, from the backend or a router.
                let out = &rng.pick(&self.recent).1;
                let from = match frame::parse_l4(out) {
                    Some(o) if rng.chance(50) => *o.dst.ip(),
                    _ => Ipv4Addr::new(10, 244, 0, 1),
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
            86..90 => {
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng);
                let mut f = self.l4(rng, src, dst, proto);
                // A fragment: first (MF) or a later one.
                let frag: u16 = if rng.chance(50) {
                    0x2000
                } else {
                    (1 + rng.below(400)) as u16 | if rng.chance(50) { 0x2000 } else { 0 }
                };
                f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&frag.to_be_bytes());
                fix_ip_sum(&mut f);
                f
            }
            90..93 => {
                // Encapsulated in VLAN, GRE or VXLAN.
                let &(dst, proto) = rng.pick(&self.targets);
                let src = self.client(rng);
                let inner = self.l4(rng, src, dst, proto);
                match rng.below(3) {
                    0 => {
                        let mut f = inner[..12].to_vec();
                        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
                        f.extend_from_slice(&inner[12..]);
                        f
                    }
                    1 => {
                        let mut gre = vec![0, 0, 0x08, 0x00];
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
                            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 4789),
                            SocketAddrV4::new(NODE_IP, 4789),
                            &vx,
                        )
                    }
                }
            }
            93..96 => {
                // IPv6 with a small extension chain.
                let mut payload = Vec::new();
                let mut next = PROTO_TCP;
                for _ in 0..rng.below(3) {
                    let mut ext = vec![next, 0, 1, 4, 0, 0, 0, 0];
                    ext[2] = 1;
                    payload.splice(0..0, ext);
                    next = *rng.pick(&[0u8, 43, 44, 60]);
                }
                payload.extend((0..20).map(|_| rng.byte()));
                frame::ethernet(
                    frame::ETH_P_IPV6,
                    &frame::ipv6(next, [0xfd; 16], [0xfe; 16], &payload),
                )
            }
            96..98 => {
                let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
                arp.extend((0..20).map(|_| rng.byte()));
                frame::ethernet(frame::ETH_P_ARP, &arp)
            }
            _ => {
                let len = ETH_HLEN + rng.below(120);
                let mut f: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
                if rng.chance(70) {
                    f[12] = 0x08;
                    f[13] = 0x00;
                }
                if rng.chance(50) && f.len() > ETH_HLEN {
                    f[ETH_HLEN] = 0x45;
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
            self.mutate(rng, &mut f);
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
}

/// Recomputes the IPv4 header checksum of an IPv4 frame whose header is all there.
fn fix_ip_sum(f: &mut [u8]) {
    if f.len() < ETH_HLEN + 20 {
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

/// Recomputes the TCP/UDP checksum of a parseable frame whose segment is all there.
fn fix_l4_sum(f: &mut [u8]) {
    let Some(p) = frame::parse_l4(f) else {
        if frame::parse_icmp_error(f).is_some() {
            fix_icmp_sum(f);
        }
        return;
    };
    let end = ETH_HLEN + p.tot_len;
    if p.tot_len < p.ihl + 8 || end > f.len() || end < p.l4_off {
        return;
    }
    let at = p.l4_off + if p.proto == PROTO_TCP { 16 } else { 6 };
    if at + 2 > end {
        return;
    }
    f[at] = 0;
    f[at + 1] = 0;
    let pseudo = frame::pseudo_header(*p.src.ip(), *p.dst.ip(), p.proto, end - p.l4_off);
    let mut c = frame::checksum(&[&pseudo, &f[p.l4_off..end]]);
    if p.proto == PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn fix_icmp_sum(f: &mut [u8]) {
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
    }
}
