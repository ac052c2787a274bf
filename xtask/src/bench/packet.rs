//! Per-packet cost of `weir_pod_ingress` with BPF_PROG_TEST_RUN, against a two-instruction empty
//! classifier run the same way in the same repetition.
//!
//! The object is the agent's own (`Datapath::load` with a private bpffs) and the services are programmed
//! by the agent's own `DesiredCache` + `Reconciler`, so the program runs against the real maps.
//!
//! Two methods, both checked against the per-path counters in `WEIR_STATS` (a measurement whose
//! counters do not add up to exactly the runs made is reported invalid):
//! - **repeat**: one syscall runs the program `repeat` times on one skb, and every run after the first
//!   sees the buffer the previous one rewrote. The translating paths are therefore measured as a
//!   ping-pong: for the conntrack hit the bench adds a forward entry for the *translated* tuple that
//!   translates it back (and a backend entry naming the ClusterIP, so the hit is valid), so every run is a
//!   genuine conntrack hit followed by a DNAT; likewise for reverse NAT. The counter check proves it.
//! - **single**: `repeat = 1`, one syscall per packet, each with its own 5-tuple (the new-flow path
//!   cannot ping-pong: its first run inserts conntrack entries). The kernel's figure then includes one
//!   clock read, which the empty program's single-shot figure carries too and the difference removes.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::{Deserialize, Serialize};
use weir_agent::datapath::{Capacities, Datapath, Maps, StatsReader};
use weir_agent::model::{DesiredCache, NodeContext, Snapshot};
use weir_agent::reconcile::{Adopted, Reconciler};
use weir_agent::standalone::ConfigDir;
use weir_common::{
    Backend, CT_FORWARD, CT_REVERSE, CtKey, CtValue, DEFAULT_AFFINITY_MAX, DEFAULT_CONNTRACK_MAX,
    MAP_BACKENDS, MAP_CONNTRACK, MAP_MAGLEV, MAP_SERVICE_STATS, MAP_SERVICES, MAP_STATS,
    PROG_POD_INGRESS, PROTO_TCP, STAT_FWD_ESTABLISHED, STAT_FWD_NEW, STAT_NAMES,
    STAT_PASS_NOT_SERVICE, STAT_REVERSE_NAT, TABLE_CHUNK_SLOTS,
};

use super::scenario::{self, SERVICE_PORT, ServiceDef};
use super::stats::{Rng, Spread, median, percentile_sorted};
use super::sys;
use super::{Bpffs, Progress, TempDir};
use weir_tests::netns::{NetNs, ip};

/// `TC_ACT_OK`: what the forward paths return.
const TC_ACT_OK: u32 = 0;
/// `TC_ACT_REDIRECT`: what reverse NAT returns once the FIB has answered (it redirects the reply).
const TC_ACT_REDIRECT: u32 = 7;
/// Runs per syscall on the reverse path: each run decrements the TTL (a router's forward), so the
/// packet starts at 255 and a syscall stays below it.
const REVERSE_CHUNK: u32 = 250;
/// The client of the measured flows.
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
/// A destination that is no service.
const NOT_OURS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 200, 0, 1), 80);
/// Services added per sync while growing N.
const PROGRAM_CHUNK: usize = 10_000;
/// Backend ids the bench adds for its ping-pong entries (the reconciler allocates from 1 upwards).
const MIRROR_BACKEND_BASE: u32 = 0xffff_0000;

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    pub ns: Vec<usize>,
    /// Endpoints per service (fake addresses: the program never sends anything).
    pub endpoints: usize,
    pub reps: usize,
    pub repeat: u32,
    pub shots: usize,
    /// Run the in-process EndpointSlice-change experiment at this N (with `changes` changes).
    pub change_at: Option<usize>,
    pub changes: usize,
    /// Total time the experiment may spend programming services; past it, the last N is measured at
    /// whatever count was reached.
    pub program_cap: std::time::Duration,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PacketResults {
    pub endpoints_per_service: usize,
    pub repeat: u32,
    pub single_shots: usize,
    pub reps: usize,
    pub program: ProgramFacts,
    pub points: Vec<PacketPoint>,
    pub slice_change: Option<InProcessChange>,
    /// N that were not measured, and why.
    pub skipped: Vec<String>,
    /// A failure at some N (the smaller N stay measured).
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgramFacts {
    pub jited_bytes: u32,
    pub verified_insns: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PacketPoint {
    pub services: usize,
    /// Services added to reach this N (from the previous point) and how long the sync took.
    pub added: usize,
    pub sync_ms: f64,
    /// How much this process's RSS grew while reading and syncing those services (the agent's own code
    /// running here: its model, reconciler and map writer).
    pub rss_growth_mb: Option<f64>,
    pub map_memory: MapMemory,
    pub paths: Vec<PathMeasure>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PathMeasure {
    /// `conntrack_hit`, `new_flow_random_service`, `new_flow_one_service`, `reverse_nat`, `not_ours`,
    /// `new_flow_naive_repeat`.
    pub path: String,
    /// `repeat` or `single`.
    pub method: String,
    /// The `WEIR_STATS` counter this path must increment once per run.
    pub counter: String,
    /// Runs per repetition (the counter must move by exactly this much, and nothing else may move).
    pub runs_per_rep: u64,
    /// Counter deltas observed, per repetition.
    pub counted: Vec<u64>,
    pub valid: bool,
    /// Per-run nanoseconds of Weir's program, of the empty program, and their difference (per rep).
    pub weir_ns: Option<Spread>,
    pub empty_ns: Option<Spread>,
    pub net_ns: Option<Spread>,
    pub note: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MapMemory {
    /// memlock per pinned map (the preallocated hash maps cost their full capacity from the start).
    pub maps: BTreeMap<String, u64>,
    /// Maglev tables: how many and their memlock.
    pub tables: usize,
    pub tables_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InProcessChange {
    pub services: usize,
    pub endpoints_of_changed: usize,
    pub changes: usize,
    /// DesiredCache::update + Reconciler::sync, microseconds.
    pub sync_us: Option<Spread>,
    pub sync_p99_us: f64,
    /// From the start of the sync to a new flow (BPF_PROG_TEST_RUN) being translated to the new
    /// endpoint, microseconds: p50 and p99 over the changes.
    pub serve_p50_us: f64,
    pub serve_p99_us: f64,
    pub serve_max_us: f64,
    pub failures: usize,
    /// One Maglev table inserted into and deleted from a hash-of-maps, alone: milliseconds per syscall.
    /// Measured by runs before the slot arena; `None` since.
    pub table_insert_ms: Option<Spread>,
    pub table_delete_ms: Option<Spread>,
}

/// Endpoints of the service the in-process change experiment changes.
const CHANGED_ENDPOINTS: usize = 10;

/// The program under test and its maps.
struct Rig {
    _datapath: Datapath,
    reconciler: Reconciler<Maps>,
    cache: DesiredCache,
    stats: StatsReader,
    prog: aya::programs::ProgramFd,
    empty: OwnedFd,
    pin_dir: PathBuf,
    snapshot: Snapshot,
    config: ConfigDir,
    config_dir: TempDir,
    tuples: Tuples,
}

/// Unique client 5-tuples (10.1.0.0/16, ports 1024..61024).
struct Tuples(u64);

impl Tuples {
    fn next(&mut self) -> SocketAddrV4 {
        let g = self.0;
        self.0 += 1;
        let ip = u32::from(Ipv4Addr::new(10, 1, 0, 0)) + (g / 60_000) as u32;
        SocketAddrV4::new(Ipv4Addr::from(ip), 1024 + (g % 60_000) as u16)
    }
}

impl Rig {
    fn new(
        tag: &str,
        bpffs: &Bpffs,
        max_services: usize,
        max_backends: usize,
    ) -> anyhow::Result<Self> {
        // Every ClusterIP also gets "any other port" entries (one per protocol) that refuse undefined
        // ports: room for four entries a service.
        let services = capacity(4 * max_services);
        let caps = Capacities {
            services,
            backends: capacity(max_backends),
            // Tables of one endpoint, plus room for the change experiment's bigger tables.
            maglev_chunks: u32::try_from(
                super::e2e::maglev_slots(max_services, 1) / u64::from(TABLE_CHUNK_SLOTS)
                    + super::e2e::maglev_slots(64, CHANGED_ENDPOINTS)
                        / u64::from(TABLE_CHUNK_SLOTS),
            )?,
            affinity: DEFAULT_AFFINITY_MAX,
            conntrack: DEFAULT_CONNTRACK_MAX,
            source_ranges: weir_common::DEFAULT_SOURCE_RANGES_MAX,
            sock_revnat: weir_common::DEFAULT_SOCK_REVNAT_MAX,
        };
        let pin_dir = bpffs.dir().to_path_buf();
        let (datapath, maps, stats) =
            Datapath::load(&pin_dir, caps).context("loading the agent's eBPF object")?;
        let reconciler = Reconciler::adopt(maps, Adopted::default());
        let prog = find_program(&pin_dir)?.0;
        let config_dir = TempDir::new(&format!("config-{tag}"))?;
        Ok(Self {
            _datapath: datapath,
            reconciler,
            cache: DesiredCache::default(),
            stats,
            prog,
            empty: sys::load_empty_classifier().context("loading the empty classifier")?,
            pin_dir,
            snapshot: Snapshot::default(),
            config: ConfigDir::new(config_dir.path()),
            config_dir,
            tuples: Tuples(0),
        })
    }

    fn prog(&self) -> BorrowedFd<'_> {
        self.prog.as_fd()
    }

    /// Syncs the current snapshot exactly as the agent does; returns the time it took.
    fn sync(&mut self) -> anyhow::Result<f64> {
        let t = Instant::now();
        let (desired, _) = self.cache.update(&self.snapshot, &NodeContext::default());
        let report = self.reconciler.sync(&desired);
        let took = t.elapsed().as_secs_f64() * 1e3;
        ensure!(report.errors == 0, "sync had {} map errors", report.errors);
        Ok(took)
    }

    /// Adds services the way the agent gets them: YAML in a config dir, read by its `ConfigDir`.
    fn add(&mut self, defs: &[ServiceDef]) -> anyhow::Result<()> {
        scenario::write_config_dir(self.config_dir.path(), defs, &[])?;
        self.snapshot = scenario::load_snapshot(&mut self.config)?;
        Ok(())
    }

    fn counters(&self) -> Vec<u64> {
        self.stats.counters()
    }

    fn pinned(&self, name: &str) -> anyhow::Result<MapData> {
        MapData::from_pin(self.pin_dir.join(name)).with_context(|| format!("opening pinned {name}"))
    }

    /// One single-shot run of Weir's program; returns the translated frame's destination and source.
    fn run_once(&self, frame: &[u8]) -> anyhow::Result<(sys::TestRun, [u8; 64])> {
        let mut out = [0u8; 64];
        let r = sys::test_run(self.prog(), frame, Some(&mut out), 1)?;
        Ok((r, out))
    }

    fn memory(&self) -> anyhow::Result<MapMemory> {
        let mut mem = MapMemory::default();
        for name in [
            MAP_SERVICES,
            MAP_BACKENDS,
            MAP_MAGLEV,
            MAP_CONNTRACK,
            MAP_STATS,
            MAP_SERVICE_STATS,
        ] {
            let map = self.pinned(name)?;
            let m = sys::own_map_mem(map.fd().as_fd())?;
            mem.maps.insert(name.to_owned(), m.memlock);
        }
        let (bytes, count) = sys::arena_tables(&self.pin_dir)?;
        mem.tables = count;
        mem.tables_bytes = bytes;
        // The arena (`MAP_MAGLEV`) is preallocated: the tables are inside its memlock.
        mem.total_bytes = mem.maps.values().sum::<u64>();
        Ok(mem)
    }
}

fn own_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<f64>()
        .ok()?;
    Some(kb / 1024.0)
}

/// Map capacity for `n` entries: the agent's default, or the next power of two above `n`.
fn capacity(n: usize) -> u32 {
    (n + 1024)
        .next_power_of_two()
        .max(weir_common::DEFAULT_SERVICES_MAX as usize) as u32
}

/// The loaded `weir_pod_ingress` whose maps are pinned in `pin_dir`, and what the kernel says of it.
pub fn find_program(pin_dir: &Path) -> anyhow::Result<(aya::programs::ProgramFd, ProgramFacts)> {
    let info = weir_tests::packet::rig::loaded_program(pin_dir, PROG_POD_INGRESS)?;
    let facts = ProgramFacts {
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
    };
    Ok((info.fd().context("fd of the loaded program")?, facts))
}

/// An Ethernet + IPv4 + TCP frame (54 bytes) with valid checksums.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> [u8; 54] {
    tcp_frame_ttl(src, dst, flags, 64)
}

/// [`tcp_frame`] with a chosen TTL.
pub fn tcp_frame_ttl(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, ttl: u8) -> [u8; 54] {
    let mut f = [0u8; 54];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[8] = ttl;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.ip().octets());
    pseudo[4..8].copy_from_slice(&dst.ip().octets());
    pseudo[9] = PROTO_TCP;
    pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
    let c = checksum(&[&pseudo, &f[34..54]]);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

/// The Internet checksum over the concatenation of `parts` (each of even length).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Destination of a frame built by [`tcp_frame`] (possibly rewritten).
pub fn frame_dst(f: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        u16::from_be_bytes([f[36], f[37]]),
    )
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4) -> CtKey {
    CtKey {
        saddr_be: u32::from(*src.ip()).to_be(),
        daddr_be: u32::from(*dst.ip()).to_be(),
        sport_be: src.port().to_be(),
        dport_be: dst.port().to_be(),
        proto: PROTO_TCP,
        pad: [0; 3],
    }
}

/// Counter deltas between two reads.
fn delta(before: &[u64], after: &[u64]) -> Vec<u64> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect()
}

/// Whether exactly `runs` runs were counted, all on `stat`.
fn counted_exactly(d: &[u64], stat: u32, runs: u64) -> bool {
    d[stat as usize] == runs && d.iter().sum::<u64>() == runs
}

fn describe(d: &[u64]) -> String {
    d.iter()
        .enumerate()
        .filter(|(_, v)| **v > 0)
        .map(|(i, v)| format!("{}={v}", STAT_NAMES[i]))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One repetition's figures.
struct Sample {
    weir: f64,
    empty: f64,
    counted: u64,
    valid: bool,
    note: Option<String>,
}

/// Accumulates repetitions of one path into a [`PathMeasure`].
fn summarise(path: &str, method: &str, stat: u32, runs: u64, samples: &[Sample]) -> PathMeasure {
    let weir: Vec<f64> = samples.iter().map(|s| s.weir).collect();
    let empty: Vec<f64> = samples.iter().map(|s| s.empty).collect();
    let net: Vec<f64> = samples.iter().map(|s| s.weir - s.empty).collect();
    let valid = !samples.is_empty() && samples.iter().all(|s| s.valid);
    let note = samples
        .iter()
        .find_map(|s| s.note.clone())
        .unwrap_or_default();
    PathMeasure {
        path: path.to_owned(),
        method: method.to_owned(),
        counter: STAT_NAMES[stat as usize].to_owned(),
        runs_per_rep: runs,
        counted: samples.iter().map(|s| s.counted).collect(),
        valid,
        weir_ns: Spread::of(&weir),
        empty_ns: Spread::of(&empty),
        net_ns: if valid { Spread::of(&net) } else { None },
        note,
    }
}

impl Rig {
    /// Repeat method: empty, Weir, empty on the same frame, `repeat` runs each, in syscalls of at
    /// most `chunk` runs (the per-run means of the syscalls are averaged). Weir's counters must show
    /// every run on `stat`, and every syscall must end with `ret`.
    fn repeat_sample(
        &self,
        frame: &[u8],
        repeat: u32,
        chunk: u32,
        stat: u32,
        ret: u32,
    ) -> anyhow::Result<Sample> {
        let calls = repeat.div_ceil(chunk);
        let per_call = repeat.min(chunk);
        let runs = u64::from(calls) * u64::from(per_call);
        let mean = |fd: BorrowedFd<'_>| -> anyhow::Result<(f64, u32, u32)> {
            let mut sum = 0.0;
            let mut bad = 0;
            let mut last = ret;
            for _ in 0..calls {
                let r = sys::test_run(fd, frame, None, per_call)?;
                sum += f64::from(r.duration_ns);
                if r.retval != ret {
                    bad += 1;
                    last = r.retval;
                }
            }
            Ok((sum / f64::from(calls), bad, last))
        };
        let (e1, _, _) = mean(self.empty.as_fd())?;
        let before = self.counters();
        let (w, bad, got) = mean(self.prog())?;
        let after = self.counters();
        let (e2, _, _) = mean(self.empty.as_fd())?;
        let d = delta(&before, &after);
        let valid = counted_exactly(&d, stat, runs) && bad == 0;
        Ok(Sample {
            weir: w,
            empty: (e1 + e2) / 2.0,
            counted: d[stat as usize],
            valid,
            note: (!valid).then(|| {
                let mut note = format!("counters after {runs} runs: {}", describe(&d));
                if bad > 0 {
                    note += &format!("; {bad} of {calls} syscalls returned {got}, not {ret}");
                }
                note
            }),
        })
    }

    /// Single method: `shots` pairs of (empty, Weir) runs with `repeat = 1`, each on `frame(k)`; medians.
    fn single_sample(
        &mut self,
        shots: usize,
        stat: u32,
        ret: u32,
        mut frame: impl FnMut(&mut Self, usize) -> [u8; 54],
    ) -> anyhow::Result<Sample> {
        let frames: Vec<[u8; 54]> = (0..shots).map(|k| frame(self, k)).collect();
        let mut weir = Vec::with_capacity(shots);
        let mut empty = Vec::with_capacity(shots);
        let mut bad_ret = 0;
        let mut got = ret;
        let before = self.counters();
        for f in &frames {
            empty.push(f64::from(
                sys::test_run(self.empty.as_fd(), f, None, 1)?.duration_ns,
            ));
            let w = sys::test_run(self.prog(), f, None, 1)?;
            if w.retval != ret {
                bad_ret += 1;
                got = w.retval;
            }
            weir.push(f64::from(w.duration_ns));
        }
        let d = delta(&before, &self.counters());
        let valid = counted_exactly(&d, stat, shots as u64) && bad_ret == 0;
        Ok(Sample {
            weir: median(&weir),
            empty: median(&empty),
            counted: d[stat as usize],
            valid,
            note: (!valid).then(|| {
                let mut note = format!("counters after {shots} runs: {}", describe(&d));
                if bad_ret > 0 {
                    note += &format!("; {bad_ret} runs returned {got}, not {ret}");
                }
                note
            }),
        })
    }

    /// A new flow from a fresh tuple to `vip:80`, run once; returns the backend it was sent to.
    fn open_flow(&mut self, client: SocketAddrV4, vip: Ipv4Addr) -> anyhow::Result<SocketAddrV4> {
        let frame = tcp_frame(client, SocketAddrV4::new(vip, SERVICE_PORT), 0x02);
        let before = self.counters();
        let (r, out) = self.run_once(&frame)?;
        let d = delta(&before, &self.counters());
        ensure!(
            r.retval == TC_ACT_OK && counted_exactly(&d, STAT_FWD_NEW, 1),
            "new flow to {vip}: return code {}, counters {}",
            r.retval,
            describe(&d)
        );
        Ok(frame_dst(&out))
    }

    /// Conntrack entries that make the translated packets translate back (see the module docs), for a
    /// flow `client → vip:80` already balanced to `backend`.
    fn ping_pong_entries(
        &self,
        client: SocketAddrV4,
        vip: Ipv4Addr,
        backend: SocketAddrV4,
        mirror_id: u32,
    ) -> anyhow::Result<()> {
        let front = SocketAddrV4::new(vip, SERVICE_PORT);
        let mut ct: BpfHashMap<MapData, CtKey, CtValue> =
            BpfHashMap::try_from(Map::from_map_data(self.pinned(MAP_CONNTRACK)?)?)?;
        let forward = ct
            .get(&ct_key(client, front), 0)
            .context("the new flow left no forward conntrack entry")?;
        let mut backends: BpfHashMap<MapData, u32, Backend> =
            BpfHashMap::try_from(Map::from_map_data(self.pinned(MAP_BACKENDS)?)?)?;
        let real = backends
            .get(&forward.backend_id, 0)
            .context("the flow's backend is not in the backend map")?;
        // Copies of the program's own entries with the addresses changed: whatever else the entries
        // carry stays as the program wrote it.
        backends.insert(
            mirror_id,
            Backend {
                addr_be: weir_common::addr_of(vip.into()),
                port_be: SERVICE_PORT.to_be(),
                ..real
            },
            0,
        )?;
        // client → backend (what the forward hit produces) translates back to client → vip.
        ct.insert(
            ct_key(client, backend),
            CtValue {
                nat_addr_be: u32::from(vip).to_be(),
                nat_port_be: SERVICE_PORT.to_be(),
                kind: CT_FORWARD,
                backend_id: mirror_id,
                ..forward
            },
            0,
        )?;
        // vip → client (what the reverse hit produces) translates back to backend → client.
        let reverse = ct
            .get(&ct_key(backend, client), 0)
            .context("the new flow left no reverse conntrack entry")?;
        ct.insert(
            ct_key(front, client),
            CtValue {
                nat_addr_be: u32::from(*backend.ip()).to_be(),
                nat_port_be: backend.port().to_be(),
                kind: CT_REVERSE,
                ..reverse
            },
            0,
        )?;
        Ok(())
    }

    fn clear_conntrack(&self) -> anyhow::Result<usize> {
        let ct = self.pinned(MAP_CONNTRACK)?;
        Ok(sys::clear_map(
            ct.fd().as_fd(),
            std::mem::size_of::<CtKey>(),
        )?)
    }
}

/// A network namespace for the test runs: the reverse path ends with a FIB lookup and a redirect
/// towards the client, which this namespace routes (through a veth with a permanent neighbour entry),
/// as the node would route a reply to a pod.
fn fib_namespace() -> anyhow::Result<NetNs> {
    let ns = NetNs::create(&format!("weir-bench-{}-pkt", std::process::id()))?;
    let n = ns.name().to_owned();
    let client = CLIENT.to_string();
    ip(&["-n", &n, "link", "set", "lo", "up"])?;
    // bpf_fib_lookup only answers for interfaces that forward, as a router's would.
    weir_tests::netns::sysctl(&n, "net.ipv4.ip_forward", "1")?;
    ip(&[
        "-n", &n, "link", "add", "bfib0", "type", "veth", "peer", "name", "bfib1",
    ])?;
    ip(&["-n", &n, "link", "set", "bfib0", "up"])?;
    ip(&["-n", &n, "link", "set", "bfib1", "up"])?;
    ip(&["-n", &n, "addr", "add", "169.254.1.1/32", "dev", "bfib0"])?;
    ip(&[
        "-n",
        &n,
        "route",
        "add",
        &format!("{client}/32"),
        "dev",
        "bfib0",
    ])?;
    ip(&[
        "-n",
        &n,
        "neigh",
        "add",
        &client,
        "lladdr",
        "02:00:00:00:00:20",
        "dev",
        "bfib0",
        "nud",
        "permanent",
    ])?;
    Ok(ns)
}

/// Runs the per-packet experiment (and the in-process EndpointSlice change when asked).
pub fn run(plan: &Plan, progress: &Progress) -> anyhow::Result<PacketResults> {
    let ns = fib_namespace()?;
    weir_tests::in_netns(ns.name(), || run_in_namespace(plan, progress))?
}

fn run_in_namespace(plan: &Plan, progress: &Progress) -> anyhow::Result<PacketResults> {
    let max_n = plan.ns.iter().copied().max().unwrap_or(1);
    let bpffs = Bpffs::mount("packet")?;
    let mut rig = Rig::new("packet", &bpffs, max_n + 1, max_n * plan.endpoints + 64)?;
    let mut results = PacketResults {
        endpoints_per_service: plan.endpoints,
        repeat: plan.repeat,
        single_shots: plan.shots,
        reps: plan.reps,
        program: find_program(&rig.pin_dir)?.1,
        ..PacketResults::default()
    };
    let mut rng = Rng::new(0x5745_4952);
    let mut programmed = 0usize;
    let started = Instant::now();
    for (nidx, &target) in plan.ns.iter().enumerate() {
        let mut state = Growth {
            rig: &mut rig,
            rng: &mut rng,
            programmed: &mut programmed,
            started,
        };
        match measure_point(&mut state, &mut results, plan, nidx, target, progress) {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                // What was measured at smaller N stays in the results.
                let why = format!("N = {target}: {err:#}");
                progress.note(&format!("per-packet failed at {why}"));
                results.errors.push(why);
                break;
            }
        }
    }
    Ok(results)
}

/// What grows from one N to the next.
struct Growth<'a> {
    rig: &'a mut Rig,
    rng: &'a mut Rng,
    programmed: &'a mut usize,
    started: Instant,
}

/// Grows the programmed services to `target` and measures every path there; `false` when nothing more
/// could be programmed (the cap).
fn measure_point(
    g: &mut Growth<'_>,
    results: &mut PacketResults,
    plan: &Plan,
    nidx: usize,
    target: usize,
    progress: &Progress,
) -> anyhow::Result<bool> {
    let rig = &mut *g.rig;
    let rng = &mut *g.rng;
    let programmed = &mut *g.programmed;
    let started = g.started;
    // Programmed in syncs of at most PROGRAM_CHUNK services, so that a cap on the time spent
    // programming can stop at whatever N was reached (and measure there).
    let defs = scenario::catalog(target, plan.endpoints, &BTreeMap::new());
    let (mut parse_ms, mut sync_ms) = (0.0, 0.0);
    let mut n = *programmed;
    let rss_before = own_rss_mb();
    while n < target {
        if started.elapsed() > plan.program_cap {
            let why = format!(
                "N = {target}: programming stopped at {n} services, the {} s cap on programming \
                 time being reached",
                plan.program_cap.as_secs()
            );
            progress.note(&why);
            results.skipped.push(why);
            break;
        }
        let end = (n + PROGRAM_CHUNK).min(target);
        let t = Instant::now();
        rig.add(&defs[n..end])?;
        parse_ms += t.elapsed().as_secs_f64() * 1e3;
        match rig.sync() {
            Ok(ms) => sync_ms += ms,
            Err(err) => {
                // Measured at the N that was programmed completely.
                let why = format!("N = {target}: programming services {n}..{end} failed: {err:#}");
                progress.note(&why);
                results.errors.push(why);
                break;
            }
        }
        n = end;
        if target > PROGRAM_CHUNK {
            progress.note(&format!(
                "{n} of {target} services programmed ({:.0} s so far)",
                started.elapsed().as_secs_f64()
            ));
        }
    }
    if n == *programmed {
        return Ok(false);
    }
    let added = n - *programmed;
    let rss_growth_mb = own_rss_mb().zip(rss_before).map(|(a, b)| a - b);
    progress.note(&format!(
        "{n} services programmed in-process ({added} added: YAML read {parse_ms:.0} ms, sync {sync_ms:.1} ms)"
    ));
    let defs = &defs[..n];

    // Every new service sees one flow first (its per-CPU counters entry is created once, as on a
    // live node); then conntrack is emptied so every N starts from the same conntrack state.
    for d in &defs[*programmed..] {
        let client = rig.tuples.next();
        rig.open_flow(client, d.vip)?;
    }
    *programmed = n;
    rig.clear_conntrack()?;

    let probe = &defs[n / 2];
    let client = SocketAddrV4::new(CLIENT, 40_000 + nidx as u16);
    let backend = rig.open_flow(client, probe.vip)?;
    rig.ping_pong_entries(
        client,
        probe.vip,
        backend,
        MIRROR_BACKEND_BASE + nidx as u32,
    )?;
    let fwd = tcp_frame(client, SocketAddrV4::new(probe.vip, SERVICE_PORT), 0x10);
    let rev = tcp_frame_ttl(backend, client, 0x10, 255);
    let other = tcp_frame(client, NOT_OURS, 0x10);

    let mut samples: BTreeMap<(&str, &str), Vec<Sample>> = BTreeMap::new();
    let (r, all) = (plan.repeat, plan.repeat);
    for rep in 0..plan.reps {
        let s = rig.repeat_sample(&fwd, r, all, STAT_FWD_ESTABLISHED, TC_ACT_OK)?;
        samples
            .entry(("conntrack_hit", "repeat"))
            .or_default()
            .push(s);
        let s = rig.repeat_sample(&rev, r, REVERSE_CHUNK, STAT_REVERSE_NAT, TC_ACT_REDIRECT)?;
        samples
            .entry(("reverse_nat", "repeat"))
            .or_default()
            .push(s);
        let s = rig.repeat_sample(&other, r, all, STAT_PASS_NOT_SERVICE, TC_ACT_OK)?;
        samples.entry(("not_ours", "repeat")).or_default().push(s);

        let vips: Vec<Ipv4Addr> = (0..plan.shots).map(|_| defs[rng.below(n)].vip).collect();
        let s = rig.single_sample(plan.shots, STAT_FWD_NEW, TC_ACT_OK, |r, k| {
            tcp_frame(
                r.tuples.next(),
                SocketAddrV4::new(vips[k], SERVICE_PORT),
                0x02,
            )
        })?;
        samples
            .entry(("new_flow_random_service", "single"))
            .or_default()
            .push(s);
        let s = rig.single_sample(plan.shots, STAT_FWD_NEW, TC_ACT_OK, |r, _| {
            tcp_frame(
                r.tuples.next(),
                SocketAddrV4::new(probe.vip, SERVICE_PORT),
                0x02,
            )
        })?;
        samples
            .entry(("new_flow_one_service", "single"))
            .or_default()
            .push(s);
        let s = rig.single_sample(plan.shots, STAT_FWD_ESTABLISHED, TC_ACT_OK, |_, _| fwd)?;
        samples
            .entry(("conntrack_hit", "single"))
            .or_default()
            .push(s);
        let s = rig.single_sample(plan.shots, STAT_REVERSE_NAT, TC_ACT_REDIRECT, |_, _| rev)?;
        samples
            .entry(("reverse_nat", "single"))
            .or_default()
            .push(s);
        let s = rig.single_sample(plan.shots, STAT_PASS_NOT_SERVICE, TC_ACT_OK, |_, _| other)?;
        samples.entry(("not_ours", "single")).or_default().push(s);
        if rep == 0 {
            // What the counter check is for: `repeat` on the new-flow path measures mostly the
            // packet the first run rewrote (not a service any more), and must be reported invalid.
            let naive = tcp_frame(
                rig.tuples.next(),
                SocketAddrV4::new(probe.vip, SERVICE_PORT),
                0x02,
            );
            let s = rig.repeat_sample(&naive, r, all, STAT_FWD_NEW, TC_ACT_OK)?;
            samples
                .entry(("new_flow_naive_repeat", "repeat"))
                .or_default()
                .push(s);
        }
    }
    let stat_of = |path: &str| match path {
        "conntrack_hit" => STAT_FWD_ESTABLISHED,
        "reverse_nat" => STAT_REVERSE_NAT,
        "not_ours" => STAT_PASS_NOT_SERVICE,
        _ => STAT_FWD_NEW,
    };
    let paths: Vec<PathMeasure> = samples
        .iter()
        .map(|((path, method), s)| {
            let runs = match (*method, *path) {
                ("repeat", "reverse_nat") => {
                    u64::from(plan.repeat.div_ceil(REVERSE_CHUNK) * REVERSE_CHUNK)
                }
                ("repeat", _) => u64::from(plan.repeat),
                _ => plan.shots as u64,
            };
            summarise(path, method, stat_of(path), runs, s)
        })
        .collect();
    for p in &paths {
        progress.note(&format!(
            "N={n} {:<24} {:<6} net {} ns{}",
            p.path,
            p.method,
            p.net_ns.map_or("-".to_owned(), |s| s.fmt(1)),
            if p.valid { "" } else { "  INVALID" }
        ));
    }
    let point = PacketPoint {
        services: n,
        added,
        sync_ms,
        rss_growth_mb,
        map_memory: rig.memory()?,
        paths,
    };
    results.points.push(point);

    if plan.change_at == Some(target) {
        results.slice_change = Some(slice_change(rig, probe, plan.changes, progress)?);
    }
    Ok(true)
}

/// EndpointSlice changes on one service among N, programmed through the agent's own path
/// (DesiredCache::update + Reconciler::sync), each followed by new flows until one is translated to the
/// new endpoint.
fn slice_change(
    rig: &mut Rig,
    probe: &ServiceDef,
    changes: usize,
    progress: &Progress,
) -> anyhow::Result<InProcessChange> {
    let slice_id = probe.slice_id();
    let original = rig
        .snapshot
        .slices
        .get(&slice_id)
        .cloned()
        .context("the probe service has no slice")?;
    let template = original
        .endpoints
        .first()
        .cloned()
        .context("the probe service has no endpoint")?;
    let mut endpoints: Vec<_> = (0..CHANGED_ENDPOINTS)
        .map(|j| {
            let mut ep = template.clone();
            ep.ip = Ipv4Addr::new(10, 250, 0, 1 + j as u8).into();
            ep
        })
        .collect();
    let set = |rig: &mut Rig, eps: &[weir_agent::model::Endpoint]| {
        if let Some(slice) = rig.snapshot.slices.get_mut(&slice_id) {
            std::sync::Arc::make_mut(slice).endpoints = eps.to_vec();
        }
    };
    set(rig, &endpoints);
    rig.sync()?;
    let mut sync_us = Vec::new();
    let mut serve_us = Vec::new();
    let mut failures = 0;
    let front = SocketAddrV4::new(probe.vip, SERVICE_PORT);
    for c in 0..changes {
        let fresh = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 251, 0, 1)) + c as u32);
        endpoints[c % CHANGED_ENDPOINTS].ip = fresh.into();
        set(rig, &endpoints);
        let t = Instant::now();
        let (desired, _) = rig.cache.update(&rig.snapshot, &NodeContext::default());
        let report = rig.reconciler.sync(&desired);
        sync_us.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(report.errors == 0, "sync had {} map errors", report.errors);
        let mut served = false;
        for _ in 0..100_000 {
            let frame = tcp_frame(rig.tuples.next(), front, 0x02);
            let (r, out) = rig.run_once(&frame)?;
            if r.retval == TC_ACT_OK && *frame_dst(&out).ip() == fresh {
                served = true;
                break;
            }
        }
        if served {
            serve_us.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            failures += 1;
        }
    }
    // Back to the catalog's endpoints for the next N.
    set(rig, &original.endpoints);
    rig.sync()?;
    serve_us.sort_by(f64::total_cmp);
    let mut sorted_sync = sync_us.clone();
    sorted_sync.sort_by(f64::total_cmp);
    let result = InProcessChange {
        services: rig.snapshot.services.len(),
        endpoints_of_changed: CHANGED_ENDPOINTS,
        changes,
        sync_us: Spread::of(&sync_us),
        sync_p99_us: percentile_sorted(&sorted_sync, 0.99),
        serve_p50_us: percentile_sorted(&serve_us, 0.50),
        serve_p99_us: percentile_sorted(&serve_us, 0.99),
        serve_max_us: serve_us.last().copied().unwrap_or(f64::NAN),
        failures,
        table_insert_ms: None,
        table_delete_ms: None,
    };
    progress.note(&format!(
        "in-process EndpointSlice change at N={}: serving p50 {:.0} µs, p99 {:.0} µs ({changes} changes)",
        result.services, result.serve_p50_us, result.serve_p99_us
    ));
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums() {
        let f = tcp_frame(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80),
            0x02,
        );
        // A header that includes its checksum sums to zero.
        assert_eq!(checksum(&[&f[14..34]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&f[26..30]);
        pseudo[4..8].copy_from_slice(&f[30..34]);
        pseudo[9] = PROTO_TCP;
        pseudo[11] = 20;
        assert_eq!(checksum(&[&pseudo, &f[34..54]]), 0);
        assert_eq!(
            frame_dst(&f),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80)
        );
    }

    #[test]
    fn counter_check_needs_every_run_on_the_path() {
        let mut d = vec![0u64; weir_common::STAT_COUNT as usize];
        d[STAT_FWD_NEW as usize] = 1;
        d[STAT_PASS_NOT_SERVICE as usize] = 9;
        assert!(!counted_exactly(&d, STAT_FWD_NEW, 10));
        d[STAT_FWD_NEW as usize] = 10;
        d[STAT_PASS_NOT_SERVICE as usize] = 0;
        assert!(counted_exactly(&d, STAT_FWD_NEW, 10));
        assert_eq!(describe(&d), "forward_new=10");
    }

    #[test]
    fn tuples_are_unique() {
        let mut t = Tuples(59_999);
        let a = t.next();
        let b = t.next();
        assert_ne!(a, b);
        assert_eq!(b, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 1024));
    }
}
