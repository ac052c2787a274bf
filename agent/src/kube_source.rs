//! Kubernetes source: kube-rs watchers for Services, EndpointSlices, this node's Node and HTTPRoutes,
//! feeding the same snapshots as the standalone source.

/// One RBAC rule the agent needs; the ClusterRole in manifests/ must grant exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccessRule {
    pub api_group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

const READ: &[&str] = &["get", "list", "watch"];

/// Everything the agent asks the API server for.
pub const RBAC_RULES: &[AccessRule] = &[
    AccessRule {
        api_group: "",
        resource: "services",
        verbs: READ,
    },
    AccessRule {
        api_group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: READ,
    },
    AccessRule {
        api_group: "",
        resource: "nodes",
        verbs: READ,
    },
    AccessRule {
        api_group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: READ,
    },
    // Route status (Accepted, ResolvedRefs) is written through the status subresource.
    AccessRule {
        api_group: "gateway.networking.k8s.io",
        resource: "httproutes/status",
        verbs: &["get", "patch", "update"],
    },
];
