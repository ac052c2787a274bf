//! What the shared datapath code needs from the program type it runs in: TC (pod interfaces, and
//! external interfaces where XDP cannot run) or XDP (the external interfaces' fast path). Parsing,
//! conntrack, frontend lookup and backend choice are written once against this trait.
use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_xdp_load_bytes,
    programs::{TcContext, XdpContext},
};

use crate::{l7, packet::Flow};

pub trait Hook {
    /// In front of a TC program that sees whatever this one passes (so a pass is counted there, once).
    const FAST_PATH: bool;
    /// Let the packet go on its way (for XDP: to the stack, where the TC program sees it next).
    const PASS: i32;
    const DROP: i32;
    /// The context pointer helpers take (`bpf_fib_lookup` accepts both kinds).
    fn raw(&self) -> *mut c_void;
    /// The interface the packet arrived on.
    fn ifindex(&self) -> u32;
    /// `(data, data_end)`, each read once. Every direct access must derive from the one `data` its
    /// bounds check was made on (a fresh load carries no proof), and the two are adjacent 32-bit
    /// context fields: read plainly, LLVM may merge them into one 64-bit load and a shift, and the
    /// verifier refuses arithmetic on `pkt_end`. Volatile reads keep them two loads.
    fn bounds(&self) -> (usize, usize);
    /// Bytes in the packet.
    fn pkt_len(&self) -> u32;
    /// A bounds-checked copy of `size_of::<T>()` bytes at `offset` (for variable offsets and for reads
    /// that direct access would turn into byte loads).
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
    /// Hands a pod's TCP connection to the L7 proxy. Only TC on pod interfaces does.
    fn steer_l7(&self, flow: &Flow) -> i32;
}

impl Hook for TcContext {
    const FAST_PATH: bool = false;
    const PASS: i32 = TC_ACT_OK;
    const DROP: i32 = TC_ACT_SHOT;

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `skb` is the live __sk_buff this program was called with.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `skb` is the live __sk_buff this program was called with.
        unsafe {
            (
                core::ptr::read_volatile(&(*self.skb.skb).data) as usize,
                core::ptr::read_volatile(&(*self.skb.skb).data_end) as usize,
            )
        }
    }

    #[inline(always)]
    fn pkt_len(&self) -> u32 {
        self.len()
    }

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        TcContext::load(self, offset).ok()
    }

    #[inline(always)]
    fn steer_l7(&self, flow: &Flow) -> i32 {
        l7::steer(self, flow)
    }
}

impl Hook for XdpContext {
    const FAST_PATH: bool = true;
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.as_ptr()
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `ctx` is the live xdp_md this program was called with.
        unsafe {
            (
                core::ptr::read_volatile(&(*self.ctx).data) as usize,
                core::ptr::read_volatile(&(*self.ctx).data_end) as usize,
            )
        }
    }

    #[inline(always)]
    fn pkt_len(&self) -> u32 {
        let (start, end) = self.bounds();
        (end - start) as u32
    }

    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes at most `size_of::<T>()` bytes into `out`, and fails (nothing
        // read) when the packet is shorter.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx.cast(),
                offset as u32,
                out.as_mut_ptr().cast(),
                size_of::<T>() as u32,
            )
        };
        // SAFETY: a zero return means all the bytes were written.
        (ret == 0).then(|| unsafe { out.assume_init() })
    }

    #[inline(always)]
    fn steer_l7(&self, _flow: &Flow) -> i32 {
        // XDP runs only on external interfaces, whose traffic is never steered.
        Self::PASS
    }
}
