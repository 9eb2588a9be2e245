//! Incremental Internet checksum update (RFC 1624) for NAT rewrites.
//!
//! Values are 16-bit words read from the packet with native byte order; one's complement
//! arithmetic is byte-order independent as long as every operand is read the same way.

/// Accumulates the changes to a checksummed region: `Σ ~old + Σ new`.
///
/// The sum is folded to 16 bits once, in [`CsumDiff::apply`], not after every word: a
/// one's-complement sum is the same however its carries are folded, and each fold is three
/// dependent instructions on the per-packet path. A `u32` holds the sum of 32 768 changed
/// words; a rewrite changes at most a few dozen.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsumDiff(u32);

impl CsumDiff {
    /// No change yet.
    pub const fn new() -> Self {
        CsumDiff(0)
    }

    /// One 16-bit word changed from `old` to `new`.
    #[inline(always)]
    pub fn word(self, old: u16, new: u16) -> Self {
        CsumDiff(self.0 + (!old) as u32 + new as u32)
    }

    /// Both accumulated changes together.
    #[inline(always)]
    pub fn combine(self, other: CsumDiff) -> Self {
        CsumDiff(self.0 + other.0)
    }

    /// Four bytes (an IPv4 address) changed.
    #[inline(always)]
    pub fn bytes4(self, old: &[u8], new: &[u8]) -> Self {
        self.word(
            u16::from_ne_bytes([old[0], old[1]]),
            u16::from_ne_bytes([new[0], new[1]]),
        )
        .word(
            u16::from_ne_bytes([old[2], old[3]]),
            u16::from_ne_bytes([new[2], new[3]]),
        )
    }

    /// Eight bytes changed, as a word whose memory bytes are the packet's (part of an IPv6
    /// address: see `flow::IpBytes`).
    #[inline(always)]
    pub fn word64(self, old: u64, new: u64) -> Self {
        let (o, n) = (old.to_ne_bytes(), new.to_ne_bytes());
        self.bytes4(&o[..4], &n[..4]).bytes4(&o[4..], &n[4..])
    }

    /// Applies the accumulated change to a checksum field (as read from the packet).
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        // Below 2^22 for any real rewrite: two folds bring any u32 to 16 bits.
        let mut s = (!csum) as u32 + self.0;
        s = (s & 0xffff) + (s >> 16);
        s = (s & 0xffff) + (s >> 16);
        !(s as u16)
    }

    /// As [`CsumDiff::apply`] for UDP, where 0 means "no checksum" and a computed 0 is sent
    /// as 0xffff (RFC 768).
    #[inline(always)]
    pub fn apply_udp(self, csum: u16) -> u16 {
        if csum == 0 {
            return 0;
        }
        match self.apply(csum) {
            0 => 0xffff,
            c => c,
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Full checksum over `data` (reference implementation).
    fn full(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                [c[0], c[1]]
            } else {
                [c[0], 0]
            };
            s += u16::from_ne_bytes(w) as u32;
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn incremental_equals_full_recompute() {
        // A 20-byte IPv4 header with its checksum at bytes 10..12.
        let mut hdr: Vec<u8> = std::vec![
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 99, 1, 2, 10, 99, 0, 10
        ];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_ne_bytes());
        let old = hdr.clone();
        // NAT: new source and destination, TTL decremented.
        hdr[12..16].copy_from_slice(&[10, 20, 0, 1]);
        hdr[16..20].copy_from_slice(&[10, 20, 0, 21]);
        hdr[8] = 63;
        let d = CsumDiff::new()
            .bytes4(&old[12..16], &hdr[12..16])
            .bytes4(&old[16..20], &hdr[16..20])
            .word(
                u16::from_ne_bytes([old[8], old[9]]),
                u16::from_ne_bytes([hdr[8], hdr[9]]),
            );
        let updated = d.apply(u16::from_ne_bytes([old[10], old[11]]));
        hdr[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, full(&hdr));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(CsumDiff::new().word(1, 2).apply_udp(0), 0);
    }

    #[test]
    fn combined_changes_equal_the_same_changes_in_sequence() {
        let a = CsumDiff::new().word(0x1234, 0xfedc).word(0xffff, 0x0001);
        let b = CsumDiff::new().word(0x8000, 0x7fff);
        let seq = a.word(0x8000, 0x7fff);
        for csum in [0u16, 0x0001, 0x8000, 0xfffe, 0xffff, 0x5a5a] {
            assert_eq!(a.combine(b).apply(csum), seq.apply(csum), "{csum:#x}");
        }
    }

    #[test]
    fn folding_once_gives_the_checksum_that_folding_every_word_gave() {
        // The previous implementation: fold after every word.
        fn eager(words: &[(u16, u16)], csum: u16) -> u16 {
            let mut acc = 0u32;
            for &(o, n) in words {
                acc += (!o) as u32 + n as u32;
                acc = (acc & 0xffff) + (acc >> 16);
            }
            let mut s = (!csum) as u32 + acc;
            s = (s & 0xffff) + (s >> 16);
            s = (s & 0xffff) + (s >> 16);
            !(s as u16)
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Edge values often: 0 and 0xffff are where one's complement differs.
            match x % 5 {
                0 => 0,
                1 => 0xffff,
                _ => (x >> 16) as u16,
            }
        };
        for _ in 0..20_000 {
            let n = (next() % 40) as usize;
            let words: Vec<(u16, u16)> = (0..n).map(|_| (next(), next())).collect();
            let csum = next();
            let lazy = words
                .iter()
                .fold(CsumDiff::new(), |d, &(o, n)| d.word(o, n))
                .apply(csum);
            assert_eq!(lazy, eager(&words, csum), "{words:?} {csum:#x}");
        }
    }
}
