//! Level-triggered reconciliation: the whole desired state is diffed against what is programmed, and only
//! the difference is written. A frontend's Maglev table is swapped atomically: the new table is written
//! in full under a fresh table id, then the frontend entry is switched to it in one map update, then the
//! old table is deleted, so no packet ever sees a half-written table.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use std::net::Ipv4Addr;
use tracing::{error, warn};

use weir_common::{
    Backend, SVC_FLAG_DROP, SVC_FLAG_L7, SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue,
};

use crate::{
    maglev,
    model::{BackendAddr, Desired, Frontend},
};

/// A failed map operation, with which map and what for.
#[derive(Debug, thiserror::Error)]
#[error("{op} in {map}: {message}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    pub message: String,
}

/// The kernel seam: the real implementation writes eBPF maps, tests use an in-memory one.
pub trait MapWriter {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// Creates a complete table (slot → backend id) under `table_id`; on error nothing is left behind.
    fn put_table(&mut self, table_id: u32, slots: &[u32]) -> Result<(), MapError>;
    /// Idempotent: deleting a missing table succeeds.
    fn delete_table(&mut self, table_id: u32) -> Result<(), MapError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError>;
    fn put_source_range(&mut self, key: ServiceKey, range: (Ipv4Addr, u8)) -> Result<(), MapError>;
    /// Idempotent.
    fn delete_source_range(
        &mut self,
        key: ServiceKey,
        range: (Ipv4Addr, u8),
    ) -> Result<(), MapError>;
    /// Removes the conntrack entries of flows to these (deleted) frontends; returns how many.
    fn purge_flows(&mut self, frontends: &BTreeSet<ServiceKey>) -> Result<usize, MapError>;
}

/// What was already in the pinned maps when the agent started.
#[derive(Debug, Default)]
pub struct Adopted {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    /// Every table id present in the Maglev map.
    pub tables: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    /// `None` for a frontend adopted from pinned maps: its backend set is unknown, so it is rewritten.
    backends: Option<BTreeSet<BackendAddr>>,
    drop_when_empty: bool,
    source_ranges: Vec<(Ipv4Addr, u8)>,
}

impl Programmed {
    /// Whether the datapath already does what `state` asks.
    fn matches(&self, state: &crate::model::FrontendState) -> bool {
        self.backends.as_ref() == Some(&state.backends)
            // An empty frontend is also rewritten when it switches between reject and drop.
            && (!state.backends.is_empty() || self.drop_when_empty == state.drop_when_empty)
            && self.value.affinity_timeout_s == state.affinity_timeout_s
            && self.source_ranges == state.source_ranges
            && (self.value.flags & SVC_FLAG_L7 != 0) == state.l7
    }
}

/// Counts of one sync, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    pub errors: usize,
}

pub struct Reconciler<W> {
    writer: W,
    frontends: HashMap<ServiceKey, Programmed>,
    backend_ids: BTreeMap<BackendAddr, u32>,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    next_table_id: u32,
    /// Tables found in the pinned maps: those no frontend uses after the first sync are deleted.
    orphan_tables: Vec<u32>,
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr_be: u32::from(f.ip).to_be(),
        port_be: f.port.to_be(),
        proto: f.protocol.number(),
        pad: 0,
    }
}

fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr_be: u32::from(b.ip).to_be(),
        port_be: b.port.to_be(),
        proto: b.protocol.number(),
        pad: 0,
    }
}

impl<W: MapWriter> Reconciler<W> {
    #[cfg(test)]
    pub fn new(writer: W) -> Self {
        Self::adopt(writer, Adopted::default())
    }

    /// Starts from the state left in pinned maps: frontends keep serving from their old tables until the
    /// first sync replaces them, backend ids are kept (conntrack entries refer to them), and tables no
    /// frontend references are removed after that sync.
    pub fn adopt(writer: W, adopted: Adopted) -> Self {
        let mut frontends = HashMap::new();
        let mut max_table = 0;
        let mut live_tables = BTreeSet::new();
        for (key, value) in adopted.services {
            max_table = max_table.max(value.table_id);
            live_tables.insert(value.table_id);
            frontends.insert(
                key,
                Programmed {
                    value,
                    backends: None,
                    drop_when_empty: false,
                    // Unknown after a restart; ranges left in the map are harmless to other frontends
                    // and the rewrite adds what this one needs.
                    source_ranges: Vec::new(),
                },
            );
        }
        let mut backend_ids = BTreeMap::new();
        let mut max_backend = 0;
        let mut stale_backend_ids = Vec::new();
        for (id, b) in adopted.backends {
            max_backend = max_backend.max(id);
            let protocol = match b.proto {
                weir_common::PROTO_TCP => crate::model::Protocol::Tcp,
                weir_common::PROTO_UDP => crate::model::Protocol::Udp,
                _ => {
                    stale_backend_ids.push(id);
                    continue;
                }
            };
            let addr = BackendAddr {
                ip: u32::from_be(b.addr_be).into(),
                port: u16::from_be(b.port_be),
                protocol,
            };
            if backend_ids.insert(addr, id).is_some() {
                stale_backend_ids.push(id);
            }
        }
        let orphan_tables = adopted
            .tables
            .into_iter()
            .inspect(|t| max_table = max_table.max(*t))
            .collect();
        let mut r = Self {
            writer,
            frontends,
            backend_ids,
            free_backend_ids: Vec::new(),
            next_backend_id: max_backend.saturating_add(1).max(1),
            next_table_id: max_table.wrapping_add(1).max(1),
            orphan_tables,
        };
        for id in stale_backend_ids {
            if r.writer.delete_backend(id).is_err() {
                warn!(id, "could not delete a malformed adopted backend entry");
            }
        }
        r
    }

    #[cfg(test)]
    pub fn writer(&self) -> &W {
        &self.writer
    }

    /// What the datapath holds for a frontend, if anything.
    pub fn programmed(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.frontends.get(key).map(|p| p.value)
    }

    pub fn programmed_frontends(&self) -> usize {
        self.frontends.len()
    }

    /// Maglev tables in use (frontends with at least one backend).
    pub fn programmed_tables(&self) -> usize {
        self.frontends
            .values()
            .filter(|p| p.value.table_size > 0)
            .count()
    }

    pub fn programmed_backends(&self) -> usize {
        self.backend_ids.len()
    }

    /// Brings the maps to `desired`. Failures are logged and counted; a frontend whose update failed
    /// keeps its previous programming, and the next sync retries it.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let mut report = SyncReport::default();

        let wanted: BTreeSet<BackendAddr> = desired
            .frontends
            .values()
            .flat_map(|f| f.backends.iter().copied())
            .collect();
        for b in &wanted {
            if self.backend_ids.contains_key(b) {
                continue;
            }
            let id = self.alloc_backend_id();
            match self.writer.put_backend(id, backend_value(b)) {
                Ok(()) => {
                    self.backend_ids.insert(*b, id);
                }
                Err(e) => {
                    error!(backend = %b, "cannot program backend: {e}");
                    self.free_backend_ids.push(id);
                    report.errors += 1;
                }
            }
        }

        for (frontend, state) in &desired.frontends {
            let key = service_key(frontend);
            if self.frontends.get(&key).is_some_and(|p| p.matches(state)) {
                continue;
            }
            match self.write_frontend(key, state) {
                Ok(()) => report.frontends_written += 1,
                Err(e) => {
                    error!(frontend = %frontend, service = %state.service, "cannot program frontend: {e}");
                    report.errors += 1;
                }
            }
        }

        let wanted_keys: BTreeSet<ServiceKey> = desired.frontends.keys().map(service_key).collect();
        let stale: Vec<ServiceKey> = self
            .frontends
            .keys()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect();
        // kube-proxy clears the conntrack entries of deleted UDP Services, so their datagrams stop
        // reaching the old backends; TCP connections, as with kube-proxy, live on until they close.
        let purge: BTreeSet<ServiceKey> = stale
            .iter()
            .filter(|k| k.proto == weir_common::PROTO_UDP)
            .copied()
            .collect();
        for key in stale {
            match self.writer.delete_service(key) {
                Ok(()) => {
                    if let Some(old) = self.frontends.remove(&key) {
                        self.drop_table(old.value);
                        for r in old.source_ranges {
                            let _ = self.writer.delete_source_range(key, r);
                        }
                    }
                    report.frontends_deleted += 1;
                }
                Err(e) => {
                    error!(?key, "cannot delete frontend: {e}");
                    report.errors += 1;
                }
            }
        }

        if !purge.is_empty() {
            match self.writer.purge_flows(&purge) {
                Ok(n) if n > 0 => tracing::info!(
                    flows = n,
                    "removed conntrack entries of deleted UDP frontends"
                ),
                Ok(_) => {}
                Err(e) => {
                    warn!("cannot remove conntrack entries of deleted frontends: {e}");
                    report.errors += 1;
                }
            }
        }

        // Backends go last: only once no table can point at them any more.
        let referenced: BTreeSet<BackendAddr> = self
            .frontends
            .values()
            .filter_map(|p| p.backends.as_ref())
            .flatten()
            .copied()
            .collect();
        let unused: Vec<(BackendAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(b, _)| !referenced.contains(b) && !wanted.contains(b))
            .map(|(b, id)| (*b, *id))
            .collect();
        // Adopted frontends not yet rewritten may still point at any adopted backend.
        let adopted_pending = self.frontends.values().any(|p| p.backends.is_none());
        if !adopted_pending {
            for (b, id) in unused {
                match self.writer.delete_backend(id) {
                    Ok(()) => {
                        self.backend_ids.remove(&b);
                        self.free_backend_ids.push(id);
                    }
                    Err(e) => {
                        error!(backend = %b, "cannot delete backend: {e}");
                        report.errors += 1;
                    }
                }
            }
        }

        self.prune_orphan_tables();
        report
    }

    fn alloc_backend_id(&mut self) -> u32 {
        self.free_backend_ids.pop().unwrap_or_else(|| {
            let id = self.next_backend_id;
            self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
            id
        })
    }

    fn alloc_table_id(&mut self) -> u32 {
        let in_use: BTreeSet<u32> = self
            .frontends
            .values()
            .map(|p| p.value.table_id)
            .chain(self.orphan_tables.iter().copied())
            .collect();
        while in_use.contains(&self.next_table_id) || self.next_table_id == 0 {
            self.next_table_id = self.next_table_id.wrapping_add(1);
        }
        let id = self.next_table_id;
        self.next_table_id = self.next_table_id.wrapping_add(1);
        id
    }

    fn write_frontend(
        &mut self,
        key: ServiceKey,
        state: &crate::model::FrontendState,
    ) -> Result<(), MapError> {
        let backends = &state.backends;
        let drop_when_empty = state.drop_when_empty;
        let value = if backends.is_empty() {
            ServiceValue {
                table_id: 0,
                table_size: 0,
                backend_count: 0,
                flags: if drop_when_empty {
                    SVC_FLAG_DROP
                } else {
                    SVC_FLAG_REJECT
                },
                affinity_timeout_s: state.affinity_timeout_s,
                pad: 0,
            }
        } else {
            let members: Vec<(Vec<u8>, u32)> = backends
                .iter()
                .filter_map(|b| {
                    self.backend_ids
                        .get(b)
                        .map(|id| (b.to_string().into_bytes(), *id))
                })
                .collect();
            if members.len() != backends.len() {
                return Err(MapError {
                    map: weir_common::MAP_BACKENDS,
                    op: "lookup",
                    message: "a backend of this frontend could not be programmed".to_owned(),
                });
            }
            let size = maglev::table_size(members.len());
            let table = maglev::build(&members, size);
            let table_id = self.alloc_table_id();
            // On failure the frontend keeps its old table.
            self.writer.put_table(table_id, &table)?;
            ServiceValue {
                table_id,
                table_size: size,
                backend_count: members.len() as u32,
                flags: 0,
                affinity_timeout_s: state.affinity_timeout_s,
                pad: 0,
            }
        };
        let mut value = value;
        let old_ranges: Vec<(Ipv4Addr, u8)> = self
            .frontends
            .get(&key)
            .map(|p| p.source_ranges.clone())
            .unwrap_or_default();
        // Allowed prefixes go in before the frontend starts checking them, and leave after it stops.
        for r in state
            .source_ranges
            .iter()
            .filter(|r| !old_ranges.contains(r))
        {
            if let Err(e) = self.writer.put_source_range(key, *r) {
                self.drop_table(value);
                return Err(e);
            }
        }
        if !state.source_ranges.is_empty() {
            value.flags |= SVC_FLAG_SOURCE_RANGES;
        }
        if state.l7 {
            value.flags |= SVC_FLAG_L7;
        }
        if let Err(e) = self.writer.put_service(key, value) {
            self.drop_table(value);
            return Err(e);
        }
        for r in old_ranges
            .iter()
            .filter(|r| !state.source_ranges.contains(r))
        {
            if let Err(e) = self.writer.delete_source_range(key, *r) {
                warn!(?r, "cannot delete a source range: {e}");
            }
        }
        let old = self.frontends.insert(
            key,
            Programmed {
                value,
                backends: Some(backends.clone()),
                drop_when_empty,
                source_ranges: state.source_ranges.clone(),
            },
        );
        if let Some(old) = old {
            self.drop_table(old.value);
        }
        Ok(())
    }

    fn drop_table(&mut self, value: ServiceValue) {
        if value.table_size == 0 {
            return;
        }
        if let Err(e) = self.writer.delete_table(value.table_id) {
            // Unreferenced, so harmless to traffic; pruned again at the next start.
            warn!(table = value.table_id, "cannot delete Maglev table: {e}");
        }
    }

    fn prune_orphan_tables(&mut self) {
        if self.orphan_tables.is_empty() {
            return;
        }
        let live: BTreeSet<u32> = self
            .frontends
            .values()
            .filter(|p| p.value.table_size > 0)
            .map(|p| p.value.table_id)
            .collect();
        for table in std::mem::take(&mut self.orphan_tables) {
            if !live.contains(&table)
                && let Err(e) = self.writer.delete_table(table)
            {
                warn!(table, "cannot delete orphaned Maglev table: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
