//! The `weir` CLI against a real agent: run in the lab's node namespace on the lab's bpffs, it lists the
//! echo Service's frontends, their Maglev slot shares, the client's conntrack entries and the counters; and
//! without the agent it still shows what the pinned maps hold, by address.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value as Json;
use weir_common::{
    MAP_BACKENDS, MAP_CONNTRACK, MAP_MAGLEV, MAP_SERVICE_STATS, MAP_SERVICES, MAP_STATS,
};
use weir_tests::Lab;
use weir_tests::scenario::{self, BACKENDS, CLIENT, CLUSTER_IP, HTTP_PORT, TCP_PORT, UDP_PORT};

const T: Duration = Duration::from_secs(2);

/// The `weir` binary: built with the agent (same package), so it sits next to the agent binary.
fn weir_cli_binary() -> PathBuf {
    let agent = weir_tests::agent_binary().expect("agent binary");
    let cli = agent.with_file_name("weir");
    assert!(
        cli.is_file(),
        "no weir CLI at {}: `cargo build --release -p weir-agent` builds it with the agent",
        cli.display()
    );
    cli
}

/// Runs `ip netns exec <node> weir --bpffs-dir <dir> ARGS` (the agent's /state is on the node's loopback).
fn weir_in(lab: &Lab, bpffs: &Path, args: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", lab.node_netns()])
        .arg(weir_cli_binary())
        .arg("--bpffs-dir")
        .arg(bpffs)
        .args(args)
        .output()
        .expect("run weir")
}

fn weir(lab: &Lab, args: &[&str]) -> Output {
    weir_in(lab, &lab.bpffs_dir().expect("bpffs"), args)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `weir ARGS -o json`, which must succeed; returns the document and stderr.
fn weir_json(lab: &Lab, args: &[&str]) -> (Json, String) {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let out = weir(lab, &all);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "weir {all:?} failed ({}):\n{stderr}",
        out.status
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "weir {all:?}: stdout is not JSON ({e}):\n{}",
            text(&out.stdout)
        )
    });
    (json, stderr)
}

fn str_of<'a>(v: &'a Json, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

fn u64_of(v: &Json, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// The standard Service's frontends: port → (protocol, port name, backend port).
fn echo_frontends() -> BTreeMap<u16, (&'static str, &'static str, u16)> {
    BTreeMap::from([
        (TCP_PORT.0, ("TCP", "tcp", TCP_PORT.1)),
        (UDP_PORT.0, ("UDP", "udp", UDP_PORT.1)),
        (HTTP_PORT.0, ("TCP", "http", HTTP_PORT.1)),
    ])
}

fn backend_addrs(port: u16) -> BTreeSet<String> {
    BACKENDS
        .iter()
        .map(|(_, ip)| format!("{}:{port}", std::net::Ipv4Addr::from(*ip)))
        .collect()
}

fn echo_rows(list: &Json) -> Vec<&Json> {
    list["frontends"]
        .as_array()
        .expect("frontends array")
        .iter()
        .filter(|f| f["ip"] == CLUSTER_IP.to_string())
        .collect()
}

#[test]
fn weir_shows_services_slot_shares_conntrack_and_counters() {
    let lab = Lab::new().expect("lab");
    let (_backends, client, _agent) = scenario::start_standard(&lab).expect("standard scene");

    // service list: the three frontends of default/echo, named by the agent, each with 3 backends.
    let (list, stderr) = weir_json(&lab, &["service", "list"]);
    assert!(!stderr.contains("warning"), "{stderr}");
    assert_eq!(list["names_from_agent"], true, "{list}");
    let rows = echo_rows(&list);
    let wanted = echo_frontends();
    assert_eq!(rows.len(), wanted.len(), "echo frontends: {list}");
    for row in rows {
        let port = u16::try_from(u64_of(row, "port")).expect("port");
        let (protocol, port_name, _) = wanted
            .get(&port)
            .unwrap_or_else(|| panic!("unexpected frontend {row}"));
        assert_eq!(str_of(row, "protocol"), *protocol, "{row}");
        assert_eq!(str_of(row, "service"), "default/echo", "{row}");
        assert_eq!(str_of(row, "port_name"), *port_name, "{row}");
        assert_eq!(u64_of(row, "backend_count"), 3, "{row}");
        assert_eq!(row["reject"], false, "{row}");
        assert!(row["table_base"].is_u64(), "{row}");
        assert!(u64_of(row, "table_size") > 0, "{row}");
    }
    // The same, for people.
    let out = weir(&lab, &["service", "list"]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(
        table.starts_with("SERVICE")
            && table.contains("default/echo")
            && table.contains("10.96.0.10:80/TCP"),
        "{table}"
    );

    // service get: every frontend's table splits evenly over the three backends.
    let (detail, _) = weir_json(&lab, &["service", "get", "default/echo"]);
    let frontends = detail["frontends"].as_array().expect("frontends");
    assert_eq!(frontends.len(), 3, "{detail}");
    for f in frontends {
        let port = u16::try_from(u64_of(f, "port")).expect("port");
        let (_, _, backend_port) = wanted[&port];
        assert_eq!(f["programmed"], true, "{f}");
        assert!(f["error"].is_null(), "{f}");
        let backends = f["backends"].as_array().expect("backends");
        let addrs: BTreeSet<String> = backends
            .iter()
            .map(|b| str_of(b, "address").to_owned())
            .collect();
        assert_eq!(addrs, backend_addrs(backend_port), "{f}");
        let slots: u64 = backends.iter().map(|b| u64_of(b, "slots")).sum();
        assert_eq!(
            slots,
            u64_of(f, "table_size"),
            "every slot names a backend: {f}"
        );
        assert_eq!(slots, u64_of(f, "slots_read"), "{f}");
        let shares: Vec<f64> = backends
            .iter()
            .map(|b| b["share_percent"].as_f64().expect("share"))
            .collect();
        let total: f64 = shares.iter().sum();
        assert!((total - 100.0).abs() < 0.01, "shares sum to {total}: {f}");
        for share in shares {
            // Maglev gives each backend ⌊M/N⌋ or ⌈M/N⌉ of M ≥ 1000 slots.
            assert!((share - 100.0 / 3.0).abs() < 0.5, "share {share}: {f}");
        }
    }

    // conntrack list: each of the client's flows has a forward and a reverse entry.
    let client_ip = std::net::Ipv4Addr::from(CLIENT.1).to_string();
    let frontend = scenario::cluster_addr(TCP_PORT.0).to_string();
    for _ in 0..5 {
        client
            .tcp_request(scenario::cluster_addr(TCP_PORT.0), T)
            .expect("connection through the ClusterIP");
    }
    let (ct, _) = weir_json(&lab, &["conntrack", "list"]);
    let entries = ct["entries"].as_array().expect("entries");
    let ip_of = |addr: &str| {
        addr.rsplit_once(':')
            .map(|(ip, _)| ip.to_owned())
            .unwrap_or_default()
    };
    let forward: Vec<&Json> = entries
        .iter()
        .filter(|e| e["direction"] == "forward" && ip_of(str_of(e, "src")) == client_ip)
        .collect();
    let reverse: Vec<&Json> = entries
        .iter()
        .filter(|e| e["direction"] == "reverse" && ip_of(str_of(e, "dst")) == client_ip)
        .collect();
    assert!(forward.len() >= 5, "forward entries of {client_ip}: {ct}");
    assert!(reverse.len() >= 5, "reverse entries of {client_ip}: {ct}");
    let backends = backend_addrs(TCP_PORT.1);
    for f in &forward {
        assert_eq!(str_of(f, "dst"), frontend, "{f}");
        assert!(
            backends.contains(str_of(f, "nat")),
            "translated to a backend: {f}"
        );
        assert_eq!(str_of(f, "service"), "default/echo", "{f}");
        assert!(
            reverse.iter().any(|r| r["dst"] == f["src"]
                && r["src"] == f["nat"]
                && r["nat"] == f["dst"]
                && r["backend_id"] == f["backend_id"]),
            "no reverse entry for {f}"
        );
    }
    assert_eq!(ct["truncated"], false);
    let out = weir(&lab, &["conntrack", "list", "--limit", "1", "-o", "json"]);
    assert!(out.status.success());
    let limited: Json = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(limited["shown"], 1, "{limited}");
    assert_eq!(limited["truncated"], true, "{limited}");
    assert!(
        text(&out.stderr).contains("showing 1 of"),
        "{}",
        text(&out.stderr)
    );

    // stats: new flows were counted, and every map reports its fill.
    let (stats, _) = weir_json(&lab, &["stats"]);
    assert!(u64_of(&stats["counters"], "forward_new") >= 5, "{stats}");
    assert!(u64_of(&stats["counters"], "reverse_nat") > 0, "{stats}");
    let maps: BTreeMap<&str, &Json> = stats["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .map(|m| (str_of(m, "name"), m))
        .collect();
    for name in [
        MAP_SERVICES,
        MAP_MAGLEV,
        MAP_BACKENDS,
        MAP_CONNTRACK,
        MAP_STATS,
        MAP_SERVICE_STATS,
    ] {
        let m = maps
            .get(name)
            .unwrap_or_else(|| panic!("no fill for {name}: {stats}"));
        assert!(u64_of(m, "max_entries") > 0, "{m}");
    }
    assert!(u64_of(maps[MAP_SERVICES], "entries") >= 3, "{stats}");
    assert!(u64_of(maps[MAP_MAGLEV], "entries") >= 3, "{stats}");
    assert!(u64_of(maps[MAP_BACKENDS], "entries") >= 3, "{stats}");
    assert!(u64_of(maps[MAP_CONNTRACK], "entries") >= 10, "{stats}");
}

#[test]
fn without_the_agent_weir_shows_addresses_and_errors_are_clear() {
    let lab = Lab::new().expect("lab");
    let (_backends, _client, mut agent) = scenario::start_standard(&lab).expect("standard scene");
    // SIGTERM detaches the programs; the maps stay pinned, which is all the CLI reads.
    agent.stop().expect("agent stops");

    let (list, stderr) = weir_json(&lab, &["service", "list"]);
    assert!(
        stderr.contains("warning: no names from the agent")
            && stderr.contains("showing addresses only"),
        "{stderr}"
    );
    assert_eq!(list["names_from_agent"], false);
    let rows = echo_rows(&list);
    assert_eq!(rows.len(), 3, "{list}");
    assert!(rows.iter().all(|r| r["service"].is_null()), "{list}");

    // A frontend address needs no names.
    let (detail, _) = weir_json(&lab, &["service", "get", "10.96.0.10:80/TCP"]);
    let frontends = detail["frontends"].as_array().expect("frontends");
    assert_eq!(frontends.len(), 1, "{detail}");
    assert_eq!(frontends[0]["backends"].as_array().map(Vec::len), Some(3));

    // A Service name does; the error says what to do instead.
    let out = weir(&lab, &["service", "get", "default/echo"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr)
            .contains("weir: error: cannot find Service default/echo without the agent's names"),
        "{}",
        text(&out.stderr)
    );

    // Bad input fails with a message and exit code 1 (clap's usage errors: 2), never a panic (101).
    let missing = Path::new("/run/weir-tests/no-such-dir");
    let out = weir_in(&lab, missing, &["service", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(
            "bpffs dir /run/weir-tests/no-such-dir does not exist: is the agent running with --bpffs-dir \
             /run/weir-tests/no-such-dir?"
        ),
        "{}",
        text(&out.stderr)
    );
    let out = weir_in(&lab, lab.config_dir(), &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("has no WEIR_STATS map: is the agent running with --bpffs-dir"),
        "{}",
        text(&out.stderr)
    );
    let out = weir(&lab, &["service", "get", "nonsense"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("neither NAMESPACE/NAME nor"),
        "{}",
        text(&out.stderr)
    );
    let out = weir(&lab, &["stats", "-o", "yaml"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
