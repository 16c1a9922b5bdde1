//! The benchmark's memory floor: one pass over exactly the bytes the mask reads and
//! writes, on the current rayon pool (`bench/cpu.py`, docs/cpu.md). Not used by the mask.
//! Also the benchmark's compute control (`fp_control`): floating-point work with no
//! memory traffic and no dependency between tasks, whose 1 -> 2 thread scaling says
//! how much two threads of arithmetic can gain on the machine at that moment.

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

/// Tokens per task of `fp_control` (fixed).
const CONTROL_CHUNK: usize = 1 << 12;

/// Fused multiply-adds per token of `fp_control`, in four-lane vectors (~3 cycles a token
/// on a core with two FMA pipes: the same order as the mask's ~12 cycles a token).
const CONTROL_FMAS_PER_TOKEN: usize = 6;

/// The benchmark's compute control: `tokens` tokens' worth of independent fused
/// multiply-add chains (`CONTROL_FMAS_PER_TOKEN` four-lane FMAs a token, eight chains
/// per task, so throughput-bound, not latency-bound) in tasks of `CONTROL_CHUNK` tokens
/// on the current rayon pool; nothing is read or written but registers. Returns the
/// largest chain value (the same for any thread count), so the work is not optimised
/// away.
pub fn fp_control(tokens: usize) -> f64 {
    let tasks = tokens.div_ceil(CONTROL_CHUNK);
    (0..tasks)
        .into_par_iter()
        .map(|t| {
            let n = CONTROL_CHUNK.min(tokens - t * CONTROL_CHUNK);
            control_task(n * CONTROL_FMAS_PER_TOKEN / 8)
        })
        .reduce(|| 0.0, f64::max)
}

/// `steps` steps of eight independent chains acc = acc * M + A (four lanes each), from
/// zero: each chain tends to A / (1 - M) = 1, never overflowing or subnormal. Returns the
/// largest lane.
fn control_task(steps: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { control_task_fma(steps) };
    }
    control_task_portable(steps)
}

const CONTROL_M: f64 = 0.999;
const CONTROL_A: f64 = 0.001;

fn control_task_portable(steps: usize) -> f64 {
    let mut acc = [0.0f64; 32];
    for _ in 0..steps {
        for a in acc.iter_mut() {
            *a = a.mul_add(CONTROL_M, CONTROL_A);
        }
    }
    acc.into_iter().fold(0.0, f64::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn control_task_fma(steps: usize) -> f64 {
    use std::arch::x86_64::*;
    let (m, a) = (_mm256_set1_pd(CONTROL_M), _mm256_set1_pd(CONTROL_A));
    let mut acc = [_mm256_setzero_pd(); 8];
    for _ in 0..steps {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_pd(*v, m, a);
        }
    }
    let mut lanes = [0.0f64; 32];
    for (i, v) in acc.iter().enumerate() {
        _mm256_storeu_pd(lanes[4 * i..].as_mut_ptr(), *v);
    }
    lanes.into_iter().fold(0.0, f64::max)
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

    #[test]
    fn fp_control_is_the_same_on_any_pool_and_matches_the_portable_loop() {
        let one = crate::pool::with_threads(1, || super::fp_control(100_000)).unwrap();
        let two = crate::pool::with_threads(2, || super::fp_control(100_000)).unwrap();
        assert_eq!(one, two);
        // The longest task (CONTROL_CHUNK tokens) sets the maximum: 1 - M^steps.
        let steps = super::CONTROL_CHUNK * super::CONTROL_FMAS_PER_TOKEN / 8;
        let expected = 1.0 - super::CONTROL_M.powi(steps as i32);
        assert!((one - expected).abs() < 1e-9, "{one} vs {expected}");
        assert_eq!(one, super::control_task_portable(steps));
        assert_eq!(super::fp_control(0), 0.0);
    }
}
