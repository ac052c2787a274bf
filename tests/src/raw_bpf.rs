//! Programs of a few raw instructions, loaded and attached with bpf(2) directly (no compiler, no ELF):
//! the XDP pass program the test lab puts on veth ends, and the bench's baselines and generator.
//!
//! Why the lab needs the pass program: a veth delivers the frames its peer's XDP program transmits
//! (XDP_TX) or redirects only when its own end runs XDP too (since Linux 6.12 GRO no longer stands in),
//! so without it the agents' XDP fast path would send NodePort traffic into the void. A physical NIC
//! needs nothing of the sort; a cluster built on veth pairs (kind and the like) does.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

use crate::netns::in_netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_XDP: u32 = 6;
/// The XDP attach type (`expected_attach_type` of XDP programs, and of their links).
pub const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `XDP_PASS`.
const XDP_PASS: i32 = 2;

/// The leading members of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-extends the rest).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr`'s `link_create` members used here.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr, sizeof(attr))` for a command that returns a new file descriptor.
fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live repr(C) prefix of `union bpf_attr` for `cmd`, whose pointers (if any)
    // outlive the call; the kernel reads at most `size_of::<T>()` bytes of it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_PROG_LOAD / BPF_LINK_CREATE returns a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_PROG_TEST_RUN` flag: XDP frames really go where the program sends them (kernel ≥ 5.18).
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// `union bpf_attr`'s `test` member (`BPF_PROG_TEST_RUN`), shared by the packet rig and the bench.
#[repr(C)]
#[derive(Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// `BPF_PROG_TEST_RUN` with `attr`; the kernel writes the results (retval, duration, sizes) back.
///
/// # Safety
/// Every pointer in `attr` (`data_in`, `data_out`, `ctx_in`, `ctx_out`) must be null or point to a
/// live buffer of the size given next to it, for the duration of the call.
pub unsafe fn prog_test_run(attr: &mut TestRunAttr) -> io::Result<()> {
    // SAFETY: `attr` is a live repr(C) struct laid out as the kernel's `test` member; the caller
    // vouches for the buffers it points to.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            std::ptr::from_mut(attr).cast::<c_void>(),
            std::mem::size_of::<TestRunAttr>() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `struct bpf_insn`, as the little-endian u64 the kernel reads.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | (dst & 0xf), o0, o1, i0, i1, i2, i3])
}

/// `r0 = value; exit`.
pub fn return_const(value: i32) -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, value), insn(0x95, 0, 0, 0, 0)]
}

/// Loads raw instructions as a program of `prog_type`; the verifier's log is in the error when it
/// refuses.
pub fn load(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[u64],
    name: &str,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|first| {
        // Again with the log, only to say why.
        let mut log = vec![0u8; 1 << 16];
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
        let _ = bpf_fd(BPF_PROG_LOAD, &mut attr);
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            first.kind(),
            format!(
                "loading {name}: {first}: {}",
                String::from_utf8_lossy(&log[..end])
            ),
        )
    })
}

/// Attaches the XDP program `prog` natively to interface `ifindex` of the calling thread's network
/// namespace; detached when the returned link closes.
pub fn attach_xdp(prog: BorrowedFd<'_>, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// The pass program attached to one interface; detached when dropped (the link's last fd closes).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Attaches a pass program to `iface` in network namespace `netns`, native mode.
pub fn pass_on(netns: &str, iface: &str) -> anyhow::Result<XdpPass> {
    let iface_owned = iface.to_owned();
    in_netns(netns, move || -> anyhow::Result<XdpPass> {
        let prog = load(
            BPF_PROG_TYPE_XDP,
            BPF_XDP,
            &return_const(XDP_PASS),
            "weir_test_pass",
        )
        .context("loading the XDP pass program")?;
        let name = std::ffi::CString::new(iface_owned.as_str())?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(
            index != 0,
            "no interface {iface_owned}: {}",
            io::Error::last_os_error()
        );
        let link = attach_xdp(prog.as_fd(), index)
            .with_context(|| format!("attaching the XDP pass program to {iface_owned}"))?;
        Ok(XdpPass {
            _link: link,
            _prog: prog,
        })
    })
    .with_context(|| format!("entering {netns}"))?
}
