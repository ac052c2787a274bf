//! The kernel side as the agent sees it: loads the embedded eBPF object with its maps pinned under
//! `--bpffs-dir`, attaches the pod-ingress program to interfaces, and implements [`MapWriter`] on the
//! pinned maps.
use std::{collections::HashMap as StdHashMap, io, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, HashOfMaps, MapData, MapError as AyaMapError, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use tracing::{info, warn};
use weir_common::{
    Backend, MAGLEV_TABLE_FLAGS, MAP_BACKENDS, MAP_CONNTRACK, MAP_MAGLEV, MAP_SERVICES, MAP_STATS,
    PROG_POD_INGRESS, STAT_COUNT, ServiceKey, ServiceValue,
};

use crate::reconcile::{Adopted, MapError, MapWriter};

/// Map capacities, set at load time.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub maglev_tables: u32,
    pub conntrack: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object (maps pinned under {pin_dir}): {source}")]
    Load {
        pin_dir: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("eBPF object has no {what} named {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: AyaMapError,
    },
}

/// The loaded object: owns the program and its attachments.
pub struct Datapath {
    ebpf: Ebpf,
    attached: StdHashMap<u32, (String, SchedClassifierLinkId)>,
}

/// Typed handles on the pinned maps, moved to the reconciler.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    backends: HashMap<MapData, u32, Backend>,
}

/// Read-only handles for metrics.
pub struct StatsReader {
    stats: PerCpuArray<MapData, u64>,
    conntrack: aya::maps::Map,
}

impl Datapath {
    pub fn load(
        pin_dir: &Path,
        caps: Capacities,
    ) -> Result<(Self, Maps, StatsReader), DatapathError> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));
        // BTF map definitions carry no pinning attribute, so the Maglev map is pinned by explicit path.
        let maglev_pin = pin_dir.join(MAP_MAGLEV);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_pin_path(MAP_MAGLEV, maglev_pin.as_path())
            .map_max_entries(MAP_SERVICES, caps.services)
            .map_max_entries(MAP_BACKENDS, caps.backends)
            .map_max_entries(MAP_MAGLEV, caps.maglev_tables)
            .map_max_entries(MAP_CONNTRACK, caps.conntrack)
            .load(object)
            .map_err(|source| DatapathError::Load {
                pin_dir: pin_dir.display().to_string(),
                source: Box::new(source),
            })?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROG_POD_INGRESS)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: PROG_POD_INGRESS,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                context: format!("{PROG_POD_INGRESS} is not a TC classifier"),
                source,
            })?;
        prog.load().map_err(|source| DatapathError::Program {
            context: format!("verifying {PROG_POD_INGRESS}"),
            source,
        })?;

        let maps = Maps {
            services: take_map(&mut ebpf, MAP_SERVICES)?,
            maglev: HashOfMaps::try_from(take_raw(&mut ebpf, MAP_MAGLEV)?).map_err(|source| {
                DatapathError::Map {
                    name: MAP_MAGLEV,
                    source,
                }
            })?,
            backends: take_map(&mut ebpf, MAP_BACKENDS)?,
        };
        let stats = StatsReader {
            stats: PerCpuArray::try_from(take_raw(&mut ebpf, MAP_STATS)?).map_err(|source| {
                DatapathError::Map {
                    name: MAP_STATS,
                    source,
                }
            })?,
            conntrack: take_raw(&mut ebpf, MAP_CONNTRACK)?,
        };
        Ok((
            Self {
                ebpf,
                attached: StdHashMap::new(),
            },
            maps,
            stats,
        ))
    }

    fn program(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.ebpf
            .program_mut(PROG_POD_INGRESS)
            .ok_or(DatapathError::Missing {
                what: "program",
                name: PROG_POD_INGRESS,
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                context: "program type".to_owned(),
                source,
            })
    }

    /// Attaches to the ingress of `name` (index `index`) unless already attached there.
    pub fn attach(&mut self, index: u32, name: &str) -> Result<bool, DatapathError> {
        if let Some((old_name, _)) = self.attached.get(&index) {
            if old_name == name {
                return Ok(false);
            }
            // Same index, new name: the interface was renamed; our link follows the index and stays.
            return Ok(false);
        }
        let link = self
            .program()?
            .attach(name, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Program {
                context: format!("attaching {PROG_POD_INGRESS} to {name} ingress"),
                source,
            })?;
        self.attached.insert(index, (name.to_owned(), link));
        info!(iface = name, index, "attached pod ingress program");
        Ok(true)
    }

    /// Forgets an interface that is gone (the kernel already dropped the attachment with it).
    pub fn forget(&mut self, index: u32) {
        if let Some((name, link)) = self.attached.remove(&index) {
            // Detaching a link whose device vanished may fail; the link is released either way.
            if let Ok(prog) = self.program() {
                let _ = prog.detach(link);
            }
            info!(iface = %name, index, "pod interface removed");
        }
    }

    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    /// Detaches from every interface (SIGTERM path).
    pub fn detach_all(&mut self) {
        let links: Vec<(u32, (String, SchedClassifierLinkId))> = self.attached.drain().collect();
        for (index, (name, link)) in links {
            match self.program() {
                Ok(prog) => match prog.detach(link) {
                    Ok(()) => info!(iface = %name, index, "detached"),
                    Err(e) => warn!(iface = %name, index, "detach failed: {e}"),
                },
                Err(e) => warn!("cannot reach program to detach: {e}"),
            }
        }
    }
}

fn take_raw(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::Missing { what: "map", name })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    HashMap::try_from(take_raw(ebpf, name)?).map_err(|source| DatapathError::Map { name, source })
}

fn map_error(map: &'static str, op: &'static str, e: AyaMapError) -> MapError {
    MapError {
        map,
        op,
        message: e.to_string(),
    }
}

/// Deleting what is not there is success: deletes are idempotent so retries and pruning can overlap.
fn ignore_missing(r: Result<(), AyaMapError>) -> Result<(), AyaMapError> {
    match r {
        Err(AyaMapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(AyaMapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl Maps {
    /// Reads what a previous agent left in the pinned maps.
    pub fn dump(&self) -> Adopted {
        Adopted {
            services: self.services.iter().filter_map(Result::ok).collect(),
            backends: self.backends.iter().filter_map(Result::ok).collect(),
            tables: self.maglev.keys().filter_map(Result::ok).collect(),
        }
    }
}

impl MapWriter for Maps {
    fn put_backend(&mut self, id: u32, backend: Backend) -> Result<(), MapError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(|e| map_error(MAP_BACKENDS, "insert", e))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        ignore_missing(self.backends.remove(&id)).map_err(|e| map_error(MAP_BACKENDS, "delete", e))
    }

    fn put_table(&mut self, table_id: u32, slots: &[u32]) -> Result<(), MapError> {
        let size = u32::try_from(slots.len()).map_err(|_| MapError {
            map: MAP_MAGLEV,
            op: "create table",
            message: format!("{} slots do not fit a u32 index", slots.len()),
        })?;
        // The flags must equal the template's for the kernel to accept the table as an inner map.
        let mut table = Array::<MapData, u32>::create(size, MAGLEV_TABLE_FLAGS)
            .map_err(|e| map_error(MAP_MAGLEV, "create table", e))?;
        for (slot, backend_id) in slots.iter().enumerate() {
            table
                .set(slot as u32, backend_id, 0)
                .map_err(|e| map_error(MAP_MAGLEV, "fill table", e))?;
        }
        // Only now, complete, does the table become reachable; dropping our fd leaves the map's
        // reference as the only one, so deleting the entry later frees it.
        self.maglev
            .insert(table_id, &table, 0)
            .map_err(|e| map_error(MAP_MAGLEV, "insert table", e))
    }

    fn delete_table(&mut self, table_id: u32) -> Result<(), MapError> {
        ignore_missing(self.maglev.remove(&table_id))
            .map_err(|e| map_error(MAP_MAGLEV, "delete table", e))
    }

    fn put_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<(), MapError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_error(MAP_SERVICES, "insert", e))
    }

    fn delete_service(&mut self, key: ServiceKey) -> Result<(), MapError> {
        ignore_missing(self.services.remove(&key)).map_err(|e| map_error(MAP_SERVICES, "delete", e))
    }
}

impl StatsReader {
    /// Datapath counters summed over CPUs, in `STAT_*` order.
    pub fn counters(&self) -> Vec<u64> {
        (0..STAT_COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Number of conntrack entries (both directions), counted by walking the keys.
    pub fn conntrack_entries(&self) -> usize {
        match aya::maps::HashMap::<&aya::maps::MapData, weir_common::CtKey, weir_common::CtValue>::try_from(
            &self.conntrack,
        ) {
            Ok(map) => map.keys().filter(Result::is_ok).count(),
            Err(_) => 0,
        }
    }
}
