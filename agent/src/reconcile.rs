//! Level-triggered reconciliation: the whole desired state is diffed against what is programmed, and only
//! the difference is written. A frontend's Maglev table is swapped atomically: the new table is written
//! in full into free chunks of the slot arena, then the frontend entry is switched to it in one map
//! update, then the old chunks are released (reused only after a quarantine), so no packet ever sees a
//! half-written table.
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// Hash maps keyed by what the reconciler programs: a sync looks up every desired frontend, and
/// SipHash was most of that walk's cost at 10k Services. foldhash is seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;

use std::net::IpAddr;
use tracing::{error, warn};

use weir_common::{
    Backend, SVC_FLAG_DROP, SVC_FLAG_L7, SVC_FLAG_REJECT, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue,
};

use crate::{
    arena::{SlotArena, chunks_for},
    maglev,
    model::{BackendAddr, Desired, Frontend, FrontendState},
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
    /// Chunks in the Maglev slot arena.
    fn arena_chunks(&self) -> u32;
    /// Writes a complete table (slot → backend id) into the arena from chunk `base` and records its
    /// members (the distinct backend ids in `slots`); on error no member is left behind.
    fn put_table(&mut self, base: u32, slots: &[u32], members: &[u32]) -> Result<(), MapError>;
    /// Whether the arena holds exactly `slots` from chunk `base` (an adopted frontend whose table is
    /// already right keeps it across a restart instead of being rewritten).
    fn table_equals(&mut self, base: u32, slots: &[u32]) -> bool;
    /// Forgets the members of the table at `base` (its chunks go back to the allocator). Idempotent.
    fn delete_table(&mut self, base: u32) -> Result<(), MapError>;
    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError>;
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError>;
    fn put_source_range(&mut self, key: ServiceKey, range: (IpAddr, u8)) -> Result<(), MapError>;
    /// Idempotent.
    fn delete_source_range(&mut self, key: ServiceKey, range: (IpAddr, u8))
    -> Result<(), MapError>;
    /// Removes the conntrack entries of flows to these (deleted) frontends; returns how many.
    fn purge_flows(&mut self, frontends: &BTreeSet<ServiceKey>) -> Result<usize, MapError>;
}

/// What was already in the pinned maps when the agent started.
#[derive(Debug, Default)]
pub struct Adopted {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, Backend)>,
    /// Every table (base chunk) that has members recorded.
    pub tables: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    /// What was programmed, shared with the desired state it came from; `None` for a frontend adopted
    /// from pinned maps (its backend set is unknown, so it is rewritten).
    state: Option<Arc<FrontendState>>,
}

impl Programmed {
    /// Whether the datapath already does what `state` asks.
    fn matches(&self, state: &Arc<FrontendState>) -> bool {
        let Some(mine) = &self.state else {
            return false;
        };
        Arc::ptr_eq(mine, state)
            || (mine.backends == state.backends
                // An empty frontend is also rewritten when it switches between reject and drop.
                && (!state.backends.is_empty() || mine.drop_when_empty == state.drop_when_empty)
                && mine.affinity_timeout_s == state.affinity_timeout_s
                && mine.source_ranges == state.source_ranges
                && mine.l7 == state.l7)
    }

    /// The source ranges in the map for this frontend (none known for an adopted one: ranges left in
    /// the map are harmless to other frontends and the rewrite adds what this one needs).
    fn source_ranges(&self) -> &[(IpAddr, u8)] {
        self.state
            .as_ref()
            .map_or(&[], |s| s.source_ranges.as_slice())
    }
}

/// Counts of one sync, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends_written: usize,
    pub frontends_deleted: usize,
    /// Frontends that could not be written (a full map or arena): a new one is left out, a changed
    /// one keeps its previous programming. Also counted in `errors`.
    pub frontends_refused: usize,
    pub errors: usize,
}

pub struct Reconciler<W> {
    writer: W,
    frontends: HashMap<ServiceKey, Programmed>,
    backend_ids: BTreeMap<BackendAddr, u32>,
    free_backend_ids: Vec<u32>,
    next_backend_id: u32,
    /// How many programmed frontends use each backend; a backend is deleted when its count falls to
    /// zero (checked only for `unreferenced` candidates, so a sync costs what changed, not N).
    backend_refs: HashMap<BackendAddr, u32>,
    /// Backends whose count fell to zero (or were never referenced) since the last sync.
    unreferenced: Vec<BackendAddr>,
    /// Adopted frontends not yet rewritten: until none is left, any adopted backend may be in use.
    adopted_pending: usize,
    arena: SlotArena,
    /// Tables found in the pinned maps: those no frontend uses after the first sync are deleted.
    orphan_tables: Vec<u32>,
}

/// Refused frontends named in the log per sync; the rest are counted.
const LOGGED_REFUSALS: usize = 10;

/// Frontends whose tables are built before any of them is written.
const TABLE_BATCH: usize = 256;

/// A frontend's Maglev table, built and not yet written.
struct BuiltTable {
    slots: Vec<u32>,
    size: u32,
    /// The distinct backend ids in `slots`.
    members: Vec<u32>,
}

/// A frontend's Maglev table from its backends' ids; `None` when it has no backend.
fn build_table(
    backend_ids: &BTreeMap<BackendAddr, u32>,
    state: &FrontendState,
) -> Result<Option<BuiltTable>, MapError> {
    if state.backends.is_empty() {
        return Ok(None);
    }
    let members: Vec<(Vec<u8>, u32)> = state
        .backends
        .iter()
        .filter_map(|b| {
            backend_ids
                .get(b)
                .map(|id| (b.to_string().into_bytes(), *id))
        })
        .collect();
    if members.len() != state.backends.len() {
        return Err(MapError {
            map: weir_common::MAP_BACKENDS,
            op: "lookup",
            message: "a backend of this frontend could not be programmed".to_owned(),
        });
    }
    let size = maglev::table_size(members.len());
    Ok(Some(BuiltTable {
        slots: maglev::build(&members, size),
        size,
        members: members.into_iter().map(|(_, id)| id).collect(),
    }))
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr_be: weir_common::addr_of(f.ip),
        port_be: f.port.to_be(),
        proto: f.protocol.number(),
        pad: 0,
    }
}

fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr_be: weir_common::addr_of(b.ip),
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
        let mut frontends = HashMap::default();
        let mut arena = SlotArena::new(writer.arena_chunks());
        for (key, value) in adopted.services {
            if value.table_size > 0
                && !arena.reserve(value.table_base, chunks_for(value.table_size))
            {
                // Out of the arena or overlapping another table: a corrupt entry. It is rewritten
                // at the first sync; until then its chunks may be handed to another table.
                warn!(
                    ?key,
                    base = value.table_base,
                    size = value.table_size,
                    "adopted frontend's Maglev table does not fit the arena"
                );
            }
            frontends.insert(key, Programmed { value, state: None });
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
                ip: weir_common::ip_of(&b.addr_be),
                port: u16::from_be(b.port_be),
                protocol,
            };
            if backend_ids.insert(addr, id).is_some() {
                stale_backend_ids.push(id);
            }
        }
        let orphan_tables = adopted.tables;
        let mut r = Self {
            writer,
            adopted_pending: frontends.len(),
            frontends,
            // Every adopted backend is a candidate for deletion once the adopted frontends are rewritten.
            unreferenced: backend_ids.keys().copied().collect(),
            backend_ids,
            backend_refs: HashMap::default(),
            free_backend_ids: Vec::new(),
            next_backend_id: max_backend.saturating_add(1).max(1),
            arena,
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

    /// The Maglev slot arena's allocation state.
    pub fn arena(&self) -> &SlotArena {
        &self.arena
    }

    /// Brings the maps to `desired`. Failures are logged and counted; a frontend whose update failed
    /// keeps its previous programming, and the next sync retries it.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let mut report = SyncReport::default();

        // What differs. An unchanged frontend is usually the very allocation programmed last time;
        // one equal in content takes the new allocation, so the old one can be freed.
        let mut changed: Vec<(&Frontend, &Arc<FrontendState>)> = Vec::new();
        let mut present = 0usize;
        for (frontend, state) in &desired.frontends {
            if let Some(p) = self.frontends.get_mut(&service_key(frontend)) {
                present += 1;
                if p.matches(state) {
                    if let Some(mine) = p.state.as_mut()
                        && !Arc::ptr_eq(mine, state)
                    {
                        *mine = Arc::clone(state);
                    }
                    continue;
                }
            }
            changed.push((frontend, state));
        }

        for b in changed.iter().flat_map(|(_, s)| s.backends.iter()) {
            if self.backend_ids.contains_key(b) {
                continue;
            }
            let id = self.alloc_backend_id();
            match self.writer.put_backend(id, backend_value(b)) {
                Ok(()) => {
                    self.backend_ids.insert(*b, id);
                    // Deleted again at the end of this sync if its frontend could not be written.
                    self.unreferenced.push(*b);
                }
                Err(e) => {
                    error!(backend = %b, "cannot program backend: {e}");
                    self.free_backend_ids.push(id);
                    report.errors += 1;
                }
            }
        }

        // Frontends no longer wanted: only looked for when some programmed frontend is not in
        // `desired`.
        let stale: Vec<ServiceKey> = if present == self.frontends.len() {
            Vec::new()
        } else {
            let wanted: HashSet<ServiceKey> = desired.frontends.keys().map(service_key).collect();
            self.frontends
                .keys()
                .filter(|k| !wanted.contains(k))
                .copied()
                .collect()
        };
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
                        for r in old.source_ranges() {
                            let _ = self.writer.delete_source_range(key, *r);
                        }
                        self.release_state(old.state.as_ref());
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

        // Writes after deletions, so the room deleted frontends free (map entries, arena chunks) is
        // available to the frontends being written. Tables are built in parallel a batch at a time
        // (building is most of the work of a big sync; batches bound the memory of tables built but
        // not yet written), then written in order.
        for batch in changed.chunks(TABLE_BATCH) {
            let tables = self.build_tables(batch);
            for ((frontend, state), table) in batch.iter().zip(tables) {
                match table.and_then(|t| self.write_frontend(service_key(frontend), state, t)) {
                    Ok(()) => report.frontends_written += 1,
                    Err(e) => {
                        // A full map refuses every frontend that does not fit: name the first few,
                        // count the rest (a summary follows the loop).
                        if report.frontends_refused < LOGGED_REFUSALS {
                            error!(frontend = %frontend, service = %state.service, "cannot program frontend: {e}");
                        }
                        report.frontends_refused += 1;
                        report.errors += 1;
                    }
                }
            }
        }

        // Backends go last: only once no table can point at them any more.
        if report.frontends_refused > LOGGED_REFUSALS {
            error!(
                refused = report.frontends_refused,
                "{} more frontends could not be programmed",
                report.frontends_refused - LOGGED_REFUSALS
            );
        }

        if self.adopted_pending == 0 {
            for b in std::mem::take(&mut self.unreferenced) {
                if self.backend_refs.contains_key(&b) {
                    continue;
                }
                let Some(&id) = self.backend_ids.get(&b) else {
                    continue;
                };
                match self.writer.delete_backend(id) {
                    Ok(()) => {
                        self.backend_ids.remove(&b);
                        self.free_backend_ids.push(id);
                    }
                    Err(e) => {
                        error!(backend = %b, "cannot delete backend: {e}");
                        self.unreferenced.push(b);
                        report.errors += 1;
                    }
                }
            }
        }

        self.prune_orphan_tables();
        report
    }

    /// Counts `state`'s backends as used by a programmed frontend.
    fn hold_state(&mut self, state: &FrontendState) {
        for b in &state.backends {
            *self.backend_refs.entry(*b).or_default() += 1;
        }
    }

    /// Undoes [`Self::hold_state`] for a frontend's previous programming (`None`: it was adopted).
    fn release_state(&mut self, state: Option<&Arc<FrontendState>>) {
        let Some(state) = state else {
            self.adopted_pending = self.adopted_pending.saturating_sub(1);
            return;
        };
        for b in &state.backends {
            if let Some(n) = self.backend_refs.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    self.backend_refs.remove(b);
                    self.unreferenced.push(*b);
                }
            }
        }
    }

    fn alloc_backend_id(&mut self) -> u32 {
        self.free_backend_ids.pop().unwrap_or_else(|| {
            let id = self.next_backend_id;
            self.next_backend_id = self.next_backend_id.wrapping_add(1).max(1);
            id
        })
    }

    /// Writes `table` into free chunks; the caller makes it reachable or releases it.
    fn place_table(&mut self, table: &[u32], members: &[u32]) -> Result<u32, MapError> {
        let size = u32::try_from(table.len()).map_err(|_| MapError {
            map: weir_common::MAP_MAGLEV,
            op: "allocate",
            message: format!("{} slots do not fit a u32 index", table.len()),
        })?;
        let chunks = chunks_for(size);
        let base = self.arena.alloc(chunks).ok_or_else(|| MapError {
            map: weir_common::MAP_MAGLEV,
            op: "allocate",
            message: format!(
                "no run of {chunks} free chunks for a {size}-slot table ({} of {} chunks in use; \
                 raise --maglev-slots)",
                self.arena.used(),
                self.arena.capacity()
            ),
        })?;
        if let Err(e) = self.writer.put_table(base, table, members) {
            self.arena.release_now(base, chunks);
            return Err(e);
        }
        Ok(base)
    }

    /// The Maglev table of each frontend of `batch` (`None` for those without backends), built on
    /// every CPU.
    fn build_tables(
        &self,
        batch: &[(&Frontend, &Arc<FrontendState>)],
    ) -> Vec<Result<Option<BuiltTable>, MapError>> {
        let ids = &self.backend_ids;
        let build = |state: &FrontendState| build_table(ids, state);
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(batch.len().div_ceil(16))
            .max(1);
        if threads == 1 {
            return batch.iter().map(|(_, s)| build(s)).collect();
        }
        let per_thread = batch.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = batch
                .chunks(per_thread)
                .map(|part| {
                    let handle =
                        scope.spawn(move || part.iter().map(|(_, s)| build(s)).collect::<Vec<_>>());
                    (part.len(), handle)
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|(len, handle)| {
                    handle.join().unwrap_or_else(|_| {
                        // A panic in a build is a bug; the frontends of that part keep their tables.
                        (0..len)
                            .map(|_| {
                                Err(MapError {
                                    map: weir_common::MAP_MAGLEV,
                                    op: "build",
                                    message: "table build panicked".to_owned(),
                                })
                            })
                            .collect()
                    })
                })
                .collect()
        })
    }

    fn write_frontend(
        &mut self,
        key: ServiceKey,
        state: &Arc<FrontendState>,
        table: Option<BuiltTable>,
    ) -> Result<(), MapError> {
        let drop_when_empty = state.drop_when_empty;
        // A table this call wrote (to be released if the frontend cannot be switched to it).
        let mut new_table = None;
        let value = match table {
            None => ServiceValue {
                table_base: 0,
                table_size: 0,
                backend_count: 0,
                flags: if drop_when_empty {
                    SVC_FLAG_DROP
                } else {
                    SVC_FLAG_REJECT
                },
                affinity_timeout_s: state.affinity_timeout_s,
                pad: 0,
            },
            Some(BuiltTable {
                slots: table,
                size,
                members,
            }) => {
                // An adopted frontend (backends unknown) whose table already is this one keeps it.
                let adopted_base = self
                    .frontends
                    .get(&key)
                    .filter(|p| p.state.is_none() && p.value.table_size == size)
                    .map(|p| p.value.table_base);
                let table_base = match adopted_base {
                    Some(base) if self.writer.table_equals(base, &table) => base,
                    // On failure the frontend keeps its old table.
                    _ => {
                        let base = self.place_table(&table, &members)?;
                        new_table = Some(base);
                        base
                    }
                };
                ServiceValue {
                    table_base,
                    table_size: size,
                    backend_count: members.len() as u32,
                    flags: 0,
                    affinity_timeout_s: state.affinity_timeout_s,
                    pad: 0,
                }
            }
        };
        let mut value = value;
        let old_ranges: Vec<(IpAddr, u8)> = self
            .frontends
            .get(&key)
            .map(|p| p.source_ranges().to_vec())
            .unwrap_or_default();
        // Allowed prefixes go in before the frontend starts checking them, and leave after it stops.
        for r in state
            .source_ranges
            .iter()
            .filter(|r| !old_ranges.contains(r))
        {
            if let Err(e) = self.writer.put_source_range(key, *r) {
                self.discard_new_table(new_table, value);
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
            self.discard_new_table(new_table, value);
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
        self.hold_state(state);
        let old = self.frontends.insert(
            key,
            Programmed {
                value,
                state: Some(Arc::clone(state)),
            },
        );
        if let Some(old) = old {
            if old.value.table_size != value.table_size || old.value.table_base != value.table_base
            {
                self.drop_table(old.value);
            }
            self.release_state(old.state.as_ref());
        }
        Ok(())
    }

    /// Frees a table this sync wrote but never made reachable.
    fn discard_new_table(&mut self, new_table: Option<u32>, value: ServiceValue) {
        if let Some(base) = new_table {
            if let Err(e) = self.writer.delete_table(base) {
                warn!(table = base, "cannot delete Maglev table members: {e}");
            }
            self.arena.release_now(base, chunks_for(value.table_size));
        }
    }

    /// Frees a table that was reachable: its chunks wait out the quarantine before reuse.
    fn drop_table(&mut self, value: ServiceValue) {
        if value.table_size == 0 {
            return;
        }
        if let Err(e) = self.writer.delete_table(value.table_base) {
            // Unreferenced, so harmless to traffic; pruned again at the next start.
            warn!(
                table = value.table_base,
                "cannot delete Maglev table members: {e}"
            );
        }
        self.arena
            .release(value.table_base, chunks_for(value.table_size));
    }

    fn prune_orphan_tables(&mut self) {
        if self.orphan_tables.is_empty() {
            return;
        }
        let live: BTreeSet<u32> = self
            .frontends
            .values()
            .filter(|p| p.value.table_size > 0)
            .map(|p| p.value.table_base)
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
