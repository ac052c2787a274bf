//! Services with a Gateway API HTTPRoute: pods' connections to the ClusterIP are steered by the datapath to
//! the agent's L7 proxy, which splits per request by the route's weights.

use std::{net::SocketAddr, time::Duration};

use hyper::{Method, StatusCode};
use weir_tests::{
    Agent, Lab, Pod,
    http::{self, Conn, DELAY_HEADER, Proto, Req},
    scenario::{self, Tally, parse_greeting},
    yaml::{documents, endpointslice_yaml, service_yaml},
};

const T: Duration = Duration::from_secs(2);
const WEB: [u8; 4] = [10, 96, 0, 50];

fn http_service(name: &str, ip: &str, pod_ip: std::net::Ipv4Addr) -> String {
    documents(&[
        service_yaml("default", name, ip, &[("http", 80, "TCP", 8081)]),
        endpointslice_yaml(
            "default",
            &format!("{name}-1"),
            name,
            &[("http", 8081, "TCP")],
            &[(pod_ip, true)],
        ),
    ])
}

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs:
    - {name: v1, port: 80, weight: 70}
    - {name: v2, port: 80, weight: 30}
"#;

#[test]
fn an_httproute_splits_requests_to_a_cluster_ip_by_weight() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    lab.write_config("web.yaml", &http_service("web", "10.96.0.50", c.ip()))
        .expect("web");
    lab.write_config("v1.yaml", &http_service("v1", "10.96.0.51", a.ip()))
        .expect("v1");
    lab.write_config("v2.yaml", &http_service("v2", "10.96.0.52", b.ip()))
        .expect("v2");
    lab.write_config("route.yaml", ROUTE).expect("route");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let web = SocketAddr::from((WEB, 80));
    let mut tally = Tally::default();
    for i in 0..200 {
        let resp = client
            .http_get(web, "/", T)
            .unwrap_or_else(|e| panic!("request {i} through the route: {e}"));
        assert_eq!(resp.status, 200, "{resp:?}");
        let (backend, _) = parse_greeting(&resp.body).expect("backend reply");
        tally.add(&backend);
    }
    println!("200 requests through a 70/30 HTTPRoute: {tally}");
    assert_eq!(
        tally.get(c.name()),
        0,
        "the route replaces web's own endpoints: {tally}"
    );
    let share = tally.percent(a.name());
    assert!((share - 70.0).abs() <= 5.0, "v1 got {share:.1} %: {tally}");
    assert_eq!(tally.get(a.name()) + tally.get(b.name()), 200);

    // The Service without a route stays L4: its own endpoint answers directly.
    let direct = client
        .http_get(SocketAddr::from(([10, 96, 0, 51], 80)), "/", T)
        .expect("v1 directly");
    assert_eq!(parse_greeting(&direct.body).expect("reply").0, a.name());
}

/// One HTTP/1.1 keep-alive connection: send `n` requests on it, one after another, and return who
/// answered each (the proxy decides per request, so one connection still splits).
fn keep_alive_tally(stream: std::net::TcpStream, n: usize) -> Tally {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut tally = Tally::default();
    for i in 0..n {
        writer
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .expect("send request");
        let mut content_length = None;
        let mut chunked = false;
        let mut line = String::new();
        reader.read_line(&mut line).expect("status line");
        assert!(line.starts_with("HTTP/1.1 200"), "request {i}: {line:?}");
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                content_length = v.trim().parse::<usize>().ok();
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        let body = if let Some(len) = content_length {
            let mut b = vec![0u8; len];
            reader.read_exact(&mut b).expect("body");
            b
        } else {
            assert!(chunked, "request {i}: neither length nor chunked");
            let mut b = Vec::new();
            loop {
                line.clear();
                reader.read_line(&mut line).expect("chunk size");
                let size = usize::from_str_radix(line.trim(), 16).expect("hex size");
                let mut chunk = vec![0u8; size + 2];
                reader.read_exact(&mut chunk).expect("chunk");
                if size == 0 {
                    break;
                }
                b.extend_from_slice(&chunk[..size]);
            }
            b
        };
        let text = String::from_utf8_lossy(&body).to_string();
        tally.add(&parse_greeting(&text).expect("backend reply").0);
    }
    tally
}

#[test]
fn one_keep_alive_connection_is_split_per_request() {
    let lab = Lab::new().expect("lab");
    let (backends, client) = scenario::add_standard_pods(&lab).expect("pods");
    let (a, b, c) = (&backends[0], &backends[1], &backends[2]);
    lab.write_config("web.yaml", &http_service("web", "10.96.0.50", c.ip()))
        .expect("web");
    lab.write_config("v1.yaml", &http_service("v1", "10.96.0.51", a.ip()))
        .expect("v1");
    lab.write_config("v2.yaml", &http_service("v2", "10.96.0.52", b.ip()))
        .expect("v2");
    lab.write_config("route.yaml", ROUTE).expect("route");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");

    let tally = client
        .run(|| {
            let s = std::net::TcpStream::connect_timeout(&SocketAddr::from((WEB, 80)), T)
                .expect("connect");
            s.set_read_timeout(Some(T)).expect("timeout");
            assert_eq!(s.peer_addr().expect("peer"), SocketAddr::from((WEB, 80)));
            keep_alive_tally(s, 500)
        })
        .expect("enter client netns");
    println!("500 requests on one keep-alive connection: {tally}");
    assert_eq!(tally.get(c.name()), 0, "{tally}");
    let share = tally.percent(a.name());
    assert!((share - 70.0).abs() <= 5.0, "v1 got {share:.1} %: {tally}");
}

/// The echo lab: pods `v1`, `v2`, `v3` and `mirror` run the HTTP echo backend (HTTP/1.1 and h2c) on
/// 8081, each behind its own Service on port 80; Service `web` (10.96.0.50, endpoint `v3`) is the
/// parent the routes attach to. `routes` are written before the agent starts.
struct EchoLab {
    client: Pod,
    mirror: http::EchoCounter,
}

const ECHO_PODS: [(&str, [u8; 4], &str); 4] = [
    ("v1", [10, 0, 0, 10], "10.96.0.51"),
    ("v2", [10, 0, 0, 11], "10.96.0.52"),
    ("v3", [10, 0, 0, 12], "10.96.0.53"),
    ("mirror", [10, 0, 0, 13], "10.96.0.54"),
];

fn echo_lab<'a>(lab: &'a Lab, routes: &[(&str, String)]) -> (EchoLab, Agent<'a>) {
    let mut pods = Vec::new();
    let mut mirror = None;
    for (name, ip, cluster_ip) in ECHO_PODS {
        let pod = lab.add_pod(name, ip).expect("pod");
        let counter = http::serve_echo(&pod, 8081).expect("echo backend");
        if name == "mirror" {
            mirror = Some(counter);
        }
        lab.write_config(
            &format!("{name}.yaml"),
            &http_service(name, cluster_ip, pod.ip()),
        )
        .expect("service");
        pods.push(pod);
    }
    lab.write_config("web.yaml", &http_service("web", "10.96.0.50", pods[2].ip()))
        .expect("web");
    for (file, yaml) in routes {
        lab.write_config(file, yaml).expect("route");
    }
    let client = lab
        .add_pod(scenario::CLIENT.0, scenario::CLIENT.1)
        .expect("client");
    let mut agent = lab.start_agent(&[]).expect("agent");
    agent
        .wait_healthy(scenario::HEALTHY_TIMEOUT)
        .expect("healthy");
    let lab = EchoLab {
        client,
        mirror: mirror.expect("mirror pod"),
    };
    (lab, agent)
}

const WEB_ADDR: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 50)),
    80,
);

/// An HTTPRoute on `web:80` named `name` with the given rules (YAML list items, indented by 2).
fn web_route(name: &str, extra_meta: &str, rules: &[String]) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default{extra_meta}}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n{}",
        rules.concat()
    )
}

/// A rule that sends to `v1` and tags the request with `x-rule: <name>`, so the echo tells which rule
/// matched.
fn tagged_rule(name: &str, matches: &str) -> String {
    format!(
        "  - name: {name}\n    matches: {matches}\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-rule, value: {name}}}]}}}}]\n    backendRefs: [{{name: v1, port: 80}}]\n"
    )
}

/// Waits until the agent's proxy routes `req` to an echo backend (the first sync may lag the healthz
/// by nothing, but a rescan of the config dir may).
fn wait_routed(client: &Pod, req: &Req) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match http::request(client, WEB_ADDR, Proto::Http1, req) {
            Ok(r) if r.status == 200 && r.echo().is_ok() => return,
            other if std::time::Instant::now() > deadline => {
                panic!("{} never routed: {other:?}", req.path)
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn http2_one_connection_is_split_per_request_and_weight_zero_gets_nothing() {
    let lab = Lab::new().expect("lab");
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs:
    - {name: v1, port: 80, weight: 70}
    - {name: v2, port: 80, weight: 30}
    - {name: v3, port: 80, weight: 0}
"#;
    let (l, _agent) = echo_lab(&lab, &[("route.yaml", route.to_owned())]);
    wait_routed(&l.client, &Req::get("/"));
    for proto in [Proto::Http2, Proto::Http1] {
        let mut conn = Conn::connect(&l.client, WEB_ADDR, proto).expect("connect");
        let mut tally = Tally::default();
        for i in 0..500 {
            let reply = conn
                .send(&Req::get(&format!("/r{i}")))
                .unwrap_or_else(|e| panic!("{proto:?} request {i}: {e:#}"));
            assert_eq!(reply.status, 200, "{reply:?}");
            let echo = reply.echo().expect("echo");
            let want_version = match proto {
                Proto::Http2 => "HTTP/2.0",
                Proto::Http1 => "HTTP/1.1",
            };
            assert_eq!(
                echo.version, want_version,
                "the proxy keeps the client's HTTP version"
            );
            tally.add(&echo.pod);
        }
        println!("500 requests on one {proto:?} connection through a 70/30/0 HTTPRoute: {tally}");
        assert_eq!(tally.get("v3"), 0, "weight 0 gets no request: {tally}");
        let share = tally.percent("v1");
        assert!(
            (share - 70.0).abs() <= 5.0,
            "{proto:?}: v1 got {share:.1} %: {tally}"
        );
        assert_eq!(tally.get("v1") + tally.get("v2"), 500, "{tally}");
    }
}

/// Every match kind, AND within a match and OR across matches, and the precedence rules between
/// rules and routes, over HTTP/1.1 and HTTP/2.
#[test]
fn httproute_matches_and_precedence_follow_the_spec() {
    let lab = Lab::new().expect("lab");
    let matches = web_route(
        "matches",
        "",
        &[
            tagged_rule("exact", "[{path: {type: Exact, value: /exact}}]"),
            tagged_rule("prefix", "[{path: {type: PathPrefix, value: /pre/}}]"),
            tagged_rule(
                "regex",
                r#"[{path: {type: RegularExpression, value: "/re/[0-9]+"}}]"#,
            ),
            tagged_rule(
                "header",
                "[{path: {type: Exact, value: /h}, headers: [{name: X-Env, value: canary}]}]",
            ),
            tagged_rule(
                "header-re",
                r#"[{path: {type: Exact, value: /hr}, headers: [{type: RegularExpression, name: x-ver, value: "v[0-9]+"}]}]"#,
            ),
            tagged_rule(
                "query",
                r#"[{path: {type: Exact, value: /q}, queryParams: [{name: version, value: "2"}]}]"#,
            ),
            tagged_rule("method", "[{path: {type: Exact, value: /m}, method: POST}]"),
            tagged_rule(
                "and",
                r#"[{path: {type: Exact, value: /and}, method: PUT, headers: [{name: x-a, value: "1"}], queryParams: [{name: k, value: v}]}]"#,
            ),
            tagged_rule(
                "or",
                "[{path: {type: Exact, value: /or1}}, {path: {type: Exact, value: /or2}, method: DELETE}]",
            ),
            // Precedence: listed so that list order alone would pick wrongly.
            tagged_rule("p-prefix", "[{path: {type: PathPrefix, value: /p}}]"),
            tagged_rule("p-long", "[{path: {type: PathPrefix, value: /p/long}}]"),
            tagged_rule(
                "p-regex",
                r#"[{path: {type: RegularExpression, value: "/p/long/r.*"}}]"#,
            ),
            tagged_rule("p-exact", "[{path: {type: Exact, value: /p/long/rx}}]"),
            tagged_rule("p-any", "[{path: {type: PathPrefix, value: /p/m}}]"),
            tagged_rule(
                "p-h2",
                r#"[{path: {type: PathPrefix, value: /p/m}, headers: [{name: x-a, value: "1"}, {name: x-b, value: "1"}]}]"#,
            ),
            tagged_rule(
                "p-h1",
                r#"[{path: {type: PathPrefix, value: /p/m}, headers: [{name: x-a, value: "1"}]}]"#,
            ),
            tagged_rule(
                "p-get",
                "[{path: {type: PathPrefix, value: /p/m}, method: GET}]",
            ),
            tagged_rule(
                "p-q1",
                r#"[{path: {type: PathPrefix, value: /p/q}, queryParams: [{name: a, value: "1"}]}]"#,
            ),
            tagged_rule(
                "p-q2",
                r#"[{path: {type: PathPrefix, value: /p/q}, queryParams: [{name: a, value: "1"}, {name: b, value: "1"}]}]"#,
            ),
        ],
    );
    // Between routes, the same match: the older route wins, then the first by namespace/name.
    let same = |route: &str, meta: &str| {
        web_route(
            route,
            meta,
            &[
                tagged_rule(route, "[{path: {type: PathPrefix, value: /p/age}}]"),
                tagged_rule(
                    &format!("{route}-n"),
                    "[{path: {type: PathPrefix, value: /p/name}}]",
                ),
            ],
        )
    };
    let routes = [
        ("matches.yaml", matches),
        (
            "newer.yaml",
            same("newer", ", creationTimestamp: \"2024-01-01T00:00:00Z\""),
        ),
        (
            "older.yaml",
            same("older", ", creationTimestamp: \"2020-01-01T00:00:00Z\""),
        ),
        ("b.yaml", same("b-route", "")),
        ("a.yaml", same("a-route", "")),
    ];
    let (l, _agent) = echo_lab(&lab, &routes);
    wait_routed(&l.client, &Req::get("/exact"));

    let get = Req::get;
    let with = |m: Method, p: &str| Req::new(m, p);
    // (request, the rule that must answer; None: 404)
    let cases: Vec<(Req, Option<&str>)> = vec![
        (get("/exact"), Some("exact")),
        (get("/exact/"), None),
        (get("/exactly"), None),
        (get("/pre"), Some("prefix")),
        (get("/pre/"), Some("prefix")),
        (get("/pre/a/b"), Some("prefix")),
        (get("/prefix"), None),
        (get("/re/123"), Some("regex")),
        (get("/re/12a"), None),
        (get("/h").header("x-env", "canary"), Some("header")),
        (get("/h").header("X-ENV", "canary"), Some("header")),
        (get("/h").header("x-env", "Canary"), None),
        (get("/h"), None),
        (get("/hr").header("x-ver", "v42"), Some("header-re")),
        (get("/hr").header("x-ver", "v42b"), None),
        (get("/q?version=2"), Some("query")),
        (get("/q?x=1&version=2"), Some("query")),
        (get("/q?version=3"), None),
        (get("/q"), None),
        (with(Method::POST, "/m"), Some("method")),
        (get("/m"), None),
        (
            with(Method::PUT, "/and?k=v").header("x-a", "1"),
            Some("and"),
        ),
        (with(Method::PUT, "/and?k=v"), None),
        (with(Method::PUT, "/and").header("x-a", "1"), None),
        (get("/and?k=v").header("x-a", "1"), None),
        (get("/or1"), Some("or")),
        (with(Method::DELETE, "/or2"), Some("or")),
        (get("/or2"), None),
        (get("/nothing"), None),
        // Exact beats every prefix; the longest prefix beats a shorter one; a regular expression
        // ranks between Exact and PathPrefix (the spec leaves it to the implementation).
        (get("/p"), Some("p-prefix")),
        (get("/p/x"), Some("p-prefix")),
        (get("/p/long"), Some("p-long")),
        (get("/p/long/z"), Some("p-long")),
        (get("/p/long/rx"), Some("p-exact")),
        (get("/p/long/ry"), Some("p-regex")),
        // Same path: a method beats headers, more headers beat fewer.
        (
            get("/p/m").header("x-a", "1").header("x-b", "1"),
            Some("p-get"),
        ),
        (
            with(Method::POST, "/p/m")
                .header("x-a", "1")
                .header("x-b", "1"),
            Some("p-h2"),
        ),
        (with(Method::POST, "/p/m").header("x-a", "1"), Some("p-h1")),
        (with(Method::POST, "/p/m"), Some("p-any")),
        // More query matches beat fewer.
        (get("/p/q?a=1&b=1"), Some("p-q2")),
        (get("/p/q?a=1"), Some("p-q1")),
        (get("/p/q"), Some("p-prefix")),
        // Across routes: the older creationTimestamp, then namespace/name order.
        (get("/p/age"), Some("older")),
        (get("/p/name"), Some("older-n")),
    ];
    for proto in [Proto::Http1, Proto::Http2] {
        let mut conn = Conn::connect(&l.client, WEB_ADDR, proto).expect("connect");
        for (req, want) in &cases {
            let reply = conn
                .send(req)
                .unwrap_or_else(|e| panic!("{proto:?} {} {}: {e:#}", req.method, req.path));
            let got = if reply.status == 404 {
                None
            } else {
                assert_eq!(
                    reply.status, 200,
                    "{proto:?} {} {}: {reply:?}",
                    req.method, req.path
                );
                Some(
                    reply
                        .echo()
                        .expect("echo")
                        .header("x-rule")
                        .map(str::to_owned),
                )
            };
            assert_eq!(
                got,
                want.map(|w| Some(w.to_owned())),
                "{proto:?} {} {} {:?}",
                req.method,
                req.path,
                req.headers
            );
        }
    }
    // Routes without timestamps (files) tie-break by name: with the timestamped ones gone, a-route wins.
    lab.remove_config("older.yaml").expect("remove older");
    lab.remove_config("newer.yaml").expect("remove newer");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = http::request(&l.client, WEB_ADDR, Proto::Http1, &get("/p/age")).expect("age");
        let rule = reply
            .echo()
            .expect("echo")
            .header("x-rule")
            .map(str::to_owned);
        if rule.as_deref() == Some("a-route") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/p/age still goes to {rule:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// RequestHeaderModifier, ResponseHeaderModifier, URLRewrite (prefix, full path, hostname),
/// RequestRedirect (default 302, and 301 with a path) and RequestMirror (all, and a percentage).
#[test]
fn httproute_filters_follow_the_spec() {
    let lab = Lab::new().expect("lab");
    let rule = |name: &str, path: &str, filters: &str| {
        format!(
            "  - name: {name}\n    matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters: {filters}\n    backendRefs: [{{name: v1, port: 80}}]\n"
        )
    };
    let route = web_route(
        "filters",
        "",
        &[
            rule(
                "req",
                "/f/req",
                "[{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: new}], add: [{name: x-add, value: b}], remove: [x-remove]}}]",
            ),
            rule(
                "resp",
                "/f/resp",
                "[{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-backend, value: hidden}], add: [{name: x-resp, value: added}], remove: [x-backend-extra]}}]",
            ),
            rule(
                "rw",
                "/f/rw",
                "[{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]",
            ),
            rule(
                "full",
                "/f/full",
                "[{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]",
            ),
            rule(
                "redir",
                "/f/redir",
                "[{type: RequestRedirect, requestRedirect: {hostname: example.com}}]",
            ),
            rule(
                "moved",
                "/f/moved",
                "[{type: RequestRedirect, requestRedirect: {statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new-home}}}]",
            ),
            rule(
                "mirror",
                "/f/mirror",
                "[{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}}}]",
            ),
            rule(
                "half",
                "/f/half",
                "[{type: RequestMirror, requestMirror: {backendRef: {name: mirror, port: 80}, percent: 50}}]",
            ),
        ],
    );
    let (l, _agent) = echo_lab(&lab, &[("route.yaml", route)]);
    wait_routed(&l.client, &Req::get("/f/req"));

    for proto in [Proto::Http1, Proto::Http2] {
        let mut conn = Conn::connect(&l.client, WEB_ADDR, proto).expect("connect");
        let mut send = |req: Req| {
            conn.send(&req)
                .unwrap_or_else(|e| panic!("{proto:?} {}: {e:#}", req.path))
        };

        let r = send(
            Req::get("/f/req")
                .header("x-set", "old")
                .header("x-add", "a")
                .header("x-remove", "gone")
                .header("x-kept", "yes"),
        );
        let e = r.echo().expect("echo");
        assert_eq!(e.header("x-set"), Some("new"), "{proto:?} {e:?}");
        assert_eq!(e.header("x-add"), Some("a,b"), "{proto:?} {e:?}");
        assert_eq!(e.header("x-remove"), None, "{proto:?} {e:?}");
        assert_eq!(e.header("x-kept"), Some("yes"), "{proto:?} {e:?}");
        assert_eq!(
            e.header("x-forwarded-for"),
            Some("10.0.0.20"),
            "{proto:?} {e:?}"
        );

        let r = send(Req::get("/f/resp"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-backend"), Some("hidden"), "{proto:?} {r:?}");
        assert_eq!(r.header("x-resp"), Some("added"), "{proto:?} {r:?}");
        assert_eq!(r.header("x-backend-extra"), None, "{proto:?} {r:?}");

        let e = send(Req::get("/f/rw/a/b?x=1")).echo().expect("echo");
        assert_eq!(
            (e.path.as_str(), e.query.as_deref()),
            ("/new/a/b", Some("x=1"))
        );
        assert_eq!(
            e.header("host"),
            Some("rewritten.example"),
            "{proto:?} {e:?}"
        );
        let e = send(Req::get("/f/rw")).echo().expect("echo");
        assert_eq!(e.path, "/new");
        let e = send(Req::get("/f/full/deep/path?q=2"))
            .echo()
            .expect("echo");
        assert_eq!(
            (e.path.as_str(), e.query.as_deref()),
            ("/replaced", Some("q=2"))
        );
        assert_eq!(e.header("host"), Some(Req::DEFAULT_HOST));

        let r = send(Req::get("/f/redir/x?y=1"));
        assert_eq!(r.status, 302, "RequestRedirect defaults to 302: {r:?}");
        assert_eq!(
            r.header("location"),
            Some("http://example.com/f/redir/x?y=1")
        );
        let r = send(Req::get("/f/moved/x"));
        assert_eq!(r.status, 301, "{r:?}");
        assert_eq!(r.header("location"), Some("http://web.default/new-home/x"));

        // Mirrors are fire-and-forget: the client's answer comes from v1, the copy goes to `mirror`.
        let before = l.mirror.get();
        for _ in 0..20 {
            let e = send(Req::get("/f/mirror")).echo().expect("echo");
            assert_eq!(e.pod, "v1");
        }
        wait_count(&l.mirror, before + 20, "mirror 100 %");
        let before = l.mirror.get();
        let n = 400;
        for _ in 0..n {
            assert_eq!(send(Req::get("/f/half")).status, 200);
        }
        // Let stragglers arrive, then count: 50 % of 400 is 200 (binomial sd 10).
        std::thread::sleep(Duration::from_millis(500));
        let mirrored = l.mirror.get() - before;
        println!("{proto:?}: {mirrored} of {n} requests mirrored at 50 %");
        assert!(
            (150..=250).contains(&mirrored),
            "{proto:?}: {mirrored} of {n} mirrored at 50 %"
        );
    }
}

fn wait_count(counter: &http::EchoCounter, want: usize, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counter.get() < want {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {} of {want} requests arrived",
            counter.get()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter.get(), want, "{what}: more copies than requests");
}

/// timeouts.request and timeouts.backendRequest answer 504, `0s` disables; no match is 404; a rule
/// without a usable backend is 500, and an invalid backend gets its share of requests as 500s.
#[test]
fn httproute_timeouts_and_error_statuses_follow_the_spec() {
    let lab = Lab::new().expect("lab");
    let rule = |name: &str, path: &str, rest: &str| {
        format!(
            "  - name: {name}\n    matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n{rest}"
        )
    };
    let v1 = "    backendRefs: [{name: v1, port: 80}]\n";
    let route = web_route(
        "errors",
        "",
        &[
            rule(
                "t-req",
                "/t/req",
                &format!("    timeouts: {{request: 400ms}}\n{v1}"),
            ),
            rule(
                "t-backend",
                "/t/backend",
                &format!("    timeouts: {{request: 5s, backendRequest: 400ms}}\n{v1}"),
            ),
            rule(
                "t-zero",
                "/t/zero",
                &format!("    timeouts: {{request: 0s}}\n{v1}"),
            ),
            rule("ok", "/ok", v1),
            rule("none", "/e/none", ""),
            rule(
                "invalid",
                "/e/invalid",
                "    backendRefs: [{group: \"\", kind: ConfigMap, name: v1}]\n",
            ),
            rule(
                "missing",
                "/e/missing",
                "    backendRefs: [{name: nosuch, port: 80}]\n",
            ),
            rule(
                "zero",
                "/e/zero",
                "    backendRefs: [{name: v1, port: 80, weight: 0}]\n",
            ),
            rule(
                "half",
                "/e/half",
                "    backendRefs: [{name: v1, port: 80}, {group: \"\", kind: ConfigMap, name: v2}]\n",
            ),
        ],
    );
    let (l, agent) = echo_lab(&lab, &[("route.yaml", route)]);
    wait_routed(&l.client, &Req::get("/ok"));
    let c = &l.client;

    for proto in [Proto::Http1, Proto::Http2] {
        let slow = |p: &str| Req::get(p).header(DELAY_HEADER, "1500");
        for path in ["/t/req", "/t/backend"] {
            let r =
                http::expect_status(c, WEB_ADDR, proto, &slow(path), StatusCode::GATEWAY_TIMEOUT)
                    .expect("504");
            assert!(
                r.elapsed >= Duration::from_millis(380) && r.elapsed < Duration::from_millis(1400),
                "{proto:?} {path}: 504 after {:?}",
                r.elapsed
            );
            // A quick backend answers within the timeout.
            http::expect_status(c, WEB_ADDR, proto, &Req::get(path), StatusCode::OK).expect("200");
        }
        let r = http::expect_status(c, WEB_ADDR, proto, &slow("/t/zero"), StatusCode::OK)
            .expect("0s disables the timeout");
        assert!(r.elapsed >= Duration::from_millis(1500), "{:?}", r.elapsed);

        http::expect_status(
            c,
            WEB_ADDR,
            proto,
            &Req::get("/unrouted"),
            StatusCode::NOT_FOUND,
        )
        .expect("no match: 404");
        for path in ["/e/none", "/e/invalid", "/e/missing", "/e/zero"] {
            http::expect_status(
                c,
                WEB_ADDR,
                proto,
                &Req::get(path),
                StatusCode::INTERNAL_SERVER_ERROR,
            )
            .expect("no usable backend: 500");
        }
    }
    let mut conn = Conn::connect(c, WEB_ADDR, Proto::Http1).expect("connect");
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..300 {
        match conn.send(&Req::get("/e/half")).expect("half").status {
            200 => ok += 1,
            500 => failed += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    println!("/e/half: {ok} answered, {failed} got 500");

    // Standalone mode serves the route's status on /state (and logs it): accepted, with a reference
    // that does not resolve (the ConfigMap backend comes first).
    let state = lab
        .in_node(|| {
            weir_tests::client::http_get(
                SocketAddr::from(([127, 0, 0, 1], 10249)),
                "/state",
                Duration::from_secs(2),
            )
        })
        .expect("netns")
        .expect("/state");
    let state: weir_agent::state::AgentState =
        serde_json::from_str(&state.body).expect("state JSON");
    let route = state
        .routes
        .iter()
        .find(|r| r.route == "default/errors")
        .unwrap_or_else(|| panic!("no status for default/errors: {:?}", state.routes));
    let conditions: Vec<(&str, &str, &str)> = route.parents[0]
        .conditions
        .iter()
        .map(|c| (c.kind.as_str(), c.status.as_str(), c.reason.as_str()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "False", "InvalidKind")
        ]
    );
    assert!(
        agent
            .log()
            .contains("HTTPRoute default/errors: parent Service web: Accepted=True"),
        "the status is logged"
    );
    assert!(
        (120..=180).contains(&failed),
        "{failed} of 300 got 500 (half the weight is invalid)"
    );
}

fn fault_object(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: HTTPFaultInjection\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n"
    )
}

/// Weir's HTTPFaultInjection, named by ExtensionRef filters: abort and delay at 100 %, an abort
/// percentage over many requests, unresolvable references (500), and a change to the object alone.
#[test]
fn fault_injection_through_extension_ref_filters() {
    let lab = Lab::new().expect("lab");
    let rule = |name: &str, path: &str, group: &str, kind: &str, fault: &str| {
        format!(
            "  - name: {name}\n    matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters: [{{type: ExtensionRef, extensionRef: {{group: {group}, kind: {kind}, name: {fault}}}}}]\n    backendRefs: [{{name: v1, port: 80}}]\n"
        )
    };
    let fi = "HTTPFaultInjection";
    let route = web_route(
        "faults",
        "",
        &[
            rule("abort", "/abort", "weir.dev", fi, "abort"),
            rule("delay", "/delay", "weir.dev", fi, "delay"),
            rule("some", "/some", "weir.dev", fi, "some"),
            rule("missing", "/missing", "weir.dev", fi, "nosuch"),
            rule("kind", "/kind", "example.com", "Fault", "abort"),
            "  - name: ok\n    matches: [{path: {type: PathPrefix, value: /ok}}]\n    backendRefs: [{name: v1, port: 80}]\n".to_owned(),
        ],
    );
    let faults = [
        fault_object("abort", "{abort: {httpStatus: 503}}"),
        fault_object("delay", "{delay: {fixedDelay: 400ms}}"),
        fault_object("some", "{abort: {httpStatus: 418, percentage: 30}}"),
    ]
    .join("---\n");
    let (l, _agent) = echo_lab(
        &lab,
        &[("faults.yaml", faults.clone()), ("route.yaml", route)],
    );
    wait_routed(&l.client, &Req::get("/ok"));
    let c = &l.client;
    for proto in [Proto::Http1, Proto::Http2] {
        let mut conn = Conn::connect(c, WEB_ADDR, proto).expect("connect");
        for _ in 0..10 {
            let r = conn.send(&Req::get("/abort")).expect("abort");
            assert_eq!(r.status, 503, "{proto:?}: abort 100 %: {r:?}");
            assert!(
                r.echo().is_err(),
                "an aborted request never reaches a backend"
            );
        }
        for _ in 0..3 {
            let r = conn.send(&Req::get("/delay")).expect("delay");
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(r.echo().expect("echo").pod, "v1");
            assert!(
                r.elapsed >= Duration::from_millis(400),
                "{proto:?}: delayed only {:?}",
                r.elapsed
            );
        }
        let quick = conn.send(&Req::get("/ok")).expect("ok");
        assert!(
            quick.elapsed < Duration::from_millis(400),
            "{:?}",
            quick.elapsed
        );
        for path in ["/missing", "/kind"] {
            let r = conn.send(&Req::get(path)).expect(path);
            assert_eq!(
                r.status, 500,
                "{proto:?} {path}: unresolvable ExtensionRef: {r:?}"
            );
        }
        let n = 400;
        let aborted = (0..n)
            .filter(|_| {
                let r = conn.send(&Req::get("/some")).expect("some");
                assert!(matches!(r.status, 200 | 418), "{r:?}");
                r.status == 418
            })
            .count();
        println!("{proto:?}: {aborted} of {n} aborted at 30 %");
        // 30 % of 400 is 120, binomial sd 9.2.
        assert!(
            (80..=160).contains(&aborted),
            "{proto:?}: {aborted} of {n} aborted at 30 %"
        );
    }
    // Changing only the fault object changes the answers.
    lab.write_config(
        "faults.yaml",
        &faults.replace("httpStatus: 503", "httpStatus: 429"),
    )
    .expect("update fault");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::request(c, WEB_ADDR, Proto::Http1, &Req::get("/abort")).expect("abort");
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the new abort status never applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Deleting it leaves the reference unresolvable: 500.
    lab.write_config(
        "faults.yaml",
        &faults
            .split("---\n")
            .skip(1)
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .expect("drop abort");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::request(c, WEB_ADDR, Proto::Http1, &Req::get("/abort")).expect("abort");
        if r.status == 500 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} after the fault object went",
            r.status
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
