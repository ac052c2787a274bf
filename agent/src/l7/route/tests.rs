//! Conversion and validation of HTTPRoutes, each case naming the spec text it checks.
use std::time::Duration;

use super::*;

fn decode(yaml: &str) -> HttpRoute {
    http_route_from_yaml(yaml).expect("valid HTTPRoute YAML")
}

fn convert(yaml: &str) -> Result<Option<Route>, RouteError> {
    Route::from_k8s(&decode(yaml))
}

fn valid(yaml: &str) -> Route {
    convert(yaml)
        .expect("route should be valid")
        .expect("route should attach to a Service")
}

/// A route on Service `web` with the given rules (YAML, indented under `rules:`).
fn with_rules(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
  namespace: shop
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: web
    port: 80
  rules:
{rules}"
    )
}

fn ns(namespace: &str, name: &str) -> NsName {
    NsName {
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[test]
fn converts_parents_backends_and_defaults() {
    let r = valid(&with_rules(
        "  - backendRefs:
    - name: v1
      port: 8080
    - name: v2
      namespace: other
      port: 8080
      weight: 3",
    ));
    assert_eq!(r.id, ns("shop", "r"));
    assert_eq!(
        r.parents,
        [ParentRef {
            service: ns("shop", "web"),
            port: Some(80),
            section_name: None
        }]
    );
    let rule = &r.rules[0];
    assert_eq!(rule.label, "0");
    // HTTPRouteRule.matches: "If no matches are specified, the default is a prefix path match on '/'".
    assert!(
        matches!(&rule.matches[..], [RouteMatch { path: PathMatch::Prefix(p), .. }] if p.is_empty())
    );
    // HTTPBackendRef.weight: "If unspecified, weight defaults to 1." Mesh backendRefs may cross
    // namespaces without a ReferenceGrant (GEP-1294).
    let got: Vec<(Backend, u32)> = rule
        .backends
        .iter()
        .map(|b| (b.backend.clone(), b.weight))
        .collect();
    assert_eq!(
        got,
        [
            (
                Backend::Service(ServicePort {
                    service: ns("shop", "v1"),
                    port: 8080
                }),
                1
            ),
            (
                Backend::Service(ServicePort {
                    service: ns("other", "v2"),
                    port: 8080
                }),
                3
            ),
        ]
    );
    assert!(r.warnings.is_empty());
}

#[test]
fn routes_without_a_service_parent_are_not_ours() {
    // ParentReference.group: "When unspecified, gateway.networking.k8s.io is inferred": a bare
    // `kind: Service` without `group: ""` does not name a core Service.
    for parent in [
        "  - name: gw",
        "  - kind: Service\n    name: web",
        "  - group: gateway.networking.k8s.io\n    kind: Gateway\n    name: gw",
    ] {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: shop}}
spec:
  parentRefs:
{parent}
  rules:
  - backendRefs: [{{name: v1, port: 80}}]"
        );
        assert!(
            convert(&yaml).expect("valid").is_none(),
            "{parent:?} should not attach to a Service"
        );
    }
}

#[test]
fn consumer_routes_and_bad_parent_ports_are_skipped_with_a_warning() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs:
  - {group: \"\", kind: Service, name: web, namespace: elsewhere}
  - {group: \"\", kind: Service, name: web, port: 70000}
  - {group: \"\", kind: Service, name: api, sectionName: http}
  rules:
  - backendRefs: [{name: v1, port: 80}]";
    let r = valid(yaml);
    assert_eq!(
        r.parents,
        [ParentRef {
            service: ns("shop", "api"),
            port: None,
            section_name: Some("http".into())
        }]
    );
    let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.parentRefs[0].namespace", "spec.parentRefs[1].port"]
    );
}

/// Each invalid rule makes the route invalid (Accepted: False), and the error names the field.
#[test]
fn invalid_rules_reject_the_route_naming_the_field() {
    let cases = [
        (
            "invalid RegularExpression path",
            "  - matches:\n    - path: {type: RegularExpression, value: \"/(unclosed\"}",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "invalid header regex",
            "  - matches:\n    - headers: [{name: x, type: RegularExpression, value: \"[\"}]",
            "spec.rules[0].matches[0].headers[0].value",
        ),
        (
            "relative Exact path",
            "  - matches:\n    - path: {type: Exact, value: foo}",
            "spec.rules[0].matches[0].path.value",
        ),
        (
            "negative weight",
            "  - backendRefs: [{name: v1, port: 80, weight: -1}]",
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            "weight above the CRD maximum",
            "  - backendRefs: [{name: v1, port: 80, weight: 1000001}]",
            "spec.rules[0].backendRefs[0].weight",
        ),
        (
            // HTTPRouteRule.filters: "URLRewrite and RequestRedirect ... may not be combined".
            "URLRewrite with RequestRedirect",
            "  - filters:
    - type: URLRewrite
      urlRewrite: {hostname: a.example}
    - type: RequestRedirect
      requestRedirect: {hostname: b.example}",
            "spec.rules[0].filters[1].type",
        ),
        (
            // "Specifying the same filter multiple times is not supported".
            "RequestHeaderModifier twice",
            "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: a, value: b}]}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: c, value: d}]}",
            "spec.rules[0].filters[1].type",
        ),
        (
            // "ReplacePrefixMatch is only compatible with a PathPrefix HTTPRouteMatch".
            "ReplacePrefixMatch on an Exact match",
            "  - matches:
    - path: {type: Exact, value: /foo}
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /bar}",
            "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
        ),
        (
            // Unsupported filters "MUST NOT be skipped".
            "CORS filter",
            "  - filters:\n    - type: CORS\n      cors: {}",
            "spec.rules[0].filters[0].type",
        ),
        (
            "type without its field",
            "  - filters:\n    - type: RequestHeaderModifier",
            "spec.rules[0].filters[0].requestHeaderModifier",
        ),
        (
            "invalid header name in a modifier",
            "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: \"bad header\", value: x}]}",
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
        ),
        (
            "redirect status 404",
            "  - filters:\n    - type: RequestRedirect\n      requestRedirect: {statusCode: 404}",
            "spec.rules[0].filters[0].requestRedirect.statusCode",
        ),
        (
            "mirror with percent and fraction",
            "  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 80}
        percent: 10
        fraction: {numerator: 1}",
            "spec.rules[0].filters[0].requestMirror",
        ),
        (
            "mirror without port",
            "  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow}",
            "spec.rules[0].filters[0].requestMirror.backendRef",
        ),
        (
            "duration that is not GEP-2257",
            "  - timeouts: {request: 1.5s}",
            "spec.rules[0].timeouts.request",
        ),
        (
            // HTTPRouteTimeouts.backendRequest "must be no more than the value of the Request timeout".
            "backendRequest above request",
            "  - timeouts: {request: 1s, backendRequest: 2s}",
            "spec.rules[0].timeouts.backendRequest",
        ),
        (
            "redirect in a backendRef's filters",
            "  - backendRefs:
    - name: v1
      port: 80
      filters:
      - type: RequestRedirect
        requestRedirect: {hostname: x.example}",
            "spec.rules[0].backendRefs[0].filters[0].type",
        ),
        (
            "duplicate rule names",
            "  - name: a\n  - name: a",
            "spec.rules[1].name",
        ),
    ];
    for (what, rules, field) in cases {
        let err = convert(&with_rules(rules)).expect_err(what);
        assert_eq!(err.field, field, "{what}: {err}");
        assert_eq!(err.route, ns("shop", "r"));
        assert!(
            err.to_string().starts_with("HTTPRoute shop/r: "),
            "{what}: {err}"
        );
    }
}

#[test]
fn unusable_backend_refs_stay_and_are_reported() {
    // HTTPRouteRule.backendRefs: an invalid backendRef's share of requests gets a 500, so it is kept.
    let r = valid(&with_rules(
        "  - backendRefs:
    - {name: v1, port: 80}
    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: far, port: 80}
    - {name: noport}",
    ));
    let kinds: Vec<bool> = r.rules[0]
        .backends
        .iter()
        .map(|b| matches!(b.backend, Backend::Invalid(_)))
        .collect();
    assert_eq!(kinds, [false, true, true]);
    let fields: Vec<&str> = r.warnings.iter().map(|w| w.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.rules[0].backendRefs[1]",
            "spec.rules[0].backendRefs[2]"
        ]
    );
}

#[test]
fn filters_convert_in_order() {
    let r = valid(&with_rules(
        "  - matches:
    - path: {type: PathPrefix, value: /api/}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: a}, {name: x-set, value: ignored}]
        add: [{name: x-add, value: b}]
        remove: [x-gone]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-resp, value: c}]}
    - type: URLRewrite
      urlRewrite:
        hostname: internal.example
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 81}, percent: 25}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow2, port: 81}, fraction: {numerator: 1, denominator: 3}}
    backendRefs:
    - name: v1
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v1}]}",
    ));
    let rule = &r.rules[0];
    // The trailing `/` of a PathPrefix is ignored.
    assert!(matches!(&rule.matches[0].path, PathMatch::Prefix(p) if p == "/api"));
    let [
        Filter::RequestHeaders(req),
        Filter::ResponseHeaders(resp),
        Filter::UrlRewrite(rw),
        Filter::Mirror(m1),
        Filter::Mirror(m2),
    ] = &rule.filters[..]
    else {
        panic!("unexpected filters {:?}", rule.filters);
    };
    // HTTPHeader.name: equivalent names (case-insensitive): the first entry counts.
    assert_eq!(req.set.len(), 1);
    assert_eq!(req.set[0].0, "x-set");
    assert_eq!(req.set[0].1, "a");
    assert_eq!(req.add[0].0, "x-add");
    assert_eq!(req.remove, [HeaderName::from_static("x-gone")]);
    assert_eq!(resp.add[0].0, "x-resp");
    assert_eq!(
        rw.path,
        Some(PathModifier::ReplacePrefixMatch("/v2".into()))
    );
    assert_eq!(
        rw.hostname.as_ref().map(|h| h.to_str().expect("text")),
        Some("internal.example")
    );
    assert_eq!((m1.numerator, m1.denominator), (25, 100));
    assert_eq!((m2.numerator, m2.denominator), (1, 3));
    assert!(matches!(
        &rule.backends[0].filters[..],
        [Filter::RequestHeaders(h)] if h.set[0].0 == "x-backend"
    ));
}

#[test]
fn redirect_defaults_to_302() {
    // HTTPRequestRedirectFilter.statusCode: default 302.
    let r = valid(&with_rules(
        "  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https}",
    ));
    let Filter::Redirect(redirect) = &r.rules[0].filters[0] else {
        panic!("not a redirect");
    };
    assert_eq!(redirect.status, StatusCode::FOUND);
    assert_eq!(redirect.scheme, Some("https"));
    let r = valid(&with_rules(
        "  - filters:
    - type: RequestRedirect
      requestRedirect: {statusCode: 301, port: 8443, path: {type: ReplaceFullPath, replaceFullPath: /new}}",
    ));
    let Filter::Redirect(redirect) = &r.rules[0].filters[0] else {
        panic!("not a redirect");
    };
    assert_eq!(redirect.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(redirect.port, Some(8443));
    assert_eq!(
        redirect.path,
        Some(PathModifier::ReplaceFullPath("/new".into()))
    );
}

#[test]
fn timeouts_zero_disables() {
    // HTTPRouteTimeouts: "Setting a timeout to the zero duration (e.g. "0s") SHOULD disable the timeout".
    let r = valid(&with_rules(
        "  - timeouts: {request: 0s}
  - timeouts: {request: 1m30s, backendRequest: 500ms}
  - {}",
    ));
    assert_eq!(
        r.rules[0].timeouts,
        Timeouts {
            request: Timeout::Disabled,
            backend_request: Timeout::Unset
        }
    );
    assert_eq!(
        r.rules[1].timeouts,
        Timeouts {
            request: Timeout::After(Duration::from_secs(90)),
            backend_request: Timeout::After(Duration::from_millis(500))
        }
    );
    assert_eq!(r.rules[2].timeouts, Timeouts::default());
}

#[test]
fn header_and_query_matches_keep_the_first_of_equivalent_names() {
    let r = valid(&with_rules(
        "  - matches:
    - headers:
      - {name: X-Version, value: v1}
      - {name: x-version, value: v2}
      queryParams:
      - {name: a, value: \"1\"}
      - {name: a, value: \"2\"}
      - {name: A, type: RegularExpression, value: \"[0-9]+\"}
      method: POST",
    ));
    let m = &r.rules[0].matches[0];
    assert_eq!(m.headers.len(), 1);
    assert!(matches!(&m.headers[0].value, ValueMatch::Exact(v) if v == "v1"));
    // Query param names are case-sensitive: `A` is another parameter.
    assert_eq!(m.query.len(), 2);
    assert_eq!(m.method, Some(Method::POST));
}

#[test]
fn missing_rules_default_to_one_catch_all_rule() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web}]";
    let r = valid(yaml);
    assert_eq!(r.rules.len(), 1);
    assert!(r.rules[0].backends.is_empty());
}

#[test]
fn decoding_names_the_failing_field_and_checks_the_kind() {
    let err = http_route_from_yaml(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  rules:
  - backendRefs:
    - name: v1
      weight: lots",
    )
    .expect_err("weight is not a number");
    assert_eq!(err.field, "spec.rules[0].backendRefs[0].weight");
    let err = http_route_from_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: x}")
        .expect_err("not an HTTPRoute");
    assert_eq!(err.field, "kind");
    let json = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute",
        "metadata":{"name":"r","namespace":"shop","creationTimestamp":"2024-05-01T10:00:00Z"},
        "spec":{"parentRefs":[{"group":"","kind":"Service","name":"web"}],
                "rules":[{"backendRefs":[{"name":"v1","port":80}]}]}}"#;
    let route = http_route_from_json(json).expect("valid JSON");
    let r = Route::from_k8s(&route).expect("valid").expect("ours");
    assert!(r.created.is_some());
    // v1beta1 has the same schema.
    assert!(
        http_route_from_yaml(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {}"
        )
        .is_ok()
    );
}

#[test]
fn parent_applies_to_port_and_section_name() {
    let all = ParentRef {
        service: ns("shop", "web"),
        port: None,
        section_name: None,
    };
    let web = ns("shop", "web");
    // GEP-1294 Ports: "If port is not set, the implementation MUST associate the route with all ports".
    assert!(all.applies_to(&web, 80, "http"));
    assert!(all.applies_to(&web, 8080, "admin"));
    assert!(!all.applies_to(&ns("shop", "api"), 80, "http"));
    // "If port is set, the implementation MUST associate the route only with that port."
    let p80 = ParentRef {
        port: Some(80),
        ..all.clone()
    };
    assert!(p80.applies_to(&web, 80, "http"));
    assert!(!p80.applies_to(&web, 8080, "http"));
    // ParentReference.sectionName: for a Service, the port name.
    let http = ParentRef {
        section_name: Some("http".into()),
        ..all
    };
    assert!(http.applies_to(&web, 80, "http"));
    assert!(!http.applies_to(&web, 8080, "admin"));
}

#[test]
fn mirror_fraction_decides_per_request() {
    use rand::{SeedableRng as _, rngs::StdRng};
    // HTTPRequestMirrorFilter: percent/fraction of requests mirrored; neither means 100 %.
    let mut rng = StdRng::seed_from_u64(9);
    let backend = Backend::Service(ServicePort {
        service: ns("shop", "shadow"),
        port: 80,
    });
    let share = |numerator, denominator, rng: &mut StdRng| {
        let m = Mirror {
            backend: backend.clone(),
            numerator,
            denominator,
        };
        (0..10_000).filter(|_| m.should_mirror(rng)).count()
    };
    assert_eq!(share(0, 100, &mut rng), 0);
    assert_eq!(share(1, 1, &mut rng), 10_000);
    assert_eq!(share(100, 100, &mut rng), 10_000);
    let quarter = share(25, 100, &mut rng);
    assert!((2_250..=2_750).contains(&quarter), "{quarter}");
    let third = share(1, 3, &mut rng);
    assert!((3_033..=3_633).contains(&third), "{third}");
}
