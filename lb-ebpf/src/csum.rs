//! Internet checksum arithmetic (RFC 1071 / RFC 1624). Values are 16-bit
//! words exactly as they sit in the packet; one's-complement sums do not
//! care about byte order as long as every word is read the same way.

/// Fold a 32-bit accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// New checksum after a 16-bit field changed from `from` to `to` (RFC 1624 eq. 3).
#[inline(always)]
pub fn replace2(csum: u16, from: u16, to: u16) -> u16 {
    !fold(!csum as u32 + !from as u32 + to as u32)
}

/// New checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace4(csum: u16, from: u32, to: u32) -> u16 {
    let sum = !csum as u32
        + !(from as u16) as u32
        + !((from >> 16) as u16) as u32
        + (to as u16) as u32
        + ((to >> 16) as u16) as u32;
    !fold(sum)
}

/// One's-complement sum of 32-bit words, each split into its two halves.
#[inline(always)]
pub fn add4(sum: u32, word: u32) -> u32 {
    sum + (word as u16) as u32 + ((word >> 16) as u16) as u32
}
