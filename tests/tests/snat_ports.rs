//! SNAT source ports under a flood: outside clients reach a NodePort whose 16 backends live on another
//! node, so every flow leaves with this node's address and a port picked so that the backend's reply
//! names exactly one flow. The flood overflows the LRU conntrack map many times over; the live flows
//! (at most half the map: two entries a flow) use well under half of each backend's 32,768 ports, so
//! the port search must always find one: reply keys whose flow was evicted are reused, and flows that
//! start on the same port do not walk the same candidates (before double hashing, this flood lost
//! 5,405 flows; with stale keys reused but one stride for all flows, 656). Run through
//! `BPF_PROG_TEST_RUN` on the agent's own object (`packet::rig`).

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use weir_agent::datapath::Capacities;
use weir_common::{PROTO_TCP, STAT_DROP_SNAT_EXHAUSTED, STAT_SNAT_NEW};
use weir_tests::packet::frame::{parse, parse_l4, tcp, tcp4};
use weir_tests::packet::fuzz::Rng;
use weir_tests::packet::rig::{
    self, BACKEND_PORT, NODE_IP, NODE_IP6, Prog, REMOTE_BACKEND, REMOTE_BACKEND6, REMOTE_NODE_PORT,
    Rig, TC_ACT_REDIRECT,
};
use weir_tests::yaml::{self, IpFamily};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// Entries (two a flow): 131,072 live flows at most, 8,192 a backend, a quarter of its ports; the
/// reply keys of evicted flows, if never reused, fill up to half.
const CONNTRACK: u32 = 262_144;
/// New flows: the map overflows about eight times.
const FLOOD: usize = 1_000_000;
const BACKENDS: u8 = 16;

#[test]
fn a_flood_to_remote_backends_never_runs_out_of_snat_ports() {
    let caps = Capacities {
        conntrack: CONNTRACK,
        ..Rig::CAPACITIES
    };
    rig::with_rig_caps(caps, |rig| {
        // 15 more backends on the remote node beside REMOTE_BACKEND.
        let more: Vec<(IpAddr, Option<&str>, bool)> = (1..BACKENDS)
            .map(|i| (IpAddr::V4(Ipv4Addr::new(10, 244, 1, 30 + i)), None, true))
            .collect();
        let slice = yaml::endpointslice_yaml_family(
            "fx",
            "remote-2",
            "remote",
            IpFamily::V4,
            &[("http", BACKEND_PORT, "TCP")],
            &more,
        );
        rig.reprogram("remote-2.yaml", &slice)
            .expect("add backends");

        let node_port = SocketAddrV4::new(NODE_IP, REMOTE_NODE_PORT);
        let mut rng = Rng::new(0x05ea_7b0a);
        let before = rig.counters();
        let mut exhausted_at = Vec::new();
        let mut backends = BTreeSet::new();
        let mut clients = HashSet::with_capacity(FLOOD);
        for n in 0..FLOOD {
            // Distinct tuples: a repeated one could still be tracked and not need a port.
            let client = loop {
                let r = rng.next_u64();
                let c = SocketAddrV4::new(
                    Ipv4Addr::new(172, 30, 64 + (r % 128) as u8, (r >> 8) as u8),
                    1024 + ((r >> 16) % 64_000) as u16,
                );
                if clients.insert(c) {
                    break c;
                }
            };
            let out = rig
                .run(Prog::Ext, &tcp4(client, node_port, SYN))
                .expect("test run");
            if out.verdict != TC_ACT_REDIRECT {
                exhausted_at.push(n);
                continue;
            }
            let p = parse_l4(&out.frame).expect("an IPv4 TCP frame comes out");
            assert_eq!(*p.src.ip(), NODE_IP, "{client}'s flow leaves from the node");
            backends.insert(*p.dst.ip());
        }
        let after = rig.counters();
        let delta = |i: u32| after[i as usize] - before[i as usize];
        println!(
            "{FLOOD} flows: {} SNATed, {} without a port (first at {:?}), {} backends",
            delta(STAT_SNAT_NEW),
            delta(STAT_DROP_SNAT_EXHAUSTED),
            exhausted_at.first(),
            backends.len()
        );
        assert_eq!(
            backends.len(),
            usize::from(BACKENDS),
            "every backend is used"
        );
        assert!(backends.contains(&REMOTE_BACKEND));
        assert_eq!(
            delta(STAT_DROP_SNAT_EXHAUSTED),
            0,
            "no flow is dropped for lack of a port (first at flow {:?} of {FLOOD})",
            exhausted_at.first()
        );
        assert_eq!(delta(STAT_SNAT_NEW), FLOOD as u64, "every flow was SNATed");
    });
}

/// The reply key of a flow whose forward entry is gone (evicted) is free again: a new flow can take
/// its port, and the backend's replies on it go to the new flow; while the old flow was live, the
/// port was not handed out.
fn stale_reply_keys_are_reused(
    clients: [SocketAddr; 3],
    node_port: SocketAddr,
    backend: SocketAddr,
) {
    rig::with_rig(|rig| {
        let port = clients[0].port();
        assert!(port >= weir_common::SNAT_PORT_MIN, "a port SNAT may keep");
        let snat = |rig: &Rig, client: SocketAddr| {
            let out = rig
                .run(Prog::Ext, &tcp(client, node_port, SYN))
                .expect("test run");
            assert_eq!(
                out.verdict, TC_ACT_REDIRECT,
                "{client} → {node_port} is forwarded"
            );
            let p = parse(&out.frame).expect("a TCP frame comes out");
            assert_eq!(p.dst, backend, "sent to the remote backend");
            assert_eq!(p.src.ip(), node_port.ip(), "SNATed to the node");
            p.src
        };
        let reply = |rig: &Rig, to: SocketAddr| {
            let out = rig
                .run(Prog::Ext, &tcp(backend, to, SYN | ACK))
                .expect("test run");
            let p = parse(&out.frame).expect("a TCP frame comes out");
            (p.src, p.dst)
        };

        let first = snat(rig, clients[0]);
        assert_eq!(first.port(), port, "the first flow keeps its own port");
        let second = snat(rig, clients[1]);
        assert_ne!(
            second.port(),
            port,
            "a live flow's port is not handed out again"
        );
        assert_eq!(reply(rig, first), (node_port, clients[0]));
        assert_eq!(reply(rig, second), (node_port, clients[1]));

        assert!(
            rig.forget(clients[0], node_port, PROTO_TCP),
            "the first flow's forward entry"
        );
        let third = snat(rig, clients[2]);
        assert_eq!(third.port(), port, "the stale reply key's port is reused");
        assert_eq!(
            reply(rig, third),
            (node_port, clients[2]),
            "replies go to the new flow"
        );
        assert_eq!(
            reply(rig, second),
            (node_port, clients[1]),
            "the other flow is untouched"
        );
    });
}

#[test]
fn stale_reply_keys_are_reused_ipv4() {
    let client = |n| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, n)), 40_000);
    stale_reply_keys_are_reused(
        [client(1), client(2), client(3)],
        SocketAddr::new(NODE_IP.into(), REMOTE_NODE_PORT),
        SocketAddr::new(REMOTE_BACKEND.into(), BACKEND_PORT),
    );
}

#[test]
fn stale_reply_keys_are_reused_ipv6() {
    let client = |n| {
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, n),
            40_000,
            0,
            0,
        ))
    };
    stale_reply_keys_are_reused(
        [client(1), client(2), client(3)],
        SocketAddr::new(NODE_IP6.into(), REMOTE_NODE_PORT),
        SocketAddr::new(REMOTE_BACKEND6.into(), BACKEND_PORT),
    );
}
