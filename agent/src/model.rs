//! The desired state: Services and EndpointSlices validated into plain values, and the frontends they
//! yield (ClusterIP:port/protocol → set of ready backends), the same whatever source they came from.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// Label that ties an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Headless services have no ClusterIP to balance.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Port of a ClusterIP's "any other port" frontend, which rejects.
pub const ANY_OTHER_PORT: u16 = 0;

/// The pre-field way to set loadBalancerSourceRanges, still honoured when the field is empty.
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// An address as the API server accepts it. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are refused:
/// they never appear on the wire, and to the datapath they are the IPv4 address itself.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip = s.parse::<IpAddr>().ok()?;
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => None,
        ip => Some(ip),
    }
}

/// `a.b.c.d/n` or `x:y::/n` → `Some((network, n))` (host bits cleared); garbage → `None`.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    match parse_ip(addr)? {
        IpAddr::V4(v4) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some((Ipv4Addr::from(u32::from(v4) & mask).into(), len))
        }
        IpAddr::V6(v6) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Some((Ipv6Addr::from(u128::from(v6) & mask).into(), len))
        }
        _ => None,
    }
}

/// Both addresses of one family (dual-stack Services are two single-stack Services to the datapath,
/// as they are to kube-proxy's per-family proxiers).
pub fn same_family(a: &IpAddr, b: &IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The API's default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Topology-aware routing, as kube-proxy reads it (current and deprecated names).
pub const ANNOTATION_TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
pub const ANNOTATION_TOPOLOGY_HINTS: &str = "service.kubernetes.io/topology-aware-hints";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NsName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => weir_common::PROTO_TCP,
            Protocol::Udp => weir_common::PROTO_UDP,
        }
    }

    fn parse(value: Option<&str>, field: &str) -> Result<Self, FieldError> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Err(FieldError::new(
                field,
                "SCTP is not supported by this datapath yet",
            )),
            other => Err(FieldError::new(
                field,
                format!("unknown protocol {other:?}"),
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// An address clients dial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = std::net::SocketAddr::new(self.ip, self.port);
        write!(f, "{addr}/{}", self.protocol)
    }
}

/// An endpoint address traffic is translated to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addr = std::net::SocketAddr::new(self.ip, self.port);
        write!(f, "{addr}/{}", self.protocol)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub service: NsName,
    pub port_name: String,
    /// Backends chosen by kube-proxy's rules (ready, else serving-terminating; policy; topology).
    pub backends: BTreeSet<BackendAddr>,
    /// With no backend: drop (a Local traffic policy with no local endpoint) rather than reject.
    pub drop_when_empty: bool,
    /// ClientIP session affinity timeout in seconds; 0 for none.
    pub affinity_timeout_s: u32,
    /// Client prefixes allowed on this frontend (of its family); empty means everyone.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// An HTTPRoute is attached: pods' TCP connections go to the L7 proxy.
    pub l7: bool,
}

/// Everything a source currently holds, keyed by namespace/name; sources publish it whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Shared, not copied, between the source's store, the snapshots it publishes and the agent's
    /// caches: at 10k Services a copy of every object per holder was most of the agent's memory.
    pub services: BTreeMap<NsName, Arc<ServiceSpec>>,
    pub slices: BTreeMap<NsName, Arc<SliceSpec>>,
    /// The agent's own Node, when the source knows it (Kubernetes mode).
    pub node: Option<NodeInfo>,
    /// Gateway API HTTPRoutes, by namespace/name (validated by the L7 route table).
    pub http_routes: BTreeMap<NsName, gateway_api::apis::standard::httproutes::HttpRoute>,
}

/// A source's latest snapshot and when the change that produced it was first seen, for the network
/// programming latency metric.
#[derive(Clone, Debug)]
pub struct SourceUpdate {
    pub snapshot: Snapshot,
    pub changed_at: std::time::Instant,
}

/// What the agent uses of its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared with the cache that computed them: an unchanged frontend is the same allocation from one
    /// sync to the next, which is how the reconciler skips it without comparing.
    pub frontends: BTreeMap<Frontend, Arc<FrontendState>>,
}

/// Which field of an object is wrong and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Allocated for NodePort and LoadBalancer Services; answered on every node IP.
    pub node_port: Option<u16>,
}

/// A Service reduced to what the datapath needs; `None` from [`ServiceSpec::from_k8s`] means "valid, but
/// not ours to program" (ExternalName, headless, another proxy's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: NsName,
    /// One per family (`spec.clusterIPs`); each family is served only by its own endpoints.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`: balanced like the ClusterIP, on the service ports, when traffic for them
    /// reaches the node.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`: like external IPs, and subject to `source_ranges`.
    pub lb_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges` (or the beta annotation): only these clients reach the
    /// LoadBalancer IPs; empty means everyone. NodePorts and the ClusterIP are not filtered.
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// `internalTrafficPolicy: Local`: ClusterIP traffic only to endpoints on this node.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`: NodePort/external traffic only to endpoints on this node.
    pub external_local: bool,
    /// `trafficDistribution: PreferClose` (or the topology-mode annotation): prefer endpoints hinted for
    /// this node's zone.
    pub prefer_close: bool,
    /// The `service.kubernetes.io/service-proxy-name` label: only the proxy of that name programs it.
    pub proxy_name: Option<String>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (default 10800, as the API's).
    pub affinity_timeout: Option<u32>,
    /// `healthCheckNodePort` of a LoadBalancer Service with `externalTrafficPolicy: Local`: the node
    /// answers load-balancer health checks there with its count of local endpoints.
    pub health_check_node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    /// Serving while terminating: used only when no endpoint is ready (kube-proxy's fallback).
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `hints.forZones`; `None` when the endpoint carries no hints.
    pub zones: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub id: NsName,
    pub service: NsName,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// Kind/namespace/name of an object, for error messages, even when the rest of it is invalid.
pub fn object_id(namespace: Option<&String>, name: Option<&String>) -> NsName {
    NsName {
        namespace: namespace.cloned().unwrap_or_else(|| "default".to_owned()),
        name: name.cloned().unwrap_or_default(),
    }
}

fn port_number(value: i32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(field, format!("port {value} is outside 1-65535")))
}

impl ServiceSpec {
    pub fn from_k8s(svc: &Service) -> Result<Option<Self>, FieldError> {
        let id = object_id(svc.metadata.namespace.as_ref(), svc.metadata.name.as_ref());
        if id.name.is_empty() {
            return Err(FieldError::new("metadata.name", "missing"));
        }
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            return Ok(None);
        }
        let proxy_name = labels
            .and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME))
            .cloned();
        let Some(spec) = svc.spec.as_ref() else {
            return Err(FieldError::new("spec", "missing"));
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Ok(None);
        }
        let mut ips: Vec<(String, &str)> = Vec::new();
        match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(list), _) if !list.is_empty() => {
                for (i, ip) in list.iter().enumerate() {
                    ips.push((format!("spec.clusterIPs[{i}]"), ip));
                }
            }
            (_, Some(ip)) => ips.push(("spec.clusterIP".to_owned(), ip)),
            _ => {}
        }
        if ips.iter().any(|(_, ip)| *ip == "None") {
            return Ok(None);
        }
        if ips.is_empty() || ips.iter().all(|(_, ip)| ip.is_empty()) {
            return Err(FieldError::new("spec.clusterIP", "no ClusterIP allocated"));
        }
        let mut cluster_ips: Vec<IpAddr> = Vec::new();
        for (field, ip) in ips {
            let Some(ip) = parse_ip(ip) else {
                return Err(FieldError::new(field, format!("invalid IP address {ip:?}")));
            };
            // The API server allows one ClusterIP per family.
            if cluster_ips.iter().any(|c| same_family(c, &ip)) {
                return Err(FieldError::new(
                    field,
                    format!("a second ClusterIP of the same family ({ip})"),
                ));
            }
            cluster_ips.push(ip);
        }
        let exposes_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            let node_port = match (exposes_node_ports, p.node_port) {
                (true, Some(n)) => Some(port_number(n, &format!("{field}.nodePort"))?),
                _ => None,
            };
            let port = ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(p.port, &format!("{field}.port"))?,
                protocol: Protocol::parse(p.protocol.as_deref(), &format!("{field}.protocol"))?,
                node_port,
            };
            if ports
                .iter()
                .any(|q: &ServicePort| q.port == port.port && q.protocol == port.protocol)
            {
                return Err(FieldError::new(
                    format!("{field}.port"),
                    format!("duplicate port {}/{}", port.port, port.protocol),
                ));
            }
            if ports.iter().any(|q: &ServicePort| q.name == port.name) {
                return Err(FieldError::new(
                    format!("{field}.name"),
                    format!("duplicate port name {:?}", port.name),
                ));
            }
            ports.push(port);
        }
        let mut external_ips = Vec::new();
        for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
            match parse_ip(ip) {
                Some(ip) => external_ips.push(ip),
                None => {
                    return Err(FieldError::new(
                        format!("spec.externalIPs[{i}]"),
                        format!("invalid IP address {ip:?}"),
                    ));
                }
            }
        }
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        let mut lb_ips = Vec::new();
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if let Some(ip) = &ing.ip {
                match parse_ip(ip) {
                    Some(ip) => lb_ips.push(ip),
                    None => {
                        return Err(FieldError::new(
                            format!("status.loadBalancer.ingress[{i}].ip"),
                            format!("invalid IP address {ip:?}"),
                        ));
                    }
                }
            }
        }
        external_ips.sort();
        external_ips.dedup();
        lb_ips.sort();
        lb_ips.dedup();
        let annotated_ranges = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SOURCE_RANGES))
            .map(|v| {
                v.split(',')
                    .map(|r| r.trim().to_owned())
                    .filter(|r| !r.is_empty())
                    .collect::<Vec<_>>()
            });
        let (ranges_field, ranges) = match spec
            .load_balancer_source_ranges
            .as_ref()
            .filter(|r| !r.is_empty())
        {
            Some(r) => ("spec.loadBalancerSourceRanges", r.clone()),
            None => (
                ANNOTATION_SOURCE_RANGES,
                annotated_ranges.unwrap_or_default(),
            ),
        };
        let mut source_ranges = Vec::new();
        for (i, r) in ranges.iter().enumerate() {
            match parse_cidr(r) {
                Some(range) => source_ranges.push(range),
                None => {
                    return Err(FieldError::new(
                        format!("{ranges_field}[{i}]"),
                        format!("invalid CIDR {r:?}"),
                    ));
                }
            }
        }
        let topology_annotation = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| {
                a.get(ANNOTATION_TOPOLOGY_MODE)
                    .or_else(|| a.get(ANNOTATION_TOPOLOGY_HINTS))
            })
            .is_some_and(|v| v != "Disabled" && v != "disabled" && !v.is_empty());
        // Kept for as long as the Service exists: no growth slack.
        cluster_ips.shrink_to_fit();
        ports.shrink_to_fit();
        external_ips.shrink_to_fit();
        lb_ips.shrink_to_fit();
        source_ranges.shrink_to_fit();
        Ok(Some(ServiceSpec {
            id,
            cluster_ips,
            ports,
            external_ips,
            lb_ips,
            source_ranges,
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            prefer_close: spec.traffic_distribution.as_deref() == Some("PreferClose")
                || topology_annotation,
            proxy_name,
            health_check_node_port: match (
                spec.type_.as_deref(),
                spec.external_traffic_policy.as_deref(),
                spec.health_check_node_port,
            ) {
                (Some("LoadBalancer"), Some("Local"), Some(p)) => {
                    Some(port_number(p, "spec.healthCheckNodePort")?)
                }
                _ => None,
            },
            affinity_timeout: match spec.session_affinity.as_deref() {
                Some("ClientIP") => Some(
                    spec.session_affinity_config
                        .as_ref()
                        .and_then(|c| c.client_ip.as_ref())
                        .and_then(|c| c.timeout_seconds)
                        .and_then(|t| u32::try_from(t).ok())
                        .filter(|t| *t > 0)
                        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
                ),
                _ => None,
            },
        }))
    }
}

impl SliceSpec {
    /// `None` means valid but not for this datapath (an IPv6 or FQDN slice).
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Option<Self>, FieldError> {
        let id = object_id(
            slice.metadata.namespace.as_ref(),
            slice.metadata.name.as_ref(),
        );
        if id.name.is_empty() {
            return Err(FieldError::new("metadata.name", "missing"));
        }
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        else {
            // Slices without the label are managed by someone else and belong to no Service.
            return Ok(None);
        };
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            "FQDN" => return Ok(None),
            other => {
                return Err(FieldError::new(
                    "addressType",
                    format!("unknown address type {other:?}"),
                ));
            }
        };
        let family = if v6 { "IPv6" } else { "IPv4" };
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}]");
            let Some(port) = p.port else {
                return Err(FieldError::new(format!("{field}.port"), "missing"));
            };
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(port, &format!("{field}.port"))?,
                protocol: Protocol::parse(p.protocol.as_deref(), &format!("{field}.protocol"))?,
            });
        }
        let mut endpoints = Vec::new();
        for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
            let cond = ep.conditions.as_ref();
            // The API defines a nil `ready` as ready, a nil `serving` as `ready`, and a nil
            // `terminating` as not terminating.
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let zones = ep
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>());
            for (j, addr) in ep.addresses.iter().enumerate() {
                let ip = parse_ip(addr)
                    .filter(|ip| ip.is_ipv6() == v6)
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("endpoints[{i}].addresses[{j}]"),
                            format!("invalid {family} address {addr:?}"),
                        )
                    })?;
                endpoints.push(Endpoint {
                    ip,
                    ready,
                    serving,
                    terminating,
                    node_name: ep.node_name.clone(),
                    zones: zones.clone(),
                });
            }
        }
        // Kept for as long as the slice exists (10k Services × 10 endpoints: growth slack alone was
        // ~6 MB of the agent's RSS).
        ports.shrink_to_fit();
        endpoints.shrink_to_fit();
        Ok(Some(SliceSpec {
            service: NsName {
                namespace: id.namespace.clone(),
                name: service.clone(),
            },
            id,
            ports,
            endpoints,
        }))
    }
}

/// Joins services with their slices into frontends. Pure: the reconciler diffs its result.
pub fn desired<'a, V: Borrow<ServiceSpec> + 'a, L: Borrow<SliceSpec> + 'a>(
    services: impl IntoIterator<Item = &'a V>,
    slices: impl IntoIterator<Item = &'a L>,
    node: &NodeContext,
) -> Desired {
    let by_service = slices_by_service(slices);
    let mut frontends = BTreeMap::new();
    for svc in services {
        let svc: &ServiceSpec = svc.borrow();
        let slices = by_service
            .get(&svc.id)
            .map(Vec::as_slice)
            .unwrap_or_default();
        frontends.extend(
            service_frontends(svc, slices, node)
                .into_iter()
                .map(|(f, st)| (f, Arc::new(st))),
        );
    }
    Desired { frontends }
}

/// What frontends depend on besides the objects: the node's own addresses (NodePorts answer on each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// Both families; a Service's NodePorts answer on the node IPs of the families it has.
    pub ips: Vec<IpAddr>,
    /// This node's name: endpoints whose `nodeName` equals it are local.
    pub name: String,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology hints.
    pub zone: Option<String>,
    /// `--service-proxy-name`: Services labelled for another proxy name (or any, when unset) are skipped.
    pub service_proxy_name: Option<String>,
}

fn slices_by_service<'a, S: Borrow<SliceSpec>>(
    slices: impl IntoIterator<Item = &'a S>,
) -> BTreeMap<&'a NsName, Vec<&'a S>> {
    let mut by_service: BTreeMap<&NsName, Vec<&S>> = BTreeMap::new();
    for slice in slices {
        by_service
            .entry(&(*slice).borrow().service)
            .or_default()
            .push(slice);
    }
    by_service
}

/// The frontends of one Service given its EndpointSlices.
fn service_frontends<S: Borrow<SliceSpec>>(
    svc: &ServiceSpec,
    slices: &[&S],
    node: &NodeContext,
) -> Vec<(Frontend, FrontendState)> {
    let mut out = Vec::new();
    // kube-proxy's rule: a labelled Service belongs to the proxy of that name only.
    if svc.proxy_name.is_some() && svc.proxy_name != node.service_proxy_name {
        return out;
    }
    // Every ClusterIP refuses ports no Service defines (a removed port fails at once, as with
    // kube-proxy): port 0, never a real port, with no backend, is the datapath's "any other port" entry.
    for ip in &svc.cluster_ips {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            out.push((
                Frontend {
                    ip: *ip,
                    port: ANY_OTHER_PORT,
                    protocol,
                },
                FrontendState {
                    service: svc.id.clone(),
                    port_name: String::new(),
                    backends: BTreeSet::new(),
                    drop_when_empty: false,
                    affinity_timeout_s: 0,
                    source_ranges: Vec::new(),
                    l7: false,
                },
            ));
        }
    }
    for port in &svc.ports {
        // Every endpoint of this port, with the port number its slice gives it.
        let mut endpoints: Vec<(&Endpoint, u16)> = Vec::new();
        for slice in slices {
            let slice: &SliceSpec = (*slice).borrow();
            // A slice port matches the service port by name (both unnamed for single-port services).
            if let Some(sp) = slice
                .ports
                .iter()
                .find(|sp| sp.name == port.name && sp.protocol == port.protocol)
            {
                endpoints.extend(slice.endpoints.iter().map(|ep| (ep, sp.port)));
            }
        }
        // Each family on its own, as kube-proxy's per-family proxiers see them: a frontend of one
        // family gets endpoints of that family, chosen among those alone.
        for cluster_ip in &svc.cluster_ips {
            let family: Vec<(&Endpoint, u16)> = endpoints
                .iter()
                .filter(|(ep, _)| same_family(&ep.ip, cluster_ip))
                .copied()
                .collect();
            family_frontends(svc, port, cluster_ip, &family, node, &mut out);
        }
    }
    out
}

/// The frontends of one Service port in the family of `cluster_ip`: the ClusterIP, and the LoadBalancer
/// IPs, external IPs and node IPs of that family.
fn family_frontends(
    svc: &ServiceSpec,
    port: &ServicePort,
    cluster_ip: &IpAddr,
    endpoints: &[(&Endpoint, u16)],
    node: &NodeContext,
    out: &mut Vec<(Frontend, FrontendState)>,
) {
    let addrs = |chosen: Vec<(&Endpoint, u16)>| -> BTreeSet<BackendAddr> {
        chosen
            .into_iter()
            .map(|(ep, p)| BackendAddr {
                ip: ep.ip,
                port: p,
                protocol: port.protocol,
            })
            .collect()
    };
    let internal = addrs(select(
        endpoints,
        svc.internal_local,
        svc.prefer_close,
        node,
    ));
    let external = addrs(select(
        endpoints,
        svc.external_local,
        svc.prefer_close,
        node,
    ));

    let state = |backends: &BTreeSet<BackendAddr>, local: bool| FrontendState {
        service: svc.id.clone(),
        port_name: port.name.clone(),
        backends: backends.clone(),
        drop_when_empty: local,
        affinity_timeout_s: svc.affinity_timeout.unwrap_or(0),
        source_ranges: Vec::new(),
        l7: false,
    };
    let frontend = |ip: IpAddr, number: u16| Frontend {
        ip,
        port: number,
        protocol: port.protocol,
    };
    let ours = |ip: &&IpAddr| same_family(ip, cluster_ip);
    out.push((
        frontend(*cluster_ip, port.port),
        state(&internal, svc.internal_local),
    ));
    // kube-proxy keeps the ranges of the frontend's family; none left means no filter.
    let ranges: Vec<(IpAddr, u8)> = svc
        .source_ranges
        .iter()
        .filter(|(ip, _)| same_family(ip, cluster_ip))
        .copied()
        .collect();
    // Traffic to these comes from outside the cluster network: externalTrafficPolicy governs it.
    for ip in svc.lb_ips.iter().filter(ours) {
        let mut st = state(&external, svc.external_local);
        st.source_ranges = ranges.clone();
        out.push((frontend(*ip, port.port), st));
    }
    let on_external_ip = svc
        .external_ips
        .iter()
        .filter(ours)
        .map(|ip| (*ip, port.port));
    let on_node_port = port
        .node_port
        .into_iter()
        .flat_map(|np| node.ips.iter().filter(ours).map(move |ip| (*ip, np)));
    for (ip, number) in on_external_ip.chain(on_node_port) {
        out.push((frontend(ip, number), state(&external, svc.external_local)));
    }
}

/// kube-proxy's endpoint selection (pkg/proxy/topology.go, CategorizeEndpoints) for one traffic policy:
/// with `local`, only endpoints on this node; ready endpoints, or when none is ready the serving and
/// terminating ones; for cluster-wide policy with topology preferred, the endpoints hinted for this
/// node's zone, when every ready endpoint carries hints and some are for this zone.
fn select<'a>(
    endpoints: &[(&'a Endpoint, u16)],
    local: bool,
    prefer_close: bool,
    node: &NodeContext,
) -> Vec<(&'a Endpoint, u16)> {
    let candidates: Vec<(&Endpoint, u16)> = endpoints
        .iter()
        .filter(|(ep, _)| !local || ep.node_name.as_deref() == Some(node.name.as_str()))
        .copied()
        .collect();
    let ready: Vec<(&Endpoint, u16)> = candidates
        .iter()
        .filter(|(ep, _)| ep.ready)
        .copied()
        .collect();
    let chosen = if ready.is_empty() {
        candidates
            .into_iter()
            .filter(|(ep, _)| ep.serving && ep.terminating)
            .collect()
    } else {
        ready
    };
    if local || !prefer_close {
        return chosen;
    }
    let Some(zone) = node.zone.as_deref() else {
        return chosen;
    };
    let all_hinted = chosen.iter().all(|(ep, _)| ep.zones.is_some());
    let for_zone = |ep: &Endpoint| {
        ep.zones
            .as_ref()
            .is_some_and(|z| z.iter().any(|z| z == zone))
    };
    if !all_hinted || !chosen.iter().any(|(ep, _)| for_zone(ep)) {
        return chosen;
    }
    chosen.into_iter().filter(|(ep, _)| for_zone(ep)).collect()
}

/// One healthCheckNodePort to serve, as kube-proxy's health check server does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    pub service: NsName,
    /// Ready endpoints on this node (terminating ones do not count: the load balancer should drain).
    pub local_endpoints: usize,
}

/// The health checks this node serves for `snapshot`.
pub fn health_checks(snapshot: &Snapshot, node: &NodeContext) -> Vec<HealthCheck> {
    let by_service = slices_by_service(snapshot.slices.values());
    let mut out = Vec::new();
    for svc in snapshot.services.values() {
        let Some(port) = svc.health_check_node_port else {
            continue;
        };
        if svc.proxy_name.is_some() && svc.proxy_name != node.service_proxy_name {
            continue;
        }
        // Counted in the Service's primary family (a dual-stack pod has one address of each).
        let primary_v6 = svc.cluster_ips.first().is_some_and(IpAddr::is_ipv6);
        let local: BTreeSet<IpAddr> = by_service
            .get(&svc.id)
            .into_iter()
            .flatten()
            .flat_map(|s| s.endpoints.iter())
            .filter(|ep| ep.ready && ep.node_name.as_deref() == Some(node.name.as_str()))
            .filter(|ep| ep.ip.is_ipv6() == primary_v6)
            .map(|ep| ep.ip)
            .collect();
        out.push(HealthCheck {
            port,
            service: svc.id.clone(),
            local_endpoints: local.len(),
        });
    }
    out
}

/// Keeps each Service's frontends between syncs and recomputes only the Services whose spec or
/// EndpointSlices changed, so a change to one Service among 100,000 costs one recomputation. A change of
/// the node context recomputes everything.
#[derive(Default)]
pub struct DesiredCache {
    entries: BTreeMap<NsName, CacheEntry>,
    /// Every entry's frontends, kept up to date entry by entry so a sync does not rebuild it.
    desired: Desired,
    /// How many entries claim each frontend (more than one only when Services clash).
    claims: std::collections::HashMap<Frontend, u32>,
    node: NodeContext,
    /// The slices of the last update, in the snapshot's (id) order: a change is found by walking
    /// both in step, comparing pointers, without looking anything up by name.
    seen_slices: Vec<Arc<SliceSpec>>,
}

struct CacheEntry {
    spec: Arc<ServiceSpec>,
    frontends: Vec<(Frontend, Arc<FrontendState>)>,
}

/// Walks two sequences sorted by the same key in step: `f(old, new)` for every key in either. Items
/// that are `same` (the very object kept from the last update) are paired without comparing keys:
/// most are, and comparing two names costs more than the rest of a step.
fn merge_join<O, N, K: Ord + ?Sized>(
    old: impl IntoIterator<Item = O>,
    new: impl IntoIterator<Item = N>,
    keys: (impl Fn(&O) -> &K, impl Fn(&N) -> &K),
    same: impl Fn(&O, &N) -> bool,
    mut f: impl FnMut(Option<O>, Option<N>),
) {
    let (old_key, new_key) = keys;
    let (mut old, mut new) = (old.into_iter().peekable(), new.into_iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => return,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(o), Some(n)) if same(o, n) => std::cmp::Ordering::Equal,
            (Some(o), Some(n)) => old_key(o).cmp(new_key(n)),
        };
        match order {
            std::cmp::Ordering::Less => f(old.next(), None),
            std::cmp::Ordering::Greater => f(None, new.next()),
            std::cmp::Ordering::Equal => f(old.next(), new.next()),
        }
    }
}

impl DesiredCache {
    /// The desired state for `snapshot`, and how many Services had to be recomputed. The cost of an
    /// update that changes one Service is two walks over the snapshot (no lookups by name, no
    /// allocation per Service) and the recomputation of that Service.
    pub fn update(&mut self, snapshot: &Snapshot, node: &NodeContext) -> (Desired, usize) {
        if *node != self.node {
            self.entries.clear();
            self.desired.frontends.clear();
            self.claims.clear();
            self.node = node.clone();
        }
        // Services whose slices were added, removed or replaced since the last update.
        // Sets of names, not hashes: usually empty or one, so a lookup is a comparison or none
        // instead of hashing a name for every Service.
        let mut dirty: BTreeSet<&NsName> = BTreeSet::new();
        let mut slices_changed = false;
        merge_join(
            &self.seen_slices,
            snapshot.slices.iter(),
            (
                |o: &&Arc<SliceSpec>| &o.id,
                |(id, _): &(&NsName, &Arc<SliceSpec>)| *id,
            ),
            |o, (_, n)| Arc::ptr_eq(o, n),
            |old, new| {
                let same = matches!((old, new), (Some(o), Some((_, n))) if Arc::ptr_eq(o, n));
                if !same {
                    slices_changed = true;
                    dirty.extend(old.map(|o| &o.service));
                    dirty.extend(new.map(|(_, n)| &n.service));
                }
            },
        );

        // Services to recompute (new, changed, or with changed slices) and Services gone.
        let mut recompute: Vec<(&NsName, &Arc<ServiceSpec>)> = Vec::new();
        let mut gone: Vec<NsName> = Vec::new();
        merge_join(
            &self.entries,
            snapshot.services.iter(),
            (
                |(id, _): &(&NsName, &CacheEntry)| *id,
                |(id, _): &(&NsName, &Arc<ServiceSpec>)| *id,
            ),
            |(_, e), (_, svc)| Arc::ptr_eq(&e.spec, svc),
            |old, new| match (old, new) {
                (Some((_, e)), Some((id, svc))) => {
                    if e.spec != *svc {
                        recompute.push((id, svc));
                    }
                }
                (None, Some((id, svc))) => recompute.push((id, svc)),
                (Some((id, _)), None) => gone.push((*id).clone()),
                (None, None) => {}
            },
        );
        // Services whose slices changed, looked up one by one (there are few) rather than checked
        // at every step above.
        let respec = recompute.len();
        recompute.extend(
            dirty
                .iter()
                .filter_map(|id| snapshot.services.get_key_value(*id))
                .filter(|(id, _)| self.entries.contains_key(*id)),
        );
        if recompute.len() > respec {
            recompute.sort_by(|a, b| a.0.cmp(b.0));
            recompute.dedup_by(|a, b| a.0 == b.0);
        }
        // The slices of the Services to recompute, in the snapshot's order (one walk over them).
        let wanted: BTreeSet<&NsName> = recompute.iter().map(|(id, _)| *id).collect();
        let mut by_service: std::collections::HashMap<&NsName, Vec<&Arc<SliceSpec>>> =
            std::collections::HashMap::with_capacity(wanted.len());
        if !wanted.is_empty() {
            for slice in snapshot.slices.values() {
                if wanted.contains(&slice.service) {
                    by_service.entry(&slice.service).or_default().push(slice);
                }
            }
        }

        // Two Services claiming one frontend (a clash the API server would refuse, possible in a
        // config dir): the map is then rebuilt whole, last Service winning, as before caching.
        let mut clash = false;
        let recomputed = recompute.len();
        for (id, svc) in recompute {
            let slices = by_service.get(id).map(Vec::as_slice).unwrap_or_default();
            // Collected into a fresh, exact-size Vec: `into_iter().map().collect()` would reuse the
            // (much larger) allocation of the built states, slack included, for as long as the
            // entry lives.
            let built = service_frontends(svc, slices, node);
            let mut frontends = Vec::with_capacity(built.len());
            frontends.extend(built.into_iter().map(|(f, st)| (f, Arc::new(st))));
            let entry = CacheEntry {
                spec: Arc::clone(svc),
                frontends,
            };
            if let Some(old) = self.entries.insert(id.clone(), entry) {
                clash |= self.forget(&old);
            }
            if let Some(e) = self.entries.get(id) {
                for (f, st) in &e.frontends {
                    self.desired.frontends.insert(*f, Arc::clone(st));
                    let n = self.claims.entry(*f).or_default();
                    *n += 1;
                    clash |= *n > 1;
                }
            }
        }
        for id in gone {
            if let Some(old) = self.entries.remove(&id) {
                clash |= self.forget(&old);
            }
        }
        if slices_changed {
            self.seen_slices = snapshot.slices.values().cloned().collect();
        }
        if clash {
            self.desired.frontends = self
                .entries
                .values()
                .flat_map(|e| e.frontends.iter().cloned())
                .collect();
        }
        (self.desired.clone(), recomputed)
    }

    /// Removes an entry's frontends from the map; true if another entry claims one of them too.
    fn forget(&mut self, old: &CacheEntry) -> bool {
        let mut clash = false;
        for (f, _) in &old.frontends {
            match self.claims.get_mut(f) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    clash = true;
                }
                _ => {
                    self.claims.remove(f);
                    self.desired.frontends.remove(f);
                }
            }
        }
        clash
    }
}

#[cfg(test)]
mod tests;
