//! Prometheus metrics: the agent's sync loop and the datapath's counters, read from the maps at scrape time.
use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use weir_common::STAT_NAMES;

use crate::datapath::StatsReader;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub syncs: Counter,
    pub sync_errors: Counter,
    pub config_errors: Counter,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub frontends: Gauge,
    pub backends: Gauge,
    pub attached_interfaces: Gauge,
    conntrack_entries: Gauge,
    datapath_packets: Family<ReasonLabel, Counter>,
    stats: Mutex<Option<StatsReader>>,
    /// Set once the first full sync is programmed; drives /healthz.
    pub synced: AtomicBool,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir");
        let sync_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "Time to program one sync of the desired state into the eBPF maps (kube-proxy's sync_proxy_rules_duration_seconds)",
            sync_duration.clone(),
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
        let datapath_packets = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "datapath_packets",
            "Packets seen by the datapath, by verdict (drops and rejects included)",
            datapath_packets.clone(),
        );
        Self {
            registry,
            sync_duration,
            syncs,
            sync_errors,
            config_errors,
            last_sync_timestamp,
            frontends,
            backends,
            attached_interfaces,
            conntrack_entries,
            datapath_packets,
            stats: Mutex::new(None),
            synced: AtomicBool::new(false),
        }
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
            self.conntrack_entries
                .set(i64::try_from(reader.conntrack_entries()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
