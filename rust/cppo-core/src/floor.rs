//! The benchmark's memory floor: one pass over exactly the bytes the mask reads and
//! writes, on the current rayon pool (`bench/cpu.py`, docs/cpu.md). Not used by the mask.

use rayon::prelude::*;

/// Bytes per task (fixed).
const CHUNK: usize = 1 << 16;

/// Reads every byte of `read` (an OR of their 64-bit words, returned so that the reads
/// are not optimised away) and copies `copy_from` into `copy_to` (the same length): the
/// traffic of a kernel that reads its inputs once and writes a byte per token.
pub fn memory_floor(read: &[&[u8]], copy_from: &[u8], copy_to: &mut [u8]) -> u64 {
    assert_eq!(
        copy_from.len(),
        copy_to.len(),
        "copy_from and copy_to differ in length"
    );
    let or_words = |bytes: &[u8]| {
        // SAFETY: every bit pattern is a valid u64.
        let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
        let mut acc = head.iter().chain(tail).fold(0u64, |a, &b| a | b as u64);
        // Eight independent lanes: the fold vectorises and is not latency-bound.
        let mut lanes = [0u64; 8];
        for block in words.chunks(8) {
            for (l, &w) in lanes.iter_mut().zip(block) {
                *l |= w;
            }
        }
        for l in lanes {
            acc |= l;
        }
        acc
    };
    let mut acc = 0u64;
    for bytes in read {
        acc |= bytes
            .par_chunks(CHUNK)
            .map(or_words)
            .reduce(|| 0, |a, b| a | b);
    }
    copy_to
        .par_chunks_mut(CHUNK)
        .zip(copy_from.par_chunks(CHUNK))
        .for_each(|(to, from)| to.copy_from_slice(from));
    acc
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_and_copies() {
        let a: Vec<u8> = (0..100_001).map(|i| (i % 7 == 0) as u8).collect();
        let b = vec![0x80u8; 3];
        let mut out = vec![9u8; a.len()];
        let acc = super::memory_floor(&[&a, &b], &a, &mut out);
        assert_eq!(out, a);
        assert_ne!(acc, 0);
    }
}
