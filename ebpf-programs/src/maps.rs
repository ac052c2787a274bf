//! Every map of the datapath, pinned by name under the agent's `--bpffs-dir` so its state survives the agent.
//! Sizes here are defaults; the agent overrides them at load time.
use aya_ebpf::{
    btf_maps::{Array as BtfArray, HashOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use weir_common::{
    AffinityKey, AffinityValue, Backend, CONFIG_SLOTS, CtKey, CtValue, DEFAULT_AFFINITY_MAX,
    DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_MAGLEV_TABLES_MAX, DEFAULT_SERVICES_MAX,
    DEFAULT_SOCK_REVNAT_MAX, DEFAULT_SOURCE_RANGES_MAX, MAGLEV_TABLE_FLAGS, MemberKey, STAT_SLOTS,
    ServiceCounters, ServiceKey, ServiceValue, SockRevKey, SockRevValue, SourceRangeKey,
};

#[map(name = "WEIR_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_SERVICES_MAX, 0);

/// Inner-map template: `BPF_F_INNER_MAP` lets every table have its own prime size (4 bytes a slot); the
/// agent creates the tables. BTF map definitions carry no pinning, so the agent pins this one by path.
type MaglevTable = BtfArray<u32, 1, { MAGLEV_TABLE_FLAGS as usize }>;

#[btf_map(name = "WEIR_MAGLEV")]
pub static MAGLEV: HashOfMaps<u32, MaglevTable, { DEFAULT_MAGLEV_TABLES_MAX as usize }> =
    HashOfMaps::new();

#[map(name = "WEIR_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);

#[map(name = "WEIR_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CONNTRACK_MAX, 0);

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

pub const SCRATCH_LEN: usize = 160;

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
pub static EXT_IFACES: HashMap<u32, u32> = HashMap::pinned(64, 0);

#[map(name = "WEIR_SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(DEFAULT_SOCK_REVNAT_MAX, 0);

/// Written by the agent at start (not pinned: a new agent writes it again before attaching).
#[map(name = "WEIR_CONFIG")]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);
