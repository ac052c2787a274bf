//! Packet fixtures: frames through `weir_pod_ingress` and `weir_ext_ingress` with BPF_PROG_TEST_RUN, each
//! with the verdict, the output bytes (built here, with checksums computed by the test's own routine)
//! and the `WEIR_STATS` counters it must move (and no other).
//!
//! The rig's Services are dual-stack: module `v6` holds the IPv6 fixtures (same runner, same exact-bytes
//! and counter checks, IPv6 pseudo-header and ICMPv6 checksums verified by `frame.rs`).  Four fixtures
//! pin datapath bugs found while writing them (IPv4-mapped destinations, the IPv6 fragment version,
//! the ICMPv6 quote checks, ICMP errors about SNATed flows), fixed since.
//!
//! The XDP fast path (`weir_ext_xdp`) is exercised end to end in `xdp.rs`; it shares this TC code's
//! parsing, conntrack and backend choice, and what it does not forward itself passes to the TC program
//! these fixtures drive.
//! VLAN: on a real interface the tag is usually taken out of the frame by the driver (skb metadata) and
//! the program sees the inner frame; BPF_PROG_TEST_RUN keeps it in the frame, so these fixtures only
//! cover in-band tags, which pass untouched.

use std::net::{Ipv4Addr, SocketAddrV4};

use weir_tests::packet::frame::{
    self, ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, Ip4, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Sum, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp,
};
use weir_tests::packet::rig::{
    self, BACKEND_PORT, BACKEND_UDP_PORT, EMPTY_VIP, HAIRPIN, LOCAL_BACKEND, LOCAL_NODE_PORT,
    LOCAL_NODE_PORT_UDP, MANY_BACKENDS, MANY_VIP, NODE_IP, ONE_BACKEND, ONE_VIP, Prog,
    REMOTE_BACKEND, REMOTE_NODE_PORT, Rig, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, with_rig,
};

/// What a fixture expects the program to leave in the buffer.
enum Expect {
    /// Every byte as it came in.
    Unchanged,
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// Exactly one of these (a Maglev choice among several backends).
    OneOf(Vec<Vec<u8>>),
    /// Anything (the verdict drops it).
    Dropped,
    /// BPF_PROG_TEST_RUN itself refuses the frame with EINVAL (the program never runs).
    Refused,
}

struct Fixture {
    name: String,
    prog: Prog,
    input: Vec<u8>,
    verdict: u32,
    output: Expect,
    /// `WEIR_STATS` deltas by name; every other counter must stay.
    stats: Vec<(&'static str, u64)>,
}

impl Fixture {
    fn new(name: impl Into<String>, prog: Prog, input: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            prog,
            input,
            verdict: TC_ACT_OK,
            output: Expect::Unchanged,
            stats: Vec::new(),
        }
    }

    fn verdict(mut self, v: u32) -> Self {
        self.verdict = v;
        self
    }

    fn output(mut self, e: Expect) -> Self {
        self.output = e;
        self
    }

    fn stat(mut self, name: &'static str) -> Self {
        self.stats.push((name, 1));
        self
    }

    /// Untouched, passed, counted as not a Service.
    fn not_service(name: impl Into<String>, prog: Prog, input: Vec<u8>) -> Self {
        Self::new(name, prog, input).stat("pass_not_service")
    }

    /// Untouched, passed, counted as unparsed.
    fn unparsed(name: impl Into<String>, prog: Prog, input: Vec<u8>) -> Self {
        Self::new(name, prog, input).stat("pass_unparsed")
    }
}

/// Runs one fixture; `Err` says what differed.
fn check(rig: &Rig, f: &Fixture) -> Result<(), String> {
    let before = rig.counters();
    let result = rig.run(f.prog, &f.input);
    if let Expect::Refused = f.output {
        return match result {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => Err(format!(
                "{} ({:?}): expected the kernel to refuse the frame, got {other:?}",
                f.name, f.prog
            )),
        };
    }
    let out = result.map_err(|e| {
        format!(
            "{} ({:?}): BPF_PROG_TEST_RUN refused the frame: {e}\n    input {}",
            f.name,
            f.prog,
            frame::hex(&f.input)
        )
    })?;
    let after = rig.counters();
    let mut problems = Vec::new();
    if out.verdict != f.verdict {
        problems.push(format!("verdict {} (expected {})", out.verdict, f.verdict));
    }
    let expected_bytes = match &f.output {
        Expect::Unchanged => Some(vec![f.input.clone()]),
        Expect::Bytes(b) => Some(vec![b.clone()]),
        Expect::OneOf(v) => Some(v.clone()),
        Expect::Dropped | Expect::Refused => None,
    };
    if let Some(candidates) = expected_bytes {
        if !candidates.contains(&out.frame) {
            problems.push(format!(
                "output\n      {}\n    expected{}\n      {}",
                frame::hex(&out.frame),
                if candidates.len() > 1 { " one of" } else { "" },
                candidates
                    .iter()
                    .map(|c| frame::hex(c))
                    .collect::<Vec<_>>()
                    .join("\n      ")
            ));
        }
        // A rewritten IPv4 frame must carry valid checksums (the expected bytes were built with the
        // test's own checksum routine, but check the output itself too).
        if out.frame != f.input {
            problems.extend(checksum_problems(&out.frame));
        }
    }
    let delta = rig::stat_delta(&before, &after);
    let mut want = f.stats.clone();
    want.sort();
    let mut got = delta.clone();
    got.sort();
    if got != want {
        problems.push(format!(
            "WEIR_STATS moved {delta:?}, expected {:?}",
            f.stats
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} ({:?}): {}\n    input {}",
            f.name,
            f.prog,
            problems.join("; "),
            frame::hex(&f.input)
        ))
    }
}

/// Checksums of a rewritten frame, by the test's own routines.
fn checksum_problems(out: &[u8]) -> Vec<String> {
    let mut p = Vec::new();
    if out.len() >= ETH_HLEN + 40 && u16::from_be_bytes([out[12], out[13]]) == ETH_P_IPV6 {
        // No header checksum; TCP/UDP and ICMPv6 cover the addresses through the pseudo-header.
        if let Some(l4) = frame::parse(out) {
            if frame::packet_sum(out, &l4) == Sum::Invalid {
                p.push("L4 checksum (IPv6 pseudo-header) invalid".to_owned());
            }
        } else if out[ETH_HLEN + 6] == PROTO_ICMPV6 && frame::icmp6_sum(out) == Sum::Invalid {
            p.push("ICMPv6 checksum invalid".to_owned());
        }
        return p;
    }
    if u16::from_be_bytes([out[12], out[13]]) != ETH_P_IP {
        return p;
    }
    if frame::ipv4_header_sum(out) != Sum::Valid {
        p.push("IPv4 header checksum invalid".to_owned());
    }
    if let Some(l4) = frame::parse_l4(out) {
        match frame::l4_sum(out, &l4) {
            Sum::Valid | Sum::Absent | Sum::Unknown => {}
            Sum::Invalid => p.push("L4 checksum invalid".to_owned()),
        }
    } else if out[ETH_HLEN + 9] == PROTO_ICMP && frame::icmp_sum(out) == Sum::Invalid {
        p.push("ICMP checksum invalid".to_owned());
    }
    p
}

/// Runs every fixture (all of them, even after a failure) and fails listing each that did not match.
fn run_all(rig: &Rig, fixtures: &[Fixture]) {
    let failures: Vec<String> = fixtures
        .iter()
        .filter_map(|f| check(rig, f).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n  {}",
        failures.len(),
        fixtures.len(),
        failures.join("\n  ")
    );
    eprintln!("{} fixtures passed", fixtures.len());
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A pod client; each fixture that must be a new flow takes its own port.
fn client(port: u16) -> SocketAddrV4 {
    sa(Ipv4Addr::new(10, 0, 0, 20), port)
}

/// The frame as a router forwards it: TTL decremented, header checksum recomputed (by us).
fn routed(mut f: Vec<u8>) -> Vec<u8> {
    f[ETH_HLEN + 8] -= 1;
    refresh_ip_sum(&mut f);
    f
}

fn refresh_ip_sum(f: &mut [u8]) {
    let ihl = usize::from(f[ETH_HLEN] & 0x0f) * 4;
    f[ETH_HLEN + 10] = 0;
    f[ETH_HLEN + 11] = 0;
    let c = frame::checksum(&[&f[ETH_HLEN..ETH_HLEN + ihl]]);
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}

fn swap_macs(mut f: Vec<u8>) -> Vec<u8> {
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    f
}

/// RFC 793 reset for a TCP segment (no payload, seq 1000, ack 2000 when ACK is set) from `client` to
/// `frontend` with `flags`, as kube-proxy's REJECT answers it: from the frontend, IPv4 id 0, DF, TTL 64.
fn expected_rst(client: SocketAddrV4, frontend: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut tcp = Tcp::new(frontend.port(), client.port(), 0);
    tcp.window = 0;
    if flags & TCP_ACK != 0 {
        tcp.seq = 2000;
        tcp.ack = 0;
        tcp.flags = TCP_RST;
    } else {
        let seg_len = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        tcp.seq = 0;
        tcp.ack = 1000 + seg_len;
        tcp.flags = TCP_RST | TCP_ACK;
    }
    let mut ip = Ip4::new(*frontend.ip(), *client.ip(), PROTO_TCP);
    ip.id = 0;
    swap_macs(frame::ethernet(
        ETH_P_IP,
        &ip.packet(&tcp.segment(*frontend.ip(), *client.ip())),
    ))
}

/// ICMP port unreachable for a UDP frame, quoting its IPv4 header and UDP header.
fn expected_port_unreachable(udp_frame: &[u8]) -> Vec<u8> {
    let quote = &udp_frame[ETH_HLEN..ETH_HLEN + 28];
    let src = Ipv4Addr::new(quote[16], quote[17], quote[18], quote[19]);
    let dst = Ipv4Addr::new(quote[12], quote[13], quote[14], quote[15]);
    let mut ip = Ip4::new(src, dst, PROTO_ICMP);
    ip.id = 0;
    swap_macs(frame::ethernet(
        ETH_P_IP,
        &ip.packet(&frame::icmp_message(3, 3, [0; 4], quote)),
    ))
}

fn with_tot_len(mut f: Vec<u8>, tot_len: u16) -> Vec<u8> {
    f[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot_len.to_be_bytes());
    refresh_ip_sum(&mut f);
    f
}

fn truncated(f: &[u8], len: usize) -> Vec<u8> {
    f[..len].to_vec()
}

/// `inner` (a frame) behind a VLAN tag of type `tpid`.
fn vlan(tpid: u16, inner: &[u8]) -> Vec<u8> {
    let mut f = inner[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&[0x00, 0x64]);
    f.extend_from_slice(&inner[12..]);
    f
}

fn udp_zero_sum(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut f = frame::udp4(src, dst, payload);
    f[ETH_HLEN + 26] = 0;
    f[ETH_HLEN + 27] = 0;
    f
}

fn fragment(mut f: Vec<u8>, frag: u16) -> Vec<u8> {
    f[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&frag.to_be_bytes());
    refresh_ip_sum(&mut f);
    f
}

const V6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
const V6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40];

/// IPv6 frames: TCP, a neighbour solicitation, a fragment header, and a chain of extension headers.
fn ipv6_frames() -> Vec<(&'static str, Vec<u8>)> {
    let tcp = Tcp::new(40000, 80, TCP_SYN).segment(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&V6_B);
    ns.extend_from_slice(&[1, 1, 0x02, 0, 0, 0, 0, 0x01]);
    let solicited = [
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0, 0, 0x40,
    ];
    let mut frag = vec![PROTO_TCP, 0, 0x00, 0x01, 0, 0, 0x12, 0x34];
    frag.extend_from_slice(&tcp);
    let mut later_frag = vec![PROTO_UDP, 0, 0x05, 0x00, 0, 0, 0x12, 0x34];
    later_frag.extend_from_slice(&[0u8; 16]);
    // Hop-by-hop → routing (type 4, 0 segments left) → destination options → fragment → TCP.
    let mut chain = vec![43, 0, 1, 4, 0, 0, 0, 0];
    chain.extend_from_slice(&[60, 0, 4, 0, 0, 0, 0, 0]);
    chain.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
    chain.extend_from_slice(&[PROTO_TCP, 0, 0, 0, 0, 0, 0x56, 0x78]);
    chain.extend_from_slice(&tcp);
    vec![
        (
            "ipv6_tcp",
            frame::ethernet(ETH_P_IPV6, &frame::ipv6(PROTO_TCP, V6_A, V6_B, &tcp)),
        ),
        (
            "ipv6_neighbour_solicitation",
            frame::ethernet(ETH_P_IPV6, &frame::ipv6(PROTO_ICMPV6, V6_A, solicited, &ns)),
        ),
        (
            "ipv6_first_fragment",
            frame::ethernet(ETH_P_IPV6, &frame::ipv6(44, V6_A, V6_B, &frag)),
        ),
        (
            "ipv6_later_fragment",
            frame::ethernet(ETH_P_IPV6, &frame::ipv6(44, V6_A, V6_B, &later_frag)),
        ),
        (
            "ipv6_extension_chain",
            frame::ethernet(ETH_P_IPV6, &frame::ipv6(0, V6_A, V6_B, &chain)),
        ),
    ]
}

fn arp_request() -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    arp.extend_from_slice(&frame::SRC_MAC);
    arp.extend_from_slice(&[10, 0, 0, 20]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&ONE_VIP.octets());
    let mut f = frame::ethernet(ETH_P_ARP, &arp);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

/// Traffic that is not Weir's, passed untouched by both programs.
fn not_ours(prog: Prog) -> Vec<Fixture> {
    let c = client(40000);
    let mut v = vec![
        Fixture::not_service(
            "tcp_to_other_ip",
            prog,
            frame::tcp4(c, sa(Ipv4Addr::new(10, 200, 0, 1), 80), TCP_SYN),
        ),
        Fixture::not_service(
            "udp_to_other_ip",
            prog,
            frame::udp4(c, sa(Ipv4Addr::new(8, 8, 8, 8), 53), b"query"),
        ),
        Fixture::not_service(
            "tcp_to_node_ip_other_port",
            prog,
            frame::tcp4(c, sa(NODE_IP, 22), TCP_SYN),
        ),
        Fixture::not_service(
            "tcp_to_a_backend_directly",
            prog,
            frame::tcp4(c, sa(ONE_BACKEND, BACKEND_PORT), TCP_SYN),
        ),
        Fixture::not_service(
            "udp_to_frontend_port_as_tcp_has_no_udp_frontend",
            prog,
            frame::udp4(c, sa(NODE_IP, REMOTE_NODE_PORT), b"x"),
        ),
        Fixture::unparsed("arp_request", prog, arp_request()),
        Fixture::unparsed(
            "icmp_echo_to_cluster_ip",
            prog,
            frame::icmp4(
                *c.ip(),
                ONE_VIP,
                &frame::icmp_message(8, 0, [0, 1, 0, 1], b"ping"),
            ),
        ),
        Fixture::unparsed("gre_encapsulated_tcp_to_cluster_ip", prog, {
            let inner = frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN);
            let mut gre = vec![0, 0, 0x08, 0x00];
            gre.extend_from_slice(&inner[ETH_HLEN..]);
            frame::ethernet(
                ETH_P_IP,
                &Ip4::new(Ipv4Addr::new(203, 0, 113, 9), NODE_IP, frame::PROTO_GRE).packet(&gre),
            )
        }),
        Fixture::not_service("vxlan_encapsulated_tcp_to_cluster_ip", prog, {
            let mut vx = vec![0x08, 0, 0, 0, 0, 0, 0x2a, 0];
            vx.extend_from_slice(&frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN));
            frame::udp4(
                sa(Ipv4Addr::new(203, 0, 113, 9), 4789),
                sa(NODE_IP, 4789),
                &vx,
            )
        }),
        Fixture::unparsed(
            "vlan_8021q_tcp_to_cluster_ip",
            prog,
            vlan(ETH_P_8021Q, &frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN)),
        ),
        Fixture::unparsed(
            "vlan_8021ad_tcp_to_cluster_ip",
            prog,
            vlan(
                ETH_P_8021AD,
                &vlan(ETH_P_8021Q, &frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN)),
            ),
        ),
        Fixture::unparsed(
            "ethernet_header_only_arp",
            prog,
            frame::ethernet(ETH_P_ARP, &[]),
        ),
        // Refused like a truncated IPv4 frame: the kernel pulls the IPv6 header too.
        Fixture::new(
            "ethernet_header_only_ipv6",
            prog,
            frame::ethernet(ETH_P_IPV6, &[]),
        )
        .output(Expect::Refused),
        Fixture::unparsed("ipv4_version_6_in_an_ipv4_frame", prog, {
            let mut f = frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN);
            f[ETH_HLEN] = 0x65;
            refresh_ip_sum(&mut f);
            f
        }),
        Fixture::unparsed("ihl_15_longer_than_the_frame", prog, {
            let mut f = frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN);
            f[ETH_HLEN] = 0x4f;
            f
        }),
    ];
    for (name, f) in ipv6_frames() {
        // An IPv6 TCP packet is parsed now; to an address that is no frontend it is not ours.
        v.push(if name == "ipv6_tcp" {
            Fixture::not_service("ipv6_tcp_to_other_ip", prog, f)
        } else {
            Fixture::unparsed(name, prog, f)
        });
    }
    for ihl in 0..5u8 {
        let mut f = frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN);
        f[ETH_HLEN] = 0x40 | ihl;
        v.push(Fixture::unparsed(format!("ihl_{ihl}"), prog, f));
    }
    // Truncations: an IPv4-typed frame shorter than Ethernet + a 20-byte IPv4 header (34 bytes) is
    // refused by BPF_PROG_TEST_RUN itself (EINVAL: the kernel pulls the IPv4 header when it builds the
    // skb), so the program can only be shown the longer ones; a real interface's stack would not
    // deliver the shorter ones to TC either way.
    let tcp = frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN);
    let udp = frame::udp4(c, sa(ONE_VIP, 53), b"");
    for (proto, full) in [("tcp", &tcp), ("udp", &udp)] {
        for len in ETH_HLEN..full.len() {
            let name = format!("{proto}_truncated_to_{len}");
            v.push(if len < ETH_HLEN + 20 {
                Fixture::new(name, prog, truncated(full, len)).output(Expect::Refused)
            } else {
                Fixture::unparsed(name, prog, truncated(full, len))
            });
        }
    }
    // Fragments not addressed to a ClusterIP are not ours; NodePorts included (the stack reassembles
    // them locally and the datagram is not balanced: NodePort fragments are not supported).
    v.push(Fixture::unparsed(
        "first_fragment_to_other_ip",
        prog,
        fragment(
            frame::udp4(c, sa(Ipv4Addr::new(10, 200, 0, 1), 53), &[7; 32]),
            0x2000,
        ),
    ));
    v.push(Fixture::unparsed(
        "later_fragment_to_node_port",
        prog,
        fragment(
            frame::udp4(c, sa(NODE_IP, LOCAL_NODE_PORT_UDP), &[7; 32]),
            0x0010,
        ),
    ));
    v
}

/// Frames through the pod program that it translates, rejects or drops.
fn pod_translations() -> Vec<Fixture> {
    let p = Prog::Pod;
    let one = sa(ONE_VIP, 80);
    let one_udp = sa(ONE_VIP, 53);
    let backend = sa(ONE_BACKEND, BACKEND_PORT);
    let backend_udp = sa(ONE_BACKEND, BACKEND_UDP_PORT);
    let c = client(41000);
    let mut v = vec![
        Fixture::new(
            "new_tcp_flow_to_cluster_ip",
            p,
            frame::tcp4(c, one, TCP_SYN),
        )
        .output(Expect::Bytes(frame::tcp4(c, backend, TCP_SYN)))
        .stat("forward_new"),
        Fixture::new("same_flow_established", p, frame::tcp4(c, one, TCP_ACK))
            .output(Expect::Bytes(frame::tcp4(c, backend, TCP_ACK)))
            .stat("forward_established"),
        // The reply goes out by FIB redirect (TTL decremented; the neighbour is unresolved on the
        // dummy pod0, so bpf_redirect_neigh, MACs left for the kernel).
        Fixture::new(
            "reply_from_backend_reverse_translated",
            p,
            frame::tcp4(backend, c, TCP_SYN | TCP_ACK),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(frame::tcp4(
            one,
            c,
            TCP_SYN | TCP_ACK,
        ))))
        .stat("reverse_nat"),
        // The backend's "fragmentation needed" about the flow: the quote names the frontend again, and
        // the outer source too (the backend sent it).
        Fixture::new(
            "icmp_frag_needed_from_backend_translated",
            p,
            frame::icmp_frag_needed(ONE_BACKEND, &frame::tcp4(c, backend, TCP_ACK)),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(frame::icmp_frag_needed(
            ONE_VIP,
            &frame::tcp4(c, one, TCP_ACK),
        ))))
        .stat("icmp_error_translated"),
        Fixture::new(
            "icmp_time_exceeded_from_router_translated",
            p,
            time_exceeded(
                Ipv4Addr::new(10, 244, 0, 1),
                &frame::tcp4(c, backend, TCP_ACK),
            ),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(time_exceeded(
            Ipv4Addr::new(10, 244, 0, 1),
            &frame::tcp4(c, one, TCP_ACK),
        ))))
        .stat("icmp_error_translated"),
        Fixture::unparsed(
            "icmp_error_about_an_untracked_flow",
            p,
            frame::icmp_frag_needed(ONE_BACKEND, &frame::tcp4(client(41999), backend, TCP_ACK)),
        ),
        // Quotes with IPv4 options are not translated (documented limitation): passed as they are.
        Fixture::unparsed("icmp_error_quoting_ipv4_options", p, {
            let quoted =
                frame::tcp4_with(c, backend, &Tcp::new(41000, BACKEND_PORT, TCP_ACK), |ip| {
                    ip.options = vec![1, 1, 1, 1]
                });
            frame::icmp_frag_needed(ONE_BACKEND, &quoted)
        }),
        Fixture::new(
            "new_udp_flow_to_cluster_ip",
            p,
            frame::udp4(c, one_udp, b"query"),
        )
        .output(Expect::Bytes(frame::udp4(c, backend_udp, b"query")))
        .stat("forward_new"),
        Fixture::new(
            "udp_zero_checksum_stays_zero",
            p,
            udp_zero_sum(client(41001), one_udp, b"query"),
        )
        .output(Expect::Bytes(udp_zero_sum(
            client(41001),
            backend_udp,
            b"query",
        )))
        .stat("forward_new"),
        // Ethernet padding after a short datagram (total length < frame): translated, padding kept.
        Fixture::new("udp_with_ethernet_padding", p, {
            let mut f = frame::udp4(client(41002), one_udp, b"ab");
            f.resize(60, 0);
            f
        })
        .output(Expect::Bytes({
            let mut f = frame::udp4(client(41002), backend_udp, b"ab");
            f.resize(60, 0);
            f
        }))
        .stat("forward_new"),
        // The program does not validate the total length: a frame shorter than it says, or a total
        // length below the headers, is translated like any other (the stack's ip_rcv drops it next).
        Fixture::new(
            "total_length_larger_than_frame_translated",
            p,
            with_tot_len(frame::tcp4(client(41003), one, TCP_SYN), 1000),
        )
        .output(Expect::Bytes(with_tot_len(
            frame::tcp4(client(41003), backend, TCP_SYN),
            1000,
        )))
        .stat("forward_new"),
        Fixture::new(
            "total_length_smaller_than_headers_translated",
            p,
            with_tot_len(frame::tcp4(client(41004), one, TCP_SYN), 20),
        )
        .output(Expect::Bytes(with_tot_len(
            frame::tcp4(client(41004), backend, TCP_SYN),
            20,
        )))
        .stat("forward_new"),
        // A pod reaching itself through its Service: source becomes the hairpin address, FIB redirect.
        Fixture::new(
            "hairpin",
            p,
            frame::tcp4(sa(ONE_BACKEND, 50000), one, TCP_SYN),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(frame::tcp4(
            sa(HAIRPIN, 50000),
            backend,
            TCP_SYN,
        ))))
        .stat("forward_new"),
        Fixture::new(
            "three_backends_one_chosen",
            p,
            frame::tcp4(client(41005), sa(MANY_VIP, 80), TCP_SYN),
        )
        .output(Expect::OneOf(
            MANY_BACKENDS
                .iter()
                .map(|&b| frame::tcp4(client(41005), sa(b, BACKEND_PORT), TCP_SYN))
                .collect(),
        ))
        .stat("forward_new"),
        // Rejects: no endpoint, or a port the ClusterIP does not define.
        Fixture::new(
            "tcp_to_service_without_endpoints_rst",
            p,
            frame::tcp4(client(41006), sa(EMPTY_VIP, 80), TCP_SYN),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(expected_rst(
            client(41006),
            sa(EMPTY_VIP, 80),
            TCP_SYN,
        )))
        .stat("reject_tcp"),
        Fixture::new(
            "tcp_to_undefined_cluster_ip_port_rst",
            p,
            frame::tcp4(client(41007), sa(ONE_VIP, 81), TCP_SYN),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(expected_rst(
            client(41007),
            sa(ONE_VIP, 81),
            TCP_SYN,
        )))
        .stat("reject_tcp"),
        Fixture::new(
            "udp_to_service_without_endpoints_port_unreachable",
            p,
            frame::udp4(client(41008), sa(EMPTY_VIP, 53), b"query"),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(expected_port_unreachable(&frame::udp4(
            client(41008),
            sa(EMPTY_VIP, 53),
            b"query",
        ))))
        .stat("reject_udp"),
        // A reject is not built for headers with options: a counted drop.
        Fixture::new(
            "tcp_with_ipv4_options_to_service_without_endpoints_dropped",
            p,
            frame::tcp4_with(
                client(41009),
                sa(EMPTY_VIP, 80),
                &Tcp::new(41009, 80, TCP_SYN),
                |ip| ip.options = vec![1, 1, 1, 1],
            ),
        )
        .verdict(TC_ACT_SHOT)
        .output(Expect::Dropped)
        .stat("drop_reject_failed"),
        // Fragments to a ClusterIP cannot be balanced: counted drops.
        Fixture::new(
            "first_fragment_to_cluster_ip_dropped",
            p,
            fragment(frame::udp4(client(41010), one_udp, &[7; 32]), 0x2000),
        )
        .verdict(TC_ACT_SHOT)
        .output(Expect::Dropped)
        .stat("drop_fragment"),
        Fixture::new(
            "later_fragment_to_cluster_ip_dropped",
            p,
            fragment(frame::tcp4(client(41011), one, TCP_ACK), 0x00b9),
        )
        .verdict(TC_ACT_SHOT)
        .output(Expect::Dropped)
        .stat("drop_fragment"),
        // DF alone is no fragment.
        Fixture::new(
            "dont_fragment_is_no_fragment",
            p,
            frame::tcp4_with(client(41012), one, &Tcp::new(41012, 80, TCP_SYN), |ip| {
                ip.frag = 0x4000
            }),
        )
        .output(Expect::Bytes(frame::tcp4_with(
            client(41012),
            backend,
            &Tcp::new(41012, BACKEND_PORT, TCP_SYN),
            |ip| ip.frag = 0x4000,
        )))
        .stat("forward_new"),
    ];
    // IPv4 options (IHL 6..=15): translated, options kept.
    for words in 1..=10u16 {
        let port = 41100 + words;
        let options: Vec<u8> = if words % 2 == 0 {
            vec![1; usize::from(words) * 4]
        } else {
            // Record route with room for addresses, then end of options.
            let len = usize::from(words) * 4 - 1;
            let mut rr = vec![7u8, len as u8, 4];
            rr.resize(len, 0);
            rr
        };
        let build = |dst: SocketAddrV4| {
            frame::tcp4_with(
                client(port),
                dst,
                &Tcp::new(port, dst.port(), TCP_SYN),
                |ip| ip.options = options.clone(),
            )
        };
        v.push(
            Fixture::new(format!("ipv4_ihl_{}_translated", 5 + words), p, build(one))
                .output(Expect::Bytes(build(backend)))
                .stat("forward_new"),
        );
    }
    v
}

fn time_exceeded(from: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let ip = &quoted[ETH_HLEN..];
    let to = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    frame::icmp4(from, to, &frame::icmp_message(11, 0, [0; 4], &ip[..28]))
}

/// Frames through the external program: NodePorts with and without SNAT.
fn ext_translations() -> Vec<Fixture> {
    let p = Prog::Ext;
    // A client port in the SNAT range (32768-65535) is kept when free.
    let outside = sa(Ipv4Addr::new(203, 0, 113, 7), 45555);
    let remote = sa(REMOTE_BACKEND, BACKEND_PORT);
    let node_port = sa(NODE_IP, REMOTE_NODE_PORT);
    vec![
        // The backend lives on another node: SNAT to this node's address (the client's own port is
        // free) and FIB redirect towards it.
        Fixture::new(
            "node_port_to_remote_backend_snat",
            p,
            frame::tcp4(outside, node_port, TCP_SYN),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(frame::tcp4(
            sa(NODE_IP, 45555),
            remote,
            TCP_SYN,
        ))))
        .stat("forward_new")
        .stat("snat_new"),
        Fixture::new(
            "node_port_snat_reply_restored",
            p,
            frame::tcp4(remote, sa(NODE_IP, 45555), TCP_SYN | TCP_ACK),
        )
        .verdict(TC_ACT_REDIRECT)
        .output(Expect::Bytes(routed(frame::tcp4(
            node_port,
            outside,
            TCP_SYN | TCP_ACK,
        ))))
        .stat("reverse_nat"),
        Fixture::new(
            "node_port_to_local_backend_no_snat",
            p,
            frame::tcp4(
                sa(Ipv4Addr::new(203, 0, 113, 8), 6000),
                sa(NODE_IP, LOCAL_NODE_PORT),
                TCP_SYN,
            ),
        )
        .output(Expect::Bytes(frame::tcp4(
            sa(Ipv4Addr::new(203, 0, 113, 8), 6000),
            sa(LOCAL_BACKEND, BACKEND_PORT),
            TCP_SYN,
        )))
        .stat("forward_new"),
        Fixture::new(
            "udp_node_port_to_local_backend",
            p,
            frame::udp4(
                sa(Ipv4Addr::new(203, 0, 113, 8), 6001),
                sa(NODE_IP, LOCAL_NODE_PORT_UDP),
                b"q",
            ),
        )
        .output(Expect::Bytes(frame::udp4(
            sa(Ipv4Addr::new(203, 0, 113, 8), 6001),
            sa(LOCAL_BACKEND, BACKEND_UDP_PORT),
            b"q",
        )))
        .stat("forward_new"),
    ]
}

#[test]
fn traffic_that_is_not_ours_passes_untouched() {
    with_rig(|rig| {
        let mut all = not_ours(Prog::Pod);
        all.extend(not_ours(Prog::Ext));
        run_all(rig, &all);
    });
}

#[test]
fn pod_ingress_translates_rejects_and_drops() {
    with_rig(|rig| run_all(rig, &pod_translations()));
}

#[test]
fn ext_ingress_node_ports_with_and_without_snat() {
    with_rig(|rig| run_all(rig, &ext_translations()));
}

/// Every one of the 256 TCP flag combinations to a frontend with a backend is translated (the
/// datapath balances on the tuple, not the flags), each as a new flow.
#[test]
fn every_tcp_flag_combination_to_a_frontend_is_translated() {
    with_rig(|rig| {
        let fixtures: Vec<Fixture> = (0..=255u8)
            .map(|flags| {
                let c = client(42000 + u16::from(flags));
                let tcp = |dst: SocketAddrV4| Tcp::new(c.port(), dst.port(), flags);
                let one = sa(ONE_VIP, 80);
                let backend = sa(ONE_BACKEND, BACKEND_PORT);
                Fixture::new(
                    format!("tcp_flags_{flags:#04x}"),
                    Prog::Pod,
                    frame::tcp4_with(c, one, &tcp(one), |_| {}),
                )
                .output(Expect::Bytes(frame::tcp4_with(
                    c,
                    backend,
                    &tcp(backend),
                    |_| {},
                )))
                .stat("forward_new")
            })
            .collect();
        run_all(rig, &fixtures);
    });
}

/// Every flag combination without RST to a frontend without endpoints gets the RFC 793 reset.
#[test]
fn every_tcp_flag_combination_without_rst_to_a_rejecting_frontend_gets_a_reset() {
    with_rig(|rig| {
        let fixtures: Vec<Fixture> = (0..=255u8)
            .filter(|flags| flags & TCP_RST == 0)
            .map(|flags| {
                let c = client(43000 + u16::from(flags));
                let empty = sa(EMPTY_VIP, 80);
                Fixture::new(
                    format!("reject_tcp_flags_{flags:#04x}"),
                    Prog::Pod,
                    frame::tcp4(c, empty, flags),
                )
                .verdict(TC_ACT_REDIRECT)
                .output(Expect::Bytes(expected_rst(c, empty, flags)))
                .stat("reject_tcp")
            })
            .collect();
        run_all(rig, &fixtures);
    });
}

/// An incoming RST to a frontend without endpoints is dropped (a RST is never answered) and counted
/// under its own reason (found by these fixtures: it used to be dropped without a counter).
#[test]
fn rst_to_a_rejecting_frontend_is_a_counted_drop() {
    with_rig(|rig| {
        let fixtures: Vec<Fixture> = (0..=255u8)
            .filter(|flags| flags & TCP_RST != 0)
            .map(|flags| {
                let c = client(44000 + u16::from(flags));
                Fixture::new(
                    format!("rst_flags_{flags:#04x}_to_rejecting_frontend"),
                    Prog::Pod,
                    frame::tcp4(c, sa(EMPTY_VIP, 80), flags),
                )
                .verdict(TC_ACT_SHOT)
                .output(Expect::Dropped)
                .stat("drop_reset_to_rejecting")
            })
            .collect();
        run_all(rig, &fixtures);
    });
}

/// What BPF_PROG_TEST_RUN accepts for a TC program: at least ETH_HLEN (14) bytes (0..13, the empty frame
/// included, are refused with EINVAL), and at most a page minus the skb's headroom and shared info.
/// The largest accepted frame, a TCP segment to a frontend, is translated with valid checksums.
#[test]
fn frame_sizes_the_kernel_accepts_and_the_largest_is_translated() {
    with_rig(|rig| {
        for len in 0..ETH_HLEN {
            let err = rig
                .run(Prog::Pod, &vec![0u8; len])
                .expect_err("a frame shorter than ETH_HLEN is refused");
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EINVAL),
                "{len}-byte frame: {err}"
            );
        }
        rig.run(Prog::Pod, &[0u8; ETH_HLEN])
            .expect("a 14-byte frame is accepted");
        // Binary search for the largest accepted size.
        let (mut ok, mut refused) = (ETH_HLEN, 65_536);
        while refused - ok > 1 {
            let mid = (ok + refused) / 2;
            match rig.run(Prog::Pod, &vec![0u8; mid]) {
                Ok(_) => ok = mid,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{mid} bytes: {e}");
                    refused = mid;
                }
            }
        }
        eprintln!("BPF_PROG_TEST_RUN (TC) accepts frames of {ETH_HLEN}..={ok} bytes");
        assert!(
            (1500..4096).contains(&ok),
            "largest accepted frame {ok}: expected a page minus skb overhead"
        );
        let payload_len = ok - ETH_HLEN - 40;
        let build = |dst: SocketAddrV4| {
            let mut tcp = Tcp::new(45000, dst.port(), TCP_ACK);
            tcp.payload = (0..payload_len).map(|i| i as u8).collect();
            frame::tcp4_with(client(45000), dst, &tcp, |_| {})
        };
        let fixture = Fixture::new(
            "largest_frame_translated",
            Prog::Pod,
            build(sa(ONE_VIP, 80)),
        )
        .output(Expect::Bytes(build(sa(ONE_BACKEND, BACKEND_PORT))))
        .stat("forward_new");
        assert_eq!(fixture.input.len(), ok);
        run_all(rig, &[fixture]);
    });
}

/// DATAPATH FINDING (fixed in `icmp.rs` on this branch): bytes that look like an ICMP error about a
/// tracked flow, but are not one, must not be touched. Before the fix the datapath translated them (and
/// redirected the frame) when the Ethernet type was not IPv4 (ARP, IPv6, a VLAN tag, anything), in an
/// IPv4 fragment other than the first (whose payload is no ICMP header at all), and when the IPv4 total
/// length ended inside the quote (the rewrite then broke the ICMP checksum).
#[test]
fn icmp_error_lookalikes_are_not_translated() {
    with_rig(|rig| {
        let c = client(46000);
        let backend = sa(ONE_BACKEND, BACKEND_PORT);
        // Make the flow tracked.
        run_all(
            rig,
            &[
                Fixture::new("flow", Prog::Pod, frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN))
                    .output(Expect::Bytes(frame::tcp4(c, backend, TCP_SYN)))
                    .stat("forward_new"),
            ],
        );
        let error = frame::icmp_frag_needed(ONE_BACKEND, &frame::tcp4(c, backend, TCP_ACK));
        let mut fixtures: Vec<Fixture> = [ETH_P_ARP, ETH_P_IPV6, 0x88b5, ETH_P_8021Q]
            .into_iter()
            .map(|ethertype| {
                let mut f = error.clone();
                f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                Fixture::unparsed(
                    format!("icmp_error_in_ethertype_{ethertype:#06x}"),
                    Prog::Pod,
                    f,
                )
            })
            .collect();
        for frag in [0x0010u16, 0x2010, 0x1fff] {
            fixtures.push(Fixture::unparsed(
                format!("icmp_error_bytes_in_a_later_fragment_{frag:#06x}"),
                Prog::Pod,
                fragment(error.clone(), frag),
            ));
        }
        // A total length that stops inside the quote: the bytes to rewrite are not covered by the ICMP
        // checksum (the datapath used to rewrite them and break the checksum).
        let mut short = with_tot_len(error.clone(), 20 + 8 + 20);
        let icmp = ETH_HLEN + 20;
        short[icmp + 2..icmp + 4].fill(0);
        let sum = frame::checksum(&[&short[icmp..ETH_HLEN + 48]]);
        short[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
        fixtures.push(Fixture::unparsed(
            "icmp_error_total_length_cuts_the_quote",
            Prog::Pod,
            short,
        ));
        // The genuine error is still translated.
        fixtures.push(
            Fixture::new("genuine_icmp_error", Prog::Pod, error.clone())
                .verdict(TC_ACT_REDIRECT)
                .output(Expect::Bytes(routed(frame::icmp_frag_needed(
                    ONE_VIP,
                    &frame::tcp4(c, sa(ONE_VIP, 80), TCP_ACK),
                ))))
                .stat("icmp_error_translated"),
        );
        run_all(rig, &fixtures);
    });
}

/// The fixture runner itself fails on a wrong expectation (so a passing fixture means something).
#[test]
fn a_wrong_expectation_fails() {
    with_rig(|rig| {
        let c = client(47000);
        let wrong_bytes =
            Fixture::new("wrong", Prog::Pod, frame::tcp4(c, sa(ONE_VIP, 80), TCP_SYN))
                .output(Expect::Unchanged)
                .stat("forward_new");
        assert!(check(rig, &wrong_bytes).is_err(), "unchanged is wrong here");
        let wrong_stat = Fixture::new(
            "wrong",
            Prog::Pod,
            frame::tcp4(c, sa(Ipv4Addr::new(10, 200, 0, 1), 80), TCP_SYN),
        )
        .stat("pass_unparsed");
        assert!(
            check(rig, &wrong_stat).is_err(),
            "pass_unparsed is wrong here"
        );
        let wrong_verdict = Fixture::not_service(
            "wrong",
            Prog::Pod,
            frame::tcp4(c, sa(Ipv4Addr::new(10, 200, 0, 1), 80), TCP_SYN),
        )
        .verdict(TC_ACT_SHOT);
        assert!(check(rig, &wrong_verdict).is_err(), "SHOT is wrong here");
        let mut bad_sum = frame::tcp4(c, sa(ONE_BACKEND, BACKEND_PORT), TCP_SYN);
        bad_sum[ETH_HLEN + 36] ^= 1;
        assert!(!checksum_problems(&bad_sum).is_empty());
    });
}

/// The IPv6 half: the same exact-bytes coverage for IPv6 frames to the rig's dual-stack Services.
/// IPv6 has no header checksum (TCP, UDP and ICMPv6 cover the addresses through the pseudo-header),
/// a router decrements the hop limit, rejects are a RST or an ICMPv6 port unreachable (type 1 code 4),
/// and path MTU is learnt from "packet too big" (type 2) alone.
mod v6 {
    use std::collections::BTreeSet;
    use std::net::{Ipv6Addr, SocketAddrV6};

    use weir_tests::packet::frame::{
        self, ETH_HLEN, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV6, ICMP6_QUOTE, IPV6_DEST_OPTS,
        IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_ROUTING, Ip6, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
        TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Tcp,
    };
    use weir_tests::packet::rig::{
        BACKEND_PORT, BACKEND_UDP_PORT, EMPTY_VIP6, EXTERNAL_IP6, HAIRPIN6, LB_IP6, LOCAL_BACKEND6,
        LOCAL_NODE_PORT, LOCAL_NODE_PORT_UDP, MANY_BACKENDS, MANY_BACKENDS6, MANY_VIP, MANY_VIP6,
        NODE_IP6, ONE_BACKEND6, ONE_VIP, ONE_VIP6, POD_ROUTER6, Prog, REMOTE_BACKEND6,
        REMOTE_NODE_PORT, TC_ACT_REDIRECT, TC_ACT_SHOT, with_rig,
    };

    use super::{Expect, Fixture, run_all, swap_macs, truncated, vlan};

    pub fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(ip, port, 0, 0)
    }

    /// A pod client (fd00:10::20); each fixture that must be a new flow takes its own port.
    pub fn client6(port: u16) -> SocketAddrV6 {
        sa6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x20), port)
    }

    /// A client outside the cluster, routed via ext0.
    fn outside6(port: u16) -> SocketAddrV6 {
        sa6(Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 7), port)
    }

    const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);

    /// The frame as a router forwards it: hop limit decremented (nothing else: no header checksum).
    /// The neighbour is unresolved on the rig's veths, so `bpf_redirect_neigh` leaves the MACs.
    fn routed6(mut f: Vec<u8>) -> Vec<u8> {
        f[ETH_HLEN + 7] -= 1;
        f
    }

    /// RFC 793 reset for `tcp` (sent from `client` to `frontend`), as the datapath builds it: from the
    /// frontend, hop limit 64, traffic class and flow label 0, window 0, no options.
    fn expected_rst6(client: SocketAddrV6, frontend: SocketAddrV6, tcp_in: &Tcp) -> Vec<u8> {
        let mut tcp = Tcp::new(frontend.port(), client.port(), 0);
        tcp.window = 0;
        if tcp_in.flags & TCP_ACK != 0 {
            tcp.seq = tcp_in.ack;
            tcp.ack = 0;
            tcp.flags = TCP_RST;
        } else {
            let seg_len = tcp_in.payload.len() as u32
                + u32::from(tcp_in.flags & TCP_SYN != 0)
                + u32::from(tcp_in.flags & TCP_FIN != 0);
            tcp.seq = 0;
            tcp.ack = tcp_in.seq.wrapping_add(seg_len);
            tcp.flags = TCP_RST | TCP_ACK;
        }
        swap_macs(frame::tcp6_with(frontend, client, &tcp, |_| {}))
    }

    /// ICMPv6 port unreachable for an IPv6 UDP frame, quoting its IPv6 header and UDP header.
    fn expected_port_unreachable6(udp_frame: &[u8]) -> Vec<u8> {
        let quote = &udp_frame[ETH_HLEN..ETH_HLEN + 48];
        swap_macs(frame::icmp6(
            frame::ipv6_dst(udp_frame),
            frame::ipv6_src(udp_frame),
            1,
            4,
            [0; 4],
            quote,
        ))
    }

    /// An ICMPv6 error about a translated flow as the client must receive it: the quote's destination
    /// back to the frontend, its source (and the outer destination) back to the client when the flow
    /// was SNATed (`peer`), the outer source the frontend when the backend sent it, the ICMPv6 checksum
    /// recomputed, hop limit decremented (FIB redirect). The quoted L4 checksum is left as it was: the
    /// datapath does not touch it (a quote may end before it, and no stack checks it).
    fn translated_error6(
        error: &[u8],
        frontend: SocketAddrV6,
        peer: Option<SocketAddrV6>,
        from_backend: bool,
    ) -> Vec<u8> {
        let mut f = error.to_vec();
        let q = ICMP6_QUOTE;
        f[q + 24..q + 40].copy_from_slice(&frontend.ip().octets());
        f[q + 42..q + 44].copy_from_slice(&frontend.port().to_be_bytes());
        if let Some(peer) = peer {
            f[q + 8..q + 24].copy_from_slice(&peer.ip().octets());
            f[q + 40..q + 42].copy_from_slice(&peer.port().to_be_bytes());
            f[ETH_HLEN + 24..ETH_HLEN + 40].copy_from_slice(&peer.ip().octets());
        }
        if from_backend {
            f[ETH_HLEN + 8..ETH_HLEN + 24].copy_from_slice(&frontend.ip().octets());
        }
        let at = ETH_HLEN + 40;
        f[at + 2..at + 4].fill(0);
        let pseudo = frame::pseudo_header6(
            frame::ipv6_src(&f),
            frame::ipv6_dst(&f),
            PROTO_ICMPV6,
            f.len() - at,
        );
        let sum = frame::checksum(&[&pseudo, &f[at..]]);
        f[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
        routed6(f)
    }

    fn udp6_zero_sum(src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) -> Vec<u8> {
        let mut f = frame::udp6(src, dst, payload);
        f[ETH_HLEN + 46] = 0;
        f[ETH_HLEN + 47] = 0;
        f
    }

    fn with_payload_len(mut f: Vec<u8>, len: u16) -> Vec<u8> {
        f[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());
        f
    }

    /// `l4` (a TCP/UDP segment with its checksum) behind extension headers: each `(type, bytes)` is
    /// one header whose next-header byte this fills in.
    fn with_extensions(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        proto: u8,
        l4: &[u8],
        chain: &[(u8, Vec<u8>)],
    ) -> Vec<u8> {
        let mut payload = Vec::new();
        for (i, (_, bytes)) in chain.iter().enumerate() {
            let mut h = bytes.clone();
            h[0] = chain.get(i + 1).map_or(proto, |(t, _)| *t);
            payload.extend_from_slice(&h);
        }
        payload.extend_from_slice(l4);
        let first = chain.first().map_or(proto, |(t, _)| *t);
        frame::ethernet(ETH_P_IPV6, &Ip6::new(src, dst, first).packet(&payload))
    }

    /// An 8-byte option header (hop-by-hop or destination options: one PadN option).
    fn options_header() -> Vec<u8> {
        vec![0, 0, 1, 4, 0, 0, 0, 0]
    }

    /// A type 4 (segment routing) routing header with no segment left.
    fn routing_header() -> Vec<u8> {
        vec![0, 0, 4, 0, 0, 0, 0, 0]
    }

    /// A fragment header: `off_m` is the offset (8-byte units, top 13 bits) and M (lowest bit).
    fn fragment_header(off_m: u16) -> Vec<u8> {
        let mut h = vec![0, 0];
        h.extend_from_slice(&off_m.to_be_bytes());
        h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        h
    }

    fn tcp_segment(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
        Tcp::new(src.port(), dst.port(), flags).segment(*src.ip(), *dst.ip())
    }

    fn neighbour(kind: u8, target: Ipv6Addr, to: Ipv6Addr) -> Vec<u8> {
        let mut body = target.octets().to_vec();
        body.extend_from_slice(&[if kind == 135 { 1 } else { 2 }, 1, 0x02, 0, 0, 0, 0, 0x01]);
        let rest = if kind == 136 { [0x60, 0, 0, 0] } else { [0; 4] };
        frame::icmp6(
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x20),
            to,
            kind,
            0,
            rest,
            &body,
        )
    }

    /// The solicited-node multicast address of `a`.
    fn solicited(a: Ipv6Addr) -> Ipv6Addr {
        let o = a.octets();
        Ipv6Addr::new(
            0xff02,
            0,
            0,
            0,
            0,
            1,
            0xff00 | u16::from(o[13]),
            u16::from_be_bytes([o[14], o[15]]),
        )
    }

    /// IPv6 traffic that is not Weir's, passed untouched by both programs.
    fn not_ours6(prog: Prog) -> Vec<Fixture> {
        let c = client6(40000);
        let one = sa6(ONE_VIP6, 80);
        let mut v = vec![
            Fixture::not_service(
                "v6_tcp_to_other_ip",
                prog,
                frame::tcp6(c, sa6(OTHER6, 80), TCP_SYN),
            ),
            Fixture::not_service(
                "v6_udp_to_other_ip",
                prog,
                frame::udp6(c, sa6(OTHER6, 53), b"query"),
            ),
            Fixture::not_service(
                "v6_tcp_to_node_ip_other_port",
                prog,
                frame::tcp6(c, sa6(NODE_IP6, 22), TCP_SYN),
            ),
            Fixture::not_service(
                "v6_tcp_to_a_backend_directly",
                prog,
                frame::tcp6(c, sa6(ONE_BACKEND6, BACKEND_PORT), TCP_SYN),
            ),
            Fixture::not_service(
                "v6_udp_to_a_tcp_only_node_port",
                prog,
                frame::udp6(c, sa6(NODE_IP6, REMOTE_NODE_PORT), b"x"),
            ),
            // Neighbour discovery for frontends and the node: ICMPv6, never ours.
            Fixture::unparsed(
                "v6_neighbour_solicitation_for_cluster_ip",
                prog,
                neighbour(135, ONE_VIP6, solicited(ONE_VIP6)),
            ),
            Fixture::unparsed(
                "v6_neighbour_solicitation_unicast_to_cluster_ip",
                prog,
                neighbour(135, ONE_VIP6, ONE_VIP6),
            ),
            Fixture::unparsed(
                "v6_neighbour_advertisement_for_node_ip",
                prog,
                neighbour(136, NODE_IP6, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
            ),
            Fixture::unparsed(
                "v6_neighbour_advertisement_to_cluster_ip",
                prog,
                neighbour(136, ONE_VIP6, ONE_VIP6),
            ),
            Fixture::unparsed(
                "v6_icmpv6_echo_to_cluster_ip",
                prog,
                frame::icmp6(*c.ip(), ONE_VIP6, 128, 0, [0, 1, 0, 1], b"ping"),
            ),
            Fixture::unparsed(
                "v6_vlan_tagged_tcp_to_cluster_ip",
                prog,
                vlan(ETH_P_8021Q, &frame::tcp6(c, one, TCP_SYN)),
            ),
            // Version 4 in an IPv6-typed frame (and the reverse): neither family's packet.
            Fixture::unparsed("v6_version_4_in_an_ipv6_frame", prog, {
                let mut f = frame::tcp6(c, one, TCP_SYN);
                f[ETH_HLEN] = 0x40;
                f
            }),
            Fixture::unparsed("v6_ipv6_packet_in_an_ipv4_typed_frame", prog, {
                let mut f = frame::tcp6(c, one, TCP_SYN);
                f[12..14].copy_from_slice(&frame::ETH_P_IP.to_be_bytes());
                f
            }),
            // A no-next-header packet to a frontend.
            Fixture::unparsed(
                "v6_no_next_header_to_cluster_ip",
                prog,
                frame::ethernet(ETH_P_IPV6, &Ip6::new(*c.ip(), ONE_VIP6, 59).packet(&[])),
            ),
            // Fragments not addressed to a ClusterIP are not ours (a NodePort's node IP included:
            // the stack reassembles them).
            Fixture::unparsed(
                "v6_first_fragment_to_other_ip",
                prog,
                with_extensions(
                    *c.ip(),
                    OTHER6,
                    PROTO_TCP,
                    &tcp_segment(c, sa6(OTHER6, 80), TCP_SYN),
                    &[(IPV6_FRAGMENT, fragment_header(0x0001))],
                ),
            ),
            Fixture::unparsed(
                "v6_later_fragment_to_node_port",
                prog,
                with_extensions(
                    *c.ip(),
                    NODE_IP6,
                    PROTO_UDP,
                    &[7; 24],
                    &[(IPV6_FRAGMENT, fragment_header(0x00b8))],
                ),
            ),
        ];
        // Extension headers are not walked (documented limitation): a TCP SYN to a frontend behind
        // any of them passes untranslated, also when the chain ends in a fragment header.
        let seg = tcp_segment(c, one, TCP_SYN);
        for (name, chain) in [
            (
                "v6_hop_by_hop_then_tcp_to_cluster_ip_passes_untranslated_ext_headers_not_walked",
                vec![(IPV6_HOP_BY_HOP, options_header())],
            ),
            (
                "v6_routing_header_then_tcp_to_cluster_ip_passes_untranslated_ext_headers_not_walked",
                vec![(IPV6_ROUTING, routing_header())],
            ),
            (
                "v6_destination_options_then_tcp_to_cluster_ip_passes_untranslated_ext_headers_not_walked",
                vec![(IPV6_DEST_OPTS, options_header())],
            ),
            (
                "v6_hop_by_hop_routing_destopts_chain_to_cluster_ip_passes_untranslated_ext_headers_not_walked",
                vec![
                    (IPV6_HOP_BY_HOP, options_header()),
                    (IPV6_ROUTING, routing_header()),
                    (IPV6_DEST_OPTS, options_header()),
                ],
            ),
            (
                "v6_hop_by_hop_then_fragment_to_cluster_ip_passes_fragment_not_seen_behind_ext_headers",
                vec![
                    (IPV6_HOP_BY_HOP, options_header()),
                    (IPV6_FRAGMENT, fragment_header(0x0001)),
                ],
            ),
        ] {
            v.push(Fixture::unparsed(
                name,
                prog,
                with_extensions(*c.ip(), ONE_VIP6, PROTO_TCP, &seg, &chain),
            ));
        }
        // Truncations: an IPv6-typed frame shorter than Ethernet + the 40-byte IPv6 header (54 bytes)
        // is refused by BPF_PROG_TEST_RUN itself (the kernel pulls the network header); the longer
        // ones cut inside the TCP/UDP header pass as unparsed.
        let tcp = frame::tcp6(c, one, TCP_SYN);
        let udp = frame::udp6(c, sa6(ONE_VIP6, 53), b"");
        for (proto, full) in [("tcp", &tcp), ("udp", &udp)] {
            for len in ETH_HLEN..full.len() {
                let name = format!("v6_{proto}_truncated_to_{len}");
                v.push(if len < ETH_HLEN + 40 {
                    Fixture::new(name, prog, truncated(full, len)).output(Expect::Refused)
                } else {
                    Fixture::unparsed(name, prog, truncated(full, len))
                });
            }
        }
        v
    }

    /// Frames through the pod program that it translates, rejects or drops.
    fn pod_translations6() -> Vec<Fixture> {
        let p = Prog::Pod;
        let one = sa6(ONE_VIP6, 80);
        let one_udp = sa6(ONE_VIP6, 53);
        let backend = sa6(ONE_BACKEND6, BACKEND_PORT);
        let backend_udp = sa6(ONE_BACKEND6, BACKEND_UDP_PORT);
        let c = client6(51000);
        let cu = client6(51001);
        let ptb_backend =
            frame::icmp6_packet_too_big(ONE_BACKEND6, &frame::tcp6(c, backend, TCP_ACK));
        let ptb_router =
            frame::icmp6_packet_too_big(POD_ROUTER6, &frame::tcp6(c, backend, TCP_ACK));
        let time_exceeded = frame::icmp6_error(
            3,
            0,
            [0; 4],
            POD_ROUTER6,
            &frame::tcp6(c, backend, TCP_ACK),
            48,
        );
        let port_unreachable = frame::icmp6_error(
            1,
            4,
            [0; 4],
            ONE_BACKEND6,
            &frame::udp6(cu, backend_udp, b"q"),
            48,
        );
        vec![
            Fixture::new(
                "v6_new_tcp_syn_to_cluster_ip",
                p,
                frame::tcp6(c, one, TCP_SYN),
            )
            .output(Expect::Bytes(frame::tcp6(c, backend, TCP_SYN)))
            .stat("forward_new"),
            Fixture::new("v6_same_flow_established", p, frame::tcp6(c, one, TCP_ACK))
                .output(Expect::Bytes(frame::tcp6(c, backend, TCP_ACK)))
                .stat("forward_established"),
            Fixture::new(
                "v6_tcp_reply_from_backend_reverse_translated",
                p,
                frame::tcp6(backend, c, TCP_SYN | TCP_ACK),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                one,
                c,
                TCP_SYN | TCP_ACK,
            ))))
            .stat("reverse_nat"),
            // The backend's "packet too big" about the flow: the quote names the frontend again,
            // and the outer source too (the backend sent it).
            Fixture::new(
                "v6_icmpv6_packet_too_big_from_backend_translated",
                p,
                ptb_backend.clone(),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(translated_error6(
                &ptb_backend,
                one,
                None,
                true,
            )))
            .stat("icmp_error_translated"),
            // From a router on the way: only the quote changes.
            Fixture::new(
                "v6_icmpv6_packet_too_big_from_router_translated",
                p,
                ptb_router.clone(),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(translated_error6(
                &ptb_router,
                one,
                None,
                false,
            )))
            .stat("icmp_error_translated"),
            Fixture::new(
                "v6_icmpv6_time_exceeded_quoting_48_bytes_translated",
                p,
                time_exceeded.clone(),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(translated_error6(
                &time_exceeded,
                one,
                None,
                false,
            )))
            .stat("icmp_error_translated"),
            Fixture::unparsed(
                "v6_icmpv6_error_about_an_untracked_flow",
                p,
                frame::icmp6_packet_too_big(
                    ONE_BACKEND6,
                    &frame::tcp6(client6(51999), backend, TCP_ACK),
                ),
            ),
            // Informational ICMPv6 (echo reply) quoting-lookalike bytes: no error type, untouched.
            Fixture::unparsed("v6_icmpv6_echo_reply_is_no_error", p, {
                let e =
                    frame::icmp6_packet_too_big(ONE_BACKEND6, &frame::tcp6(c, backend, TCP_ACK));
                let mut m = e[ETH_HLEN + 40..].to_vec();
                m[0] = 129;
                frame::icmp6(ONE_BACKEND6, *c.ip(), 129, 0, [0; 4], &m[8..])
            }),
            Fixture::new(
                "v6_new_udp_flow_to_cluster_ip",
                p,
                frame::udp6(cu, one_udp, b"query"),
            )
            .output(Expect::Bytes(frame::udp6(cu, backend_udp, b"query")))
            .stat("forward_new"),
            Fixture::new(
                "v6_udp_reply_from_backend_reverse_translated",
                p,
                frame::udp6(backend_udp, cu, b"answer"),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::udp6(one_udp, cu, b"answer"))))
            .stat("reverse_nat"),
            // The backend's port unreachable about the UDP flow: the client's socket sees "refused".
            Fixture::new(
                "v6_icmpv6_port_unreachable_from_backend_translated",
                p,
                port_unreachable.clone(),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(translated_error6(
                &port_unreachable,
                one_udp,
                None,
                true,
            )))
            .stat("icmp_error_translated"),
            // A zero UDP checksum is invalid over IPv6 (RFC 8200 section 8.1; the receiving stack
            // drops it). The datapath neither drops nor repairs it: the zero is kept through the
            // rewrite (BPF_F_MARK_MANGLED_0), as for IPv4.
            Fixture::new(
                "v6_udp_zero_checksum_translated_and_stays_zero",
                p,
                udp6_zero_sum(client6(51002), one_udp, b"query"),
            )
            .output(Expect::Bytes(udp6_zero_sum(
                client6(51002),
                backend_udp,
                b"query",
            )))
            .stat("forward_new"),
            // Ethernet padding after a short datagram (payload length < frame): translated, kept.
            Fixture::new("v6_udp_with_ethernet_padding", p, {
                let mut f = frame::udp6(client6(51003), one_udp, b"ab");
                f.resize(80, 0);
                f
            })
            .output(Expect::Bytes({
                let mut f = frame::udp6(client6(51003), backend_udp, b"ab");
                f.resize(80, 0);
                f
            }))
            .stat("forward_new"),
            // The payload length is not validated (as the IPv4 total length): translated; the
            // stack's ipv6_rcv drops the inconsistent ones.
            Fixture::new(
                "v6_payload_length_larger_than_frame_translated",
                p,
                with_payload_len(frame::tcp6(client6(51004), one, TCP_SYN), 1000),
            )
            .output(Expect::Bytes(with_payload_len(
                frame::tcp6(client6(51004), backend, TCP_SYN),
                1000,
            )))
            .stat("forward_new"),
            // Traffic class, flow label and hop limit are left as they are.
            Fixture::new(
                "v6_traffic_class_and_flow_label_kept",
                p,
                frame::tcp6_with(client6(51005), one, &Tcp::new(51005, 80, TCP_SYN), |ip| {
                    ip.class_flow = 0x0b8_abcde;
                    ip.hop_limit = 1;
                }),
            )
            .output(Expect::Bytes(frame::tcp6_with(
                client6(51005),
                backend,
                &Tcp::new(51005, BACKEND_PORT, TCP_SYN),
                |ip| {
                    ip.class_flow = 0x0b8_abcde;
                    ip.hop_limit = 1;
                },
            )))
            .stat("forward_new"),
            // A pod reaching itself through its Service: the source becomes fd00:5745:4952::1.
            Fixture::new(
                "v6_hairpin",
                p,
                frame::tcp6(sa6(ONE_BACKEND6, 50000), one, TCP_SYN),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                sa6(HAIRPIN6, 50000),
                backend,
                TCP_SYN,
            ))))
            .stat("forward_new"),
            // The pod's reply to the hairpin address: back to itself, from the ClusterIP.
            Fixture::new(
                "v6_hairpin_reply_restored",
                p,
                frame::tcp6(backend, sa6(HAIRPIN6, 50000), TCP_SYN | TCP_ACK),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                one,
                sa6(ONE_BACKEND6, 50000),
                TCP_SYN | TCP_ACK,
            ))))
            .stat("reverse_nat"),
            Fixture::new(
                "v6_three_backends_one_chosen",
                p,
                frame::tcp6(client6(51006), sa6(MANY_VIP6, 80), TCP_SYN),
            )
            .output(Expect::OneOf(
                MANY_BACKENDS6
                    .iter()
                    .map(|&b| frame::tcp6(client6(51006), sa6(b, BACKEND_PORT), TCP_SYN))
                    .collect(),
            ))
            .stat("forward_new"),
            // Rejects: no endpoint, or a port the ClusterIP does not define.
            Fixture::new(
                "v6_tcp_syn_to_service_without_endpoints_rst",
                p,
                frame::tcp6(client6(51007), sa6(EMPTY_VIP6, 80), TCP_SYN),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(expected_rst6(
                client6(51007),
                sa6(EMPTY_VIP6, 80),
                &Tcp::new(51007, 80, TCP_SYN),
            )))
            .stat("reject_tcp"),
            Fixture::new(
                "v6_tcp_to_undefined_cluster_ip_port_rst",
                p,
                frame::tcp6(client6(51008), sa6(ONE_VIP6, 81), TCP_SYN),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(expected_rst6(
                client6(51008),
                sa6(ONE_VIP6, 81),
                &Tcp::new(51008, 81, TCP_SYN),
            )))
            .stat("reject_tcp"),
            // RFC 793: no ACK in the segment → ack = seq + data + SYN + FIN, sequence 0.
            Fixture::new("v6_tcp_syn_fin_with_data_rst_acks_all_of_it", p, {
                let mut t = Tcp::new(51009, 80, TCP_SYN | TCP_FIN);
                t.seq = 0xffff_fff0;
                t.payload = vec![0xaa; 37];
                frame::tcp6_with(client6(51009), sa6(EMPTY_VIP6, 80), &t, |_| {})
            })
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes({
                let mut t = Tcp::new(51009, 80, TCP_SYN | TCP_FIN);
                t.seq = 0xffff_fff0;
                t.payload = vec![0xaa; 37];
                expected_rst6(client6(51009), sa6(EMPTY_VIP6, 80), &t)
            }))
            .stat("reject_tcp"),
            // RFC 793: with ACK → seq = the segment's ack, no ACK flag.
            Fixture::new("v6_tcp_ack_with_data_rst_takes_its_ack_as_seq", p, {
                let mut t = Tcp::new(51010, 80, TCP_ACK | 0x08);
                t.ack = 0x1234_5678;
                t.payload = b"GET / HTTP/1.1\r\n".to_vec();
                frame::tcp6_with(client6(51010), sa6(EMPTY_VIP6, 80), &t, |_| {})
            })
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes({
                let mut t = Tcp::new(51010, 80, TCP_ACK | 0x08);
                t.ack = 0x1234_5678;
                t.payload = b"GET / HTTP/1.1\r\n".to_vec();
                expected_rst6(client6(51010), sa6(EMPTY_VIP6, 80), &t)
            }))
            .stat("reject_tcp"),
            Fixture::new(
                "v6_rst_to_rejecting_frontend_dropped",
                p,
                frame::tcp6(client6(51011), sa6(EMPTY_VIP6, 80), TCP_RST),
            )
            .verdict(TC_ACT_SHOT)
            .output(Expect::Dropped)
            .stat("drop_reset_to_rejecting"),
            Fixture::new(
                "v6_udp_to_service_without_endpoints_icmpv6_port_unreachable",
                p,
                frame::udp6(client6(51012), sa6(EMPTY_VIP6, 53), b"query"),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(expected_port_unreachable6(&frame::udp6(
                client6(51012),
                sa6(EMPTY_VIP6, 53),
                b"query",
            ))))
            .stat("reject_udp"),
            // The quote is the IPv6 header + 8 bytes whatever the datagram's size.
            Fixture::new(
                "v6_large_udp_to_undefined_port_icmpv6_port_unreachable",
                p,
                frame::udp6(client6(51013), sa6(ONE_VIP6, 54), &[0x5a; 1200]),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(expected_port_unreachable6(&frame::udp6(
                client6(51013),
                sa6(ONE_VIP6, 54),
                &[0x5a; 1200],
            ))))
            .stat("reject_udp"),
            // Fragments to a ClusterIP cannot be balanced: counted drops.
            Fixture::new(
                "v6_first_fragment_to_cluster_ip_dropped",
                p,
                with_extensions(
                    *client6(51014).ip(),
                    ONE_VIP6,
                    PROTO_UDP,
                    &frame::udp_segment(client6(51014), one_udp, &[7; 32]),
                    &[(IPV6_FRAGMENT, fragment_header(0x0001))],
                ),
            )
            .verdict(TC_ACT_SHOT)
            .output(Expect::Dropped)
            .stat("drop_fragment"),
            Fixture::new(
                "v6_later_fragment_to_cluster_ip_dropped",
                p,
                with_extensions(
                    *client6(51015).ip(),
                    ONE_VIP6,
                    PROTO_TCP,
                    &[9; 24],
                    &[(IPV6_FRAGMENT, fragment_header(0x05c8))],
                ),
            )
            .verdict(TC_ACT_SHOT)
            .output(Expect::Dropped)
            .stat("drop_fragment"),
            // An atomic fragment (offset 0, no M: RFC 6946) is still a fragment header.
            Fixture::new(
                "v6_atomic_fragment_to_cluster_ip_dropped",
                p,
                with_extensions(
                    *client6(51016).ip(),
                    ONE_VIP6,
                    PROTO_TCP,
                    &tcp_segment(client6(51016), one, TCP_SYN),
                    &[(IPV6_FRAGMENT, fragment_header(0x0000))],
                ),
            )
            .verdict(TC_ACT_SHOT)
            .output(Expect::Dropped)
            .stat("drop_fragment"),
        ]
    }

    /// Frames through the external program: NodePorts, externalIPs and LoadBalancer IPs.
    fn ext_translations6() -> Vec<Fixture> {
        let p = Prog::Ext;
        let outside = outside6(45555);
        let remote = sa6(REMOTE_BACKEND6, BACKEND_PORT);
        let node_port = sa6(NODE_IP6, REMOTE_NODE_PORT);
        let local = sa6(LOCAL_BACKEND6, BACKEND_PORT);
        vec![
            // The backend lives on another node: SNAT to this node's IPv6 address (the client's own
            // port is free) and FIB redirect towards it.
            Fixture::new(
                "v6_node_port_to_remote_backend_snat",
                p,
                frame::tcp6(outside, node_port, TCP_SYN),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                sa6(NODE_IP6, 45555),
                remote,
                TCP_SYN,
            ))))
            .stat("forward_new")
            .stat("snat_new"),
            Fixture::new(
                "v6_node_port_snat_established",
                p,
                frame::tcp6(outside, node_port, TCP_ACK),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                sa6(NODE_IP6, 45555),
                remote,
                TCP_ACK,
            ))))
            .stat("forward_established"),
            Fixture::new(
                "v6_node_port_snat_reply_restored",
                p,
                frame::tcp6(remote, sa6(NODE_IP6, 45555), TCP_SYN | TCP_ACK),
            )
            .verdict(TC_ACT_REDIRECT)
            .output(Expect::Bytes(routed6(frame::tcp6(
                node_port,
                outside,
                TCP_SYN | TCP_ACK,
            ))))
            .stat("reverse_nat"),
            Fixture::new(
                "v6_node_port_to_local_backend_no_snat",
                p,
                frame::tcp6(outside6(6000), sa6(NODE_IP6, LOCAL_NODE_PORT), TCP_SYN),
            )
            .output(Expect::Bytes(frame::tcp6(outside6(6000), local, TCP_SYN)))
            .stat("forward_new"),
            Fixture::new(
                "v6_udp_node_port_to_local_backend",
                p,
                frame::udp6(outside6(6001), sa6(NODE_IP6, LOCAL_NODE_PORT_UDP), b"q"),
            )
            .output(Expect::Bytes(frame::udp6(
                outside6(6001),
                sa6(LOCAL_BACKEND6, BACKEND_UDP_PORT),
                b"q",
            )))
            .stat("forward_new"),
            Fixture::new(
                "v6_external_ip_to_local_backend",
                p,
                frame::tcp6(outside6(6002), sa6(EXTERNAL_IP6, 80), TCP_SYN),
            )
            .output(Expect::Bytes(frame::tcp6(outside6(6002), local, TCP_SYN)))
            .stat("forward_new"),
            Fixture::new(
                "v6_load_balancer_ip_to_local_backend",
                p,
                frame::tcp6(outside6(6003), sa6(LB_IP6, 80), TCP_SYN),
            )
            .output(Expect::Bytes(frame::tcp6(outside6(6003), local, TCP_SYN)))
            .stat("forward_new"),
            Fixture::new(
                "v6_udp_load_balancer_ip_to_local_backend",
                p,
                frame::udp6(outside6(6004), sa6(LB_IP6, 53), b"q"),
            )
            .output(Expect::Bytes(frame::udp6(
                outside6(6004),
                sa6(LOCAL_BACKEND6, BACKEND_UDP_PORT),
                b"q",
            )))
            .stat("forward_new"),
        ]
    }

    #[test]
    fn v6_traffic_that_is_not_ours_passes_untouched() {
        with_rig(|rig| {
            let mut all = not_ours6(Prog::Pod);
            all.extend(not_ours6(Prog::Ext));
            run_all(rig, &all);
        });
    }

    #[test]
    fn v6_pod_ingress_translates_rejects_and_drops() {
        with_rig(|rig| run_all(rig, &pod_translations6()));
    }

    #[test]
    fn v6_ext_ingress_node_ports_external_and_lb_ips() {
        with_rig(|rig| run_all(rig, &ext_translations6()));
    }

    /// Every flag combination without RST to an IPv6 frontend without endpoints gets the RFC 793 reset.
    #[test]
    fn v6_every_tcp_flag_combination_without_rst_to_a_rejecting_frontend_gets_a_reset() {
        with_rig(|rig| {
            let fixtures: Vec<Fixture> = (0..=255u8)
                .filter(|flags| flags & TCP_RST == 0)
                .map(|flags| {
                    let c = client6(52000 + u16::from(flags));
                    let empty = sa6(EMPTY_VIP6, 80);
                    let t = Tcp::new(c.port(), 80, flags);
                    Fixture::new(
                        format!("v6_reject_tcp_flags_{flags:#04x}"),
                        Prog::Pod,
                        frame::tcp6(c, empty, flags),
                    )
                    .verdict(TC_ACT_REDIRECT)
                    .output(Expect::Bytes(expected_rst6(c, empty, &t)))
                    .stat("reject_tcp")
                })
                .collect();
            run_all(rig, &fixtures);
        });
    }

    /// A dual-stack Service: its IPv4 frontend balances over its IPv4 endpoints only, its IPv6
    /// frontend over its IPv6 endpoints only, each reaching all of its own family's.
    #[test]
    fn v6_dual_stack_service_each_family_to_its_own_backends() {
        with_rig(|rig| {
            let mut seen4 = BTreeSet::new();
            let mut seen6 = BTreeSet::new();
            for i in 0..64u16 {
                let c4 = super::client(53000 + i);
                let out = rig
                    .run(
                        Prog::Pod,
                        &frame::tcp4(c4, super::sa(MANY_VIP, 80), TCP_SYN),
                    )
                    .expect("test run");
                let p = frame::parse(&out.frame).expect("a TCP frame comes out");
                assert!(!p.v6 && p.src == c4.into(), "{p:?}");
                seen4.insert(p.dst);
                let c6 = client6(53000 + i);
                let out = rig
                    .run(Prog::Pod, &frame::tcp6(c6, sa6(MANY_VIP6, 80), TCP_SYN))
                    .expect("test run");
                let p = frame::parse(&out.frame).expect("a TCP frame comes out");
                assert!(p.v6 && p.src == c6.into(), "{p:?}");
                seen6.insert(p.dst);
            }
            let want4: BTreeSet<_> = MANY_BACKENDS
                .iter()
                .map(|&b| super::sa(b, BACKEND_PORT).into())
                .collect();
            let want6: BTreeSet<_> = MANY_BACKENDS6
                .iter()
                .map(|&b| sa6(b, BACKEND_PORT).into())
                .collect();
            assert_eq!(
                seen4, want4,
                "the IPv4 frontend reaches exactly its IPv4 backends"
            );
            assert_eq!(
                seen6, want6,
                "the IPv6 frontend reaches exactly its IPv6 backends"
            );
            // The rig programmed both families' backends (the sets the fuzzer's judge uses).
            for b in want4.iter().chain(&want6) {
                assert!(rig.is_backend(*b, PROTO_TCP), "{b} is in WEIR_BACKENDS");
            }
        });
    }

    /// IPv4-mapped addresses (`::ffff:a.b.c.d`) are how the maps key IPv4, but never a valid IPv6
    /// address on the wire (RFC 4291 section 2.5.5.2): an IPv6 packet naming one (as destination or
    /// source) is not parsed at all, so it can never be balanced as if it were IPv4 traffic. (Found
    /// by this fixture: the first IPv6 parser DNATed it to the IPv4 backend.)
    #[test]
    fn v6_packets_to_ipv4_mapped_frontends_are_not_ours() {
        with_rig(|rig| {
            let mapped = |a: std::net::Ipv4Addr| a.to_ipv6_mapped();
            let c = client6(54000);
            run_all(
                rig,
                &[
                    Fixture::unparsed(
                        "v6_tcp_to_ipv4_mapped_cluster_ip",
                        Prog::Pod,
                        frame::tcp6(c, sa6(mapped(ONE_VIP), 80), TCP_SYN),
                    ),
                    Fixture::unparsed(
                        "v6_udp_to_ipv4_mapped_cluster_ip",
                        Prog::Pod,
                        frame::udp6(c, sa6(mapped(ONE_VIP), 53), b"q"),
                    ),
                    Fixture::unparsed(
                        "v6_tcp_from_ipv4_mapped_source_to_ipv6_cluster_ip_other_host",
                        Prog::Pod,
                        frame::tcp6(
                            sa6(mapped(std::net::Ipv4Addr::new(10, 0, 0, 20)), 54001),
                            sa6(OTHER6, 80),
                            TCP_SYN,
                        ),
                    ),
                ],
            );
        });
    }

    /// Bytes that look like an ICMPv6 error about a tracked flow but are not one are not touched:
    /// another Ethernet type, a payload length that ends inside the quote (the bytes to rewrite would
    /// not be covered by the ICMPv6 checksum), a quote that is no IPv6 header.
    #[test]
    fn v6_icmpv6_error_lookalikes_are_not_translated() {
        with_rig(|rig| {
            let c = client6(55000);
            let backend = sa6(ONE_BACKEND6, BACKEND_PORT);
            run_all(
                rig,
                &[Fixture::new(
                    "flow",
                    Prog::Pod,
                    frame::tcp6(c, sa6(ONE_VIP6, 80), TCP_SYN),
                )
                .output(Expect::Bytes(frame::tcp6(c, backend, TCP_SYN)))
                .stat("forward_new")],
            );
            let error =
                frame::icmp6_packet_too_big(ONE_BACKEND6, &frame::tcp6(c, backend, TCP_ACK));
            let mut fixtures: Vec<Fixture> = [ETH_P_ARP, 0x88b5, ETH_P_8021Q]
                .into_iter()
                .map(|ethertype| {
                    let mut f = error.clone();
                    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
                    Fixture::unparsed(
                        format!("v6_icmpv6_error_in_ethertype_{ethertype:#06x}"),
                        Prog::Pod,
                        f,
                    )
                })
                .collect();
            fixtures.push(
                Fixture::new("v6_genuine_icmpv6_error", Prog::Pod, error.clone())
                    .verdict(TC_ACT_REDIRECT)
                    .output(Expect::Bytes(translated_error6(
                        &error,
                        sa6(ONE_VIP6, 80),
                        None,
                        true,
                    )))
                    .stat("icmp_error_translated"),
            );
            run_all(rig, &fixtures);
        });
    }

    /// An IPv6-typed frame whose version is not 6 is no IPv6 packet, even with next header 44 to a
    /// ClusterIP: not a fragment to drop.
    ///
    /// Found here, fixed: before the fix `packet::fragment_destination`'s IPv6 branch does not check
    /// the version nibble (its IPv4 branch does), so such a frame is a counted `drop_fragment`. The
    /// stack would drop it anyway (`ipv6_rcv`), so only the counter is wrong.
    #[test]
    fn v6_fragment_lookalike_with_version_4_is_not_a_fragment() {
        with_rig(|rig| {
            let c = client6(56000);
            let mut f = with_extensions(
                *c.ip(),
                ONE_VIP6,
                PROTO_TCP,
                &tcp_segment(c, sa6(ONE_VIP6, 80), TCP_SYN),
                &[(IPV6_FRAGMENT, fragment_header(0x0001))],
            );
            f[ETH_HLEN] = 0x40;
            run_all(
                rig,
                &[Fixture::unparsed(
                    "v6_version_4_fragment_header_to_cluster_ip",
                    Prog::Pod,
                    f,
                )],
            );
        });
    }

    /// Found here, fixed: before the fix `icmp::translate_error6` checks neither that the IPv6 payload length
    /// covers the quote (`icmp_error_total_length_cuts_the_quote` is the IPv4 twin, fixed there) nor
    /// that the quote is IPv6 (its IPv4 twin checks `0x45`). A payload length ending inside the quote
    /// gets the bytes past it rewritten and the ICMPv6 checksum adjusted for them: the error leaves
    /// with a broken checksum. A quote of another version is translated as if it were IPv6.
    #[test]
    fn v6_icmpv6_error_with_short_payload_length_or_non_ipv6_quote_is_not_translated() {
        with_rig(|rig| {
            let c = client6(55100);
            let backend = sa6(ONE_BACKEND6, BACKEND_PORT);
            run_all(
                rig,
                &[Fixture::new(
                    "flow",
                    Prog::Pod,
                    frame::tcp6(c, sa6(ONE_VIP6, 80), TCP_SYN),
                )
                .output(Expect::Bytes(frame::tcp6(c, backend, TCP_SYN)))
                .stat("forward_new")],
            );
            let error =
                frame::icmp6_packet_too_big(ONE_BACKEND6, &frame::tcp6(c, backend, TCP_ACK));
            let mut fixtures = Vec::new();
            fixtures.push(Fixture::unparsed(
                "v6_icmpv6_error_payload_length_cuts_the_quote",
                Prog::Pod,
                {
                    // ICMPv6 header + 40 quoted bytes: the quoted ports lie past the payload length.
                    let mut f = with_payload_len(error.clone(), 8 + 40);
                    let at = ETH_HLEN + 40;
                    f[at + 2..at + 4].fill(0);
                    let pseudo = frame::pseudo_header6(ONE_BACKEND6, *c.ip(), PROTO_ICMPV6, 48);
                    let sum = frame::checksum(&[&pseudo, &f[at..at + 48]]);
                    f[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
                    f
                },
            ));
            fixtures.push(Fixture::unparsed(
                "v6_icmpv6_error_quote_is_not_ipv6",
                Prog::Pod,
                {
                    let mut f = error.clone();
                    f[ICMP6_QUOTE] = 0x45;
                    let at = ETH_HLEN + 40;
                    f[at + 2..at + 4].fill(0);
                    let pseudo =
                        frame::pseudo_header6(ONE_BACKEND6, *c.ip(), PROTO_ICMPV6, f.len() - at);
                    let sum = frame::checksum(&[&pseudo, &f[at..]]);
                    f[at + 2..at + 4].copy_from_slice(&sum.to_be_bytes());
                    f
                },
            ));
            run_all(rig, &fixtures);
        });
    }

    /// An ICMPv6 "packet too big" from the remote backend of a NodePort flow that was SNATed (the
    /// quote is node:port → backend, the error is addressed to the node) must reach the outside
    /// client as it would without SNAT: the quote client → node:nodePort, the outer destination the
    /// client, the outer source the frontend (the backend sent it).
    ///
    /// Found here, fixed (both families): before the fix `icmp::translate_error4/6` restore the frontend in
    /// the quote and the outer source but ignore the reverse entry's peer: the error leaves as
    /// node → node, quoting node:45555 → node:30080 (verdict `TC_ACT_OK`: the FIB sees a local
    /// destination), and the client never learns the path MTU through an SNATed NodePort.
    #[test]
    fn icmp_errors_about_snat_flows_reach_the_outside_client() {
        with_rig(|rig| {
            let p = Prog::Ext;
            let outside = outside6(45600);
            let remote = sa6(REMOTE_BACKEND6, BACKEND_PORT);
            let node_port = sa6(NODE_IP6, REMOTE_NODE_PORT);
            let ptb = frame::icmp6_packet_too_big(
                REMOTE_BACKEND6,
                &frame::tcp6(sa6(NODE_IP6, 45600), remote, TCP_ACK),
            );
            let outside4 = super::sa(std::net::Ipv4Addr::new(203, 0, 113, 7), 45600);
            let node_port4 = super::sa(weir_tests::packet::rig::NODE_IP, REMOTE_NODE_PORT);
            let remote4 = super::sa(weir_tests::packet::rig::REMOTE_BACKEND, BACKEND_PORT);
            let snat4 = super::sa(weir_tests::packet::rig::NODE_IP, 45600);
            run_all(
                rig,
                &[
                    Fixture::new("v6_flow", p, frame::tcp6(outside, node_port, TCP_SYN))
                        .verdict(TC_ACT_REDIRECT)
                        .output(Expect::Bytes(routed6(frame::tcp6(
                            sa6(NODE_IP6, 45600),
                            remote,
                            TCP_SYN,
                        ))))
                        .stat("forward_new")
                        .stat("snat_new"),
                    Fixture::new(
                        "v6_packet_too_big_from_remote_backend_about_snat_flow",
                        p,
                        ptb.clone(),
                    )
                    .verdict(TC_ACT_REDIRECT)
                    .output(Expect::Bytes(translated_error6(
                        &ptb,
                        node_port,
                        Some(outside),
                        true,
                    )))
                    .stat("icmp_error_translated"),
                    Fixture::new("v4_flow", p, frame::tcp4(outside4, node_port4, TCP_SYN))
                        .verdict(TC_ACT_REDIRECT)
                        .output(Expect::Bytes(super::routed(frame::tcp4(
                            snat4, remote4, TCP_SYN,
                        ))))
                        .stat("forward_new")
                        .stat("snat_new"),
                    Fixture::new(
                        "v4_frag_needed_from_remote_backend_about_snat_flow",
                        p,
                        frame::icmp_frag_needed(
                            *remote4.ip(),
                            &frame::tcp4(snat4, remote4, TCP_ACK),
                        ),
                    )
                    .verdict(TC_ACT_REDIRECT)
                    .output(Expect::Bytes(super::routed(frame::icmp_frag_needed(
                        *node_port4.ip(),
                        &frame::tcp4(outside4, node_port4, TCP_ACK),
                    ))))
                    .stat("icmp_error_translated"),
                ],
            );
        });
    }

    #[test]
    fn v6_the_fixture_runner_checks_ipv6_checksums() {
        let mut f = frame::tcp6(client6(1), sa6(ONE_BACKEND6, BACKEND_PORT), TCP_SYN);
        assert!(super::checksum_problems(&f).is_empty());
        // A changed address breaks the L4 checksum through the pseudo-header.
        f[ETH_HLEN + 39] ^= 1;
        assert!(!super::checksum_problems(&f).is_empty());
        let mut e = frame::icmp6_packet_too_big(
            ONE_BACKEND6,
            &frame::tcp6(client6(1), sa6(ONE_BACKEND6, 80), TCP_ACK),
        );
        assert!(super::checksum_problems(&e).is_empty());
        e[ICMP6_QUOTE + 24] ^= 1;
        assert!(!super::checksum_problems(&e).is_empty());
    }
}
