//! Conntrack timeouts: the datapath stamps each entry with its last packet's time and the TCP FIN/RST it
//! saw, and the agent's collector forgets each flow (both entries) once idle past its state's timeout.
//! With the rig (the agent's object under `BPF_PROG_TEST_RUN`) the collector is run at chosen future
//! times, so every state's timeout is checked exactly; with the lab, a real agent forgets idle UDP flows
//! within its GC interval while an idle established TCP connection keeps working.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use weir_agent::conntrack_gc::{Collector, Timeouts, monotonic_now_s};
use weir_common::{CT_FLAG_FIN, CT_FLAG_RST, CT_FLAG_SEEN, PROTO_TCP, PROTO_UDP};
use weir_tests::Lab;
use weir_tests::metrics;
use weir_tests::packet::frame::{Packet, parse, tcp4, tcp6, udp4};
use weir_tests::packet::rig::{
    self, BACKEND_PORT, BACKEND_UDP_PORT, NODE_IP, ONE_BACKEND, ONE_BACKEND6, ONE_VIP, ONE_VIP6,
    Prog, REMOTE_BACKEND, REMOTE_NODE_PORT, Rig,
};
use weir_tests::scenario::{self, UDP_PORT};

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// Each state its own timeout, 10 s apart, so one collector pass tells them apart.
const TIMEOUTS: Timeouts = Timeouts {
    tcp_close: 10,
    tcp_syn: 20,
    tcp_time_wait: 30,
    udp: 40,
    udp_stream: 50,
    tcp_close_wait: 60,
    tcp_established: 70,
};

/// One flow of the rig test: its two conntrack keys as on the wire.
#[derive(Clone, Copy, Debug)]
struct Flow {
    name: &'static str,
    forward: (SocketAddr, SocketAddr),
    reverse: (SocketAddr, SocketAddr),
    proto: u8,
    /// The timeout its state should get.
    timeout: u32,
}

fn client(n: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100 + n), 41_000 + u16::from(n))
}

fn run(rig: &Rig, prog: Prog, frame: &[u8]) -> Packet {
    let out = rig.run(prog, frame).expect("test run");
    parse(&out.frame).expect("a TCP/UDP frame comes out")
}

/// A TCP flow client → ONE_VIP:80 (one backend), driven by `steps`: (from the client?, flags).
fn tcp_flow(rig: &Rig, n: u8, steps: &[(bool, u8)]) -> (SocketAddr, SocketAddr, SocketAddr) {
    let c = client(n);
    let vip = SocketAddrV4::new(ONE_VIP, 80);
    let backend = SocketAddrV4::new(ONE_BACKEND, BACKEND_PORT);
    for &(from_client, flags) in steps {
        if from_client {
            let p = run(rig, Prog::Pod, &tcp4(c, vip, flags));
            assert_eq!(p.dst, backend.into(), "flow {n} goes to the one backend");
        } else {
            let p = run(rig, Prog::Pod, &tcp4(backend, c, flags));
            assert_eq!(
                p.src,
                vip.into(),
                "flow {n}'s reply comes from the ClusterIP"
            );
        }
    }
    (c.into(), vip.into(), backend.into())
}

fn present(rig: &Rig, f: &Flow) -> (bool, bool) {
    (
        rig.tracked(f.forward.0, f.forward.1, f.proto).is_some(),
        rig.tracked(f.reverse.0, f.reverse.1, f.proto).is_some(),
    )
}

fn flags_of(rig: &Rig, src: SocketAddr, dst: SocketAddr, proto: u8) -> u8 {
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => rig.conntrack(s, d, proto).map(|v| v.flags),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => rig.conntrack6(s, d, proto).map(|v| v.flags),
        _ => None,
    }
    .unwrap_or_else(|| panic!("no entry {src} → {dst}"))
}

#[test]
fn each_flow_state_expires_at_its_own_timeout_and_both_entries_go_together() {
    rig::with_rig(|rig| {
        let established = [(true, SYN), (false, SYN | ACK), (true, ACK)];
        let mut flows = Vec::new();
        let mut add =
            |name, (c, vip, backend): (SocketAddr, SocketAddr, SocketAddr), proto, timeout| {
                flows.push(Flow {
                    name,
                    forward: (c, vip),
                    reverse: (backend, c),
                    proto,
                    timeout,
                });
            };
        add(
            "reset",
            tcp_flow(rig, 1, &[&established[..], &[(false, RST)]].concat()),
            PROTO_TCP,
            10,
        );
        add(
            "syn unanswered",
            tcp_flow(rig, 2, &[(true, SYN)]),
            PROTO_TCP,
            20,
        );
        let closed = [
            &established[..],
            &[(true, FIN | ACK), (false, FIN | ACK), (true, ACK)],
        ]
        .concat();
        add("closed both ways", tcp_flow(rig, 3, &closed), PROTO_TCP, 30);
        add(
            "closed by the client only",
            tcp_flow(
                rig,
                4,
                &[&established[..], &[(true, FIN | ACK), (false, ACK)]].concat(),
            ),
            PROTO_TCP,
            60,
        );
        add("established", tcp_flow(rig, 5, &established), PROTO_TCP, 70);
        // A closed tuple reused for a new connection: the SYNs forget the old FINs.
        let reused = [&closed[..], &established[..]].concat();
        add(
            "tuple reused after close",
            tcp_flow(rig, 6, &reused),
            PROTO_TCP,
            70,
        );

        let dns = SocketAddrV4::new(ONE_VIP, 53);
        let dns_backend = SocketAddrV4::new(ONE_BACKEND, BACKEND_UDP_PORT);
        for (n, answered, timeout, name) in [
            (7, false, 40, "udp unanswered"),
            (8, true, 50, "udp answered"),
        ] {
            let c = client(n);
            assert_eq!(
                run(rig, Prog::Pod, &udp4(c, dns, b"q")).dst,
                dns_backend.into()
            );
            if answered {
                assert_eq!(
                    run(rig, Prog::Pod, &udp4(dns_backend, c, b"a")).src,
                    dns.into()
                );
            }
            add(
                name,
                (c.into(), dns.into(), dns_backend.into()),
                PROTO_UDP,
                timeout,
            );
        }

        // IPv6 lives in its own map.
        let c6 = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x109), 41_009, 0, 0);
        let vip6 = SocketAddrV6::new(ONE_VIP6, 80, 0, 0);
        let backend6 = SocketAddrV6::new(ONE_BACKEND6, BACKEND_PORT, 0, 0);
        assert_eq!(
            run(rig, Prog::Pod, &tcp6(c6, vip6, SYN)).dst,
            SocketAddr::V6(backend6)
        );
        assert_eq!(
            run(rig, Prog::Pod, &tcp6(backend6, c6, SYN | ACK)).src,
            SocketAddr::V6(vip6)
        );
        add(
            "ipv6 established",
            (c6.into(), vip6.into(), backend6.into()),
            PROTO_TCP,
            70,
        );

        // Outside client → NodePort → backend on another node: SNATed, so the reply key names this
        // node and the allocated port (the pair the collector must find through the entries' peers).
        let outside = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 7), 45_000);
        let node_port = SocketAddrV4::new(NODE_IP, REMOTE_NODE_PORT);
        let remote = SocketAddrV4::new(REMOTE_BACKEND, BACKEND_PORT);
        let out = run(rig, Prog::Ext, &tcp4(outside, node_port, SYN));
        assert_eq!(out.dst, remote.into(), "sent to the remote backend");
        let snat = out.src;
        assert_eq!(snat.ip(), IpAddr::V4(NODE_IP), "SNATed to the node");
        let SocketAddr::V4(snat4) = snat else {
            unreachable!("checked above")
        };
        let back = run(rig, Prog::Ext, &tcp4(remote, snat4, SYN | ACK));
        assert_eq!((back.src, back.dst), (node_port.into(), outside.into()));
        flows.push(Flow {
            name: "snat established",
            forward: (outside.into(), node_port.into()),
            reverse: (remote.into(), snat),
            proto: PROTO_TCP,
            timeout: 70,
        });
        let now = monotonic_now_s();

        // What the datapath recorded.
        let f = |name: &str| *flows.iter().find(|f| f.name == name).expect("flow");
        let seen_rst = CT_FLAG_SEEN | CT_FLAG_RST;
        let reset = f("reset");
        assert_eq!(
            flags_of(rig, reset.reverse.0, reset.reverse.1, PROTO_TCP),
            seen_rst
        );
        let syn = f("syn unanswered");
        assert_eq!(
            flags_of(rig, syn.forward.0, syn.forward.1, PROTO_TCP),
            0,
            "one packet: not seen again"
        );
        assert_eq!(
            flags_of(rig, syn.reverse.0, syn.reverse.1, PROTO_TCP),
            0,
            "never answered"
        );
        let closed = f("closed both ways");
        for (s, d) in [closed.forward, closed.reverse] {
            assert_eq!(
                flags_of(rig, s, d, PROTO_TCP),
                CT_FLAG_SEEN | CT_FLAG_FIN,
                "{s} → {d}"
            );
        }
        let reused = f("tuple reused after close");
        for (s, d) in [reused.forward, reused.reverse] {
            assert_eq!(
                flags_of(rig, s, d, PROTO_TCP),
                CT_FLAG_SEEN,
                "{s} → {d}: FIN forgotten"
            );
        }
        let SocketAddr::V4(est) = f("established").forward.0 else {
            unreachable!()
        };
        let stamp = rig
            .conntrack(est, SocketAddrV4::new(ONE_VIP, 80), PROTO_TCP)
            .expect("entry")
            .seen_s;
        assert!(
            stamp.abs_diff(now) <= 2,
            "stamped {stamp}, now {now}: the same clock"
        );

        let mut collector = Collector::open(rig.pin_dir(), TIMEOUTS).expect("open the maps");
        let all = flows.len() as u64 * 2;
        assert_eq!(
            collector.pass(now).expect("pass").deleted,
            0,
            "nothing is idle yet"
        );
        let mut deleted = 0;
        let mut timeouts: Vec<u32> = flows.iter().map(|f| f.timeout).collect();
        timeouts.sort_unstable();
        timeouts.dedup();
        for t in timeouts {
            // Two seconds of margin either way: stamps are whole seconds of a coarse clock.
            deleted += collector.pass(now + t + 2).expect("pass").deleted;
            for flow in &flows {
                let gone = flow.timeout <= t;
                assert_eq!(
                    present(rig, flow),
                    (!gone, !gone),
                    "{}: after {t} s idle (its timeout {})",
                    flow.name,
                    flow.timeout
                );
            }
        }
        assert_eq!(deleted, all, "every entry deleted once");
    });
}

/// A real agent with short UDP and SYN timeouts: an answered UDP exchange through the ClusterIP is
/// forgotten within a few GC intervals (both entries), counted in the metrics, while a TCP connection
/// left idle for longer than every short timeout is kept (established: 24 h) and keeps working.
#[test]
fn the_agent_forgets_idle_udp_flows_and_keeps_idle_established_connections() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    scenario::write_echo_service(&lab, &backends.iter().collect::<Vec<_>>()).expect("service");
    let mut agent = lab
        .start_agent(&[
            "--conntrack-gc-interval",
            "500ms",
            "--conntrack-udp-timeout",
            "1s",
            "--conntrack-udp-timeout-stream",
            "2s",
            "--conntrack-tcp-timeout-syn",
            "1s",
            "--conntrack-tcp-timeout-close-wait",
            "1s",
        ])
        .expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let t = Duration::from_secs(2);
    let mut conn = client
        .tcp_connect(scenario::cluster_addr(scenario::TCP_PORT.0), t)
        .expect("connect through the ClusterIP");
    let (backend, _) =
        scenario::parse_greeting(&conn.read_line().expect("greeting")).expect("greeting");
    let reply = client
        .udp_request(scenario::cluster_addr(UDP_PORT.0), t)
        .expect("UDP through the ClusterIP");
    // The backend greets with the address it sees: the client's own (no SNAT in the pod network).
    let (_, udp_client) = scenario::parse_greeting(&reply.line).expect("UDP greeting");
    let entries = |lab: &Lab| metrics::counter(lab, "weir_conntrack_entries").unwrap_or(0.0);
    // TCP (2) + UDP (2) at least.
    assert!(entries(&lab) >= 4.0, "entries before: {}", entries(&lab));

    // Idle for well past the UDP stream timeout and the GC interval.
    std::thread::sleep(Duration::from_secs(5));
    let deleted =
        metrics::counter(&lab, "weir_conntrack_gc_deleted_entries_total").expect("metric");
    assert!(
        deleted >= 2.0,
        "the UDP flow's two entries were collected: {deleted}"
    );
    let runs = metrics::counter(&lab, "weir_conntrack_gc_runs_total").expect("metric");
    assert!(runs >= 4.0, "the collector ran every 500 ms: {runs}");
    let listing = agent_conntrack(&lab);
    assert!(
        !listing.contains(&udp_client.to_string()),
        "no entry of the UDP flow {udp_client} left:\n{listing}"
    );
    let tcp_client = conn.local_addr().expect("local addr");
    assert!(
        listing.matches(&tcp_client.to_string()).count() >= 2,
        "the idle established connection {tcp_client} keeps both entries:\n{listing}"
    );
    // And it still works, through the same backend.
    let answer = conn
        .exchange("again")
        .expect("the idle connection still works");
    assert!(answer.starts_with(&format!("{backend} ")), "{answer}");
}

/// `weir conntrack list` in the node's namespace.
fn agent_conntrack(lab: &Lab) -> String {
    let agent = weir_tests::agent_binary().expect("agent binary");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.node_netns()])
        .arg(agent.with_file_name("weir"))
        .arg("--bpffs-dir")
        .arg(lab.bpffs_dir().expect("bpffs"))
        .args(["conntrack", "list"])
        .output()
        .expect("run weir");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Entries an older datapath left unstamped (`seen_s` 0, e.g. in maps pinned before an upgrade) are
/// adopted: their idle time counts from the collector's first look, not from boot, so live flows are
/// not expired by the upgrade.
#[test]
fn unstamped_entries_are_adopted_not_expired() {
    rig::with_rig(|rig| {
        let established = [(true, SYN), (false, SYN | ACK), (true, ACK)];
        let (c, vip, backend) = tcp_flow(rig, 1, &established);
        let mut ct = v4_conntrack(rig);
        let keys: Vec<weir_common::CtKey> = ct.keys().map(|k| k.expect("key")).collect();
        assert_eq!(keys.len(), 2, "one flow, two entries");
        for k in &keys {
            let v = ct.get(k, 0).expect("entry");
            ct.insert(k, weir_common::CtValue { seen_s: 0, ..v }, 0)
                .expect("unstamp");
        }
        let mut collector = Collector::open(rig.pin_dir(), TIMEOUTS).expect("open the maps");
        let later = monotonic_now_s() + 1_000;
        assert_eq!(
            collector.pass(later).expect("pass").deleted,
            0,
            "adopted, not expired"
        );
        let flow = Flow {
            name: "unstamped",
            forward: (c, vip),
            reverse: (backend, c),
            proto: PROTO_TCP,
            timeout: TIMEOUTS.tcp_established,
        };
        assert_eq!(present(rig, &flow), (true, true));
        for k in &keys {
            assert_eq!(
                ct.get(k, 0).expect("entry").seen_s,
                later,
                "stamped at the first look"
            );
        }
        let expired = later + TIMEOUTS.tcp_established + 1;
        assert_eq!(
            collector.pass(expired).expect("pass").deleted,
            2,
            "then expired as usual"
        );
        assert_eq!(present(rig, &flow), (false, false));
    });
}

/// The rig's pinned IPv4 conntrack map, opened for reading and rewriting entries.
fn v4_conntrack(
    rig: &Rig,
) -> aya::maps::HashMap<aya::maps::MapData, weir_common::CtKey, weir_common::CtValue> {
    let data = aya::maps::MapData::from_pin(rig.pin_dir().join(weir_common::MAP_CONNTRACK))
        .expect("pinned WEIR_CT");
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).expect("WEIR_CT as a hash map")
}

/// Moves the stamps of every IPv4 conntrack entry `by_s` seconds into the past.
fn age_v4_entries(rig: &Rig, by_s: u32) {
    let mut ct = v4_conntrack(rig);
    let keys: Vec<weir_common::CtKey> = ct.keys().map(|k| k.expect("key")).collect();
    for k in &keys {
        let v = ct.get(k, 0).expect("entry");
        ct.insert(
            k,
            weir_common::CtValue {
                seen_s: v.seen_s - by_s,
                ..v
            },
            0,
        )
        .expect("restamp");
    }
}

/// A client reuses a closed flow's tuple while the collector runs: the walk judged the old pair
/// expired, the new SYN stamps only the forward entry (the backend has not answered yet), and both
/// entries must survive the deletions. Deleting the reverse one would leave the new connection's
/// replies untranslated, a connection stalled until the client gave up (seen in the bench as 1 s stalls
/// at 30k connections/s).
#[test]
fn a_tuple_reused_between_the_walk_and_the_deletions_keeps_both_entries() {
    rig::with_rig(|rig| {
        let closed = [(true, SYN), (false, SYN | ACK), (true, ACK), (true, RST)];
        let (c, vip, backend) = tcp_flow(rig, 3, &closed);
        // An hour idle: expired in any state, and the SYN below stamps a different second.
        age_v4_entries(rig, 3_600);
        let mut collector = Collector::open(rig.pin_dir(), TIMEOUTS).expect("open the maps");
        let plan = collector.plan(monotonic_now_s());
        assert_eq!(
            plan.expired(),
            2,
            "the closed flow's pair is judged expired"
        );

        tcp_flow(rig, 3, &[(true, SYN)]);
        assert_eq!(
            collector.apply(plan).expect("apply").deleted,
            0,
            "the revived flow keeps both entries"
        );
        let flow = Flow {
            name: "reused",
            forward: (c, vip),
            reverse: (backend, c),
            proto: PROTO_TCP,
            timeout: TIMEOUTS.tcp_syn,
        };
        assert_eq!(present(rig, &flow), (true, true));
        // The helper checks that the reply leaves from the ClusterIP.
        tcp_flow(rig, 3, &[(false, SYN | ACK), (true, ACK)]);
    });
}

/// The LRU evicts entries one at a time, so a flow can lose its reverse entry alone. A client's next SYN
/// on the tuple then opens the flow anew, reverse entry included, and the backend's replies are
/// translated again, for a ClusterIP of either family and for a NodePort flow SNATed to a backend on
/// another node. (Forwarded as established, the SYN's reply would leave with the backend's address, or
/// for SNAT, to the node itself.)
#[test]
fn a_syn_on_a_flow_without_its_reverse_entry_records_it_again() {
    rig::with_rig(|rig| {
        let (c, _, backend) = tcp_flow(rig, 4, &[(true, SYN), (false, SYN | ACK)]);
        assert!(rig.forget(backend, c, PROTO_TCP), "the reverse entry alone");
        tcp_flow(rig, 4, &[(true, SYN)]);
        assert_eq!(
            rig.tracked(backend, c, PROTO_TCP),
            Some(weir_common::CT_REVERSE),
            "recorded again by the SYN"
        );
        tcp_flow(rig, 4, &[(false, SYN | ACK), (true, ACK)]);

        let c6 = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 4), 41_004, 0, 0);
        let vip6 = SocketAddrV6::new(ONE_VIP6, 80, 0, 0);
        let backend6 = SocketAddrV6::new(ONE_BACKEND6, BACKEND_PORT, 0, 0);
        assert_eq!(
            run(rig, Prog::Pod, &tcp6(c6, vip6, SYN)).dst,
            backend6.into()
        );
        assert!(rig.forget(backend6.into(), c6.into(), PROTO_TCP));
        assert_eq!(
            run(rig, Prog::Pod, &tcp6(c6, vip6, SYN)).dst,
            backend6.into()
        );
        assert_eq!(
            run(rig, Prog::Pod, &tcp6(backend6, c6, SYN | ACK)).src,
            vip6.into(),
            "the IPv6 reply comes from the ClusterIP"
        );

        let outside = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 4), 41_004);
        let node_port = SocketAddrV4::new(NODE_IP, REMOTE_NODE_PORT);
        let remote = SocketAddrV4::new(REMOTE_BACKEND, BACKEND_PORT);
        let out = run(rig, Prog::Ext, &tcp4(outside, node_port, SYN));
        assert_eq!(out.dst, remote.into(), "to the backend on the other node");
        assert!(
            rig.forget(remote.into(), out.src, PROTO_TCP),
            "its reverse entry alone"
        );
        let again = run(rig, Prog::Ext, &tcp4(outside, node_port, SYN));
        assert_eq!(again.dst, remote.into());
        assert_eq!(again.src.ip(), IpAddr::V4(NODE_IP), "SNATed to the node");
        let SocketAddr::V4(snat) = again.src else {
            panic!("an IPv4 source")
        };
        let reply = run(rig, Prog::Ext, &tcp4(remote, snat, SYN | ACK));
        assert_eq!(
            (reply.src, reply.dst),
            (node_port.into(), outside.into()),
            "the backend's reply goes back to the outside client from the NodePort"
        );
    });
}
