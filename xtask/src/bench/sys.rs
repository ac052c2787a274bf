//! The few bpf(2) calls the bench makes itself: loading a two-instruction empty classifier (the baseline
//! every per-packet figure is measured against), `BPF_PROG_TEST_RUN` on any program fd (the same code
//! path for Weir's program and the empty one), clearing maps, and the kernel's memory accounting (`memlock` in fdinfo).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use weir_tests::raw_bpf;

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `bpf(cmd, attr, sizeof(attr))`; the kernel zero-extends an attr shorter than its own.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed repr(C) struct laid out as the kernel's union member
    // for `cmd`; the kernel reads and writes at most `size_of::<T>()` bytes of it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `r0 = 0; exit` as a TC classifier (`TC_ACT_OK` for every packet): the cost of running *a*
/// program through BPF_PROG_TEST_RUN, which every Weir figure is reported above. No compiler involved.
pub fn load_empty_classifier() -> io::Result<OwnedFd> {
    raw_bpf::load(
        raw_bpf::BPF_PROG_TYPE_SCHED_CLS,
        0,
        &raw_bpf::return_const(0),
        "bench_empty",
    )
}

pub use weir_tests::packet::rig::TestRun;

/// Runs the program `repeat` times over one skb built from `data` (Ethernet frame). With `repeat` > 1
/// every run after the first sees what the previous one left in the buffer.
pub fn test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    out: Option<&mut [u8]>,
    repeat: u32,
) -> io::Result<TestRun> {
    weir_tests::packet::rig::test_run_raw(prog, data, out, repeat, None)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Every key of a map whose keys are `K` (plain data), by `BPF_MAP_GET_NEXT_KEY`.
fn keys<K: Copy>(map: BorrowedFd<'_>, zero: K) -> io::Result<Vec<K>> {
    let mut out = Vec::new();
    let mut prev: Option<K> = None;
    loop {
        let mut next = zero;
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: prev.as_ref().map_or(0, |k| std::ptr::from_ref(k) as u64),
            value: std::ptr::from_mut(&mut next) as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {
                out.push(next);
                prev = Some(next);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Deletes every entry of a hash map whose keys are `key_size` bytes (≤ 64); returns how many.
pub fn clear_map(map: BorrowedFd<'_>, key_size: usize) -> io::Result<usize> {
    assert!(key_size <= 64, "key of {key_size} bytes");
    let all = keys(map, [0u8; 64])?;
    for key in &all {
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: 0,
            flags: 0,
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(all.len())
}

/// One bpf map seen through an fd: its id and the kernel's `memlock` accounting (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapMem {
    pub id: u32,
    pub memlock: u64,
}

/// Parses a bpf map's fdinfo text; `None` for fds that are not maps.
pub fn parse_map_fdinfo(text: &str) -> Option<MapMem> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    text.lines()
        .any(|l| l.starts_with("map_type:"))
        .then_some(())?;
    Some(MapMem {
        id: u32::try_from(field("map_id:")?).ok()?,
        memlock: field("memlock:")?,
    })
}

/// `memlock` of one of our own map fds.
pub fn own_map_mem(fd: BorrowedFd<'_>) -> io::Result<MapMem> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    parse_map_fdinfo(&text).ok_or_else(|| io::Error::other("fd is not a bpf map"))
}

/// Every bpf map another process holds an fd of (deduplicated by id).
pub fn process_maps(pid: u32) -> io::Result<Vec<MapMem>> {
    let mut maps: Vec<MapMem> = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(m) = parse_map_fdinfo(&text)
            && !maps.iter().any(|x| x.id == m.id)
        {
            maps.push(m);
        }
    }
    Ok(maps)
}

/// Bytes of the Maglev arena that frontends' tables occupy (whole chunks), and how many tables, from
/// the pinned frontend map under `bpffs`. The arena itself is preallocated: its full size is in the
/// memlock of its map fd.
pub fn arena_tables(bpffs: &std::path::Path) -> anyhow::Result<(u64, usize)> {
    use anyhow::Context as _;
    use weir_common::{MAP_SERVICES, ServiceKey, ServiceValue, TableChunk};
    let data = aya::maps::MapData::from_pin(bpffs.join(MAP_SERVICES))
        .context("opening the pinned frontend map")?;
    let services: aya::maps::HashMap<_, ServiceKey, ServiceValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
    let mut bases = std::collections::BTreeMap::new();
    for entry in services.iter() {
        let (_, v) = entry.context("reading the frontend map")?;
        if v.table_size > 0 {
            bases.insert(v.table_base, v.table_size);
        }
    }
    let bytes = bases
        .values()
        .map(|&size| {
            u64::from(weir_agent::arena::chunks_for(size))
                * std::mem::size_of::<TableChunk>() as u64
        })
        .sum();
    Ok((bytes, bases.len()))
}

/// The XDP side of the forwarding experiment (`forward.rs`): raw programs, a program array for the
/// generator's tail call, native attachment, and BPF_PROG_TEST_RUN in live-frames mode.
pub mod xdp {
    use super::{bpf, raw_bpf};
    use std::io;
    use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;

    pub use weir_tests::raw_bpf::{attach_xdp as attach, insn};

    /// Loads raw instructions as an XDP program; the verifier's log is in the error when it refuses.
    /// Its expected attach type is XDP, as aya loads XDP programs (`weir_ext_xdp` among them): a program
    /// array takes only programs whose attach type matches its owner's (the generator's).
    pub fn load(insns: &[u64], name: &str) -> io::Result<OwnedFd> {
        raw_bpf::load(raw_bpf::BPF_PROG_TYPE_XDP, raw_bpf::BPF_XDP, insns, name)
    }

    #[repr(C)]
    #[derive(Default)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    /// A program array of `entries` slots (the generator tail-calls slot 0).
    pub fn prog_array(entries: u32) -> io::Result<OwnedFd> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PROG_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: entries,
            map_flags: 0,
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
        // SAFETY: BPF_MAP_CREATE returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    /// Puts `prog` into slot `index` of a program array.
    pub fn prog_array_set(map: BorrowedFd<'_>, index: u32, prog: BorrowedFd<'_>) -> io::Result<()> {
        let value = prog.as_raw_fd() as u32;
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&index) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// BPF_PROG_TEST_RUN in live-frames mode: `frames` frames built from `data` run through `prog` in
    /// batches of `batch` as if they arrived on `ingress_ifindex` (of the calling thread's network
    /// namespace); what the program transmits or redirects is really sent, what it passes enters the
    /// stack. The kernel fills a page per frame from `data` once and recycles pages without refilling
    /// them, so a program that rewrites frames must restore them itself (the generator does). Returns
    /// the kernel's mean nanoseconds per frame: its timer runs around the batches (program runs,
    /// transmissions, the stack for passed frames and the softirqs the batches raise), not around the
    /// call's setup and teardown, which cost a fixed ~20 ms here whatever the frame count.
    pub fn live_frames(
        prog: BorrowedFd<'_>,
        data: &[u8],
        ingress_ifindex: u32,
        frames: u32,
        batch: u32,
    ) -> io::Result<u32> {
        // `struct xdp_md`: data, data_end (must be the frame's length), data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex.
        let ctx: [u32; 6] = [0, data.len() as u32, 0, ingress_ifindex, 0, 0];
        let mut attr = raw_bpf::TestRunAttr {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: data.len() as u32,
            data_in: data.as_ptr() as u64,
            repeat: frames,
            ctx_size_in: std::mem::size_of_val(&ctx) as u32,
            ctx_in: ctx.as_ptr() as u64,
            flags: raw_bpf::BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: batch,
            ..raw_bpf::TestRunAttr::default()
        };
        // SAFETY: `data` and `ctx` outlive the call and have the sizes given; no output buffers.
        unsafe { raw_bpf::prog_test_run(&mut attr) }?;
        Ok(attr.duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_map_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\nkey_size:\t8\n\
                    value_size:\t16\nmax_entries:\t65536\nmap_flags:\t0x0\nmap_extra:\t0x0\n\
                    memlock:\t5767232\nmap_id:\t42\nfrozen:\t0\n";
        assert_eq!(
            parse_map_fdinfo(text),
            Some(MapMem {
                id: 42,
                memlock: 5_767_232
            })
        );
        assert_eq!(parse_map_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }
}
