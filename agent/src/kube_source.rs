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
    // Fault injection for HTTPRoute rules (ExtensionRef filters), Weir's own CRD.
    AccessRule {
        api_group: "weir.dev",
        resource: "httpfaultinjections",
        verbs: READ,
    },
];

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    pin::Pin,
    time::Instant,
};

use futures::{FutureExt as _, Stream, StreamExt as _, stream::select_all};
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    l7::fault::{FaultObjects, HttpFaultInjection},
    model::{FieldError, NodeInfo, NsName, ServiceSpec, SliceSpec, Snapshot, SourceUpdate},
};

/// Label carrying the node's zone, used for topology-aware routing.
const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
    HttpRoute,
    FaultInjection,
}

/// What a watcher stream told us: something changed, a (re-)list began or completed, or it failed.
enum Signal {
    Changed(Kind),
    Relisting(Kind),
    Listed(Kind),
    Failed(Kind, String),
}

type Signals = Pin<Box<dyn Stream<Item = Signal> + Send>>;

fn signals<K>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
) -> Signals
where
    K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .map(move |ev| match ev {
            Ok(watcher::Event::InitDone) => Signal::Listed(kind),
            Ok(watcher::Event::Init) => Signal::Relisting(kind),
            Ok(_) => Signal::Changed(kind),
            Err(e) => Signal::Failed(kind, e.to_string()),
        })
        .boxed()
}

/// Validated objects, keeping the last good version of any object that turns invalid.
#[derive(Default)]
struct Validated {
    services: BTreeMap<NsName, std::sync::Arc<ServiceSpec>>,
    slices: BTreeMap<NsName, std::sync::Arc<SliceSpec>>,
    reported: BTreeSet<String>,
}

fn id_of<K: Resource>(obj: &K) -> NsName {
    crate::model::object_id(obj.meta().namespace.as_ref(), obj.meta().name.as_ref())
}

impl Validated {
    /// Rebuilds from the stores; returns how many new problems were reported.
    fn refresh(&mut self, services: &Store<Service>, slices: &Store<EndpointSlice>) -> usize {
        let mut problems = BTreeSet::new();
        self.services = collect(
            &services.state(),
            &self.services,
            ServiceSpec::from_k8s,
            "Service",
            &mut problems,
        );
        self.slices = collect(
            &slices.state(),
            &self.slices,
            SliceSpec::from_k8s,
            "EndpointSlice",
            &mut problems,
        );
        let new: Vec<&String> = problems.difference(&self.reported).collect();
        for p in &new {
            error!("kubernetes: {p}; skipped");
        }
        let n = new.len();
        self.reported = problems;
        n
    }
}

fn collect<K: Resource, S: PartialEq>(
    objects: &[std::sync::Arc<K>],
    previous: &BTreeMap<NsName, std::sync::Arc<S>>,
    validate: impl Fn(&K) -> Result<Option<S>, FieldError>,
    kind: &str,
    problems: &mut BTreeSet<String>,
) -> BTreeMap<NsName, std::sync::Arc<S>> {
    let mut out = BTreeMap::new();
    for obj in objects {
        let id = id_of(obj.as_ref());
        match validate(obj) {
            Ok(Some(spec)) => {
                // An unchanged object keeps its allocation, so caches downstream see it unchanged
                // without comparing.
                let spec = match previous.get(&id) {
                    Some(old) if **old == spec => std::sync::Arc::clone(old),
                    _ => std::sync::Arc::new(spec),
                };
                out.insert(id, spec);
            }
            Ok(None) => {}
            Err(e) => {
                problems.insert(format!("{kind} {id}: {}: {}", e.field, e.message));
                // The API server validated it once; keep what we had rather than drop a working Service.
                if let Some(old) = previous.get(&id) {
                    out.insert(id, std::sync::Arc::clone(old));
                }
            }
        }
    }
    out
}

fn node_info(node: &Node) -> NodeInfo {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .collect();
    NodeInfo {
        name: node.name_any(),
        addresses,
        zone: node.labels().get(LABEL_ZONE).cloned(),
    }
}

/// Follows the API server and publishes a snapshot after every burst of changes, once the initial lists
/// of Services and EndpointSlices are complete; `HTTPFaultInjection` objects go to `faults_tx`, before
/// the snapshot of the same burst. Watch errors (410 Gone, dropped connections, an
/// unreachable server) are retried with backoff by kube-rs; the last published state stays programmed
/// meanwhile. Returns only if every stream ends.
pub async fn run(
    client: Client,
    node_name: String,
    tx: watch::Sender<Option<SourceUpdate>>,
    faults_tx: watch::Sender<FaultObjects>,
    config_errors: impl Fn(usize) + Send + 'static,
) -> anyhow::Result<()> {
    let (services, svc_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (routes, route_writer) = reflector::store::<HttpRoute>();
    let (faults, fault_writer) = reflector::store::<HttpFaultInjection>();
    let mut streams = select_all([
        signals(
            Kind::Service,
            Api::all(client.clone()),
            watcher::Config::default(),
            svc_writer,
        ),
        signals(
            Kind::EndpointSlice,
            Api::all(client.clone()),
            watcher::Config::default(),
            slice_writer,
        ),
        signals(
            Kind::Node,
            Api::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            node_writer,
        ),
        signals(
            Kind::HttpRoute,
            Api::all(client.clone()),
            watcher::Config::default(),
            route_writer,
        ),
        // Without the CRD installed this watch fails (logged once) and faults stay empty.
        signals(
            Kind::FaultInjection,
            Api::all(client),
            watcher::Config::default(),
            fault_writer,
        ),
    ]);

    let mut listed = BTreeSet::new();
    let mut failing: HashMap<Kind, String> = HashMap::new();
    let mut validated = Validated::default();
    let mut last: Option<Snapshot> = None;
    while let Some(first) = streams.next().await {
        let changed_at = Instant::now();
        // Coalesce a burst: take everything already waiting before rebuilding once.
        let mut batch = vec![first];
        while let Some(Some(more)) = streams.next().now_or_never() {
            batch.push(more);
        }
        for signal in batch {
            match signal {
                Signal::Listed(kind) => {
                    if failing.remove(&kind).is_some() {
                        info!(?kind, "watch recovered");
                    }
                    listed.insert(kind);
                }
                Signal::Changed(kind) => {
                    failing.remove(&kind);
                }
                // Hold publishing while a kind re-lists (after 410 Gone): its store is swapped whole at
                // the end, and a snapshot taken halfway could pair new objects of one kind with stale
                // objects of another.
                Signal::Relisting(kind) => {
                    listed.remove(&kind);
                }
                Signal::Failed(kind, e) => {
                    // Report a failure once per kind until it recovers, not on every backoff retry.
                    if failing.get(&kind) != Some(&e) {
                        warn!(?kind, "watch failed, retrying: {e}");
                        failing.insert(kind, e);
                    }
                }
            }
        }
        if !(listed.contains(&Kind::Service) && listed.contains(&Kind::EndpointSlice)) {
            continue;
        }
        config_errors(validated.refresh(&services, &slices));
        let fault_objects: FaultObjects = faults
            .state()
            .iter()
            .map(|f| (id_of(f.as_ref()), (**f).clone()))
            .collect();
        faults_tx.send_if_modified(|current| {
            let changed = *current != fault_objects;
            if changed {
                *current = fault_objects;
            }
            changed
        });
        let snapshot = Snapshot {
            services: validated.services.clone(),
            slices: validated.slices.clone(),
            node: nodes.state().first().map(|n| node_info(n)),
            http_routes: routes
                .state()
                .iter()
                .map(|r| (id_of(r.as_ref()), (**r).clone()))
                .collect(),
        };
        if last.as_ref() == Some(&snapshot) {
            continue;
        }
        info!(
            services = snapshot.services.len(),
            endpoint_slices = snapshot.slices.len(),
            http_routes = snapshot.http_routes.len(),
            "kubernetes state changed"
        );
        last = Some(snapshot.clone());
        if tx
            .send(Some(SourceUpdate {
                snapshot,
                changed_at,
            }))
            .is_err()
        {
            return Ok(());
        }
    }
    anyhow::bail!("every Kubernetes watch stream ended")
}
