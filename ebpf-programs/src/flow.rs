//! The flow hash that picks a Maglev slot: every packet of a 5-tuple hashes the same, and tuples that differ
//! only in the source port spread evenly (murmur3's 64-bit finaliser).
use crate::packet::Flow;

#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// An address folded to one word: for IPv4 (mapped) a constant XOR of the address, so it spreads as
/// well as the address itself.
#[inline(always)]
fn fold(a: &[u32; 4]) -> u32 {
    a[0] ^ a[1] ^ a[2] ^ a[3]
}

#[inline(always)]
fn mix(flow: &Flow) -> u64 {
    let addrs = ((fold(&flow.saddr) as u64) << 32) | fold(&flow.daddr) as u64;
    let ports = ((flow.sport_be as u64) << 24) | ((flow.dport_be as u64) << 8) | flow.proto as u64;
    fmix64(fmix64(addrs) ^ ports)
}

#[inline(always)]
pub fn hash(flow: &Flow) -> u32 {
    let h = mix(flow);
    (h ^ (h >> 32)) as u32
}

/// A second hash of the flow, independent of [`hash`]: flows that picked the same backend (their
/// Maglev hashes alike modulo the table) must not also search the same SNAT ports.
#[inline(always)]
pub fn hash64_other(flow: &Flow) -> u64 {
    // Any constant with bits spread over the word: the golden ratio's.
    fmix64(mix(flow) ^ 0x9e37_79b9_7f4a_7c15)
}
