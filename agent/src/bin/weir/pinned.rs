//! Read-only access to the maps the agent pinned under `--bpffs-dir`, with errors that say what to check.
use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, MapType, PerCpuArray};
use weir_common::{
    Backend, CtKey, CtKey6, CtValue, CtValue6, MAP_BACKENDS, MAP_CONNTRACK, MAP_CONNTRACK6,
    MAP_MAGLEV, MAP_SERVICE_STATS, MAP_SERVICES, MAP_STATS, ServiceKey, ServiceValue,
    TABLE_CHUNK_SLOTS, TableChunk,
};

use crate::view::MapFill;

/// The agent's maps, in the order `weir stats` lists them.
const KNOWN_MAPS: [&str; 7] = [
    MAP_SERVICES,
    MAP_MAGLEV,
    MAP_BACKENDS,
    MAP_CONNTRACK,
    MAP_CONNTRACK6,
    MAP_STATS,
    MAP_SERVICE_STATS,
];

/// The pin directory of one agent.
pub struct Pinned {
    dir: PathBuf,
}

/// Conntrack entries read, and how many keys the map held while we walked it.
pub struct CtDump {
    pub entries: Vec<(CtKey6, CtValue6)>,
    pub total: u64,
}

impl Pinned {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn open(&self, name: &str) -> anyhow::Result<MapData> {
        let dir = self.dir.display();
        let path = self.dir.join(name);
        match path.try_exists() {
            Ok(true) => {}
            Ok(false) if !self.dir.is_dir() => {
                bail!(
                    "bpffs dir {dir} does not exist: is the agent running with --bpffs-dir {dir}?"
                )
            }
            Ok(false) => {
                bail!(
                    "bpffs dir {dir} has no {name} map: is the agent running with --bpffs-dir {dir}?"
                )
            }
            Err(e) => bail!("cannot look into bpffs dir {dir}: {e}"),
        }
        MapData::from_pin(&path).map_err(|e| {
            let hint = if is_permission_error(&e) {
                " (reading eBPF maps needs root, or CAP_BPF and CAP_SYS_ADMIN)"
            } else {
                ""
            };
            anyhow::Error::new(e).context(format!("opening pinned map {}{hint}", path.display()))
        })
    }

    /// Opens `name` as the kind of map `convert` expects, blaming a mismatch on version skew, which is
    /// the only way the agent's own pin can have another type or key size.
    fn typed<M>(
        &self,
        name: &str,
        convert: impl FnOnce(Map) -> Result<M, MapError>,
    ) -> anyhow::Result<M> {
        let data = self.open(name)?;
        let map =
            Map::from_map_data(data).with_context(|| format!("{name}: unsupported map type"))?;
        convert(map).with_context(|| {
            format!(
                "{name} in {} does not have the layout this weir expects: are the agent and weir the \
                 same version?",
                self.dir.display()
            )
        })
    }

    pub fn services(&self) -> anyhow::Result<Vec<(ServiceKey, ServiceValue)>> {
        let map: HashMap<MapData, ServiceKey, ServiceValue> =
            self.typed(MAP_SERVICES, HashMap::try_from)?;
        collect_entries(&map, MAP_SERVICES)
    }

    pub fn backends(&self) -> anyhow::Result<BTreeMap<u32, Backend>> {
        let map: HashMap<MapData, u32, Backend> = self.typed(MAP_BACKENDS, HashMap::try_from)?;
        Ok(collect_entries(&map, MAP_BACKENDS)?.into_iter().collect())
    }

    /// A reader of Maglev tables in the slot arena.
    pub fn maglev(&self) -> anyhow::Result<Maglev> {
        Ok(Maglev {
            map: self.typed(MAP_MAGLEV, Array::try_from)?,
        })
    }

    /// Up to `limit` conntrack entries (0: all) of both families, IPv4 ones in the IPv6 form with
    /// IPv4-mapped addresses, and the number of keys in the maps.
    pub fn conntrack(&self, limit: usize) -> anyhow::Result<CtDump> {
        let map: HashMap<MapData, CtKey, CtValue> = self.typed(MAP_CONNTRACK, HashMap::try_from)?;
        let max = self.info(MAP_CONNTRACK)?.max_entries() as usize;
        let (v4, total4) = walk(&map, MAP_CONNTRACK, max, limit)?;
        let mut entries: Vec<(CtKey6, CtValue6)> = v4.into_iter().map(widen).collect();
        let map6: HashMap<MapData, CtKey6, CtValue6> =
            self.typed(MAP_CONNTRACK6, HashMap::try_from)?;
        let max6 = self.info(MAP_CONNTRACK6)?.max_entries() as usize;
        let left = if limit == 0 {
            0
        } else {
            limit.saturating_sub(entries.len()).max(1)
        };
        let (v6, total6) = walk(&map6, MAP_CONNTRACK6, max6, left)?;
        if limit == 0 || entries.len() < limit {
            entries.extend(v6);
        }
        Ok(CtDump {
            total: total4 + total6,
            entries,
        })
    }

    /// Datapath counters summed over CPUs, by index.
    pub fn counters(&self) -> anyhow::Result<Vec<u64>> {
        let map: PerCpuArray<MapData, u64> = self.typed(MAP_STATS, PerCpuArray::try_from)?;
        (0..map.len())
            .map(|i| {
                map.get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum::<u64>())
                    .with_context(|| format!("reading {MAP_STATS}[{i}]"))
            })
            .collect()
    }

    /// Entries and capacity of every map pinned in the directory: the agent's known maps first, in
    /// [`KNOWN_MAPS`] order, then any other (a newer agent's) by name.
    pub fn fill(&self) -> anyhow::Result<Vec<MapFill>> {
        let dir = self.dir.display();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).with_context(|| {
            format!("bpffs dir {dir}: is the agent running with --bpffs-dir {dir}?")
        })? {
            let entry = entry.with_context(|| format!("listing {dir}"))?;
            // Maps are pinned as files here; links live in a subdirectory.
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort_by_key(|n| {
            let known = KNOWN_MAPS.iter().position(|k| k == n);
            (known.unwrap_or(usize::MAX), n.clone())
        });
        let mut fills = Vec::new();
        for name in names {
            // Something pinned here that is not a map (a program) is not ours to report.
            let Ok(data) = MapData::from_pin(self.dir.join(&name)) else {
                continue;
            };
            fills.push(fill_of(&name, &data)?);
        }
        if fills.is_empty() {
            bail!(
                "bpffs dir {dir} has no pinned maps: is the agent running with --bpffs-dir {dir}?"
            );
        }
        Ok(fills)
    }

    fn info(&self, name: &str) -> anyhow::Result<MapInfo> {
        // Through `open` first, for its clear error when the pin is missing.
        let data = self.open(name)?;
        data.info()
            .with_context(|| format!("reading the info of {name}"))
    }
}

fn fill_of(name: &str, data: &MapData) -> anyhow::Result<MapFill> {
    let info = data
        .info()
        .with_context(|| format!("reading the info of {name}"))?;
    let max = info.max_entries();
    let kind = info.map_type().ok();
    if matches!(kind, Some(MapType::Array | MapType::PerCpuArray)) {
        return Ok(MapFill::array(name, &type_name(kind), max));
    }
    let entries = count_keys(data, info.key_size() as usize, max as usize)
        .with_context(|| format!("counting the entries of {name}"))?;
    Ok(MapFill::new(name, &type_name(kind), entries, max))
}

/// One Maglev table reader; keeps the arena open across lookups.
pub struct Maglev {
    map: Array<MapData, TableChunk>,
}

impl Maglev {
    /// The `size` slots (backend ids) of the table starting at chunk `base`.
    pub fn table(&self, base: u32, size: u32) -> anyhow::Result<Vec<u32>> {
        let mut slots = Vec::with_capacity(size as usize);
        let mut chunk = base;
        while slots.len() < size as usize {
            let c = self
                .map
                .get(&chunk, 0)
                .with_context(|| format!("chunk {chunk} of the table at {base} in {MAP_MAGLEV}"))?;
            let take = (size as usize - slots.len()).min(TABLE_CHUNK_SLOTS as usize);
            slots.extend_from_slice(&c.slots[..take]);
            chunk = chunk.checked_add(1).context("table runs past the arena")?;
        }
        Ok(slots)
    }
}

fn collect_entries<K: aya::Pod + Eq + Hash, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
) -> anyhow::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) => {
                if seen.insert(k) {
                    out.push((k, v));
                }
            }
            // The agent deleted the entry between our key walk and the lookup.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(e).context(format!("reading {name}")),
        }
    }
    Ok(out)
}

/// Counts the distinct keys of a hash-type map with raw `BPF_MAP_GET_NEXT_KEY`: aya's key walk needs the
/// key type at compile time, and `weir stats` covers every pinned map, newer ones included. A key deleted
/// under the walk restarts it from the first key (the kernel's rule for a missing key), so the walk is
/// bounded by the capacity and keys are deduplicated.
fn count_keys(map: &MapData, key_size: usize, max: usize) -> io::Result<u64> {
    /// The `bpf_attr` layout of the `BPF_MAP_*_ELEM` commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    if key_size == 0 {
        return Ok(0);
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    for step in 0..max {
        let attr = ElemAttr {
            map_fd: fd as u32,
            pad: 0,
            // No key: the first one.
            key: if step == 0 { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` is a valid prefix of `bpf_attr` for this command (the kernel zero-fills the
        // rest); `key` and `next` are live buffers of the map's own key size, which is all the kernel
        // reads from the one and writes to the other.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                std::ptr::from_ref(&attr),
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: past the last key. Any other failure after a start keeps what was counted.
            if e.raw_os_error() == Some(libc::ENOENT) || !seen.is_empty() {
                break;
            }
            return Err(e);
        }
        seen.insert(next.clone());
        std::mem::swap(&mut key, &mut next);
    }
    Ok(seen.len() as u64)
}

fn type_name(kind: Option<MapType>) -> String {
    match kind {
        Some(MapType::Hash) => "hash".to_owned(),
        Some(MapType::LruHash) => "lru_hash".to_owned(),
        Some(MapType::HashOfMaps) => "hash_of_maps".to_owned(),
        Some(MapType::PerCpuArray) => "percpu_array".to_owned(),
        Some(MapType::PerCpuHash) => "percpu_hash".to_owned(),
        Some(MapType::Array) => "array".to_owned(),
        Some(MapType::LpmTrie) => "lpm_trie".to_owned(),
        Some(other) => format!("{other:?}").to_lowercase(),
        None => "unknown".to_owned(),
    }
}

fn is_permission_error(e: &MapError) -> bool {
    match e {
        MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::PermissionDenied,
        _ => false,
    }
}

/// An IPv4 entry in the IPv6 form (addresses IPv4-mapped; a peer of 0 stays all-zero).
fn widen((k, v): (CtKey, CtValue)) -> (CtKey6, CtValue6) {
    let mapped = |a: u32| {
        if a == 0 {
            [0; 4]
        } else {
            weir_common::v4_mapped(a)
        }
    };
    (
        CtKey6 {
            saddr_be: mapped(k.saddr_be),
            daddr_be: mapped(k.daddr_be),
            sport_be: k.sport_be,
            dport_be: k.dport_be,
            proto: k.proto,
            pad: [0; 3],
        },
        CtValue6 {
            nat_addr_be: mapped(v.nat_addr_be),
            nat_port_be: v.nat_port_be,
            kind: v.kind,
            flags: v.flags,
            backend_id: v.backend_id,
            peer_addr_be: mapped(v.peer_addr_be),
            peer_port_be: v.peer_port_be,
            pad2: [0; 2],
            seen_s: v.seen_s,
        },
    )
}

/// Up to `limit` entries (0: all) of a conntrack map, and how many keys it has. The datapath inserts
/// and the LRU evicts while we walk; a key deleted under the walk restarts it from the first key, so
/// the walk is bounded by the map's capacity and keys are deduplicated.
fn walk<K, V>(
    map: &HashMap<MapData, K, V>,
    name: &str,
    max: usize,
    limit: usize,
) -> anyhow::Result<(Vec<(K, V)>, u64)>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for key in map.keys().take(max) {
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                if seen.is_empty() {
                    return Err(e).context(format!("reading {name}"));
                }
                break;
            }
        };
        if !seen.insert(key) {
            continue;
        }
        if limit != 0 && entries.len() >= limit {
            continue;
        }
        // Evicted between the key walk and the lookup: simply gone.
        if let Ok(value) = map.get(&key, 0) {
            entries.push((key, value));
        }
    }
    Ok((entries, seen.len() as u64))
}
