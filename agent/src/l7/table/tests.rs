//! Matching and precedence, table-driven; each case cites the HTTPRoute spec rule it checks.
use hyper::http::{HeaderValue, Method};

use super::*;
use crate::l7::route::http_route_from_yaml;

fn ns(name: &str) -> NsName {
    NsName {
        namespace: "shop".into(),
        name: name.into(),
    }
}

/// A route `name` on Service `web` (all ports), created at `created` (RFC 3339) when given, with
/// `rules` (YAML under `rules:`).
fn route(name: &str, created: Option<&str>, rules: &str) -> Route {
    let ts = created
        .map(|c| format!(", creationTimestamp: \"{c}\""))
        .unwrap_or_default();
    let yaml = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop{ts}}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: web}}]
  rules:
{rules}"
    );
    Route::from_k8s(&http_route_from_yaml(&yaml).expect("yaml"))
        .expect("valid")
        .expect("ours")
}

struct Req<'a> {
    method: Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: HeaderMap,
}

fn req(target: &str) -> Req<'_> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Req {
        method: Method::GET,
        path,
        query,
        headers: HeaderMap::new(),
    }
}

impl Req<'_> {
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }

    fn method(mut self, m: Method) -> Self {
        self.method = m;
        self
    }
}

/// Which route and rule label a request to `web:80` ends up at: `route/rule`, `404` or `none`.
fn lookup(table: &RouteTable, r: &Req<'_>) -> String {
    let service = ns("web");
    let parent = Parent {
        service: &service,
        port: 80,
        port_name: "http",
    };
    let view = RequestView {
        method: &r.method,
        path: r.path,
        query: r.query,
        headers: &r.headers,
    };
    match table.find(&parent, &view) {
        Lookup::NoRoutes => "none".into(),
        Lookup::NoMatch => "404".into(),
        Lookup::Matched(s) => format!("{}/{}", s.route.id.name, s.rule.label),
    }
}

#[test]
fn path_matching() {
    let table = RouteTable::new([route(
        "r",
        None,
        "  - name: exact
    matches: [{path: {type: Exact, value: /exact}}]
  - name: prefix
    matches: [{path: {type: PathPrefix, value: /foo}}]
  - name: slash
    matches: [{path: {type: PathPrefix, value: /bar/}}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]",
    )]);
    let cases = [
        // PathMatchExact: the whole path, nothing more.
        ("/exact", "r/exact"),
        ("/exact/", "404"),
        ("/exact/more", "404"),
        // PathMatchPathPrefix: on `/`-separated elements: `/foo` matches `/foo`, `/foo/`, `/foo/bar`,
        // not `/foobar`.
        ("/foo", "r/prefix"),
        ("/foo/", "r/prefix"),
        ("/foo/bar", "r/prefix"),
        ("/foobar", "404"),
        // "When specified, a trailing `/` is ignored": `/bar/` matches `/bar` too.
        ("/bar", "r/slash"),
        ("/bar/x", "r/slash"),
        ("/barx", "404"),
        // RegularExpression: the whole path must match (anchored).
        ("/items/42", "r/regex"),
        ("/items/42/x", "404"),
        ("/x/items/42", "404"),
        // The query is not part of the path.
        ("/exact?x=1", "r/exact"),
    ];
    for (target, want) in cases {
        assert_eq!(lookup(&table, &req(target)), want, "{target}");
    }
}

#[test]
fn header_query_and_method_matching() {
    let table = RouteTable::new([route(
        "r",
        None,
        "  - name: hdr
    matches: [{path: {value: /h}, headers: [{name: X-Env, value: canary}]}]
  - name: hdr-re
    matches: [{path: {value: /hr}, headers: [{name: x-user, type: RegularExpression, value: \"user-[0-9]+\"}]}]
  - name: query
    matches: [{path: {value: /q}, queryParams: [{name: v, value: \"2\"}]}]
  - name: query-re
    matches: [{path: {value: /qr}, queryParams: [{name: id, type: RegularExpression, value: \"[a-f]+\"}]}]
  - name: method
    matches: [{path: {value: /m}, method: DELETE}]",
    )]);
    let cases = [
        // HTTPHeaderMatch.name: "Name matching MUST be case-insensitive"; values are exact.
        (req("/h").header("x-env", "canary"), "r/hdr"),
        (req("/h").header("X-ENV", "canary"), "r/hdr"),
        (req("/h").header("x-env", "Canary"), "404"),
        (req("/h"), "404"),
        // Repeated header lines are one comma-separated value (RFC 9110 §5.3).
        (
            req("/h").header("x-env", "canary").header("x-env", "b"),
            "404",
        ),
        (req("/hr").header("x-user", "user-17"), "r/hdr-re"),
        (req("/hr").header("x-user", "user-17x"), "404"),
        // HTTPQueryParamMatch: exact name, first value when repeated (recommended), decoded.
        (req("/q?v=2"), "r/query"),
        (req("/q?a=1&v=2"), "r/query"),
        (req("/q?v=3&v=2"), "404"),
        (req("/q?V=2"), "404"),
        (req("/q?%76=%32"), "r/query"),
        (req("/q"), "404"),
        (req("/qr?id=beef"), "r/query-re"),
        (req("/qr?id=beefy"), "404"),
        // HTTPRouteMatch.method.
        (req("/m").method(Method::DELETE), "r/method"),
        (req("/m"), "404"),
    ];
    for (r, want) in cases {
        assert_eq!(
            lookup(&table, &r),
            want,
            "{} {}?{:?} {:?}",
            r.method,
            r.path,
            r.query,
            r.headers
        );
    }
}

#[test]
fn conditions_are_anded_and_matches_ored() {
    // HTTPRouteMatch: "Multiple match types are ANDed together"; HTTPRouteRule.matches: "this rule will
    // be matched if any one of the matches is satisfied".
    let table = RouteTable::new([route(
        "r",
        None,
        "  - name: both
    matches:
    - {path: {value: /foo}, headers: [{name: version, value: v2}]}
    - {path: {value: /v2/foo}}",
    )]);
    let cases = [
        (req("/foo").header("version", "v2"), "r/both"),
        (req("/foo"), "404"),
        (req("/bar").header("version", "v2"), "404"),
        (req("/v2/foo"), "r/both"),
    ];
    for (r, want) in cases {
        assert_eq!(lookup(&table, &r), want, "{} {:?}", r.path, r.headers);
    }
}

#[test]
fn precedence_across_rules_and_routes() {
    // HTTPRouteRule.matches: across all rules of the routes attached to a parent, precedence goes to
    // (1) an Exact path, (2) the longest PathPrefix, (3) a method match, (4) the most header matches,
    // (5) the most query param matches; then (6) the oldest route, (7) "{namespace}/{name}"
    // alphabetically, (8) the first rule in list order.
    let newer = route(
        "a-newer",
        Some("2024-06-01T00:00:00Z"),
        "  - name: prefix-foo
    matches: [{path: {type: PathPrefix, value: /foo}}]
  - name: exact
    matches: [{path: {type: Exact, value: /foo/bar}}]
  - name: tie-new
    matches: [{path: {value: /tie}}]
  - name: tie-first
    matches: [{path: {value: /same}}]
  - name: tie-second
    matches: [{path: {value: /same}}]",
    );
    let older = route(
        "z-older",
        Some("2024-01-01T00:00:00Z"),
        "  - name: prefix-foo-bar
    matches: [{path: {type: PathPrefix, value: /foo/bar}}]
  - name: method
    matches: [{path: {value: /m}, method: GET}]
  - name: headers-1
    matches: [{path: {value: /m}, headers: [{name: a, value: \"1\"}]}]
  - name: headers-2
    matches: [{path: {value: /h}, headers: [{name: a, value: \"1\"}, {name: b, value: \"1\"}]}]
  - name: headers-1b
    matches: [{path: {value: /h}, headers: [{name: a, value: \"1\"}], queryParams: [{name: q, value: \"1\"}]}]
  - name: query-1
    matches: [{path: {value: /q}, queryParams: [{name: q, value: \"1\"}]}]
  - name: query-2
    matches: [{path: {value: /q}, queryParams: [{name: q, value: \"1\"}, {name: r, value: \"1\"}]}]
  - name: tie-old
    matches: [{path: {value: /tie}}]",
    );
    let untimed = route(
        "0-untimed",
        None,
        "  - name: tie-untimed
    matches: [{path: {value: /tie}}]
  - name: alpha
    matches: [{path: {value: /alpha}}]",
    );
    let alpha_b = route(
        "b",
        None,
        "  - name: alpha
    matches: [{path: {value: /alpha}}]",
    );
    let table = RouteTable::new([newer, older, untimed, alpha_b]);
    let cases = [
        // (1) Exact beats any prefix, even a longer one from an older route.
        (req("/foo/bar"), "a-newer/exact"),
        // (2) The longest prefix wins over the older route's order.
        (req("/foo/bar/baz"), "z-older/prefix-foo-bar"),
        (req("/foo/x"), "a-newer/prefix-foo"),
        // (3) A method match beats a header match of the same path.
        (req("/m").header("a", "1"), "z-older/method"),
        (
            req("/m").header("a", "1").method(Method::POST),
            "z-older/headers-1",
        ),
        // (4) Two header matches beat one, even when the one has a query param too.
        (
            req("/h?q=1").header("a", "1").header("b", "1"),
            "z-older/headers-2",
        ),
        (req("/h?q=1").header("a", "1"), "z-older/headers-1b"),
        // (5) More query param matches win.
        (req("/q?q=1&r=1"), "z-older/query-2"),
        (req("/q?q=1"), "z-older/query-1"),
        // (6) The oldest route; routes without a creation time count as the newest.
        (req("/tie"), "z-older/tie-old"),
        // (7) Then "{namespace}/{name}": shop/0-untimed before shop/b.
        (req("/alpha"), "0-untimed/alpha"),
        // (8) Then the first rule in list order.
        (req("/same"), "a-newer/tie-first"),
        // "When no rules matching a request have been successfully attached ... 404".
        (req("/nothing"), "404"),
    ];
    for (r, want) in cases {
        assert_eq!(
            lookup(&table, &r),
            want,
            "{} {}?{:?} {:?}",
            r.method,
            r.path,
            r.query,
            r.headers
        );
    }
}

#[test]
fn parent_port_scoping() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web, port: 8080}]
  rules: [{backendRefs: [{name: v1, port: 80}]}]";
    let table = RouteTable::new([Route::from_k8s(&http_route_from_yaml(yaml).expect("yaml"))
        .expect("valid")
        .expect("ours")]);
    let web = ns("web");
    let r = req("/");
    let view = RequestView {
        method: &r.method,
        path: r.path,
        query: r.query,
        headers: &r.headers,
    };
    let on = |port| Parent {
        service: &web,
        port,
        port_name: "",
    };
    // GEP-1294: a route with a port applies only to that Service port; others are plain Services.
    assert!(matches!(table.find(&on(8080), &view), Lookup::Matched(_)));
    assert!(matches!(table.find(&on(80), &view), Lookup::NoRoutes));
    assert!(table.has_routes(&on(8080)));
    assert!(!table.has_routes(&on(80)));
    let other = ns("api");
    assert!(matches!(
        table.find(
            &Parent {
                service: &other,
                port: 8080,
                port_name: ""
            },
            &view
        ),
        Lookup::NoRoutes
    ));
    let mut dir = ServiceDirectory::default();
    dir.insert_frontend(
        "10.96.0.1:8080".parse().expect("addr"),
        web.clone(),
        8080,
        "",
    );
    dir.insert_frontend("10.96.0.1:80".parse().expect("addr"), web.clone(), 80, "");
    assert_eq!(
        table.steered_frontends(&dir),
        ["10.96.0.1:8080".parse::<SocketAddr>().expect("addr")]
    );
}

#[test]
fn percent_decoding() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(percent_decode("%zz%4"), "%zz%4");
    assert_eq!(percent_decode("plain"), "plain");
    assert_eq!(query_param("a=1&b=%41&a=2", "a").as_deref(), Some("1"));
    assert_eq!(query_param("a=1&b=%41", "b").as_deref(), Some("A"));
    assert_eq!(query_param("flag&x=1", "flag").as_deref(), Some(""));
    assert_eq!(query_param("x=1", "y"), None);
}
