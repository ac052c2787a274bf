//! A flood of new flows (issue 7, item 4): one million distinct new flows through a small LRU
//! conntrack map evict each other, yet established flows that keep sending keep their backend (also
//! after the Service gains backends, which moves about half of all hash choices) and their replies keep
//! being translated back. Run through `BPF_PROG_TEST_RUN` on the agent's own object (`packet::rig`).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Instant;

use weir_agent::datapath::Capacities;
use weir_common::PROTO_TCP;
use weir_tests::packet::frame::{parse_l4, tcp4};
use weir_tests::packet::fuzz::Rng;
use weir_tests::packet::rig::{self, BACKEND_PORT, MANY_BACKENDS, MANY_VIP, Prog, Rig};
use weir_tests::yaml;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
/// Conntrack entries (two a flow): the flood overflows it 250 times.
const CONNTRACK: u32 = 8192;
const FLOOD: usize = 1_000_000;
const ESTABLISHED: usize = 32;
/// Every this many new flows, each established flow sends a packet and gets a reply.
const ROUND: usize = 1_000;
const NEW_BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 14),
    Ipv4Addr::new(10, 244, 0, 15),
    Ipv4Addr::new(10, 244, 0, 16),
];

fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(MANY_VIP, 80)
}

/// Runs a client packet of `client` through the pod program; returns the backend it was sent to.
fn forward(rig: &Rig, client: SocketAddrV4, flags: u8) -> SocketAddrV4 {
    let out = rig
        .run(Prog::Pod, &tcp4(client, vip(), flags))
        .expect("test run");
    let p = parse_l4(&out.frame).expect("an IPv4 TCP frame comes out");
    assert_eq!(p.src, client, "the source is left alone");
    p.dst
}

/// Runs the backend's reply to `client` through the pod program; it must come out from the VIP.
fn reply(rig: &Rig, backend: SocketAddrV4, client: SocketAddrV4) {
    let out = rig
        .run(Prog::Pod, &tcp4(backend, client, ACK))
        .expect("test run");
    let p = parse_l4(&out.frame).expect("an IPv4 TCP frame comes out");
    assert_eq!(
        (p.src, p.dst),
        (vip(), client),
        "the reply of {client}'s flow from {backend} is translated back"
    );
}

#[test]
fn a_million_new_flows_through_a_small_lru_conntrack_do_not_move_established_flows() {
    let caps = Capacities {
        conntrack: CONNTRACK,
        ..Rig::CAPACITIES
    };
    rig::with_rig_caps(caps, |rig| {
        let clients: Vec<SocketAddrV4> = (0..ESTABLISHED)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1 + i as u8), 40_000 + i as u16))
            .collect();
        let backends: Vec<SocketAddrV4> = clients.iter().map(|c| forward(rig, *c, SYN)).collect();
        for (c, b) in clients.iter().zip(&backends) {
            assert!(
                MANY_BACKENDS.contains(b.ip()) && b.port() == BACKEND_PORT,
                "{c} → {b}"
            );
            reply(rig, *b, *c);
        }

        // The Service doubles its backends: new flows now spread over six, so about half of the
        // established flows would hash elsewhere if their conntrack entries were lost.
        let slice = yaml::endpointslice_yaml(
            "fx",
            "many-2",
            "many",
            &[("http", BACKEND_PORT, "TCP")],
            &NEW_BACKENDS.map(|ip| (ip, true)),
        );
        rig.reprogram("many-2.yaml", &slice).expect("add backends");

        let mut rng = Rng::new(0x00f1_00d5);
        let mut new_backends_seen = BTreeSet::new();
        let mut first_flood_flow = None;
        let started = Instant::now();
        for n in 0..FLOOD {
            let r = rng.next_u64();
            let src = SocketAddrV4::new(
                Ipv4Addr::new(10, 0, 1 + (r % 255) as u8, (r >> 8) as u8),
                1024 + ((r >> 16) % 64_000) as u16,
            );
            let b = forward(rig, src, SYN);
            first_flood_flow.get_or_insert(src);
            if NEW_BACKENDS.contains(b.ip()) {
                new_backends_seen.insert(*b.ip());
            }
            if n % ROUND == ROUND - 1 {
                for (c, b) in clients.iter().zip(&backends) {
                    let now = forward(rig, *c, ACK);
                    assert_eq!(
                        now, *b,
                        "established flow {c} moved after {n} new flows (conntrack of {CONNTRACK})"
                    );
                    reply(rig, *b, *c);
                }
            }
        }
        let took = started.elapsed();
        println!(
            "{FLOOD} new flows + {} established packets and replies in {took:?} ({:.0} runs/s)",
            FLOOD / ROUND * ESTABLISHED * 2,
            (FLOOD + FLOOD / ROUND * ESTABLISHED * 2) as f64 / took.as_secs_f64()
        );
        assert_eq!(
            new_backends_seen.len(),
            NEW_BACKENDS.len(),
            "new flows reach the added backends (the table really changed)"
        );
        let first = first_flood_flow.expect("a flood flow");
        assert!(
            rig.conntrack(first, vip(), PROTO_TCP).is_none(),
            "the first flood flow was evicted: the map really overflowed"
        );
        for c in &clients {
            assert!(
                rig.conntrack(*c, vip(), PROTO_TCP).is_some(),
                "{c} kept its entry"
            );
        }
    });
}
