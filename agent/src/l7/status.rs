//! HTTPRoute status as the Gateway API defines it for a Service parent (GAMMA): per `parentRefs`
//! entry of kind Service, an `Accepted` and a `ResolvedRefs` condition under Weir's controller name.
//! Computed at every sync from the routes, the Services and the fault objects; written to the API
//! server in Kubernetes mode (`route_status`), logged and served on `/state` in standalone mode.
use std::collections::BTreeMap;

use gateway_api::apis::standard::httproutes::HttpRoute;
use serde::{Deserialize, Serialize};

use super::{
    fault::Faults,
    route::{Backend, FaultFilter, Filter, GROUP, Route},
};
use crate::model::{NsName, ServiceSpec, object_id};

/// `status.parents[].controllerName` of the entries Weir owns.
pub const CONTROLLER_NAME: &str = "weir.dev/l7";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// `namespace/name`.
    pub route: String,
    /// `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentStatus {
    /// The `parentRefs` entry as written in the spec (group, kind, name, namespace, port, sectionName).
    pub parent_ref: serde_json::Value,
    pub conditions: Vec<RouteCondition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteCondition {
    /// `Accepted` or `ResolvedRefs`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`, as Kubernetes conditions spell it.
    pub status: String,
    pub reason: String,
    pub message: String,
}

impl RouteCondition {
    fn new(kind: &str, ok: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

impl std::fmt::Display for RouteStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTPRoute {}:", self.route)?;
        for p in &self.parents {
            let name = p
                .parent_ref
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or("");
            write!(f, " parent Service {name}:")?;
            for c in &p.conditions {
                write!(f, " {}={} ({})", c.kind, c.status, c.reason)?;
                if !c.is_true() {
                    write!(f, " {}", c.message)?;
                }
                write!(f, ";")?;
            }
        }
        Ok(())
    }
}

fn service_has_port(spec: &ServiceSpec, port: Option<u16>, section: Option<&str>) -> bool {
    spec.ports.iter().any(|p| {
        port.is_none_or(|n| n == p.port) && section.is_none_or(|name| name == p.name.as_str())
    })
}

/// The first reason ResolvedRefs is false, and every problem, for a valid route.
fn resolved_refs(
    route: &Route,
    services: &BTreeMap<NsName, std::sync::Arc<ServiceSpec>>,
) -> RouteCondition {
    let mut reason: Option<&'static str> = None;
    let mut messages: Vec<String> = Vec::new();
    let mut problem = |r: &'static str, m: String| {
        reason.get_or_insert(r);
        if !messages.contains(&m) {
            messages.push(m);
        }
    };
    let check_service = |sp: &super::route::ServicePort,
                         what: &str,
                         problem: &mut dyn FnMut(&'static str, String)| {
        match services.get(&sp.service) {
            Some(spec) if service_has_port(spec, Some(sp.port), None) => {}
            Some(_) => problem(
                "BackendNotFound",
                format!("{what} Service {} has no port {}", sp.service, sp.port),
            ),
            None => problem(
                "BackendNotFound",
                format!("{what} Service {} not found", sp.service),
            ),
        }
    };
    let filters = |fs: &[Filter], problem: &mut dyn FnMut(&'static str, String)| {
        for f in fs {
            match f {
                Filter::Fault(FaultFilter::Unresolved { reason, message }) => {
                    problem(reason, message.clone())
                }
                Filter::Mirror(m) => {
                    if let Backend::Service(sp) = &m.backend {
                        check_service(sp, "mirror", problem);
                    }
                }
                _ => {}
            }
        }
    };
    for rule in &route.rules {
        filters(&rule.filters, &mut problem);
        for b in &rule.backends {
            filters(&b.filters, &mut problem);
        }
    }
    for rule in &route.rules {
        for b in &rule.backends {
            match &b.backend {
                Backend::Invalid(msg) => {
                    let r = if msg.starts_with("unsupported backend kind") {
                        "InvalidKind"
                    } else {
                        "UnsupportedValue"
                    };
                    problem(r, msg.clone());
                }
                Backend::Service(sp) => check_service(sp, "backend", &mut problem),
            }
        }
    }
    match reason {
        None => RouteCondition::new(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "all references resolved",
        ),
        Some(r) => RouteCondition::new("ResolvedRefs", false, r, messages.join("; ")),
    }
}

/// The status of every route with at least one Service parentRef, sorted by route.
pub fn compute(
    routes: &BTreeMap<NsName, HttpRoute>,
    services: &BTreeMap<NsName, std::sync::Arc<ServiceSpec>>,
    faults: &Faults,
) -> Vec<RouteStatus> {
    let mut out = Vec::new();
    for (id, route) in routes {
        let parsed = Route::from_k8s_with(route, faults);
        let mut parents = Vec::new();
        for p in route.spec.parent_refs.iter().flatten() {
            // Only Service parents are ours (the API defaults the group to Gateway API's).
            if !p.group.as_deref().unwrap_or(GROUP).is_empty()
                || p.kind.as_deref().unwrap_or("Gateway") != "Service"
            {
                continue;
            }
            let parent_ref = serde_json::to_value(p).unwrap_or(serde_json::Value::Null);
            let service = object_id(p.namespace.as_ref().or(Some(&id.namespace)), Some(&p.name));
            let port = p.port.and_then(|n| u16::try_from(n).ok());
            let mut conditions = Vec::new();
            let accepted = match &parsed {
                Err(e) => RouteCondition::new(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    format!("{}: {}", e.field, e.message),
                ),
                Ok(_) if service.namespace != id.namespace => RouteCondition::new(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    "consumer routes (parent Service in another namespace) are not supported",
                ),
                Ok(_) => match services.get(&service) {
                    None => RouteCondition::new(
                        "Accepted",
                        false,
                        "NoMatchingParent",
                        format!("Service {service} not found"),
                    ),
                    Some(spec) if !service_has_port(spec, port, p.section_name.as_deref()) => {
                        RouteCondition::new(
                            "Accepted",
                            false,
                            "NoMatchingParent",
                            format!("Service {service} has no such port"),
                        )
                    }
                    Some(_) => {
                        RouteCondition::new("Accepted", true, "Accepted", "accepted by weir")
                    }
                },
            };
            conditions.push(accepted);
            if let Ok(Some(r)) = &parsed {
                conditions.push(resolved_refs(r, services));
            }
            parents.push(ParentStatus {
                parent_ref,
                conditions,
            });
        }
        if !parents.is_empty() {
            out.push(RouteStatus {
                route: id.to_string(),
                generation: route.metadata.generation,
                parents,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::route::http_route_from_yaml;

    fn services() -> BTreeMap<NsName, std::sync::Arc<ServiceSpec>> {
        let mut m = BTreeMap::new();
        for name in ["web", "v1"] {
            let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(&format!(
                "metadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{name: http, port: 80, protocol: TCP}}]}}"
            ))
            .expect("service");
            let spec = ServiceSpec::from_k8s(&svc).expect("valid").expect("ours");
            m.insert(spec.id.clone(), std::sync::Arc::new(spec));
        }
        m
    }

    fn status_of(route: &str) -> RouteStatus {
        let r = http_route_from_yaml(route).expect("route");
        let mut routes = BTreeMap::new();
        routes.insert(
            object_id(r.metadata.namespace.as_ref(), r.metadata.name.as_ref()),
            r,
        );
        let mut all = compute(&routes, &services(), &Faults::new());
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    fn conds(s: &RouteStatus) -> Vec<(String, String, String)> {
        s.parents[0]
            .conditions
            .iter()
            .map(|c| (c.kind.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    const HEAD: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: default}\nspec:\n";

    #[test]
    fn conditions_and_reasons() {
        let c = |a: &str, b: &str, r: &str| (a.to_owned(), b.to_owned(), r.to_owned());
        let good = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]"
        ));
        assert_eq!(
            conds(&good),
            [
                c("Accepted", "True", "Accepted"),
                c("ResolvedRefs", "True", "ResolvedRefs")
            ]
        );
        let missing = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{{backendRefs: [{{name: nosuch, port: 80}}]}}]"
        ));
        assert_eq!(
            conds(&missing)[1],
            c("ResolvedRefs", "False", "BackendNotFound")
        );
        let kind = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{{backendRefs: [{{kind: ConfigMap, name: v1}}]}}]"
        ));
        assert_eq!(conds(&kind)[1], c("ResolvedRefs", "False", "InvalidKind"));
        let no_parent = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: gone}}]\n  rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]"
        ));
        assert_eq!(
            conds(&no_parent)[0],
            c("Accepted", "False", "NoMatchingParent")
        );
        let bad_port = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web, port: 81}}]\n  rules: [{{backendRefs: [{{name: v1, port: 80}}]}}]"
        ));
        assert_eq!(
            conds(&bad_port)[0],
            c("Accepted", "False", "NoMatchingParent")
        );
        let invalid = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{{matches: [{{path: {{type: RegularExpression, value: \"(\"}}}}], backendRefs: [{{name: v1, port: 80}}]}}]"
        ));
        assert_eq!(
            conds(&invalid),
            [c("Accepted", "False", "UnsupportedValue")]
        );
        let ext = status_of(&format!(
            "{HEAD}  parentRefs: [{{group: \"\", kind: Service, name: web}}]\n  rules: [{{filters: [{{type: ExtensionRef, extensionRef: {{group: weir.dev, kind: HTTPFaultInjection, name: x}}}}], backendRefs: [{{name: v1, port: 80}}]}}]"
        ));
        assert_eq!(conds(&ext)[1], c("ResolvedRefs", "False", "FilterNotFound"));
    }
}
