use super::*;

/// Frontends on real ports (each ClusterIP also has its reject-any-other-port entries).
fn served(d: &Desired) -> usize {
    d.frontends
        .keys()
        .filter(|f| f.port != ANY_OTHER_PORT)
        .count()
}

fn service(yaml: &str) -> Service {
    serde_yaml::from_str(yaml).expect("test YAML parses")
}

fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml::from_str(yaml).expect("test YAML parses")
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
- addresses: [10.0.0.2]
- addresses: [10.0.0.3]
  conditions: {ready: false}
"#;

#[test]
fn service_and_slice_yield_one_frontend_per_port_with_ready_backends() {
    let svc = ServiceSpec::from_k8s(&service(WEB))
        .expect("valid")
        .expect("ours");
    let sl = SliceSpec::from_k8s(&slice(WEB_SLICE))
        .expect("valid")
        .expect("ours");
    let d = desired([&svc], [&sl], &NodeContext::default());
    assert_eq!(served(&d), 2);
    let http = &d.frontends[&Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10).into(),
        port: 80,
        protocol: Protocol::Tcp,
    }];
    let ips: Vec<String> = http.backends.iter().map(ToString::to_string).collect();
    // A nil `ready` counts as ready; ready: false is left out.
    assert_eq!(ips, ["10.0.0.1:8080/TCP", "10.0.0.2:8080/TCP"]);
    let dns = &d.frontends[&Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10).into(),
        port: 53,
        protocol: Protocol::Udp,
    }];
    assert!(
        dns.backends
            .iter()
            .all(|b| b.port == 5353 && b.protocol == Protocol::Udp)
    );
    assert_eq!(dns.service.to_string(), "shop/web");
}

#[test]
fn service_without_slices_has_a_rejecting_frontend() {
    let svc = ServiceSpec::from_k8s(&service(WEB))
        .expect("valid")
        .expect("ours");
    let d = desired([&svc], [] as [&SliceSpec; 0], &NodeContext::default());
    assert_eq!(served(&d), 2);
    assert!(d.frontends.values().all(|f| f.backends.is_empty()));
}

#[test]
fn slices_of_other_services_or_namespaces_do_not_match() {
    let svc = ServiceSpec::from_k8s(&service(WEB))
        .expect("valid")
        .expect("ours");
    let other_ns = SliceSpec::from_k8s(&slice(
        &WEB_SLICE.replace("namespace: shop", "namespace: other"),
    ))
    .expect("valid")
    .expect("ours");
    let d = desired([&svc], [&other_ns], &NodeContext::default());
    assert!(d.frontends.values().all(|f| f.backends.is_empty()));
}

#[test]
fn invalid_fields_are_named() {
    let bad_ip = service(
        &WEB.replace("clusterIP: 10.96.0.10\n", "clusterIP: not-an-ip\n")
            .replace("  clusterIPs: [10.96.0.10]\n", ""),
    );
    let e = ServiceSpec::from_k8s(&bad_ip).expect_err("invalid");
    assert_eq!(e.field, "spec.clusterIP");

    let bad_port = service(&WEB.replace("port: 80,", "port: 70000,"));
    assert_eq!(
        ServiceSpec::from_k8s(&bad_port).expect_err("invalid").field,
        "spec.ports[0].port"
    );

    let dup = service(&WEB.replace("port: 53, protocol: UDP", "port: 80, protocol: TCP"));
    assert_eq!(
        ServiceSpec::from_k8s(&dup).expect_err("invalid").field,
        "spec.ports[1].port"
    );

    let bad_ep = slice(&WEB_SLICE.replace("[10.0.0.2]", "[10.0.0.999]"));
    assert_eq!(
        SliceSpec::from_k8s(&bad_ep).expect_err("invalid").field,
        "endpoints[1].addresses[0]"
    );
}

#[test]
fn services_that_are_not_ours_are_skipped() {
    let headless = service(
        &WEB.replace("clusterIP: 10.96.0.10", "clusterIP: None")
            .replace("clusterIPs: [10.96.0.10]", "clusterIPs: [None]"),
    );
    assert_eq!(ServiceSpec::from_k8s(&headless), Ok(None));
    let external = service(&WEB.replace(
        "spec:\n",
        "spec:\n  type: ExternalName\n  externalName: example.org\n",
    ));
    assert_eq!(ServiceSpec::from_k8s(&external), Ok(None));
    let other_proxy = service(&WEB.replace(
        "namespace: shop}",
        "namespace: shop, labels: {service.kubernetes.io/service-proxy-name: other}}",
    ));
    let spec = ServiceSpec::from_k8s(&other_proxy)
        .expect("valid")
        .expect("parsed");
    let mut node = NodeContext::default();
    assert!(
        desired([&spec], [] as [&SliceSpec; 0], &node)
            .frontends
            .is_empty(),
        "not ours without a proxy name"
    );
    node.service_proxy_name = Some("weir".into());
    assert!(
        desired([&spec], [] as [&SliceSpec; 0], &node)
            .frontends
            .is_empty(),
        "labelled for another proxy"
    );
    node.service_proxy_name = Some("other".into());
    assert_eq!(
        served(&desired([&spec], [] as [&SliceSpec; 0], &node)),
        2,
        "ours when the names match"
    );
}

#[test]
fn the_cache_recomputes_only_services_whose_inputs_changed() {
    let mut snapshot = Snapshot::default();
    for i in 0..1000u32 {
        let name = format!("svc-{i}");
        let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
        let svc = service(
            &WEB.replace("name: web", &format!("name: {name}"))
                .replace("10.96.0.10", &ip),
        );
        let spec = ServiceSpec::from_k8s(&svc).expect("valid").expect("ours");
        let sl = slice(
            &WEB_SLICE
                .replace("name: web-abc", &format!("name: {name}-abc"))
                .replace(
                    "kubernetes.io/service-name: web",
                    &format!("kubernetes.io/service-name: {name}"),
                ),
        );
        let sl = SliceSpec::from_k8s(&sl).expect("valid").expect("ours");
        snapshot
            .services
            .insert(spec.id.clone(), std::sync::Arc::new(spec));
        snapshot
            .slices
            .insert(sl.id.clone(), std::sync::Arc::new(sl));
    }
    let mut cache = DesiredCache::default();
    let (first, n) = cache.update(&snapshot, &NodeContext::default());
    assert_eq!(n, 1000);
    assert_eq!(
        first,
        desired(
            snapshot.services.values(),
            snapshot.slices.values(),
            &NodeContext::default()
        )
    );

    let (_, n) = cache.update(&snapshot, &NodeContext::default());
    assert_eq!(n, 0, "nothing changed");

    let id = NsName {
        namespace: "shop".into(),
        name: "svc-7-abc".into(),
    };
    std::sync::Arc::make_mut(snapshot.slices.get_mut(&id).expect("slice"))
        .endpoints
        .pop();
    let gone = NsName {
        namespace: "shop".into(),
        name: "svc-9".into(),
    };
    snapshot.services.remove(&gone);
    let (after, n) = cache.update(&snapshot, &NodeContext::default());
    assert_eq!(n, 1, "only svc-7 recomputed");
    assert_eq!(
        after,
        desired(
            snapshot.services.values(),
            snapshot.slices.values(),
            &NodeContext::default()
        )
    );
}

/// The cache finds changed slices by walking them in step with the last update's: a slice moved to
/// another Service (label changed), deleted, added, or replaced by an equal copy, and a Service whose
/// spec alone changed, each recompute exactly the Services concerned, and the result always equals a
/// full computation.
#[test]
fn the_cache_follows_slices_added_removed_and_moved_between_services() {
    let node = NodeContext::default();
    let full = |s: &Snapshot| desired(s.services.values(), s.slices.values(), &node);
    let mut snapshot = Snapshot::default();
    let svc_id = |i: u32| NsName {
        namespace: "shop".into(),
        name: format!("svc-{i}"),
    };
    let slice_of = |i: u32, name: &str| {
        let sl = slice(
            &WEB_SLICE
                .replace("name: web-abc", &format!("name: {name}"))
                .replace(
                    "kubernetes.io/service-name: web",
                    &format!("kubernetes.io/service-name: svc-{i}"),
                ),
        );
        std::sync::Arc::new(SliceSpec::from_k8s(&sl).expect("valid").expect("ours"))
    };
    for i in 0..20u32 {
        let svc = service(
            &WEB.replace("name: web", &format!("name: svc-{i}"))
                .replace("10.96.0.10", &format!("10.96.0.{}", 10 + i)),
        );
        let spec = ServiceSpec::from_k8s(&svc).expect("valid").expect("ours");
        snapshot
            .services
            .insert(spec.id.clone(), std::sync::Arc::new(spec));
        let sl = slice_of(i, &format!("svc-{i}-a"));
        snapshot.slices.insert(sl.id.clone(), sl);
    }
    let mut cache = DesiredCache::default();
    assert_eq!(cache.update(&snapshot, &node).1, 20);

    let mut step = |snapshot: &Snapshot, want: usize, what: &str| {
        let (d, n) = cache.update(snapshot, &node);
        assert_eq!(n, want, "{what}: Services recomputed");
        assert_eq!(d, full(snapshot), "{what}: equals a full computation");
    };
    step(&snapshot, 0, "nothing changed");

    // svc-3's slice now belongs to svc-4 (its label changed): both change.
    let moved = slice_of(4, "svc-3-a");
    snapshot.slices.insert(moved.id.clone(), moved);
    step(&snapshot, 2, "slice moved from svc-3 to svc-4");

    // A second slice for svc-7, sorting between others.
    let extra = slice_of(7, "svc-12-zz");
    snapshot.slices.insert(extra.id.clone(), extra);
    step(&snapshot, 1, "slice added to svc-7");

    // svc-10's slice deleted.
    let gone = NsName {
        namespace: "shop".into(),
        name: "svc-10-a".into(),
    };
    snapshot.slices.remove(&gone);
    step(&snapshot, 1, "slice of svc-10 deleted");

    // An equal copy of svc-11's slice (a resync delivers new objects with the same content).
    let id = NsName {
        namespace: "shop".into(),
        name: "svc-11-a".into(),
    };
    let copy = std::sync::Arc::new((*snapshot.slices[&id]).clone());
    snapshot.slices.insert(id, copy);
    step(&snapshot, 1, "slice of svc-11 replaced by an equal copy");

    // svc-15's spec changes (a port added), its slices not.
    let svc = service(
        &WEB.replace("name: web", "name: svc-15")
            .replace("10.96.0.10", "10.96.0.25")
            .replace(
                "  - {name: http, port: 80",
                "  - {name: extra, port: 81, protocol: TCP, targetPort: 8080}\n  - {name: http, port: 80",
            ),
    );
    let spec = ServiceSpec::from_k8s(&svc).expect("valid").expect("ours");
    snapshot
        .services
        .insert(svc_id(15), std::sync::Arc::new(spec));
    step(&snapshot, 1, "spec of svc-15 changed");

    // A slice for a Service that does not exist yet, then the Service.
    let early = slice_of(20, "svc-20-a");
    snapshot.slices.insert(early.id.clone(), early);
    step(&snapshot, 0, "slice without its Service");
    let svc = service(
        &WEB.replace("name: web", "name: svc-20")
            .replace("10.96.0.10", "10.96.0.30"),
    );
    let spec = ServiceSpec::from_k8s(&svc).expect("valid").expect("ours");
    snapshot
        .services
        .insert(svc_id(20), std::sync::Arc::new(spec));
    step(&snapshot, 1, "its Service arrives");
    snapshot.services.remove(&svc_id(0));
    step(&snapshot, 0, "svc-0 deleted");
}

#[test]
fn node_ports_answer_on_every_node_ip_and_external_ips_on_the_service_port() {
    let svc = service(
        &WEB.replace(
            "spec:\n",
            "spec:\n  type: NodePort\n  externalIPs: [203.0.113.7]\n",
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}"),
    );
    let mut with_lb = svc.clone();
    with_lb.status = Some(
        serde_yaml::from_str("loadBalancer: {ingress: [{ip: 198.51.100.9}]}").expect("status"),
    );
    let spec = ServiceSpec::from_k8s(&with_lb)
        .expect("valid")
        .expect("ours");
    let sl = SliceSpec::from_k8s(&slice(WEB_SLICE))
        .expect("valid")
        .expect("ours");
    let node = NodeContext {
        ips: vec![
            Ipv4Addr::new(172, 30, 0, 1).into(),
            Ipv4Addr::new(172, 31, 0, 1).into(),
        ],
        ..NodeContext::default()
    };
    let d = desired([&spec], [&sl], &node);
    let tcp: Vec<String> = d
        .frontends
        .keys()
        .filter(|f| f.protocol == Protocol::Tcp && f.port != ANY_OTHER_PORT)
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        tcp,
        [
            "10.96.0.10:80/TCP",
            "172.30.0.1:30080/TCP",
            "172.31.0.1:30080/TCP",
            "198.51.100.9:80/TCP",
            "203.0.113.7:80/TCP"
        ]
    );
    let http = &d.frontends[&Frontend {
        ip: Ipv4Addr::new(172, 30, 0, 1).into(),
        port: 30080,
        protocol: Protocol::Tcp,
    }];
    assert_eq!(http.backends.len(), 2, "same backends as the ClusterIP");

    // A ClusterIP Service carrying a stale nodePort gets none.
    let plain = service(&WEB.replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}"));
    let spec = ServiceSpec::from_k8s(&plain).expect("valid").expect("ours");
    assert!(
        desired([&spec], [&sl], &node)
            .frontends
            .keys()
            .all(|f| f.port != 30080)
    );
}

const POLICY_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.0.0.1]
  nodeName: node-a
  conditions: {ready: true, serving: true, terminating: false}
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.0.0.2]
  nodeName: node-b
  conditions: {ready: true, serving: true, terminating: false}
  hints: {forZones: [{name: zone-b}]}
- addresses: [10.0.0.3]
  nodeName: node-a
  conditions: {ready: false, serving: true, terminating: true}
  hints: {forZones: [{name: zone-a}]}
- addresses: [10.0.0.4]
  nodeName: node-b
  conditions: {ready: false, serving: false, terminating: true}
"#;

fn http_backends(
    svc_yaml: &str,
    slice_yaml: &str,
    node: &NodeContext,
    frontend: Frontend,
) -> (Vec<String>, bool) {
    let spec = ServiceSpec::from_k8s(&service(svc_yaml))
        .expect("valid")
        .expect("ours");
    let sl = SliceSpec::from_k8s(&slice(slice_yaml))
        .expect("valid")
        .expect("ours");
    let d = desired([&spec], [&sl], node);
    let f = &d.frontends[&frontend];
    (
        f.backends.iter().map(|b| b.ip.to_string()).collect(),
        f.drop_when_empty,
    )
}

fn cluster_http() -> Frontend {
    Frontend {
        ip: Ipv4Addr::new(10, 96, 0, 10).into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn node(name: &str, zone: Option<&str>) -> NodeContext {
    NodeContext {
        ips: vec![Ipv4Addr::new(172, 30, 0, 1).into()],
        name: name.into(),
        zone: zone.map(Into::into),
        service_proxy_name: None,
    }
}

#[test]
fn ready_endpoints_are_used_and_serving_terminating_ones_only_when_none_is_ready() {
    let (b, _) = http_backends(WEB, POLICY_SLICE, &node("node-a", None), cluster_http());
    assert_eq!(b, ["10.0.0.1", "10.0.0.2"]);
    // Only terminating endpoints left: the serving one takes new connections, the non-serving one never.
    let only_terminating = POLICY_SLICE.replace(
        "conditions: {ready: true, serving: true, terminating: false}",
        "conditions: {ready: false, serving: false, terminating: true}",
    );
    let (b, drop) = http_backends(
        WEB,
        &only_terminating,
        &node("node-a", None),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.3"]);
    assert!(!drop);
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints_and_drops_without_one() {
    let itp = WEB.replace("spec:\n", "spec:\n  internalTrafficPolicy: Local\n");
    let (b, drop) = http_backends(&itp, POLICY_SLICE, &node("node-a", None), cluster_http());
    assert_eq!(b, ["10.0.0.1"]);
    assert!(drop, "an empty local set drops, not rejects");
    let (b, drop) = http_backends(&itp, POLICY_SLICE, &node("node-c", None), cluster_http());
    assert!(b.is_empty() && drop);
    // Local endpoints only terminating: the local serving-terminating one is used (fallback per policy).
    let (b, _) = http_backends(
        &itp,
        &POLICY_SLICE.replace(
            "- addresses: [10.0.0.1]\n  nodeName: node-a",
            "- addresses: [10.0.0.1]\n  nodeName: node-z",
        ),
        &node("node-a", None),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.3"]);
}

#[test]
fn external_traffic_policy_local_governs_node_ports_but_not_the_cluster_ip() {
    let etp = WEB
        .replace(
            "spec:\n",
            "spec:\n  type: NodePort\n  externalTrafficPolicy: Local\n",
        )
        .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30080}");
    let np = Frontend {
        ip: Ipv4Addr::new(172, 30, 0, 1).into(),
        port: 30080,
        protocol: Protocol::Tcp,
    };
    let (b, drop) = http_backends(&etp, POLICY_SLICE, &node("node-b", None), np);
    assert_eq!(b, ["10.0.0.2"]);
    assert!(drop);
    let (b, drop) = http_backends(&etp, POLICY_SLICE, &node("node-b", None), cluster_http());
    assert_eq!(b, ["10.0.0.1", "10.0.0.2"]);
    assert!(!drop);
}

#[test]
fn prefer_close_keeps_traffic_in_zone_only_when_every_endpoint_is_hinted() {
    let pc = WEB.replace("spec:\n", "spec:\n  trafficDistribution: PreferClose\n");
    let (b, _) = http_backends(
        &pc,
        POLICY_SLICE,
        &node("node-a", Some("zone-b")),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.2"]);
    // Without PreferClose, hints are ignored.
    let (b, _) = http_backends(
        WEB,
        POLICY_SLICE,
        &node("node-a", Some("zone-b")),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.1", "10.0.0.2"]);
    // A ready endpoint without hints disables topology for the service.
    let unhinted = POLICY_SLICE.replace("  hints: {forZones: [{name: zone-b}]}\n", "");
    let (b, _) = http_backends(
        &pc,
        &unhinted,
        &node("node-a", Some("zone-b")),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.1", "10.0.0.2"]);
    // No endpoint for this node's zone: all are used.
    let (b, _) = http_backends(
        &pc,
        POLICY_SLICE,
        &node("node-a", Some("zone-x")),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.1", "10.0.0.2"]);
    // The annotation works like the field.
    let annotated = WEB.replace(
        "namespace: shop}",
        "namespace: shop, annotations: {service.kubernetes.io/topology-mode: Auto}}",
    );
    let (b, _) = http_backends(
        &annotated,
        POLICY_SLICE,
        &node("node-a", Some("zone-a")),
        cluster_http(),
    );
    assert_eq!(b, ["10.0.0.1"]);
}

#[test]
fn every_cluster_ip_rejects_ports_no_service_defines() {
    let svc = ServiceSpec::from_k8s(&service(WEB))
        .expect("valid")
        .expect("ours");
    let sl = SliceSpec::from_k8s(&slice(WEB_SLICE))
        .expect("valid")
        .expect("ours");
    let d = desired([&svc], [&sl], &NodeContext::default());
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let any = &d.frontends[&Frontend {
            ip: Ipv4Addr::new(10, 96, 0, 10).into(),
            port: ANY_OTHER_PORT,
            protocol,
        }];
        assert!(any.backends.is_empty() && !any.drop_when_empty, "rejects");
    }
}

#[test]
fn the_cache_agrees_with_a_full_computation_when_services_clash() {
    let spec = |name: &str, ip: &str| {
        let svc = service(
            &WEB.replace("name: web", &format!("name: {name}"))
                .replace("10.96.0.10", ip),
        );
        std::sync::Arc::new(ServiceSpec::from_k8s(&svc).expect("valid").expect("ours"))
    };
    let node = NodeContext::default();
    let full = |s: &Snapshot| desired(s.services.values(), s.slices.values(), &node);
    let mut snapshot = Snapshot::default();
    let mut cache = DesiredCache::default();
    for (name, ip) in [
        ("a", "10.96.0.10"),
        ("b", "10.96.0.10"),
        ("c", "10.96.0.11"),
    ] {
        let s = spec(name, ip);
        snapshot.services.insert(s.id.clone(), s);
        assert_eq!(
            cache.update(&snapshot, &node).0,
            full(&snapshot),
            "after adding {name}"
        );
    }
    // b (sorting after a) owns the clashing frontend; removing either leaves the other's.
    for name in ["b", "a"] {
        let id = snapshot
            .services
            .keys()
            .find(|id| id.name == name)
            .cloned()
            .expect("service");
        snapshot.services.remove(&id);
        assert_eq!(
            cache.update(&snapshot, &node).0,
            full(&snapshot),
            "after removing {name}"
        );
    }
    assert_eq!(
        cache.update(&snapshot, &node).0.frontends.len(),
        full(&snapshot).frontends.len()
    );
}
