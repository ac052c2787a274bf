//! Hostile objects (issue 7, item 3): adversarial and randomly generated Services, EndpointSlices and
//! HTTPRoutes through the real file reader, decoder and validation. Every document is either refused
//! with an error naming file, document, object and field, or programmed as written; nothing panics, and
//! the objects of a good file stay whatever the other files hold.
use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Instant,
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::*;
use crate::model::{DesiredCache, NodeContext, Protocol};
use crate::reconcile::{MapError, MapWriter, Reconciler};
use weir_common::{Backend, ServiceKey, ServiceValue};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-hostile-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn service(name: &str, ip: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {ip}\n  ports: {ports}\n"
    )
}

fn slice(name: &str, svc: &str, ports: &str, addresses: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, \
         namespace: default, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\n\
         ports: {ports}\nendpoints: [{{addresses: {addresses}}}]\n"
    )
}

const GOOD: &str = "[{name: http, port: 80, protocol: TCP}]";
const GOOD_SLICE: &str = "[{name: http, port: 8080, protocol: TCP}]";

/// A valid Service `keep` (10.96.0.1:80 → 10.0.0.1:8080) that every test expects to survive.
fn write_keep(dir: &Path) {
    let text = format!(
        "{}---\n{}",
        service("keep", "10.96.0.1", GOOD),
        slice("keep-1", "keep", GOOD_SLICE, "[10.0.0.1]")
    );
    fs::write(dir.join("00-keep.yaml"), text).expect("write keep");
}

fn assert_keep(snap: &Snapshot) {
    let keep = NsName {
        namespace: "default".into(),
        name: "keep".into(),
    };
    let spec = snap
        .services
        .get(&keep)
        .expect("the good Service is still there");
    assert_eq!(spec.cluster_ips, [Ipv4Addr::new(10, 96, 0, 1)]);
    let node = NodeContext::default();
    let (desired, _) = DesiredCache::default().update(snap, &node);
    let f = crate::model::Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 1).into(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let backends: Vec<String> = desired
        .frontends
        .get(&f)
        .expect("keep's frontend")
        .backends
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(backends, ["10.0.0.1:8080/TCP"]);
}

/// One file `bad.yaml` beside the good one: the errors of the reload, and the snapshot.
fn load_bad(dir: &Path, bytes: &[u8]) -> (Snapshot, Vec<String>) {
    fs::write(dir.join("bad.yaml"), bytes).expect("write bad.yaml");
    let result = ConfigDir::new(dir).reload().expect("dir readable");
    assert_keep(&result.0);
    result
}

/// Frontends (`ip:port/PROTO`) the document must add, or the substrings its one error must hold.
type Expect = Result<Vec<&'static str>, Vec<&'static str>>;

#[test]
fn adversarial_objects_are_refused_naming_file_object_and_field_or_programmed_as_written() {
    let dir = temp_dir("table");
    write_keep(&dir);
    let long = |n: usize| "a".repeat(n);
    // (what, document, Ok(frontends as "ip:port/PROTO") | Err(substrings every error must hold)).
    let svc63 = format!("s{}", long(62));
    let slice253 = format!("{}.{}.{}.{}", long(63), long(63), long(63), long(61));
    let cases: Vec<(&str, String, Expect)> =
        vec![
        (
            "bad IPv4",
            service("a", "10.96.0.300", GOOD),
            Err(vec!["Service default/a", "spec.clusterIP", "10.96.0.300"]),
        ),
        (
            "CIDR as IP",
            service("a", "10.96.0.2/24", GOOD),
            Err(vec!["spec.clusterIP", "invalid IP"]),
        ),
        (
            "dual-stack: both families are served",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: fd00::2\n  \
             clusterIPs: [fd00::2, 10.96.0.2]\n  ports: [{port: 80}]\n"
                .to_owned(),
            Ok(vec!["10.96.0.2:80/TCP", "[fd00::2]:80/TCP"]),
        ),
        (
            "bad second family",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  \
             clusterIPs: [10.96.0.2, 'fd00::zz']\n  ports: [{port: 80}]\n"
                .to_owned(),
            Err(vec!["spec.clusterIPs[1]", "fd00::zz"]),
        ),
        (
            "port 0",
            service("a", "10.96.0.2", "[{port: 0}]"),
            Err(vec!["spec.ports[0].port", "outside 1-65535"]),
        ),
        (
            "port 65536",
            service("a", "10.96.0.2", "[{name: a, port: 80}, {name: b, port: 65536}]"),
            Err(vec!["spec.ports[1].port", "65536"]),
        ),
        (
            "negative port",
            service("a", "10.96.0.2", "[{port: -80}]"),
            Err(vec!["spec.ports[0].port", "-80"]),
        ),
        (
            "port beyond i32",
            service("a", "10.96.0.2", "[{port: 4294967376}]"),
            Err(vec!["spec.ports[0].port"]),
        ),
        (
            "port as text",
            service("a", "10.96.0.2", "[{port: http}]"),
            Err(vec!["spec.ports[0].port"]),
        ),
        (
            "nodePort 65536",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  type: NodePort\n  \
             clusterIP: 10.96.0.2\n  ports: [{port: 80, nodePort: 65536}]\n"
                .to_owned(),
            Err(vec!["spec.ports[0].nodePort"]),
        ),
        (
            "duplicate port",
            service("a", "10.96.0.2", "[{name: a, port: 80}, {name: b, port: 80}]"),
            Err(vec!["spec.ports[1].port", "duplicate port 80/TCP"]),
        ),
        (
            "same port, other protocol",
            service(
                "a",
                "10.96.0.2",
                "[{name: a, port: 53, protocol: TCP}, {name: b, port: 53, protocol: UDP}]",
            ),
            Ok(vec!["10.96.0.2:53/TCP", "10.96.0.2:53/UDP"]),
        ),
        (
            "unknown protocol",
            service("a", "10.96.0.2", "[{port: 80, protocol: QUIC}]"),
            Err(vec!["spec.ports[0].protocol"]),
        ),
        (
            "unknown fields are ignored, as the API's non-strict decoding does",
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, bogus: 1}\nspec:\n  \
             clusterIP: 10.96.0.2\n  frobnicate: {x: [1, 2]}\n  ports: [{port: 80, extra: y}]\n"
                .to_owned(),
            Ok(vec!["10.96.0.2:80/TCP"]),
        ),
        (
            "Service name at the 63-byte limit",
            service(&svc63, "10.96.0.2", GOOD),
            Ok(vec!["10.96.0.2:80/TCP"]),
        ),
        (
            "Service name over the limit",
            service(&format!("s{}", long(63)), "10.96.0.2", GOOD),
            Err(vec!["metadata.name", "64 bytes", "DNS-1035"]),
        ),
        (
            "Service name with capitals",
            service("Echo", "10.96.0.2", GOOD),
            Err(vec!["metadata.name", "DNS-1035"]),
        ),
        (
            "namespace over the limit",
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a, namespace: {}}}\nspec: \
                 {{clusterIP: 10.96.0.2, ports: [{{port: 80}}]}}\n",
                long(64)
            ),
            Err(vec!["metadata.namespace", "DNS-1123"]),
        ),
        (
            "missing name",
            "apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {clusterIP: 10.96.0.2}\n"
                .to_owned(),
            Err(vec!["metadata.name", "missing"]),
        ),
        (
            "slice name at the 253-byte limit",
            slice(&slice253, "x", GOOD_SLICE, "[10.0.0.2]"),
            Ok(vec![]),
        ),
        (
            "slice name over the limit",
            slice(&format!("{slice253}a"), "x", GOOD_SLICE, "[10.0.0.2]"),
            Err(vec!["EndpointSlice", "metadata.name", "254 bytes"]),
        ),
        (
            "bad endpoint address",
            slice("x-1", "x", GOOD_SLICE, "[10.0.0.2, 10.0.0.256]"),
            Err(vec!["EndpointSlice default/x-1", "endpoints[0].addresses[1]"]),
        ),
        (
            "IPv6 address in an IPv4 slice",
            slice("x-1", "x", GOOD_SLICE, "['fd00::1']"),
            Err(vec!["endpoints[0].addresses[0]", "fd00::1"]),
        ),
        (
            "slice port 0",
            slice("x-1", "x", "[{port: 0}]", "[10.0.0.2]"),
            Err(vec!["ports[0].port", "outside 1-65535"]),
        ),
        (
            "slice port 65536",
            slice("x-1", "x", "[{port: 65536}]", "[10.0.0.2]"),
            Err(vec!["ports[0].port"]),
        ),
        (
            "unknown address type",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: x-1, labels: \
             {kubernetes.io/service-name: x}}\naddressType: IPv7\nendpoints: []\n"
                .to_owned(),
            Err(vec!["addressType", "IPv7"]),
        ),
        (
            "HTTPRoute with a bad port type",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n\
             spec:\n  parentRefs: [{kind: Service, name: keep, port: many}]\n"
                .to_owned(),
            Err(vec!["HTTPRoute default/r", "spec.parentRefs[0].port"]),
        ),
        (
            "HTTPRoute name over the limit",
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: \
                 {}}}\nspec: {{}}\n",
                long(254)
            ),
            Err(vec!["HTTPRoute", "metadata.name", "…"]),
        ),
    ];
    let bad = dir.join("bad.yaml");
    let mut failures = Vec::new();
    for (what, doc, expected) in &cases {
        let (snap, errors) = load_bad(&dir, doc.as_bytes());
        match expected {
            Err(needles) => {
                let ok = errors.len() == 1
                    && errors[0].contains(&bad.display().to_string())
                    && errors[0].contains("document 0")
                    && needles.iter().all(|n| errors[0].contains(n));
                if !ok {
                    failures.push(format!(
                        "{what}: expected one error with {needles:?}, got {errors:?}"
                    ));
                }
                if snap.services.len() != 1 {
                    failures.push(format!(
                        "{what}: refused, yet {} Services",
                        snap.services.len()
                    ));
                }
            }
            Ok(frontends) => {
                if !errors.is_empty() {
                    failures.push(format!("{what}: expected success, got {errors:?}"));
                    continue;
                }
                let (desired, _) = DesiredCache::default().update(&snap, &NodeContext::default());
                let got: BTreeSet<String> = desired
                    .frontends
                    .keys()
                    // Port 0: the "any other port" entries every ClusterIP gets.
                    .filter(|f| f.port != 0)
                    .map(ToString::to_string)
                    .filter(|f| !f.starts_with("10.96.0.1:"))
                    .collect();
                let want: BTreeSet<String> = frontends.iter().map(|s| (*s).to_owned()).collect();
                if got != want {
                    failures.push(format!("{what}: frontends {got:?}, expected {want:?}"));
                }
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn yaml_bombs_deep_nesting_huge_files_and_non_utf8_are_refused_quickly_and_keep_the_rest() {
    let dir = temp_dir("bombs");
    write_keep(&dir);
    // Billion laughs: nine levels of nine aliases each, 9^9 nodes if expanded.
    let mut lol = String::from("a0: &a0 [lol]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        lol.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let lol_service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: lol}}\n{lol}spec: {{clusterIP: 10.96.0.9}}\n"
    );
    let deep_flow = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_block: String = (0..5_000)
        .map(|i| format!("{}- \n", "  ".repeat(i)))
        .collect();
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "billion laughs",
            lol_service.into_bytes(),
            "repetition limit exceeded",
        ),
        (
            "100,000 nested flow sequences",
            deep_flow.into_bytes(),
            "recursion limit exceeded",
        ),
        (
            "5,000 nested block sequences",
            deep_block.into_bytes(),
            "recursion limit exceeded",
        ),
        (
            "non-UTF-8 bytes in a name",
            b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n".to_vec(),
            "not UTF-8 (invalid byte at offset 49)",
        ),
        ("a NUL byte", b"apiVersion: v1\x00\n".to_vec(), "bad.yaml"),
    ];
    for (what, bytes, needle) in cases {
        let started = Instant::now();
        let (snap, errors) = load_bad(&dir, &bytes);
        let took = started.elapsed();
        assert!(
            errors.len() == 1 && errors[0].contains("bad.yaml") && errors[0].contains(needle),
            "{what}: expected one error naming bad.yaml with {needle:?}, got {errors:?}"
        );
        assert_eq!(snap.services.len(), 1, "{what}");
        assert!(took.as_secs() < 5, "{what}: took {took:?}");
        println!(
            "{what}: refused in {took:?}: {}",
            errors[0].chars().take(200).collect::<String>()
        );
    }

    // A file over the size limit is refused without being read (a sparse file: no disk used).
    let huge = dir.join("huge.yaml");
    let f = fs::File::create(&huge).expect("create huge.yaml");
    f.set_len(MAX_FILE_BYTES + 1).expect("size huge.yaml");
    fs::remove_file(dir.join("bad.yaml")).expect("remove bad.yaml");
    let (snap, errors) = ConfigDir::new(&dir).reload().expect("dir readable");
    assert_keep(&snap);
    assert!(
        errors.len() == 1 && errors[0].contains("huge.yaml") && errors[0].contains("limit"),
        "{errors:?}"
    );

    // A broken file keeps its last good objects: good, then a bomb in the same file.
    fs::remove_file(&huge).expect("remove huge.yaml");
    let mut config = ConfigDir::new(&dir);
    fs::write(dir.join("b.yaml"), service("b", "10.96.0.3", GOOD)).expect("write b");
    let (snap, errors) = config.reload().expect("dir readable");
    assert!(errors.is_empty() && snap.services.len() == 2, "{errors:?}");
    fs::write(
        dir.join("b.yaml"),
        format!(
            "{}{}",
            service("b", "10.96.0.3", GOOD),
            "x: ".repeat(3) + &"[".repeat(10_000)
        ),
    )
    .expect("break b");
    let (snap, errors) = config.reload().expect("dir readable");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        snap.services.keys().any(|k| k.name == "b"),
        "b keeps its last good version"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Interesting values for the generator: each with whether it is valid.
const IPS: [(&str, bool); 14] = [
    ("10.96.0.7", true),
    ("10.96.1.8", true),
    ("0.0.0.0", true),
    ("255.255.255.255", true),
    ("10.96.0.256", false),
    ("10.96.0", false),
    ("010.96.0.7", false),
    ("''", false),
    ("'10.96.0.7 '", false),
    ("fd00::7", true),
    ("2001:db8::96:8", true),
    ("10.96.2.9", true),
    // IPv4-mapped: refused (never on the wire; to the datapath it is 10.96.0.7 itself).
    ("'::ffff:10.96.0.7'", false),
    ("x", false),
];
const PORTS: [(&str, bool); 10] = [
    ("1", true),
    ("80", true),
    ("65535", true),
    ("0", false),
    ("65536", false),
    ("-1", false),
    ("2147483648", false),
    ("'80'", false),
    ("8.5", false),
    ("null", false),
];

fn pick<T: Copy>(rng: &mut StdRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// A random Service: its text and, when every part of it is valid, the frontends it must produce.
fn random_service(rng: &mut StdRng, n: usize) -> (String, Option<BTreeSet<String>>) {
    let (ip, ip_ok) = pick(rng, &IPS);
    let mut valid = ip_ok;
    let mut frontends = BTreeSet::new();
    let mut ports = Vec::new();
    let mut seen = BTreeSet::new();
    for i in 0..rng.random_range(0..4) {
        let (port, port_ok) = pick(rng, &PORTS);
        let proto = pick(rng, &["TCP", "UDP", "SCTP"]);
        valid &= port_ok && proto != "SCTP";
        if port_ok && !seen.insert((port, proto)) {
            valid = false;
        }
        ports.push(format!("{{name: p{i}, port: {port}, protocol: {proto}}}"));
        if let (Ok(ip), Ok(port)) = (ip.parse::<IpAddr>(), port.parse::<u16>()) {
            frontends.insert(format!("{}/{proto}", std::net::SocketAddr::new(ip, port)));
        }
    }
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: default}}\nspec:\n  \
         clusterIP: {ip}\n  ports: [{}]\n",
        ports.join(", ")
    );
    if rng.random_bool(0.2) {
        text.push_str(&format!("  unknownField{n}: {{deep: [1, {{x: y}}]}}\n"));
    }
    (text, valid.then_some(frontends))
}

/// Flips, inserts or deletes a few bytes (the result may not be UTF-8 or YAML at all).
fn mutate(rng: &mut StdRng, text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.random_range(0..bytes.len());
        match rng.random_range(0..3) {
            0 => bytes[at] = rng.random(),
            1 => bytes.insert(at, pick(rng, b"{}[]:-&*!|>'\"#\n\t \xff0")),
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

#[test]
fn random_and_mutated_objects_are_refused_with_a_named_error_or_programmed_as_written() {
    let seed = std::env::var("WEIR_OBJECT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x005e_ed73);
    println!("seed {seed} (WEIR_OBJECT_FUZZ_SEED replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = temp_dir("random");
    write_keep(&dir);
    let bad = dir.join("bad.yaml").display().to_string();
    let (mut accepted, mut refused, mut mutated) = (0, 0, 0);
    for n in 0..3_000 {
        let (text, expected) = random_service(&mut rng, n);
        let mutate_it = rng.random_bool(0.3);
        let bytes = if mutate_it {
            mutated += 1;
            mutate(&mut rng, &text)
        } else {
            text.clone().into_bytes()
        };
        let (snap, errors) = load_bad(&dir, &bytes);
        for e in &errors {
            assert!(
                e.contains(&bad),
                "case {n}: error does not name the file: {e}\n{text}"
            );
            // An object error names the object and a field; a file error says what is wrong.
            assert!(
                e.contains("document") || e.contains("UTF-8"),
                "case {n}: error without a document: {e}"
            );
        }
        let id = NsName {
            namespace: "default".into(),
            name: format!("s{n}"),
        };
        if mutate_it {
            // A mutation may keep the object valid: then what is served must come from the text.
            if let Some(spec) = snap.services.get(&id) {
                assert!(
                    spec.ports.iter().all(|p| p.port != 0),
                    "case {n}: port 0 served"
                );
            }
        } else {
            match &expected {
                Some(frontends) => {
                    assert!(
                        errors.is_empty(),
                        "case {n}: refused a valid object: {errors:?}\n{text}"
                    );
                    let (desired, _) =
                        DesiredCache::default().update(&snap, &NodeContext::default());
                    let got: BTreeSet<String> = desired
                        .frontends
                        .keys()
                        .filter(|f| f.port != 0)
                        .map(ToString::to_string)
                        .filter(|f| !f.starts_with("10.96.0.1:"))
                        .collect();
                    assert_eq!(&got, frontends, "case {n}:\n{text}");
                }
                None => {
                    assert!(
                        errors.len() == 1 && errors[0].contains(&format!("Service default/s{n}")),
                        "case {n}: an invalid object must be refused by name: {errors:?}\n{text}"
                    );
                    assert!(!snap.services.contains_key(&id), "case {n}: served anyway");
                }
            }
        }
        if snap.services.contains_key(&id) {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    println!("3000 objects ({mutated} mutated): {accepted} accepted, {refused} refused");
    assert!(
        accepted > 300 && refused > 300,
        "the generator must exercise both sides"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn random_httproutes_never_panic_and_name_the_failing_field() {
    let mut rng = StdRng::seed_from_u64(7);
    let ports = ["80", "1", "65535", "0", "65536", "-1", "x"];
    let path_types = ["PathPrefix", "Exact", "RegularExpression", "Bogus"];
    let paths = ["/", "/a", "''", "'/a b'", "x", "'(('", "'/a//b'", "'/%zz'"];
    let header_names = ["X-A", "''", "'bad name'", "'x:y'"];
    let weights = ["1", "0", "-1", "1000001", "2147483648"];
    let timeouts = ["10s", "'0s'", "'-1s'", "'1h2x'", "'99999h'", "''"];
    let mut outcomes = [0usize; 3];
    for n in 0..3_000 {
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{n}}}\n\
             spec:\n  parentRefs: [{{kind: Service, name: keep, port: {}}}]\n  rules:\n  - matches: \
             [{{path: {{type: {}, value: {}}}, headers: [{{name: {}, value: v}}]}}]\n    \
             backendRefs: [{{name: keep, port: {}, weight: {}}}]\n    timeouts: {{request: {}}}\n",
            pick(&mut rng, &ports),
            pick(&mut rng, &path_types),
            pick(&mut rng, &paths),
            pick(&mut rng, &header_names),
            pick(&mut rng, &ports),
            pick(&mut rng, &weights),
            pick(&mut rng, &timeouts),
        );
        let outcome = match crate::l7::route::http_route_from_yaml(&text) {
            Err(e) => {
                assert!(
                    !e.field.is_empty() || e.message.contains("YAML"),
                    "{e:?}\n{text}"
                );
                0
            }
            Ok(route) => match crate::l7::Route::from_k8s(&route) {
                Err(e) => {
                    assert!(
                        e.to_string()
                            .contains(&format!("HTTPRoute default/r{n}: spec.")),
                        "error must name route and field: {e}\n{text}"
                    );
                    1
                }
                Ok(route) => {
                    // Problems that do not invalidate the whole route are warnings, each naming a field.
                    for w in route.iter().flat_map(|r| &r.warnings) {
                        assert!(
                            w.field.starts_with("spec."),
                            "warning without a field: {w:?}\n{text}"
                        );
                    }
                    2
                }
            },
        };
        outcomes[outcome] += 1;
    }
    println!("3000 HTTPRoutes: {outcomes:?} (undecodable, invalid, valid or with warnings)");
    assert!(outcomes[0] > 0 && outcomes[2] > 0, "{outcomes:?}");
}

/// Map writer with the kernel's behaviour at capacity: inserting a new key into a full map fails.
#[derive(Default)]
struct BoundedMaps {
    services: std::collections::HashMap<ServiceKey, ServiceValue>,
    max_services: usize,
    chunks: u32,
}

impl MapWriter for BoundedMaps {
    fn put_backend(&mut self, _: u32, _: Backend) -> Result<(), MapError> {
        Ok(())
    }
    fn delete_backend(&mut self, _: u32) -> Result<(), MapError> {
        Ok(())
    }
    fn arena_chunks(&self) -> u32 {
        self.chunks
    }
    fn put_table(&mut self, _: u32, _: &[u32], _: &[u32]) -> Result<(), MapError> {
        Ok(())
    }
    fn table_equals(&mut self, _: u32, _: &[u32]) -> bool {
        false
    }
    fn delete_table(&mut self, _: u32) -> Result<(), MapError> {
        Ok(())
    }
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        if !self.services.contains_key(&key) && self.services.len() >= self.max_services {
            return Err(MapError {
                map: weir_common::MAP_SERVICES,
                op: "insert",
                message: "Argument list too long (os error 7)".into(),
            });
        }
        self.services.insert(key, value);
        Ok(())
    }
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        self.services.remove(&key);
        Ok(())
    }
    fn put_source_range(&mut self, _: ServiceKey, _: (IpAddr, u8)) -> Result<(), MapError> {
        Ok(())
    }
    fn delete_source_range(&mut self, _: ServiceKey, _: (IpAddr, u8)) -> Result<(), MapError> {
        Ok(())
    }
    fn purge_flows(&mut self, _: &BTreeSet<ServiceKey>) -> Result<usize, MapError> {
        Ok(0)
    }
}

#[test]
fn a_hundred_thousand_services_and_a_ten_thousand_endpoint_slice_parse_and_program_or_are_refused()
{
    let dir = temp_dir("100k");
    // 100 files of 1,000 Services, each with a one-endpoint slice.
    let started = Instant::now();
    let mut bytes = 0;
    for f in 0..100 {
        let mut text = String::new();
        for i in 0..1_000 {
            let n = f * 1_000 + i;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + n as u32);
            let ep = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + n as u32);
            text.push_str(&service(&format!("s{n}"), &ip.to_string(), GOOD));
            text.push_str("---\n");
            text.push_str(&slice(
                &format!("s{n}-1"),
                &format!("s{n}"),
                GOOD_SLICE,
                &format!("[{ep}]"),
            ));
            text.push_str("---\n");
        }
        bytes += text.len();
        fs::write(dir.join(format!("f{f:03}.yaml")), text).expect("write");
    }
    let written = started.elapsed();
    let started = Instant::now();
    let (snap, errors) = ConfigDir::new(&dir).reload().expect("dir readable");
    let parsed = started.elapsed();
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(3)]);
    assert_eq!((snap.services.len(), snap.slices.len()), (100_000, 100_000));
    let started = Instant::now();
    let (desired, _) = DesiredCache::default().update(&snap, &NodeContext::default());
    let computed = started.elapsed();
    // Each Service: its port, and the "any other port" entries of its ClusterIP (TCP and UDP).
    assert_eq!(desired.frontends.len(), 300_000);

    // The default frontend map (65,536 entries) cannot hold them: the rest are refused, counted as errors.
    let capacity = weir_common::DEFAULT_SERVICES_MAX as usize;
    let maps = BoundedMaps {
        max_services: capacity,
        chunks: 100_000 * 4 + 64,
        ..BoundedMaps::default()
    };
    let mut reconciler = Reconciler::new(maps);
    let started = Instant::now();
    let report = reconciler.sync(&desired);
    let synced = started.elapsed();
    assert_eq!(report.frontends_written, capacity);
    assert_eq!(report.errors, 300_000 - capacity);
    assert_eq!(reconciler.programmed_frontends(), capacity);
    println!(
        "100,000 Services + slices: {} MB of YAML in 100 files (written in {written:?}); parsed and \
         validated in {parsed:?}; desired state in {computed:?}; synced into a {capacity}-entry map \
         in {synced:?} ({} written, {} refused)",
        bytes >> 20,
        report.frontends_written,
        report.errors
    );
    let _ = fs::remove_dir_all(&dir);

    // 10,000 endpoints in one slice (ten times the API's limit): accepted, and every one is a backend.
    let dir = temp_dir("10k");
    let addrs: Vec<String> = (0..10_000u32)
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i).to_string())
        .collect();
    let text = format!(
        "{}---\n{}",
        service("big", "10.96.0.5", GOOD),
        slice(
            "big-1",
            "big",
            GOOD_SLICE,
            &format!("[{}]", addrs.join(", "))
        )
    );
    fs::write(dir.join("big.yaml"), text).expect("write big");
    let started = Instant::now();
    let (snap, errors) = ConfigDir::new(&dir).reload().expect("dir readable");
    assert!(errors.is_empty(), "{errors:?}");
    let (desired, _) = DesiredCache::default().update(&snap, &NodeContext::default());
    let state = desired
        .frontends
        .iter()
        .find(|(f, _)| f.port == 80)
        .map(|(_, s)| s)
        .expect("big's frontend");
    assert_eq!(state.backends.len(), 10_000);
    let table = crate::maglev::table_size(10_000);
    let mut reconciler = Reconciler::new(BoundedMaps {
        max_services: 16,
        chunks: table.div_ceil(weir_common::TABLE_CHUNK_SLOTS) * 2,
        ..BoundedMaps::default()
    });
    let report = reconciler.sync(&desired);
    assert_eq!((report.frontends_written, report.errors), (3, 0));
    println!(
        "10,000-endpoint slice: parsed, computed and its {table}-slot Maglev table built in {:?}",
        started.elapsed()
    );
    let _ = fs::remove_dir_all(&dir);
}
