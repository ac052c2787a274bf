//! Kubernetes YAML for the agent's config directory: Services and EndpointSlices rendered as the API server
//! would serve them, and multi-document joining.

use std::net::{IpAddr, Ipv4Addr};

/// A YAML scalar for `s`: a JSON string is valid YAML and quotes everything that needs it.
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A core/v1 `ClusterIP` Service. `ports` are `(name, port, protocol, target_port)`, protocol as
/// Kubernetes spells it (`TCP`, `UDP`, `SCTP`). `cluster_ip` is a string on purpose, so tests can render
/// invalid ones.
pub fn service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, &str, u16)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  type: ClusterIP\n  \
         clusterIP: {ip}\n  clusterIPs:\n  - {ip}\n  ipFamilies:\n  - IPv4\n  ports:\n",
        q(name),
        q(ns),
        ip = q(cluster_ip),
    );
    if ports.is_empty() {
        y.truncate(y.len() - 1);
        y.push_str(" []\n");
    }
    for (port_name, port, protocol, target) in ports {
        y.push_str(&format!(
            "  - name: {}\n    port: {port}\n    protocol: {}\n    targetPort: {target}\n",
            q(port_name),
            q(protocol)
        ));
    }
    y
}

/// A discovery.k8s.io/v1 EndpointSlice for Service `service`. `ports` are `(name, port, protocol)` with the
/// backends' (target) port; `endpoints` are `(address, ready)`: ready endpoints are also serving, none is
/// terminating.
pub fn endpointslice_yaml(
    ns: &str,
    slice_name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv4Addr, bool)],
) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {}\n  namespace: {}\n  \
         labels:\n    kubernetes.io/service-name: {}\n    endpointslice.kubernetes.io/managed-by: {}\n\
         addressType: IPv4\n",
        q(slice_name),
        q(ns),
        q(service),
        q("weir-tests")
    );
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
    }
    for (ip, ready) in endpoints {
        y.push_str(&format!(
            "- addresses:\n  - {}\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n",
            q(&ip.to_string())
        ));
    }
    if ports.is_empty() {
        y.push_str("ports: []\n");
    } else {
        y.push_str("ports:\n");
    }
    for (port_name, port, protocol) in ports {
        y.push_str(&format!(
            "- name: {}\n  port: {port}\n  protocol: {}\n",
            q(port_name),
            q(protocol)
        ));
    }
    y
}

/// A discovery.k8s.io/v1 EndpointSlice like [`endpointslice_yaml`], but each endpoint names the node it runs
/// on: `endpoints` are `(address, nodeName, ready)`. Multi-node tests need `nodeName`, because
/// externalTrafficPolicy=Local (and the health check node port) count only the agent's own node's endpoints.
pub fn endpointslice_with_nodes(
    ns: &str,
    slice_name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv4Addr, &str, bool)],
) -> String {
    let y = endpointslice_yaml(ns, slice_name, service, ports, &[]);
    if endpoints.is_empty() {
        return y;
    }
    // The shared header and ports, with the empty endpoint list replaced by ours.
    let mut list = String::from("endpoints:\n");
    for (ip, node, ready) in endpoints {
        list.push_str(&format!(
            "- addresses:\n  - {}\n  nodeName: {}\n  conditions:\n    ready: {ready}\n    serving: {ready}\n    \
             terminating: false\n",
            q(&ip.to_string()),
            q(node)
        ));
    }
    y.replacen("endpoints: []\n", &list, 1)
}

/// `spec.externalTrafficPolicy` of a Service that exposes node ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Every node forwards to every ready endpoint (Kubernetes' default).
    Cluster,
    /// A node forwards only to its own endpoints, and drops when it has none.
    Local,
}

impl TrafficPolicy {
    /// The value as Kubernetes spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cluster => "Cluster",
            Self::Local => "Local",
        }
    }
}

/// A core/v1 `NodePort` Service with explicit node ports. `ports` are `(name, port, protocol, target_port,
/// node_port)`; otherwise as [`service_yaml`].
pub fn nodeport_service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    policy: TrafficPolicy,
    ports: &[(&str, u16, &str, u16, u16)],
) -> String {
    exposed_service_yaml(ns, name, cluster_ip, "NodePort", policy, ports)
}

/// A core/v1 `LoadBalancer` Service: [`nodeport_service_yaml`] plus `status.loadBalancer.ingress` with
/// `ingress_ips` and, when given, `spec.healthCheckNodePort` (the API server allocates one for Local
/// LoadBalancer Services; the agent serves it only then).
pub fn loadbalancer_service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    policy: TrafficPolicy,
    ports: &[(&str, u16, &str, u16, u16)],
    ingress_ips: &[Ipv4Addr],
    health_check_node_port: Option<u16>,
) -> String {
    let mut y = exposed_service_yaml(ns, name, cluster_ip, "LoadBalancer", policy, ports);
    if let Some(port) = health_check_node_port {
        y = y.replacen(
            "  clusterIP: ",
            &format!("  healthCheckNodePort: {port}\n  clusterIP: "),
            1,
        );
    }
    if !ingress_ips.is_empty() {
        y.push_str("status:\n  loadBalancer:\n    ingress:\n");
        for ip in ingress_ips {
            y.push_str(&format!("    - ip: {}\n", q(&ip.to_string())));
        }
    }
    y
}

/// [`service_yaml`] with another `type`, the traffic policy, and a `nodePort` after each `targetPort`.
fn exposed_service_yaml(
    ns: &str,
    name: &str,
    cluster_ip: &str,
    type_: &str,
    policy: TrafficPolicy,
    ports: &[(&str, u16, &str, u16, u16)],
) -> String {
    let plain: Vec<(&str, u16, &str, u16)> = ports
        .iter()
        .map(|(n, port, proto, target, _)| (*n, *port, *proto, *target))
        .collect();
    let mut y = service_yaml(ns, name, cluster_ip, &plain).replacen(
        "  type: ClusterIP\n",
        &format!(
            "  type: {type_}\n  externalTrafficPolicy: {}\n",
            policy.as_str()
        ),
        1,
    );
    // Port entries are unique by name, so each one's rendering is found exactly once.
    for (port_name, port, protocol, target, node_port) in ports {
        let entry = format!(
            "  - name: {}\n    port: {port}\n    protocol: {}\n    targetPort: {target}\n",
            q(port_name),
            q(protocol)
        );
        y = y.replacen(&entry, &format!("{entry}    nodePort: {node_port}\n"), 1);
    }
    y
}

/// An IP family as Kubernetes spells it in `spec.ipFamilies` and an EndpointSlice's `addressType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// `IPv4` or `IPv6`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

/// Gives a Service rendered by this module ([`service_yaml`], [`nodeport_service_yaml`],
/// [`loadbalancer_service_yaml`]) with `clusterIP: cluster_ips[0]` the ClusterIPs `cluster_ips` (one
/// or two, primary first, as the API server allocates them): `clusterIP` the primary, `clusterIPs` all,
/// `ipFamilies` theirs in order, and `ipFamilyPolicy` `SingleStack` for one, `RequireDualStack` for two.
/// Panics on a Service not rendered with `cluster_ips[0]` (a bug in the test).
pub fn with_cluster_ips(service: &str, cluster_ips: &[IpAddr]) -> String {
    assert!(
        (1..=2).contains(&cluster_ips.len()),
        "a Service has one or two ClusterIPs, not {cluster_ips:?}"
    );
    let primary = q(&cluster_ips[0].to_string());
    let block =
        format!("  clusterIP: {primary}\n  clusterIPs:\n  - {primary}\n  ipFamilies:\n  - IPv4\n");
    assert!(
        service.contains(&block),
        "not a Service of this module with ClusterIP {primary}:\n{service}"
    );
    let policy = if cluster_ips.len() == 1 {
        "SingleStack"
    } else {
        "RequireDualStack"
    };
    let mut dual = format!("  ipFamilyPolicy: {policy}\n  clusterIP: {primary}\n  clusterIPs:\n");
    for ip in cluster_ips {
        dual.push_str(&format!("  - {}\n", q(&ip.to_string())));
    }
    dual.push_str("  ipFamilies:\n");
    for ip in cluster_ips {
        dual.push_str(&format!("  - {}\n", IpFamily::of(*ip).as_str()));
    }
    service.replacen(&block, &dual, 1)
}

/// A `ClusterIP` Service with one or two ClusterIPs of any family: [`service_yaml`] through
/// [`with_cluster_ips`]. A single IPv6 address makes a single-stack IPv6 Service.
pub fn service_yaml_ips(
    ns: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    ports: &[(&str, u16, &str, u16)],
) -> String {
    let primary = cluster_ips
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    with_cluster_ips(&service_yaml(ns, name, &primary, ports), cluster_ips)
}

/// A `NodePort` Service with one or two ClusterIPs of any family: [`nodeport_service_yaml`] through
/// [`with_cluster_ips`]. Its node ports answer on the node IPs of its families.
pub fn nodeport_service_yaml_ips(
    ns: &str,
    name: &str,
    cluster_ips: &[IpAddr],
    policy: TrafficPolicy,
    ports: &[(&str, u16, &str, u16, u16)],
) -> String {
    let primary = cluster_ips
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    with_cluster_ips(
        &nodeport_service_yaml(ns, name, &primary, policy, ports),
        cluster_ips,
    )
}

/// A discovery.k8s.io/v1 EndpointSlice of address type `family` for Service `service`, as
/// [`endpointslice_yaml`] (ready endpoints are also serving, none terminating) but for either family and
/// with an optional `nodeName` per endpoint: `endpoints` are `(address, nodeName, ready)`. Kubernetes
/// keeps one family per slice, so a dual-stack Service has (at least) two; panics on an endpoint of the
/// other family (a bug in the test).
pub fn endpointslice_yaml_family(
    ns: &str,
    slice_name: &str,
    service: &str,
    family: IpFamily,
    ports: &[(&str, u16, &str)],
    endpoints: &[(IpAddr, Option<&str>, bool)],
) -> String {
    if let Some((ip, ..)) = endpoints
        .iter()
        .find(|(ip, ..)| IpFamily::of(*ip) != family)
    {
        panic!("endpoint {ip} in an {} slice", family.as_str());
    }
    let y = endpointslice_yaml(ns, slice_name, service, ports, &[]).replacen(
        "addressType: IPv4\n",
        &format!("addressType: {}\n", family.as_str()),
        1,
    );
    if endpoints.is_empty() {
        return y;
    }
    let mut list = String::from("endpoints:\n");
    for (ip, node, ready) in endpoints {
        list.push_str(&format!("- addresses:\n  - {}\n", q(&ip.to_string())));
        if let Some(node) = node {
            list.push_str(&format!("  nodeName: {}\n", q(node)));
        }
        list.push_str(&format!(
            "  conditions:\n    ready: {ready}\n    serving: {ready}\n    terminating: false\n"
        ));
    }
    y.replacen("endpoints: []\n", &list, 1)
}

/// Joins documents into one multi-document YAML stream.
pub fn documents(docs: &[String]) -> String {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_renders_every_port_and_the_cluster_ip_twice() {
        let y = service_yaml(
            "default",
            "web",
            "10.96.0.10",
            &[("http", 80, "TCP", 8080), ("dns", 53, "UDP", 5353)],
        );
        assert!(y.contains("kind: Service\n"), "{y}");
        assert!(
            y.contains("  clusterIP: \"10.96.0.10\"\n  clusterIPs:\n  - \"10.96.0.10\"\n"),
            "{y}"
        );
        assert!(
            y.contains(
                "  - name: \"dns\"\n    port: 53\n    protocol: \"UDP\"\n    targetPort: 5353\n"
            ),
            "{y}"
        );
    }

    #[test]
    fn endpointslice_carries_the_service_label_and_conditions() {
        let ip = Ipv4Addr::new(10, 0, 0, 10);
        let y = endpointslice_yaml(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[(ip, false)],
        );
        assert!(
            y.contains("    kubernetes.io/service-name: \"web\"\n"),
            "{y}"
        );
        assert!(
            y.contains("  - \"10.0.0.10\"\n  conditions:\n    ready: false\n    serving: false\n"),
            "{y}"
        );
        assert!(
            y.contains("ports:\n- name: \"http\"\n  port: 8080\n"),
            "{y}"
        );
        let empty = endpointslice_yaml("default", "web-1", "web", &[], &[]);
        assert!(
            empty.contains("endpoints: []\n") && empty.contains("ports: []\n"),
            "{empty}"
        );
    }

    #[test]
    fn endpointslice_with_nodes_names_each_endpoints_node() {
        let y = endpointslice_with_nodes(
            "default",
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[
                (Ipv4Addr::new(10, 0, 0, 10), "node-0", true),
                (Ipv4Addr::new(10, 0, 1, 10), "node-1", false),
            ],
        );
        assert!(
            y.contains(
                "- addresses:\n  - \"10.0.0.10\"\n  nodeName: \"node-0\"\n  conditions:\n    ready: true\n"
            ),
            "{y}"
        );
        assert!(
            y.contains(
                "- addresses:\n  - \"10.0.1.10\"\n  nodeName: \"node-1\"\n  conditions:\n    ready: false\n"
            ),
            "{y}"
        );
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_yaml::from_str(&y).expect("EndpointSlice");
        let nodes: Vec<_> = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.node_name.as_deref())
            .collect();
        assert_eq!(nodes, [Some("node-0"), Some("node-1")]);
    }

    #[test]
    fn exposed_services_carry_type_policy_and_node_ports() {
        let ports = [
            ("tcp", 80, "TCP", 8080, 30080),
            ("udp", 53, "UDP", 5353, 30053),
        ];
        let y = nodeport_service_yaml("default", "web", "10.96.0.10", TrafficPolicy::Local, &ports);
        assert!(
            y.contains("  type: NodePort\n  externalTrafficPolicy: Local\n"),
            "{y}"
        );
        assert!(
            y.contains("    targetPort: 8080\n    nodePort: 30080\n"),
            "{y}"
        );
        assert!(
            y.contains("    targetPort: 5353\n    nodePort: 30053\n"),
            "{y}"
        );
        let lb = loadbalancer_service_yaml(
            "default",
            "web",
            "10.96.0.10",
            TrafficPolicy::Cluster,
            &ports,
            &[Ipv4Addr::new(198, 51, 100, 10)],
            Some(32000),
        );
        assert!(
            lb.contains("  type: LoadBalancer\n  externalTrafficPolicy: Cluster\n"),
            "{lb}"
        );
        assert!(
            lb.contains("  healthCheckNodePort: 32000\n  clusterIP: \"10.96.0.10\"\n"),
            "{lb}"
        );
        assert!(
            lb.ends_with("status:\n  loadBalancer:\n    ingress:\n    - ip: \"198.51.100.10\"\n"),
            "{lb}"
        );
        // What the agent decodes: the Kubernetes types themselves.
        let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(&lb).expect("Service");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(spec.health_check_node_port, Some(32000));
        let node_ports: Vec<_> = spec.ports.iter().flatten().map(|p| p.node_port).collect();
        assert_eq!(node_ports, [Some(30080), Some(30053)]);
        let ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|l| l.ingress);
        assert_eq!(
            ingress.expect("ingress")[0].ip.as_deref(),
            Some("198.51.100.10")
        );
    }

    #[test]
    fn dual_stack_services_and_ipv6_slices_decode_as_kubernetes_types() {
        let v4: IpAddr = "10.96.0.10".parse().expect("v4");
        let v6: IpAddr = "fd00:10:96::10".parse().expect("v6");
        let ports = [("tcp", 80, "TCP", 8080, 30080)];
        let y =
            nodeport_service_yaml_ips("default", "web", &[v4, v6], TrafficPolicy::Cluster, &ports);
        let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(&y).expect("Service");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(
            spec.cluster_ips.expect("clusterIPs"),
            ["10.96.0.10", "fd00:10:96::10"]
        );
        assert_eq!(spec.ip_families.expect("ipFamilies"), ["IPv4", "IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));

        let single = service_yaml_ips("default", "web6", &[v6], &[("tcp", 80, "TCP", 8080)]);
        let svc: k8s_openapi::api::core::v1::Service =
            serde_yaml::from_str(&single).expect("Service");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::10"));
        assert_eq!(spec.ip_families.expect("ipFamilies"), ["IPv6"]);
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));

        let pod6: IpAddr = "fd00:10::10".parse().expect("pod");
        let slice = endpointslice_yaml_family(
            "default",
            "web-v6",
            "web",
            IpFamily::V6,
            &[("tcp", 8080, "TCP")],
            &[(pod6, Some("node-0"), true)],
        );
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_yaml::from_str(&slice).expect("EndpointSlice");
        assert_eq!(slice.address_type, "IPv6");
        let endpoints = slice.endpoints.expect("endpoints");
        assert_eq!(endpoints[0].addresses, ["fd00:10::10"]);
        assert_eq!(endpoints[0].node_name.as_deref(), Some("node-0"));
    }

    #[test]
    fn documents_are_separated() {
        assert_eq!(
            documents(&["a: 1".into(), "b: 2\n".into()]),
            "---\na: 1\n---\nb: 2\n"
        );
    }
}
