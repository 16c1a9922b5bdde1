//! The per-row prefix budget (paper Eq. 22): the spec's linear-interpolation quantile
//! and the clamped adaptive budget.

use crate::params::Params;
use crate::row::sized;

/// Spec quantile (linear interpolation): h = q (n - 1),
/// Q = x[floor h] + (h - floor h) (x[ceil h] - x[floor h]) over the sorted values.
///
/// `bits` holds the values' IEEE-754 bit patterns; the values are finite and >= +0.0,
/// so integer order is numeric order (integer selection is much faster than a float
/// comparator). `bits` is non-empty; it is reordered.
pub fn quantile_linear(bits: &mut [u64], q: f64) -> f64 {
    let h = q * (bits.len() - 1) as f64;
    quantile_ranks(bits, h, h.floor() as usize, h.ceil() as usize)
}

/// `x[lo] + (h - floor h) (x[hi] - x[lo])` where x[r] is the value of rank r in `bits`.
fn quantile_ranks(bits: &mut [u64], h: f64, lo: usize, hi: usize) -> f64 {
    let (_, &mut lo_bits, right) = bits.select_nth_unstable(lo);
    let x_lo = f64::from_bits(lo_bits);
    let x_hi = if hi == lo {
        x_lo
    } else {
        f64::from_bits(*right.iter().min().expect("hi < n"))
    };
    x_lo + (h - h.floor()) * (x_hi - x_lo)
}

/// The clamp window of the adaptive budget on D, widened by a relative 1e-9: a value
/// below `low` gives k D < delta_b, one above `high` gives k D > m delta_b, whatever the
/// rounding in Q's interpolation and in k Q. `None` when k = 0 or delta_b = 0 (no
/// shortcut).
#[inline]
pub(crate) fn clamp_window(params: &Params) -> Option<(f64, f64)> {
    let (delta_b, k) = (params.delta_b, params.budget_scale);
    (k > 0.0 && delta_b > 0.0).then(|| {
        (
            delta_b / k * (1.0 - 1e-9),
            params.budget_ceiling * delta_b / k * (1.0 + 1e-9),
        )
    })
}

/// Counts over a row's valid positions: all of them, those below the clamp window and
/// those above it (`clamp_window`; 0 and 0 without a window).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowCounts {
    pub valid: usize,
    pub below: usize,
    pub above: usize,
}

impl WindowCounts {
    /// One branch-free pass (the divergence loop of `row` counts while it computes D).
    pub(crate) fn count(params: &Params, div: &[f64], valid: &[u8]) -> Self {
        let (low, high) = clamp_window(params).unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
        let mut c = WindowCounts::default();
        for (&d, &v) in div.iter().zip(valid) {
            let v = v != 0;
            c.valid += v as usize;
            c.below += (v & (d < low)) as usize;
            c.above += (v & (d > high)) as usize;
        }
        c
    }
}

/// delta_b_row = clamp(k Q_q(D), delta_b, m delta_b) over the row's valid positions
/// (paper Eq. 22 with the ceiling m = `budget_ceiling`, 2 in the paper; delta_b for a
/// row with no valid token). `counts`: `WindowCounts` of `div`, if already known.
///
/// Most rows' quantile falls clearly below or above the clamp window, and then the clamp
/// decides the budget without the exact quantile: the counts tell. Otherwise only the
/// values inside the window (with a 1e-9 relative margin) are selected from, by a
/// histogram of their bit patterns (`select_in_window`). The result equals the spec's
/// formula exactly, since the margin covers every rounding in Q's interpolation and in
/// k Q.
pub(crate) fn adaptive_budget(
    params: &Params,
    div: &[f64],
    valid: &[u8],
    counts: Option<WindowCounts>,
    scratch: &mut Vec<u64>,
) -> f64 {
    let (delta_b, k) = (params.delta_b, params.budget_scale);
    let ceiling = params.budget_ceiling * delta_b;
    let clamp = |q: f64| (k * q).max(delta_b).min(ceiling);
    let WindowCounts {
        valid: n,
        below,
        above,
    } = counts.unwrap_or_else(|| WindowCounts::count(params, div, valid));
    if n == 0 {
        return delta_b;
    }
    let h = params.budget_quantile * (n - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    if let Some((low, high)) = clamp_window(params) {
        if hi < below {
            return delta_b; // x[hi] < low: k Q < delta_b
        }
        if lo >= n - above {
            return ceiling; // x[lo] > high: k Q > m delta_b
        }
        if lo >= below && hi < n - above {
            // Both ranks lie inside the window: select among its values only, compacted
            // without branches (the window holds a data-dependent mix).
            let bits = sized(scratch, div.len() + 4);
            let m = compact_window(div, valid, (low, high), bits);
            let (x_lo, x_hi) = select_in_window(
                &mut bits[..m],
                (low.to_bits(), high.to_bits()),
                lo - below,
                hi - below,
            );
            return clamp(x_lo + (h - h.floor()) * (x_hi - x_lo));
        }
    }
    // + 0.0: a given -0.0 becomes +0.0 (equal value, ordered bits).
    scratch.clear();
    scratch.extend(
        div.iter()
            .zip(valid)
            .filter(|&(_, &v)| v != 0)
            .map(|(&d, _)| (d + 0.0).to_bits()),
    );
    clamp(quantile_linear(scratch, params.budget_quantile))
}

/// Writes the bit patterns of `d + 0.0` for the valid values with low <= d <= high to
/// the front of `bits` (in order; `bits` holds `div.len() + 4`, its tail is scratch)
/// and returns how many there are. The values are finite and >= -0.0 and low > 0; d +
/// 0.0 turns a given -0.0 into +0.0 (an equal value), so integer order on the bits is
/// numeric order. Under the AVX2 and AVX-512 variants, four values a step by a
/// permutation table (the same values in the same order).
fn compact_window(div: &[f64], valid: &[u8], (low, high): (f64, f64), bits: &mut [u64]) -> usize {
    let valid = &valid[..div.len()];
    assert!(bits.len() >= div.len() + 4);
    #[cfg(target_arch = "x86_64")]
    if crate::row::Isa::current_has_avx2() {
        // SAFETY: the CPU has AVX2; lengths checked above.
        return unsafe { compact_window_avx2(div, valid, (low, high), bits) };
    }
    compact_window_scalar(div, valid, (low, high), bits, 0, 0)
}

/// `compact_window` from position `c` with `m` values already written.
fn compact_window_scalar(
    div: &[f64],
    valid: &[u8],
    (low, high): (f64, f64),
    bits: &mut [u64],
    c: usize,
    mut m: usize,
) -> usize {
    // low <= d <= high tested on the bits, in integer arithmetic (the float comparisons
    // compiled to branches, mispredicted on this data-dependent mix).
    let (low_bits, span) = (low.to_bits(), high.to_bits() - low.to_bits());
    for (&d, &v) in div[c..].iter().zip(&valid[c..]) {
        let b = (d + 0.0).to_bits();
        bits[m] = b;
        m += (b.wrapping_sub(low_bits) <= span) as usize & (v != 0) as usize;
    }
    m
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compact_window_avx2(
    div: &[f64],
    valid: &[u8],
    (low, high): (f64, f64),
    bits: &mut [u64],
) -> usize {
    use std::arch::x86_64::*;
    // PERM[k]: the 32-bit lane indices moving the 64-bit lanes set in k to the front.
    const PERM: [[i32; 8]; 16] = {
        let mut t = [[0i32; 8]; 16];
        let mut k = 0;
        while k < 16 {
            let (mut out, mut lane) = (0, 0);
            while lane < 4 {
                if k & (1 << lane) != 0 {
                    t[k][2 * out] = 2 * lane;
                    t[k][2 * out + 1] = 2 * lane + 1;
                    out += 1;
                }
                lane += 1;
            }
            k += 1;
        }
        t
    };
    let n = div.len();
    let (vlow, vhigh) = (_mm256_set1_pd(low), _mm256_set1_pd(high));
    let (dp, vp, out) = (div.as_ptr(), valid.as_ptr(), bits.as_mut_ptr());
    let mut m = 0usize;
    let mut c = 0;
    while c + 4 <= n {
        let d = _mm256_loadu_pd(dp.add(c)); // -0.0 is below low anyway
        let inside = _mm256_and_pd(
            _mm256_cmp_pd::<_CMP_GE_OQ>(d, vlow),
            _mm256_cmp_pd::<_CMP_LE_OQ>(d, vhigh),
        );
        let flags = (vp.add(c) as *const u32).read_unaligned();
        let v = _mm256_cmpeq_epi64(
            _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(flags as i32)),
            _mm256_setzero_si256(),
        );
        let k = _mm256_movemask_pd(_mm256_andnot_pd(_mm256_castsi256_pd(v), inside)) as usize;
        let idx = _mm256_loadu_si256(PERM[k].as_ptr() as *const __m256i);
        let moved = _mm256_permutevar8x32_epi32(_mm256_castpd_si256(d), idx);
        _mm256_storeu_si256(out.add(m) as *mut __m256i, moved);
        m += k.count_ones() as usize;
        c += 4;
    }
    compact_window_scalar(div, valid, (low, high), bits, c, m)
}

/// The values of rank `lo` and `hi` (`hi` = `lo` or `lo` + 1) among `bits`, bit
/// patterns of non-negative floats all within `range` (inclusive). Large sets go
/// through a 2048-bucket histogram of `bits - range.0` (one counting pass; then only
/// the one or two buckets holding the ranks are selected from); small ones straight to
/// `select_nth_unstable`. `bits` is reordered.
fn select_in_window(bits: &mut [u64], range: (u64, u64), lo: usize, hi: usize) -> (f64, f64) {
    const BUCKET_BITS: u32 = 11;
    let select = |bits: &mut [u64], lo: usize, hi: usize| {
        let (_, &mut lo_bits, right) = bits.select_nth_unstable(lo);
        let hi_bits = if hi == lo {
            lo_bits
        } else {
            *right.iter().min().expect("hi < n")
        };
        (f64::from_bits(lo_bits), f64::from_bits(hi_bits))
    };
    if bits.len() < 512 {
        return select(bits, lo, hi);
    }
    let span = range.1 - range.0;
    let shift = (u64::BITS - span.leading_zeros()).saturating_sub(BUCKET_BITS);
    let mut hist = [0u32; (1 << BUCKET_BITS) + 1];
    for &b in bits.iter() {
        hist[((b - range.0) >> shift) as usize] += 1;
    }
    // Buckets of ranks lo and hi, and the number of values in the buckets before.
    let (mut first, mut before, mut acc) = (None, 0usize, 0usize);
    let mut last = 0;
    for (j, &count) in hist.iter().enumerate() {
        let next = acc + count as usize;
        if first.is_none() && lo < next {
            first = Some(j);
            before = acc;
        }
        if hi < next {
            last = j;
            break;
        }
        acc = next;
    }
    let first = first.expect("lo < number of values");
    // Compact the values of buckets first..=last to the front, then select there.
    let mut m = 0;
    for i in 0..bits.len() {
        let b = bits[i];
        let j = ((b - range.0) >> shift) as usize;
        bits[m] = b;
        m += ((j >= first) & (j <= last)) as usize;
    }
    select(&mut bits[..m], lo - before, hi - before)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_matches_spec_formula() {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut v = bits(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(quantile_linear(&mut v, 0.9), 4.0 + (0.9 * 4.0 - 3.0) * 1.0);
        let mut one = bits(&[7.0]);
        assert_eq!(quantile_linear(&mut one, 0.9), 7.0);
        let mut tiny = bits(&[0.0, 1e-300, 2.0]);
        assert_eq!(quantile_linear(&mut tiny, 0.5), 1e-300);
    }

    /// The AVX2 compaction keeps exactly the scalar loop's values, in its order: window
    /// edges, -0.0, padding flags other than 1, every length mod 4.
    #[test]
    fn compact_window_variants_agree() {
        let mut rng = crate::weights::SplitMix64::new(5, 0);
        let (low, high) = (0.02, 0.04);
        for case in 0..300 {
            let n = case % 37 + (case / 37) * 50;
            let div: Vec<f64> = (0..n)
                .map(|_| match rng.next_u64() % 8 {
                    0 => low,
                    1 => high,
                    2 => -0.0,
                    3 => 0.0,
                    _ => (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 0.06,
                })
                .collect();
            let valid: Vec<u8> = (0..n).map(|_| (rng.next_u64() % 4) as u8).collect();
            let mut want = vec![0u64; n + 4];
            let m = compact_window_scalar(&div, &valid, (low, high), &mut want, 0, 0);
            let mut got = vec![0u64; n + 4];
            let k = compact_window(&div, &valid, (low, high), &mut got);
            assert_eq!((k, &got[..k]), (m, &want[..m]), "case {case}");
            // The AVX2 loop itself, whatever variant CPPO_NATIVE_ISA chose.
            #[cfg(target_arch = "x86_64")]
            if crate::row::Isa::Avx2.supported() {
                let mut got = vec![0u64; n + 4];
                // SAFETY: the CPU has AVX2; `got` holds n + 4.
                let k = unsafe { compact_window_avx2(&div, &valid, (low, high), &mut got) };
                assert_eq!((k, &got[..k]), (m, &want[..m]), "case {case} (avx2)");
            }
            assert!(m > 0 || n < 8, "case {case}: nothing selected");
        }
    }
}
