//! Kubernetes objects as JSON for the simulator: the harness's YAML renderings (`crate::yaml`,
//! `crate::scenario`) converted, so the config-dir tests and the API-server tests feed the agent the same
//! objects, plus a Node.

use std::net::Ipv4Addr;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};

/// Every document of a (multi-document) YAML stream, as JSON; empty documents are skipped.
pub fn from_yaml(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("YAML document {i}"))?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

fn single(yaml: &str) -> anyhow::Result<Value> {
    from_yaml(yaml)?
        .into_iter()
        .next()
        .context("no YAML document")
}

/// A `ClusterIP` Service; `ports` are `(name, port, protocol, target_port)`. See
/// [`crate::yaml::service_yaml`].
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, &str, u16)],
) -> anyhow::Result<Value> {
    single(&crate::yaml::service_yaml(
        namespace, name, cluster_ip, ports,
    ))
}

/// An EndpointSlice of Service `service`; `ports` are `(name, port, protocol)`, `endpoints`
/// `(address, ready)`. See [`crate::yaml::endpointslice_yaml`].
pub fn endpointslice(
    namespace: &str,
    slice_name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(Ipv4Addr, bool)],
) -> anyhow::Result<Value> {
    single(&crate::yaml::endpointslice_yaml(
        namespace, slice_name, service, ports, endpoints,
    ))
}

/// The standard echo Service `name` in `default` and its EndpointSlice `<name>-1` (see
/// [`crate::scenario::echo_service`]).
pub fn echo_service(
    name: &str,
    cluster_ip: Ipv4Addr,
    endpoints: &[(Ipv4Addr, bool)],
) -> anyhow::Result<Vec<Value>> {
    from_yaml(&crate::scenario::echo_service(name, cluster_ip, endpoints))
}

/// A Ready Node with one InternalIP, as the kubelet reports it.
pub fn node(name: &str, internal_ip: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
        },
        "spec": {"podCIDR": "10.0.0.0/24", "podCIDRs": ["10.0.0.0/24"]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": internal_ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_renderings_convert_to_api_objects() {
        let objects = echo_service(
            "echo",
            Ipv4Addr::new(10, 96, 0, 10),
            &[(Ipv4Addr::new(10, 0, 0, 10), true)],
        )
        .expect("convert");
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0]["kind"], "Service");
        assert_eq!(objects[0]["spec"]["ports"][0]["port"], 80);
        assert_eq!(objects[1]["kind"], "EndpointSlice");
        assert_eq!(objects[1]["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(
            objects[1]["metadata"]["labels"]["kubernetes.io/service-name"],
            "echo"
        );
    }
}
