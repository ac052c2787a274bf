//! Every map of the datapath, pinned by name under the agent's `--bpffs-dir` so its state survives the agent.
//! Sizes here are defaults; the agent overrides them at load time.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use weir_common::{
    AffinityKey, AffinityValue, Backend, CONFIG_SLOTS, CtKey, CtKey6, CtValue, CtValue6,
    DEFAULT_AFFINITY_MAX, DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_MAGLEV_CHUNKS,
    DEFAULT_SERVICES_MAX, DEFAULT_SOCK_REVNAT_MAX, DEFAULT_SOURCE_RANGES_MAX, ExtIface,
    MAGLEV_ARENA_FLAGS, MemberKey, NEXT_HOPS_MAX, NextHop, NextHopKey, STAT_SLOTS, ServiceCounters,
    ServiceKey, ServiceValue, SockRevKey, SockRevValue, SourceRangeKey, TABLE_CHUNK_SLOTS,
    TableChunk,
};

#[map(name = "WEIR_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_SERVICES_MAX, 0);

/// Every frontend's Maglev table, in runs of chunks the agent allocates (see `weir_common::MAP_MAGLEV`).
#[map(name = "WEIR_MAGLEV")]
pub static MAGLEV: Array<TableChunk> = Array::pinned(DEFAULT_MAGLEV_CHUNKS, MAGLEV_ARENA_FLAGS);

/// The backend id in slot `hash % table_size` of a frontend's table; `None` when the frontend has no
/// table or its chunks lie outside the arena (a corrupt entry: the caller drops, counted).
#[inline(always)]
pub fn maglev_slot(svc: &ServiceValue, hash: u32) -> Option<u32> {
    if svc.table_size == 0 {
        return None;
    }
    let slot = hash % svc.table_size;
    let chunk = MAGLEV.get(svc.table_base.wrapping_add(slot / TABLE_CHUNK_SLOTS))?;
    // `% TABLE_CHUNK_SLOTS` keeps the index inside the chunk's array, so no bounds failure is possible.
    Some(chunk.slots[(slot % TABLE_CHUNK_SLOTS) as usize])
}

#[map(name = "WEIR_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);

#[map(name = "WEIR_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CONNTRACK_MAX, 0);

#[map(name = "WEIR_CT6")]
pub static CONNTRACK6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(DEFAULT_CONNTRACK_MAX, 0);

#[map(name = "WEIR_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_SLOTS, 0);

/// Sized like `WEIR_SERVICES`: one entry per frontend that saw traffic; the agent deletes it with the
/// frontend.
#[map(name = "WEIR_SVC_STATS")]
pub static SERVICE_STATS: PerCpuHashMap<ServiceKey, ServiceCounters> =
    PerCpuHashMap::pinned(DEFAULT_SERVICES_MAX, 0);

#[map(name = "WEIR_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_AFFINITY_MAX, 0);

/// Sized like the backends a table can hold in total; the agent writes a table's members before the
/// table becomes reachable and deletes them after.
#[map(name = "WEIR_MEMBERS")]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(DEFAULT_BACKENDS_MAX * 4, 0);

pub const SCRATCH_LEN: usize = 256;

/// Per-CPU working memory for building reply packets (not pinned: it holds nothing between packets).
#[map(name = "WEIR_SCRATCH")]
pub static SCRATCH: PerCpuArray<[u8; SCRATCH_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Allowed client prefixes of LoadBalancer frontends with `loadBalancerSourceRanges` (no-prealloc, as
/// LPM tries must be).
#[map(name = "WEIR_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::pinned(DEFAULT_SOURCE_RANGES_MAX, 0);

/// Written by the agent when it attaches to an external interface; a handful of entries.
#[map(name = "WEIR_EXT_IFACES")]
pub static EXT_IFACES: HashMap<u32, ExtIface> = HashMap::pinned(64, 0);

#[map(name = "WEIR_SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(DEFAULT_SOCK_REVNAT_MAX, 0);

/// Written by the agent at start (not pinned: a new agent writes it again before attaching).
#[map(name = "WEIR_CONFIG")]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// The XDP fast path's next-hop cache (see `weir_common::MAP_NEXT_HOPS`; not pinned: a cache).
#[map(name = "WEIR_NEXT_HOPS")]
pub static NEXT_HOPS: LruHashMap<NextHopKey, NextHop> =
    LruHashMap::with_max_entries(NEXT_HOPS_MAX, 0);
