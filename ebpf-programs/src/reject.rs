//! kube-proxy's REJECT for a Service without ready endpoints: a TCP RST or an ICMP port unreachable,
//! built in place and sent back out of the interface the packet came in on, so the client fails at once.
use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    programs::TcContext,
};
use weir_common::{
    PROTO_TCP, STAT_DROP_REJECT_FAILED, STAT_DROP_RESET_TO_REJECTING, STAT_REJECT_TCP,
    STAT_REJECT_UDP,
};

use crate::{
    csum,
    maps::{SCRATCH, SCRATCH_LEN},
    packet::{ETH_HLEN, Flow, IPV4_MIN_HLEN, IPV6_HLEN},
    stats::count,
};

/// Where the original headers are copied in the scratch buffer, and where the reply is built: the
/// program's stack (512 bytes, shared along the call chain) has no room for both.
const IN_OFF: usize = 0;
const OUT_OFF: usize = 128;
const _: () = assert!(IN_OFF + RST6_LEN <= OUT_OFF && IN_OFF + ORIG_UDP6_LEN <= OUT_OFF);
const _: () = assert!(OUT_OFF + RST6_LEN <= SCRATCH_LEN && OUT_OFF + ICMP6_LEN <= SCRATCH_LEN);

/// The per-CPU scratch buffer, with the first `len` bytes of the packet copied to `IN_OFF` and the
/// reply area zeroed.
#[inline(always)]
fn scratch_with_headers(
    ctx: &TcContext,
    len: usize,
) -> Result<&'static mut [u8; SCRATCH_LEN], i64> {
    let buf = SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: a per-CPU array slot: only this program, on this CPU, uses it until it returns.
    let buf = unsafe { &mut *buf };
    // SAFETY: the helper writes exactly `len` bytes into the buffer, which is at least that long.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            buf[IN_OFF..].as_mut_ptr().cast(),
            len as u32,
        )
    };
    if ret != 0 {
        return Err(ret);
    }
    buf[OUT_OFF..].fill(0);
    Ok(buf)
}

const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_FIN: u8 = 0x01;
const TCP_ACK: u8 = 0x10;
const RST_LEN: usize = ETH_HLEN + 20 + 20;
/// Ethernet + IPv4 + ICMP header + the offending IPv4 header + its first 8 bytes (RFC 792).
const ICMP_LEN: usize = ETH_HLEN + 20 + 8 + 20 + 8;
const ORIG_UDP_LEN: usize = ETH_HLEN + 20 + 8;
const RST6_LEN: usize = ETH_HLEN + IPV6_HLEN + 20;
/// Ethernet + IPv6 + ICMPv6 header + the offending IPv6 header and its first 8 bytes (RFC 4443 asks
/// for as much as fits in the minimum MTU; the headers are what the client's stack needs).
const ICMP6_LEN: usize = ETH_HLEN + IPV6_HLEN + 8 + IPV6_HLEN + 8;
const ORIG_UDP6_LEN: usize = ETH_HLEN + IPV6_HLEN + 8;
const PROTO_ICMPV6: u8 = 58;

/// Out of line: the reply buffers would otherwise share the main program's 512-byte stack.
#[inline(never)]
pub fn reject(ctx: &TcContext, flow: &Flow) -> i32 {
    // Headers with IPv4 options are rare from pods; building replies for them is not worth the code.
    if !flow.v6 && flow.ihl as usize != IPV4_MIN_HLEN {
        count(STAT_DROP_REJECT_FAILED);
        return TC_ACT_SHOT;
    }
    let built = match (flow.proto == PROTO_TCP, flow.v6) {
        (true, false) => tcp_rst::<false>(ctx).map(|sent| (sent, STAT_REJECT_TCP)),
        (true, true) => tcp_rst::<true>(ctx).map(|sent| (sent, STAT_REJECT_TCP)),
        (false, false) => icmp_port_unreachable(ctx).map(|sent| (sent, STAT_REJECT_UDP)),
        (false, true) => icmp6_port_unreachable(ctx).map(|sent| (sent, STAT_REJECT_UDP)),
    };
    match built {
        Ok((true, stat)) => {
            count(stat);
            // SAFETY: ctx.skb.skb is the live __sk_buff this program was called with.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            // SAFETY: plain helper call with an ifindex taken from the skb itself.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        // An incoming RST is never answered.
        Ok((false, _)) => {
            count(STAT_DROP_RESET_TO_REJECTING);
            TC_ACT_SHOT
        }
        Err(_) => {
            count(STAT_DROP_REJECT_FAILED);
            TC_ACT_SHOT
        }
    }
}

/// Returns Ok(false) when the packet must be dropped silently (it is itself a RST). `V6` is a const
/// parameter so every offset stays a constant the verifier can check.
#[inline(never)]
fn tcp_rst<const V6: bool>(ctx: &TcContext) -> Result<bool, i64> {
    let iph = if V6 { IPV6_HLEN } else { IPV4_MIN_HLEN };
    let len = ETH_HLEN + iph + 20;
    let buf = scratch_with_headers(ctx, len)?;
    let (inp, out) = buf.split_at_mut(OUT_OFF);
    let inp = &inp[IN_OFF..IN_OFF + len];
    let out = &mut out[..len];
    let l4 = ETH_HLEN + iph;
    let in_flags = inp[l4 + 13];
    if in_flags & TCP_RST != 0 {
        return Ok(false);
    }
    let payload = if V6 {
        u16::from_be_bytes([inp[ETH_HLEN + 4], inp[ETH_HLEN + 5]]) as u32
    } else {
        (u16::from_be_bytes([inp[ETH_HLEN + 2], inp[ETH_HLEN + 3]]) as u32).saturating_sub(20)
    };
    let doff = ((inp[l4 + 12] >> 4) as u32) * 4;
    let in_seq = u32::from_be_bytes([inp[l4 + 4], inp[l4 + 5], inp[l4 + 6], inp[l4 + 7]]);
    let in_ack = [inp[l4 + 8], inp[l4 + 9], inp[l4 + 10], inp[l4 + 11]];
    let mut seg_len = payload.saturating_sub(doff);
    if in_flags & TCP_SYN != 0 {
        seg_len += 1;
    }
    if in_flags & TCP_FIN != 0 {
        seg_len += 1;
    }

    swap_ethernet(inp, out, V6);
    if V6 {
        ip6_header(inp, out, 20, PROTO_TCP);
    } else {
        ip_header(inp, out, 40, PROTO_TCP);
    }
    // Ports swapped.
    out[l4] = inp[l4 + 2];
    out[l4 + 1] = inp[l4 + 3];
    out[l4 + 2] = inp[l4];
    out[l4 + 3] = inp[l4 + 1];
    // RFC 793 reset generation: echo the peer's ACK as our sequence if it had one, else ACK its segment.
    if in_flags & TCP_ACK != 0 {
        out[l4 + 4] = in_ack[0];
        out[l4 + 5] = in_ack[1];
        out[l4 + 6] = in_ack[2];
        out[l4 + 7] = in_ack[3];
        out[l4 + 13] = TCP_RST;
    } else {
        let ack = in_seq.wrapping_add(seg_len).to_be_bytes();
        out[l4 + 8] = ack[0];
        out[l4 + 9] = ack[1];
        out[l4 + 10] = ack[2];
        out[l4 + 11] = ack[3];
        out[l4 + 13] = TCP_RST | TCP_ACK;
    }
    out[l4 + 12] = 5 << 4;
    // Pseudo header: addresses, protocol, TCP length.
    let addrs = if V6 {
        &out[ETH_HLEN + 8..ETH_HLEN + 40]
    } else {
        &out[ETH_HLEN + 12..ETH_HLEN + 20]
    };
    let pseudo = csum::sum(addrs, PROTO_TCP as u32 + 20);
    let c = csum::finish(csum::sum(&out[l4..len], pseudo));
    out[l4 + 16] = c[0];
    out[l4 + 17] = c[1];

    resize(ctx, len)?;
    if V6 {
        let out: &[u8; RST6_LEN] = (&*out).try_into().map_err(|_| -1i64)?;
        ctx.store(0, out, 0)?;
    } else {
        let out: &[u8; RST_LEN] = (&*out).try_into().map_err(|_| -1i64)?;
        ctx.store(0, out, 0)?;
    }
    Ok(true)
}

#[inline(never)]
fn icmp_port_unreachable(ctx: &TcContext) -> Result<bool, i64> {
    let buf = scratch_with_headers(ctx, ORIG_UDP_LEN)?;
    let (inp, out) = buf.split_at_mut(OUT_OFF);
    let inp = &inp[IN_OFF..IN_OFF + ORIG_UDP_LEN];
    let out = &mut out[..ICMP_LEN];
    swap_ethernet(inp, out, false);
    ip_header(inp, out, (ICMP_LEN - ETH_HLEN) as u16, 1);
    let icmp = ETH_HLEN + 20;
    out[icmp] = 3; // destination unreachable
    out[icmp + 1] = 3; // port unreachable
    let mut i = 0;
    while i < ORIG_UDP_LEN - ETH_HLEN {
        out[icmp + 8 + i] = inp[ETH_HLEN + i];
        i += 1;
    }
    let c = csum::finish(csum::sum(&out[icmp..ICMP_LEN], 0));
    out[icmp + 2] = c[0];
    out[icmp + 3] = c[1];

    resize(ctx, ICMP_LEN)?;
    let out: &[u8; ICMP_LEN] = (&*out).try_into().map_err(|_| -1i64)?;
    ctx.store(0, out, 0)?;
    Ok(true)
}

/// ICMPv6 destination unreachable, code 4 (port unreachable), quoting the UDP packet's headers.
#[inline(never)]
fn icmp6_port_unreachable(ctx: &TcContext) -> Result<bool, i64> {
    let buf = scratch_with_headers(ctx, ORIG_UDP6_LEN)?;
    let (inp, out) = buf.split_at_mut(OUT_OFF);
    let inp = &inp[IN_OFF..IN_OFF + ORIG_UDP6_LEN];
    let out = &mut out[..ICMP6_LEN];
    swap_ethernet(inp, out, true);
    let payload = (ICMP6_LEN - ETH_HLEN - IPV6_HLEN) as u16;
    ip6_header(inp, out, payload, PROTO_ICMPV6);
    let icmp = ETH_HLEN + IPV6_HLEN;
    out[icmp] = 1; // destination unreachable
    out[icmp + 1] = 4; // port unreachable
    let mut i = 0;
    while i < ORIG_UDP6_LEN - ETH_HLEN {
        out[icmp + 8 + i] = inp[ETH_HLEN + i];
        i += 1;
    }
    // ICMPv6 checksums the pseudo-header too: addresses, upper-layer length, next header.
    let pseudo = csum::sum(
        &out[ETH_HLEN + 8..ETH_HLEN + 40],
        payload as u32 + PROTO_ICMPV6 as u32,
    );
    let c = csum::finish(csum::sum(&out[icmp..ICMP6_LEN], pseudo));
    out[icmp + 2] = c[0];
    out[icmp + 3] = c[1];

    resize(ctx, ICMP6_LEN)?;
    let out: &[u8; ICMP6_LEN] = (&*out).try_into().map_err(|_| -1i64)?;
    ctx.store(0, out, 0)?;
    Ok(true)
}

#[inline(always)]
fn swap_ethernet(inp: &[u8], out: &mut [u8], v6: bool) {
    let mut i = 0;
    while i < 6 {
        out[i] = inp[6 + i];
        out[6 + i] = inp[i];
        i += 1;
    }
    if v6 {
        out[12] = 0x86;
        out[13] = 0xdd;
    } else {
        out[12] = 0x08;
        out[13] = 0x00;
    }
}

/// A fresh IPv6 header from the frontend (original destination) back to the client.
#[inline(always)]
fn ip6_header(inp: &[u8], out: &mut [u8], payload_len: u16, next: u8) {
    let ip = ETH_HLEN;
    out[ip] = 0x60;
    let len = payload_len.to_be_bytes();
    out[ip + 4] = len[0];
    out[ip + 5] = len[1];
    out[ip + 6] = next;
    out[ip + 7] = 64;
    let mut i = 0;
    while i < 16 {
        out[ip + 8 + i] = inp[ip + 24 + i];
        out[ip + 24 + i] = inp[ip + 8 + i];
        i += 1;
    }
}

/// A fresh IPv4 header from the frontend (original destination) back to the client.
#[inline(always)]
fn ip_header(inp: &[u8], out: &mut [u8], tot_len: u16, proto: u8) {
    let ip = ETH_HLEN;
    out[ip] = 0x45;
    let len = tot_len.to_be_bytes();
    out[ip + 2] = len[0];
    out[ip + 3] = len[1];
    out[ip + 6] = 0x40; // don't fragment
    out[ip + 8] = 64;
    out[ip + 9] = proto;
    let mut i = 0;
    while i < 4 {
        out[ip + 12 + i] = inp[ip + 16 + i];
        out[ip + 16 + i] = inp[ip + 12 + i];
        i += 1;
    }
    let c = csum::finish(csum::sum(&out[ip..ip + 20], 0));
    out[ip + 10] = c[0];
    out[ip + 11] = c[1];
}

#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> Result<(), i64> {
    // SAFETY: plain helper call on the live skb; it may move packet data, and no packet pointer is
    // held across it (the reply is built on the stack).
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}
