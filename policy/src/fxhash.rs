//! The Fx hash (rustc's), for the index's hash maps and the source-namespace gates.
//!
//! This module owns the hash function only. It must not be used for keys a peer chooses: it
//! has no HashDoS resistance. The keys hashed with it (label pairs and namespace names) come
//! from the control plane.

use std::hash::{BuildHasherDefault, Hasher};

/// The Fx hash (rustc's): fast for short keys.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

pub(crate) type FxBuildHasher = BuildHasherDefault<FxHasher>;

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        // The last 1–7 bytes as one word, from (possibly overlapping) fixed-size reads: no
        // variable-length copy.
        let rest = chunks.remainder();
        let n = rest.len();
        let word = if n >= 4 {
            let lo = rest
                .first_chunk::<4>()
                .map_or(0, |c| u32::from_le_bytes(*c));
            let hi = rest.last_chunk::<4>().map_or(0, |c| u32::from_le_bytes(*c));
            u64::from(lo) | (u64::from(hi) << 32)
        } else if n > 0 {
            u64::from(rest[0]) | (u64::from(rest[n / 2]) << 8) | (u64::from(rest[n - 1]) << 16)
        } else {
            0
        };
        if n > 0 {
            self.add(word ^ ((n as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}
