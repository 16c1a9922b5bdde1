//! The Binary TV pass (`tv::tv_span`) for AVX2+FMA, for float32 and float64 log-probs,
//! in intrinsics.
//!
//! The loop is specialised for the weight mode and the kind of advantage (no branch
//! inside), keeps its counters in registers and advances a column vector instead of
//! converting the column each step. Until the sixth session its `exp` (the degree-13
//! form) was hand-allocated assembly: LLVM spilled about 45% of the loop's instructions
//! with 16 vector registers. `vexp`'s table form needs half the registers and is plain
//! intrinsics here (`exp4`), the table read by one load a lane; on the AMD EPYC (Zen 4)
//! it was measured on, with `CPPO_NATIVE_ISA=avx2`, the pass took 2.82-3.0 ns a token
//! against 2.72-2.82 with the assembly (docs/cpu.md). CPUs with AVX-512 run
//! `tv_avx512` instead.
//!
//! Same bits as the generic pass: every floating-point value is the same IEEE-754
//! operations in the same order (`vexp::exp_fast` lane by lane, the weights' division,
//! `a * (p - q) <= 0`), and the counts are integer sums
//! (`row::tests::tv_pass_variants_agree` compares the two exactly, with bad, tiny and
//! NaN values at valid and padding positions).
//!
//! Differences in form only: the input checks and `vexp::TINY` arguments raise one
//! "slow" flag (the span is then re-examined by the generic pass, which tells which
//! it was), and the direction bytes come from `movemask`.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::tv::{vector_pass, Span, TvConsts, TvStats, LINEAR, ONES, SKIP};
use super::{Advantage, Widen};
use crate::budget::WindowCounts;
use crate::divergence::LOG_PROB_TOLERANCE;
use crate::vexp;

/// Loads four log-probs as float64.
pub(super) trait Load4: Widen {
    /// # Safety
    /// `p` points at four readable elements; AVX2 is available.
    unsafe fn load4(p: *const Self) -> __m256d;
}

impl Load4 for f64 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f64) -> __m256d {
        _mm256_loadu_pd(p)
    }
}

impl Load4 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f32) -> __m256d {
        _mm256_cvtps_pd(_mm_loadu_ps(p))
    }
}

/// `vexp`'s table at the low four bits of each lane of `t`: one load a lane.
/// (`vgatherqpd` was slower on the AMD EPYC (Zen 4) this was measured on.)
///
/// # Safety
/// AVX2 is available.
#[inline(always)]
unsafe fn table4(t: __m256i) -> (__m256d, __m256d) {
    let mut j = [0u64; 4];
    _mm256_storeu_si256(j.as_mut_ptr() as *mut __m256i, t);
    let j = j.map(|j| (j & 15) as usize);
    let (hi, lo) = (&vexp::T_HI, &vexp::T_LO);
    (
        _mm256_setr_pd(hi[j[0]], hi[j[1]], hi[j[2]], hi[j[3]]),
        _mm256_setr_pd(lo[j[0]], lo[j[1]], lo[j[2]], lo[j[3]]),
    )
}

/// `vexp::exp_fast` of four lanes: the same operations in the same order, lane by
/// lane (`vexp::reduce`, `vexp::unscaled`, the scale added to the exponent bits).
///
/// # Safety
/// AVX2 and FMA are available.
#[inline(always)]
unsafe fn exp4(x: __m256d) -> __m256d {
    let c = _mm256_set1_pd;
    let shifter = c(vexp::SHIFTER);
    let t = _mm256_fmadd_pd(x, c(vexp::INV_LN2_16), shifter);
    let m = _mm256_sub_pd(t, shifter);
    let hi = _mm256_fnmadd_pd(m, c(vexp::LN2_16_HI), x);
    let r = _mm256_fnmadd_pd(m, c(vexp::LN2_16_LO), hi);
    let t = _mm256_castpd_si256(t);
    let (t_hi, t_lo) = table4(t);
    let q = &vexp::Q;
    let r2 = _mm256_mul_pd(r, r);
    let p01 = _mm256_fmadd_pd(c(q[1]), r, c(q[0]));
    let p23 = _mm256_fmadd_pd(c(q[3]), r, c(q[2]));
    let p45 = _mm256_fmadd_pd(c(q[5]), r, c(q[4]));
    let p03 = _mm256_fmadd_pd(p23, r2, p01);
    let r4 = _mm256_mul_pd(r2, r2);
    let q = _mm256_fmadd_pd(p45, r4, p03);
    let em1 = _mm256_fmadd_pd(r2, q, r);
    let y = _mm256_add_pd(t_hi, _mm256_fmadd_pd(t_hi, em1, t_lo));
    let scale = _mm256_slli_epi64::<52>(_mm256_srli_epi64::<4>(t));
    _mm256_castsi256_pd(_mm256_add_epi64(_mm256_castpd_si256(y), scale))
}

/// The pass over one span; `tv::tv_span`'s contract.
///
/// # Safety
/// AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tv_span_avx2<T: Load4>(k: &TvConsts, span: Span<T>) -> TvStats {
    vector_pass!(k, span, 4, steps4)
}

/// The pass over a span whose length is a multiple of four, for one weight mode
/// (`W`: `LINEAR`, `ONES` or `SKIP`) and one kind of advantage; returns the counts and
/// whether a valid position held a bad value or an argument below TINY.
#[inline(always)]
unsafe fn steps4<T: Load4, const W: u8, const TOKEN_ADV: bool>(
    k: &TvConsts,
    span: &mut Span<T>,
) -> (TvStats, bool) {
    let n = span.valid.len();
    let (tiny, tol) = (
        _mm256_set1_pd(vexp::TINY),
        _mm256_set1_pd(LOG_PROB_TOLERANCE),
    );
    let (low, high) = (_mm256_set1_pd(k.low), _mm256_set1_pd(k.high));
    let sign = _mm256_set1_pd(-0.0);
    let zero = _mm256_setzero_pd();
    let (hm1, omw, one) = (
        _mm256_set1_pd(k.horizon_m1),
        _mm256_set1_pd(k.one_minus_w_min),
        _mm256_set1_pd(1.0),
    );
    let (row_a, at) = match span.adv {
        Advantage::Row(a) => (a, [].as_ptr()),
        Advantage::Token(at) => (0.0, at.as_ptr()),
    };
    // A row's advantage is checked once: bad if it is not finite and a position is
    // valid (the same condition as the generic pass's).
    let row_a_ok = row_a.is_finite();
    let row_a = _mm256_set1_pd(row_a);
    // Columns as float64 (exact below 2^52): col0 + c, c = 4 i + lane.
    let mut col = _mm256_add_pd(
        _mm256_set1_pd(span.col0 as f64),
        _mm256_setr_pd(0.0, 1.0, 2.0, 3.0),
    );
    let four = _mm256_set1_pd(4.0);
    // all_ok: all ones while every valid lane passed the checks; counters subtract
    // the compare masks (-1 per counted lane).
    let mut all_ok = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    let (mut invalid, mut below, mut above) = (
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
    );
    let (lpp, lqp, vp) = (span.lp.as_ptr(), span.lq.as_ptr(), span.valid.as_ptr());
    let (dp, tp) = (span.div.as_mut_ptr(), span.toward.as_mut_ptr());
    let wp = span.weight.as_mut_ptr();
    let mut c = 0;
    while c < n {
        let (p, q) = (T::load4(lpp.add(c)), T::load4(lqp.add(c)));
        let (ep, eq) = (exp4(p), exp4(q));
        // inv: all ones where valid[c] == 0.
        let flags = (vp.add(c) as *const i32).read_unaligned();
        let inv = _mm256_castsi256_pd(_mm256_cmpeq_epi64(
            _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(flags)),
            _mm256_setzero_si256(),
        ));
        let a = if TOKEN_ADV {
            _mm256_loadu_pd(at.add(c))
        } else {
            row_a
        };
        // Slow path: a bad value or an argument below TINY at a valid position.
        let mut ok = _mm256_and_pd(
            _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(p, tiny),
                _mm256_cmp_pd::<_CMP_LE_OQ>(p, tol),
            ),
            _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(q, tiny),
                _mm256_cmp_pd::<_CMP_LE_OQ>(q, tol),
            ),
        );
        if TOKEN_ADV {
            let inf = _mm256_set1_pd(f64::INFINITY);
            ok = _mm256_and_pd(
                ok,
                _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_andnot_pd(sign, a), inf),
            );
        }
        all_ok = _mm256_and_pd(all_ok, _mm256_or_pd(ok, inv));
        let d = _mm256_andnot_pd(sign, _mm256_sub_pd(ep, eq));
        let d = _mm256_andnot_pd(inv, d);
        _mm256_storeu_pd(dp.add(c), d);
        // toward: valid & (a (p - q) <= 0), one byte per token.
        let tw = _mm256_andnot_pd(
            inv,
            _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(a, _mm256_sub_pd(p, q)), zero),
        );
        let bits = _mm256_movemask_pd(tw) as u32;
        (tp.add(c) as *mut u32).write_unaligned((bits.wrapping_mul(0x0020_4081)) & 0x0101_0101);
        invalid = _mm256_sub_epi64(invalid, _mm256_castpd_si256(inv));
        below = _mm256_sub_epi64(
            below,
            _mm256_castpd_si256(_mm256_andnot_pd(inv, _mm256_cmp_pd::<_CMP_LT_OQ>(d, low))),
        );
        above = _mm256_sub_epi64(
            above,
            _mm256_castpd_si256(_mm256_andnot_pd(inv, _mm256_cmp_pd::<_CMP_GT_OQ>(d, high))),
        );
        match W {
            LINEAR => {
                // position_weight: 1 - (1 - w_min) min(col / (T - 1), 1).
                let ratio = _mm256_div_pd(col, hm1);
                let w = _mm256_sub_pd(one, _mm256_mul_pd(omw, _mm256_min_pd(ratio, one)));
                _mm256_storeu_pd(wp.add(c), _mm256_andnot_pd(inv, w));
                col = _mm256_add_pd(col, four);
            }
            ONES => _mm256_storeu_pd(wp.add(c), _mm256_andnot_pd(inv, one)),
            _ => debug_assert_eq!(W, SKIP),
        }
        c += 4;
    }
    let sum = |x: __m256i| {
        let mut l = [0u64; 4];
        _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, x);
        (l[0] + l[1] + l[2] + l[3]) as usize
    };
    let valid = n - sum(invalid);
    let slow = _mm256_movemask_pd(all_ok) != 0b1111 || (valid > 0 && !row_a_ok);
    let stats = TvStats {
        bad: false,
        tiny: false,
        counts: WindowCounts {
            valid,
            below: sum(below),
            above: sum(above),
        },
    };
    (stats, slow)
}
