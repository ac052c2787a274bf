//! A two-instruction XDP program that passes every frame, attached (native mode) to the lab's veth ends
//! that face a node's external interface. A veth delivers the frames its peer's XDP program transmits
//! (XDP_TX) or redirects only when its own end runs XDP too (since Linux 6.12 GRO no longer stands in),
//! so without this the agents' XDP fast path would send NodePort traffic into the void. A physical
//! NIC needs nothing of the sort; a cluster built on veth pairs (kind and the like) does.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::Context as _;

use crate::netns::in_netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The leading members of `union bpf_attr` for BPF_PROG_LOAD (the kernel zero-fills the rest).
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

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
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
    // SAFETY: a successful BPF_PROG_LOAD / BPF_LINK_CREATE returns a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The program attached to one interface; detached when dropped (the link's last fd closes).
#[derive(Debug)]
pub struct XdpPass {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Attaches the pass program to `iface` in network namespace `netns`, native mode.
pub fn attach(netns: &str, iface: &str) -> anyhow::Result<XdpPass> {
    let iface_owned = iface.to_owned();
    in_netns(netns, move || -> anyhow::Result<XdpPass> {
        // r0 = XDP_PASS (2); exit
        let insns = [
            Insn {
                code: 0xb7,
                regs: 0,
                off: 0,
                imm: 2,
            },
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0,
            },
        ];
        let license = c"GPL";
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load).context("loading the XDP pass program")?;
        let name = std::ffi::CString::new(iface_owned.as_str())?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(
            index != 0,
            "no interface {iface_owned}: {}",
            io::Error::last_os_error()
        );
        let mut link = LinkCreateAttr {
            prog_fd: prog.as_raw_fd() as u32,
            target_ifindex: index,
            attach_type: BPF_XDP,
            flags: XDP_FLAGS_DRV_MODE,
        };
        let link = bpf(BPF_LINK_CREATE, &mut link)
            .with_context(|| format!("attaching the XDP pass program to {iface_owned}"))?;
        Ok(XdpPass {
            _link: link,
            _prog: prog,
        })
    })
    .with_context(|| format!("entering {netns}"))?
}
