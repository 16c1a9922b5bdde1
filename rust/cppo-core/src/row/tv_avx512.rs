//! The Binary TV pass (`tv::tv_span`) for AVX-512, for float32 and float64 log-probs:
//! eight lanes a step, `vexp`'s table read by two-register permutes, the valid flags,
//! the checks and the counts in mask registers.
//!
//! Why not the generic loop compiled for AVX-512: LLVM reads `vexp`'s table with
//! `vgatherqpd`, which on the AMD EPYC (Zen 4) this was written on made the pass slower
//! than the table-free `exp` it replaced. Why eight lanes and not `tv_avx2`'s four with
//! permutes: the same operations in half the instructions; the exp of two vectors ran
//! 1.38 -> 1.05 ns a token on that CPU (which splits a 512-bit operation in two), and the
//! pass 2.13-2.22 -> see docs/cpu.md.
//!
//! Same bits as the generic pass: every floating-point value is the same IEEE-754
//! operations in the same order (`vexp::exp_fast` lane by lane, the weights' division,
//! `a * (p - q) <= 0`), and the counts are integer sums
//! (`row::tests::tv_pass_variants_agree` compares them exactly, with bad, tiny and NaN
//! values at valid and padding positions). As in `tv_avx2`, a bad value or an argument
//! below `vexp::TINY` at a valid position raises one "slow" flag, and the span is then
//! re-examined by the generic pass.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::tv::{vector_pass, Span, TvConsts, TvStats, LINEAR, ONES, SKIP};
use super::{Advantage, Widen};
use crate::budget::WindowCounts;
use crate::divergence::LOG_PROB_TOLERANCE;
use crate::vexp;

/// Loads eight log-probs as float64.
pub(super) trait Load8: Widen {
    /// # Safety
    /// `p` points at eight readable elements; AVX-512 F is available.
    unsafe fn load8(p: *const Self) -> __m512d;
}

impl Load8 for f64 {
    #[inline(always)]
    unsafe fn load8(p: *const f64) -> __m512d {
        _mm512_loadu_pd(p)
    }
}

impl Load8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m512d {
        _mm512_cvtps_pd(_mm256_loadu_ps(p))
    }
}

/// `vexp`'s table, each half in two registers.
#[derive(Clone, Copy)]
struct Table {
    hi: (__m512d, __m512d),
    lo: (__m512d, __m512d),
}

/// `vexp::exp_fast` of eight lanes: the same operations in the same order, lane by
/// lane (`vexp::reduce`, `vexp::unscaled`, the scale added to the exponent bits).
///
/// # Safety
/// AVX-512 F and FMA are available.
#[inline(always)]
unsafe fn exp8(x: __m512d, tab: Table) -> __m512d {
    let c = _mm512_set1_pd;
    let shifter = c(vexp::SHIFTER);
    let t = _mm512_fmadd_pd(x, c(vexp::INV_LN2_16), shifter);
    let m = _mm512_sub_pd(t, shifter);
    let hi = _mm512_fnmadd_pd(m, c(vexp::LN2_16_HI), x);
    let r = _mm512_fnmadd_pd(m, c(vexp::LN2_16_LO), hi);
    let t = _mm512_castpd_si512(t);
    // The permutes take the low four bits of each lane of t: j.
    let t_hi = _mm512_permutex2var_pd(tab.hi.0, t, tab.hi.1);
    let t_lo = _mm512_permutex2var_pd(tab.lo.0, t, tab.lo.1);
    let q = &vexp::Q;
    let r2 = _mm512_mul_pd(r, r);
    let p01 = _mm512_fmadd_pd(c(q[1]), r, c(q[0]));
    let p23 = _mm512_fmadd_pd(c(q[3]), r, c(q[2]));
    let p45 = _mm512_fmadd_pd(c(q[5]), r, c(q[4]));
    let p03 = _mm512_fmadd_pd(p23, r2, p01);
    let r4 = _mm512_mul_pd(r2, r2);
    let q = _mm512_fmadd_pd(p45, r4, p03);
    let em1 = _mm512_fmadd_pd(r2, q, r);
    let y = _mm512_add_pd(t_hi, _mm512_fmadd_pd(t_hi, em1, t_lo));
    let scale = _mm512_slli_epi64::<52>(_mm512_srli_epi64::<4>(t));
    _mm512_castsi512_pd(_mm512_add_epi64(_mm512_castpd_si512(y), scale))
}

/// The pass over one span; `tv::tv_span`'s contract.
///
/// # Safety
/// AVX2, FMA, AVX-512 F, DQ, BW and VL are available.
#[target_feature(enable = "avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")]
pub(super) unsafe fn tv_span_avx512<T: Load8>(k: &TvConsts, span: Span<T>) -> TvStats {
    vector_pass!(k, span, 8, steps8)
}

/// The pass over a span whose length is a multiple of eight, for one weight mode
/// (`W`: `LINEAR`, `ONES` or `SKIP`) and one kind of advantage; returns the counts and
/// whether a valid position held a bad value or an argument below TINY.
#[inline(always)]
unsafe fn steps8<T: Load8, const W: u8, const TOKEN_ADV: bool>(
    k: &TvConsts,
    span: &mut Span<T>,
) -> (TvStats, bool) {
    let n = span.valid.len();
    let (hi, lo) = (vexp::T_HI.as_ptr(), vexp::T_LO.as_ptr());
    let tab = Table {
        hi: (_mm512_loadu_pd(hi), _mm512_loadu_pd(hi.add(8))),
        lo: (_mm512_loadu_pd(lo), _mm512_loadu_pd(lo.add(8))),
    };
    let c = _mm512_set1_pd;
    let (tiny, tol) = (c(vexp::TINY), c(LOG_PROB_TOLERANCE));
    let (low, high) = (c(k.low), c(k.high));
    let sign = c(-0.0);
    let zero = _mm512_setzero_pd();
    let (hm1, omw, one) = (c(k.horizon_m1), c(k.one_minus_w_min), c(1.0));
    let (row_a, at) = match span.adv {
        Advantage::Row(a) => (a, [].as_ptr()),
        Advantage::Token(at) => (0.0, at.as_ptr()),
    };
    // A row's advantage is checked once: bad if it is not finite and a position is
    // valid (the same condition as the generic pass's).
    let row_a_ok = row_a.is_finite();
    let row_a = c(row_a);
    // Columns as float64 (exact below 2^52): col0 + c, c = 8 i + lane.
    let mut col = _mm512_add_pd(
        c(span.col0 as f64),
        _mm512_setr_pd(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
    );
    let eight = c(8.0);
    let ones8 = _mm_set1_epi8(1);
    // bad: a lane bit set where a valid lane failed the checks.
    let mut bad: __mmask8 = 0;
    let (mut valid, mut below, mut above) = (0u32, 0u32, 0u32);
    let mut counts = WindowCounts::default();
    let (lpp, lqp, vp) = (span.lp.as_ptr(), span.lq.as_ptr(), span.valid.as_ptr());
    let (dp, tp) = (span.div.as_mut_ptr(), span.toward.as_mut_ptr());
    let wp = span.weight.as_mut_ptr();
    let mut i = 0;
    while i < n {
        let (p, q) = (T::load8(lpp.add(i)), T::load8(lqp.add(i)));
        let (ep, eq) = (exp8(p, tab), exp8(q, tab));
        let flags = _mm_loadl_epi64(vp.add(i) as *const __m128i);
        let v = _mm_test_epi8_mask(flags, flags) as __mmask8;
        let a = if TOKEN_ADV {
            _mm512_loadu_pd(at.add(i))
        } else {
            row_a
        };
        // Slow path: a bad value or an argument below TINY at a valid position.
        let mut ok = _mm512_mask_cmp_pd_mask::<_CMP_GE_OQ>(v, p, tiny);
        ok = _mm512_mask_cmp_pd_mask::<_CMP_LE_OQ>(ok, p, tol);
        ok = _mm512_mask_cmp_pd_mask::<_CMP_GE_OQ>(ok, q, tiny);
        ok = _mm512_mask_cmp_pd_mask::<_CMP_LE_OQ>(ok, q, tol);
        if TOKEN_ADV {
            let inf = c(f64::INFINITY);
            ok = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(ok, _mm512_andnot_pd(sign, a), inf);
        }
        bad |= v & !ok;
        let d = _mm512_andnot_pd(sign, _mm512_sub_pd(ep, eq));
        let d = _mm512_maskz_mov_pd(v, d);
        _mm512_storeu_pd(dp.add(i), d);
        // toward: valid & (a (p - q) <= 0), one byte per token.
        let tw =
            _mm512_mask_cmp_pd_mask::<_CMP_LE_OQ>(v, _mm512_mul_pd(a, _mm512_sub_pd(p, q)), zero);
        _mm_storel_epi64(
            tp.add(i) as *mut __m128i,
            _mm_maskz_mov_epi8(tw as __mmask16, ones8),
        );
        valid += (v as u32).count_ones();
        below += (_mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(v, d, low) as u32).count_ones();
        above += (_mm512_mask_cmp_pd_mask::<_CMP_GT_OQ>(v, d, high) as u32).count_ones();
        match W {
            LINEAR => {
                // position_weight: 1 - (1 - w_min) min(col / (T - 1), 1).
                let ratio = _mm512_div_pd(col, hm1);
                let w = _mm512_sub_pd(one, _mm512_mul_pd(omw, _mm512_min_pd(ratio, one)));
                _mm512_storeu_pd(wp.add(i), _mm512_maskz_mov_pd(v, w));
                col = _mm512_add_pd(col, eight);
            }
            ONES => _mm512_storeu_pd(wp.add(i), _mm512_maskz_mov_pd(v, one)),
            _ => debug_assert_eq!(W, SKIP),
        }
        i += 8;
        // u32 counters: flushed every 2^28 tokens.
        if i & ((1 << 28) - 1) == 0 {
            counts = add_counts(counts, valid, below, above);
            (valid, below, above) = (0, 0, 0);
        }
    }
    let counts = add_counts(counts, valid, below, above);
    let slow = bad != 0 || (counts.valid > 0 && !row_a_ok);
    let stats = TvStats {
        bad: false,
        tiny: false,
        counts,
    };
    (stats, slow)
}

#[inline(always)]
fn add_counts(c: WindowCounts, valid: u32, below: u32, above: u32) -> WindowCounts {
    WindowCounts {
        valid: c.valid + valid as usize,
        below: c.below + below as usize,
        above: c.above + above as usize,
    }
}
