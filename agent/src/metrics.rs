//! Prometheus metrics: the agent's sync loop and the datapath's counters, read from the maps at scrape time.
use std::sync::Arc;
use std::{
    sync::{
        Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use weir_common::STAT_NAMES;

use crate::{
    datapath::StatsReader,
    state::{AgentState, ProgrammedView},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// `namespace/name`, or empty for a frontend the agent no longer knows by name.
    pub service: String,
    /// `ip:port/PROTO`.
    pub frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub programming_latency: Histogram,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub refused_frontends: Gauge,
    pub config_errors: Counter,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub attached_interfaces: Gauge,
    conntrack_entries: Gauge,
    pub conntrack_gc_runs: Counter,
    pub conntrack_gc_deleted: Counter,
    pub conntrack_gc_duration: Gauge<f64, AtomicU64>,
    datapath_packets: Family<ReasonLabel, Counter>,
    service_packets: Family<ServiceLabels, Counter>,
    service_bytes: Family<ServiceLabels, Counter>,
    map_fill: Family<MapLabel, Gauge<f64, AtomicU64>>,
    stats: Mutex<Option<StatsReader>>,
    /// Set once the first full sync is programmed and pod interfaces are attached; drives /healthz.
    synced: AtomicBool,
    /// Since when a received change waits to be programmed.
    pending_since: Mutex<Option<Instant>>,
    healthz_timeout: Duration,
    state: RwLock<AgentState>,
    /// The frontends of `/state`, rendered on request.
    programmed: RwLock<Arc<ProgrammedView>>,
}

impl Metrics {
    pub fn new(healthz_timeout: Duration) -> Self {
        Self::with_extra(healthz_timeout, |_| {})
    }

    /// Also registers what `extra` adds (the L7 proxy's metrics).
    pub fn with_extra(healthz_timeout: Duration, extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("weir");
        extra(&mut registry);
        let sync_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to program one sync of the desired state into the eBPF maps (kube-proxy's sync_proxy_rules_duration_seconds)",
            sync_duration.clone(),
        );
        let programming_latency = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "network_programming_duration_seconds",
            "Time from a change being seen by the source (file event or watch event) to its map writes",
            programming_latency.clone(),
        );
        let syncs = Counter::default();
        registry.register(
            "syncs",
            "Syncs of the desired state into the maps",
            syncs.clone(),
        );
        let sync_errors = Counter::default();
        registry.register(
            "sync_errors",
            "Map operations that failed during syncs (the affected frontend keeps its previous programming)",
            sync_errors.clone(),
        );
        let refused_frontends = Gauge::default();
        registry.register(
            "refused_frontends",
            "Frontends the last sync could not write (a full map or Maglev arena; raise --max-services, \
             --maglev-slots or --max-backends): new ones are not served, changed ones keep their \
             previous programming; retried with a backoff up to 16 s",
            refused_frontends.clone(),
        );
        let config_errors = Counter::default();
        registry.register(
            "config_errors",
            "Invalid files or objects found while reading the configuration (each skipped)",
            config_errors.clone(),
        );
        let last_sync_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "Unix time of the last successful sync",
            last_sync_timestamp.clone(),
        );
        let frontends = Gauge::default();
        registry.register(
            "programmed_frontends",
            "Frontends (ClusterIP:port/protocol) in the datapath",
            frontends.clone(),
        );
        let backends = Gauge::default();
        registry.register(
            "programmed_backends",
            "Distinct backends in the datapath",
            backends.clone(),
        );
        let attached_interfaces = Gauge::default();
        registry.register(
            "attached_interfaces",
            "Pod interfaces the datapath program is attached to",
            attached_interfaces.clone(),
        );
        let conntrack_entries = Gauge::default();
        registry.register(
            "conntrack_entries",
            "Connection-tracking entries (one per direction of a flow)",
            conntrack_entries.clone(),
        );
        let conntrack_gc_runs = Counter::default();
        registry.register(
            "conntrack_gc_runs",
            "Passes of the conntrack garbage collector over both conntrack maps",
            conntrack_gc_runs.clone(),
        );
        let conntrack_gc_deleted = Counter::default();
        registry.register(
            "conntrack_gc_deleted_entries",
            "Conntrack entries the garbage collector removed (idle flows past their --conntrack-* timeout)",
            conntrack_gc_deleted.clone(),
        );
        let conntrack_gc_duration = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "conntrack_gc_last_duration_seconds",
            "Time the last garbage-collector pass took",
            conntrack_gc_duration.clone(),
        );
        let datapath_packets = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "datapath_packets",
            "Packets seen by the datapath, by verdict (drops and rejects included)",
            datapath_packets.clone(),
        );
        let service_packets = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_packets",
            "Packets of each frontend's flows, both directions, counted in the datapath",
            service_packets.clone(),
        );
        let service_bytes = Family::<ServiceLabels, Counter>::default();
        registry.register(
            "service_bytes",
            "Bytes (frames as seen at the pod interface) of each frontend's flows, both directions",
            service_bytes.clone(),
        );
        let map_fill = Family::<MapLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "map_fill_ratio",
            "Entries in use divided by capacity, per eBPF map",
            map_fill.clone(),
        );
        Self {
            registry,
            service_packets,
            service_bytes,
            map_fill,
            sync_duration,
            programming_latency,
            syncs,
            sync_errors,
            refused_frontends,
            config_errors,
            last_sync_timestamp,
            frontends,
            backends,
            attached_interfaces,
            conntrack_entries,
            conntrack_gc_runs,
            conntrack_gc_deleted,
            conntrack_gc_duration,
            datapath_packets,
            stats: Mutex::new(None),
            synced: AtomicBool::new(false),
            pending_since: Mutex::new(None),
            healthz_timeout,
            state: RwLock::new(AgentState::default()),
            programmed: RwLock::new(Arc::default()),
        }
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Relaxed);
        self.update_state(|s| s.synced = synced);
    }

    pub fn mark_pending(&self) {
        if let Ok(mut p) = self.pending_since.lock() {
            p.get_or_insert_with(Instant::now);
        }
    }

    pub fn clear_pending(&self) {
        if let Ok(mut p) = self.pending_since.lock() {
            *p = None;
        }
    }

    /// kube-proxy's semantics: healthy once synced, unhealthy again while a change has waited longer
    /// than the timeout to be programmed.
    pub fn healthy(&self) -> bool {
        let overdue = self
            .pending_since
            .lock()
            .ok()
            .and_then(|p| *p)
            .is_some_and(|t| t.elapsed() > self.healthz_timeout);
        self.synced.load(Ordering::Relaxed) && !overdue
    }

    pub fn set_state(&self, state: AgentState) {
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
    }

    pub fn update_state(&self, f: impl FnOnce(&mut AgentState)) {
        if let Ok(mut s) = self.state.write() {
            f(&mut s);
        }
    }

    /// Replaces what `/state` lists as programmed.
    pub fn set_programmed(&self, view: ProgrammedView) {
        if let Ok(mut p) = self.programmed.write() {
            *p = Arc::new(view);
        }
    }

    fn programmed(&self) -> Arc<ProgrammedView> {
        self.programmed
            .read()
            .map(|p| Arc::clone(&p))
            .unwrap_or_default()
    }

    pub fn state_json(&self) -> String {
        let Ok(mut state) = self.state.read().map(|s| s.clone()) else {
            return "{}".to_owned();
        };
        state.frontends = self.programmed().frontend_infos();
        serde_json::to_string(&state).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Records how full a map is.
    pub fn set_fill(&self, map: &str, used: usize, capacity: u32) {
        let ratio = if capacity == 0 {
            0.0
        } else {
            used as f64 / f64::from(capacity)
        };
        self.map_fill
            .get_or_create(&MapLabel {
                map: map.to_owned(),
            })
            .set(ratio);
    }

    pub fn set_stats_reader(&self, reader: StatsReader) {
        if let Ok(mut guard) = self.stats.lock() {
            *guard = Some(reader);
        }
    }

    /// Text exposition, refreshed from the maps.
    pub fn render(&self) -> String {
        if let Ok(guard) = self.stats.lock()
            && let Some(reader) = guard.as_ref()
        {
            for (value, name) in reader.counters().into_iter().zip(STAT_NAMES) {
                // The kernel's per-CPU sums are already monotonic; mirror them as the counter's value.
                self.datapath_packets
                    .get_or_create(&ReasonLabel {
                        reason: name.to_owned(),
                    })
                    .inner()
                    .store(value, Ordering::Relaxed);
            }
            let ct = reader.conntrack_entries();
            self.conntrack_entries
                .set(i64::try_from(ct).unwrap_or(i64::MAX));
            self.set_fill(weir_common::MAP_CONNTRACK, ct, reader.conntrack_capacity());
            let programmed = self.programmed();
            let names: std::collections::HashMap<weir_common::ServiceKey, &crate::model::NsName> =
                programmed
                    .frontends
                    .iter()
                    .map(|(f, state, _)| (crate::reconcile::service_key(f), &state.service))
                    .collect();
            for (key, c) in reader.service_counters() {
                let frontend = frontend_name(&key);
                let labels = ServiceLabels {
                    service: names.get(&key).map(ToString::to_string).unwrap_or_default(),
                    frontend,
                };
                self.service_packets
                    .get_or_create(&labels)
                    .inner()
                    .store(c.packets, Ordering::Relaxed);
                self.service_bytes
                    .get_or_create(&labels)
                    .inner()
                    .store(c.bytes, Ordering::Relaxed);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn frontend_name(key: &weir_common::ServiceKey) -> String {
    let proto = match key.proto {
        weir_common::PROTO_TCP => "TCP".to_owned(),
        weir_common::PROTO_UDP => "UDP".to_owned(),
        other => other.to_string(),
    };
    let addr =
        std::net::SocketAddr::new(weir_common::ip_of(&key.addr_be), u16::from_be(key.port_be));
    format!("{addr}/{proto}")
}
