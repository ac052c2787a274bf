//! Full Internet checksums over headers the datapath builds itself (RST and ICMP replies).

/// One's-complement sum of big-endian 16-bit words, not yet folded.
#[inline(always)]
pub fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    acc
}

/// Folds a sum to 16 bits and complements it; returns the field in network order bytes.
#[inline(always)]
pub fn finish(mut acc: u32) -> [u8; 2] {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    (!(acc as u16)).to_be_bytes()
}
