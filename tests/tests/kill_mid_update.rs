//! SIGKILL in the middle of a large update (issue 7, item 5): 5,000 Services appear at once and the
//! agent is killed while programming them. The pinned maps it leaves (which the datapath serves from
//! while no agent runs) hold no half-programmed frontend: every frontend entry names a complete table
//! of live backends. The next agent converges to exactly what the config says.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use weir_common::{
    Backend, MAP_BACKENDS, MAP_MAGLEV, MAP_SERVICES, ServiceKey, ServiceValue, TABLE_CHUNK_SLOTS,
    TableChunk,
};
use weir_tests::scenario::{self, BACKENDS, CLIENT, TCP_PORT};
use weir_tests::yaml::{endpointslice_yaml, service_yaml};
use weir_tests::{Lab, Pod};

const SERVICES: u32 = 5_000;

fn vip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + n)
}

fn big_config(backend: &Pod) -> String {
    let mut text = String::new();
    for n in 0..SERVICES {
        let name = format!("s{n}");
        text.push_str("---\n");
        text.push_str(&service_yaml(
            "default",
            &name,
            &vip(n).to_string(),
            &[("tcp", TCP_PORT.0, "TCP", TCP_PORT.1)],
        ));
        text.push_str("---\n");
        text.push_str(&endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            &name,
            &[("tcp", TCP_PORT.1, "TCP")],
            &[(backend.ip(), true)],
        ));
    }
    text
}

/// Checks that every frontend in the pinned maps is whole; returns the ClusterIP:80 frontends that have
/// a table.
fn check_pins(pins: &Path) -> BTreeSet<Ipv4Addr> {
    let open = |name: &str| MapData::from_pin(pins.join(name)).expect("open pinned map");
    let services: BpfHashMap<_, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(open(MAP_SERVICES))).expect("services");
    let backends: BpfHashMap<_, u32, Backend> =
        BpfHashMap::try_from(Map::HashMap(open(MAP_BACKENDS))).expect("backends");
    let arena: Array<_, TableChunk> = Array::try_from(Map::Array(open(MAP_MAGLEV))).expect("arena");
    let mut served = BTreeSet::new();
    for entry in services.iter() {
        let (k, v) = entry.expect("read WEIR_SERVICES");
        let std::net::IpAddr::V4(ip) = weir_common::ip_of(&k.addr_be) else {
            panic!("an IPv6 frontend in an IPv4-only test: {k:?}");
        };
        if v.table_size == 0 {
            continue;
        }
        for s in 0..v.table_size {
            let chunk = arena
                .get(&(v.table_base + s / TABLE_CHUNK_SLOTS), 0)
                .expect("arena chunk");
            let id = chunk.slots[(s % TABLE_CHUNK_SLOTS) as usize];
            assert!(
                backends.get(&id, 0).is_ok(),
                "{ip}:{} slot {s} of {} names backend {id}, which is not in WEIR_BACKENDS",
                u16::from_be(k.port_be),
                v.table_size
            );
        }
        served.insert(ip);
    }
    served
}

#[test]
fn sigkill_during_a_5000_service_update_leaves_no_half_programmed_frontend() {
    let lab = Lab::new().expect("lab");
    let backend = scenario::add_backend(&lab, BACKENDS[0].0, BACKENDS[0].1).expect("backend");
    let client = lab.add_pod(CLIENT.0, CLIENT.1).expect("client");
    scenario::write_echo_service(&lab, &[&backend]).expect("echo");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let pins = lab.bpffs_dir().expect("pins");

    // All at once (write, then rename into place), then kill while the sync runs.
    let config = big_config(&backend);
    std::fs::write(lab.config_dir().join(".big.tmp"), &config).expect("write");
    std::fs::rename(
        lab.config_dir().join(".big.tmp"),
        lab.config_dir().join("big.yaml"),
    )
    .expect("rename");
    agent
        .wait_for_log("services=5001", Duration::from_secs(20))
        .expect("the agent read the 5,000 Services");
    agent.kill().expect("SIGKILL");
    let served = check_pins(&pins);
    println!(
        "killed with {} of {} ClusterIPs programmed, every one whole",
        served.len(),
        SERVICES + 1
    );
    // The datapath keeps serving what was there without an agent.
    client
        .tcp_request(scenario::cluster_addr(TCP_PORT.0), Duration::from_secs(2))
        .expect("echo answers with no agent running");

    let started = Instant::now();
    let mut agent = lab.start_agent(&[]).expect("restart");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy after restart");
    let want: BTreeSet<Ipv4Addr> = (0..SERVICES)
        .map(vip)
        .chain([scenario::CLUSTER_IP])
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = check_pins(&pins);
        if served == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after restart {} of {} ClusterIPs have a table",
            served.len(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("restarted agent converged in {:?}", started.elapsed());
    for n in [0, SERVICES / 2, SERVICES - 1] {
        client
            .tcp_request(
                SocketAddr::from((vip(n), TCP_PORT.0)),
                Duration::from_secs(2),
            )
            .unwrap_or_else(|e| panic!("s{n} answers after restart: {e}"));
    }
}
