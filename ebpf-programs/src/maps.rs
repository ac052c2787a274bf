//! Every map of the datapath, pinned by name under the agent's `--bpffs-dir` so its state survives the agent.
//! Sizes here are defaults; the agent overrides them at load time.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use weir_common::{
    Backend, CtKey, CtValue, DEFAULT_BACKENDS_MAX, DEFAULT_CONNTRACK_MAX, DEFAULT_MAGLEV_MAX,
    DEFAULT_SERVICES_MAX, MaglevKey, STAT_COUNT, ServiceKey, ServiceValue,
};

#[map(name = "WEIR_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_SERVICES_MAX, 0);

/// Not preallocated: tables are sized per service (≥ 100 slots per backend), so the worst case is far
/// above the usual fill.
#[map(name = "WEIR_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, u32> =
    HashMap::pinned(DEFAULT_MAGLEV_MAX, BPF_F_NO_PREALLOC);

#[map(name = "WEIR_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);

#[map(name = "WEIR_CT")]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_MAX, 0);

#[map(name = "WEIR_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);
