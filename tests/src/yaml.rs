//! Kubernetes YAML for the agent's config directory: Services and EndpointSlices rendered as the API server
//! would serve them, and multi-document joining.

use std::net::Ipv4Addr;

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
    fn documents_are_separated() {
        assert_eq!(
            documents(&["a: 1".into(), "b: 2\n".into()]),
            "---\na: 1\n---\nb: 2\n"
        );
    }
}
