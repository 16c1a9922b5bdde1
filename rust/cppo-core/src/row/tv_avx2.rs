//! The Binary TV pass (`tv::tv_span`) written with AVX2+FMA intrinsics, for float32 and
//! float64 log-probs. LLVM's vectorisation of the generic loop for AVX2 (16 vector
//! registers) spent ~45 instructions a token on spills, constant re-broadcasts and
//! byte/word shuffles for the valid flags, the direction bytes and the counts; on an
//! AMD EPYC (Zen 3) it ran at ~6.5 ns a token, this at ~4 (`examples/tv_bench.rs`).
//! Eight tokens a step: the four `exp` evaluations (p and q of two groups of four) are
//! interleaved operation by operation, each being a latency chain of ~45 cycles
//! (Horner's form of the polynomial, a chain of 11 FMAs, ran 1.6x slower here).
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

use super::tv::{tv_span, Span, TvConsts, TvStats, Weights};
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

/// `vexp::exp_fast` on N vectors of four lanes: the same operations in the same order
/// for each lane; the N evaluations are interleaved operation by operation (each is a
/// latency chain of ~45 cycles).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp4n<const N: usize>(kc: &[__m256d; 12], x: [__m256d; N]) -> [__m256d; N] {
    macro_rules! each {
        (|$i:ident| $e:expr) => {{
            let mut out = [_mm256_setzero_pd(); N];
            for $i in 0..N {
                out[$i] = $e;
            }
            out
        }};
    }
    let c = |i: usize| kc[i];
    let t = each!(|i| _mm256_fmadd_pd(
        x[i],
        _mm256_set1_pd(vexp::LOG2E),
        _mm256_set1_pd(vexp::SHIFTER)
    ));
    let k = each!(|i| _mm256_sub_pd(t[i], _mm256_set1_pd(vexp::SHIFTER)));
    // (-k).mul_add(c, y) = fma(-k, c, y) = -(k c) + y: fnmadd (negation is exact).
    let hi = each!(|i| _mm256_fnmadd_pd(k[i], _mm256_set1_pd(vexp::LN2_HI), x[i]));
    let r = each!(|i| _mm256_fnmadd_pd(k[i], _mm256_set1_pd(vexp::LN2_LO), hi[i]));
    let r2 = each!(|i| _mm256_mul_pd(r[i], r[i]));
    let p01 = each!(|i| _mm256_fmadd_pd(c(1), r[i], c(0)));
    let p23 = each!(|i| _mm256_fmadd_pd(c(3), r[i], c(2)));
    let p45 = each!(|i| _mm256_fmadd_pd(c(5), r[i], c(4)));
    let p67 = each!(|i| _mm256_fmadd_pd(c(7), r[i], c(6)));
    let p89 = each!(|i| _mm256_fmadd_pd(c(9), r[i], c(8)));
    let p1011 = each!(|i| _mm256_fmadd_pd(c(11), r[i], c(10)));
    let r4 = each!(|i| _mm256_mul_pd(r2[i], r2[i]));
    let p03 = each!(|i| _mm256_fmadd_pd(p23[i], r2[i], p01[i]));
    let p47 = each!(|i| _mm256_fmadd_pd(p67[i], r2[i], p45[i]));
    let p811 = each!(|i| _mm256_fmadd_pd(p1011[i], r2[i], p89[i]));
    let r8 = each!(|i| _mm256_mul_pd(r4[i], r4[i]));
    let p07 = each!(|i| _mm256_fmadd_pd(p47[i], r4[i], p03[i]));
    let q = each!(|i| _mm256_fmadd_pd(p811[i], r8[i], p07[i]));
    let r_lo = each!(|i| _mm256_fnmadd_pd(
        k[i],
        _mm256_set1_pd(vexp::LN2_LO),
        _mm256_sub_pd(hi[i], r[i])
    ));
    let one = _mm256_set1_pd(1.0);
    let h = each!(|i| _mm256_add_pd(one, r[i]));
    let lo = each!(|i| _mm256_add_pd(_mm256_sub_pd(one, h[i]), r[i]));
    each!(|i| {
        let e = _mm256_add_pd(
            h[i],
            _mm256_add_pd(lo[i], _mm256_fmadd_pd(r2[i], q[i], r_lo[i])),
        );
        let scale = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_add_epi64(
            _mm256_castpd_si256(t[i]),
            _mm256_set1_epi64x(1023),
        )));
        _mm256_mul_pd(e, scale)
    })
}

/// Four lanes' running state.
struct Acc {
    slow: __m256d,
    valid: __m256i,
    below: __m256i,
    above: __m256i,
}

/// The pass over one span; `tv::tv_span`'s contract.
///
/// # Safety
/// AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tv_span_avx2<T: Load4>(k: &TvConsts, span: Span<T>) -> TvStats {
    let span = span.fit(k.weights);
    let (n, col0) = (span.valid.len(), span.col0);
    let (adv_token, adv_row) = match span.adv {
        Advantage::Token(a) => (Some(a), 0.0),
        Advantage::Row(a) => (None, a),
    };
    let steps = n / 4;
    let zero = _mm256_setzero_pd();
    let (tiny, tol) = (
        _mm256_set1_pd(vexp::TINY),
        _mm256_set1_pd(LOG_PROB_TOLERANCE),
    );
    let (low, high) = (_mm256_set1_pd(k.low), _mm256_set1_pd(k.high));
    let sign = _mm256_set1_pd(-0.0);
    let inf = _mm256_set1_pd(f64::INFINITY);
    let (hm1, omw, one) = (
        _mm256_set1_pd(k.horizon_m1),
        _mm256_set1_pd(k.one_minus_w_min),
        _mm256_set1_pd(1.0),
    );
    let row_a = _mm256_set1_pd(adv_row);
    // Columns as float64 (exact below 2^52): col0 + c, c = 4 i + lane.
    let col_base = _mm256_add_pd(
        _mm256_set1_pd(col0 as f64),
        _mm256_setr_pd(0.0, 1.0, 2.0, 3.0),
    );
    // The polynomial's coefficients, opaque to the compiler: read as memory operands
    // instead of re-broadcast before every use (AVX2 has 16 vector registers).
    let kc: [__m256d; 12] =
        std::hint::black_box(std::array::from_fn(|i| _mm256_set1_pd(vexp::C[i])));
    let mut acc = Acc {
        slow: zero,
        valid: _mm256_setzero_si256(),
        below: _mm256_setzero_si256(),
        above: _mm256_setzero_si256(),
    };
    let (lpp, lqp, vp) = (span.lp.as_ptr(), span.lq.as_ptr(), span.valid.as_ptr());
    let (dp, tp) = (span.div.as_mut_ptr(), span.toward.as_mut_ptr());
    let wp = span.weight.as_mut_ptr();
    // One step: four tokens from `c` (a macro: a closure would not be compiled with
    // this function's target features, nor inlined).
    macro_rules! step {
        ($c:expr, $acc:expr, $p:expr, $q:expr, $ep:expr, $eq:expr) => {{
            let (c, acc): (usize, &mut Acc) = ($c, $acc);
            let (p, q, ep, eq) = ($p, $q, $ep, $eq);
            let a = match adv_token {
                Some(at) => _mm256_loadu_pd(at.as_ptr().add(c)),
                None => row_a,
            };
            let flags = (vp.add(c) as *const u32).read_unaligned();
            // v: all ones where valid[c] != 0.
            let vi = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(flags as i32));
            let v = _mm256_castsi256_pd(_mm256_xor_si256(
                _mm256_cmpeq_epi64(vi, _mm256_setzero_si256()),
                _mm256_set1_epi64x(-1),
            ));
            // Slow path: a bad value or an argument below TINY at a valid position.
            let ok_p = _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(p, tiny),
                _mm256_cmp_pd::<_CMP_LE_OQ>(p, tol),
            );
            let ok_q = _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_GE_OQ>(q, tiny),
                _mm256_cmp_pd::<_CMP_LE_OQ>(q, tol),
            );
            let ok_a = _mm256_cmp_pd::<_CMP_LT_OQ>(_mm256_andnot_pd(sign, a), inf);
            let ok = _mm256_and_pd(_mm256_and_pd(ok_p, ok_q), ok_a);
            acc.slow = _mm256_or_pd(acc.slow, _mm256_andnot_pd(ok, v));
            let d = _mm256_andnot_pd(sign, _mm256_sub_pd(ep, eq));
            let d = _mm256_and_pd(d, v);
            _mm256_storeu_pd(dp.add(c), d);
            // toward: v & (a (p - q) <= 0), one byte per token.
            let tw = _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_LE_OQ>(_mm256_mul_pd(a, _mm256_sub_pd(p, q)), zero),
                v,
            );
            let bits = _mm256_movemask_pd(tw) as u32;
            (tp.add(c) as *mut u32).write_unaligned((bits.wrapping_mul(0x0020_4081)) & 0x0101_0101);
            // Counts: the compare masks are -1 per counted lane.
            let vi = _mm256_castpd_si256(v);
            acc.valid = _mm256_sub_epi64(acc.valid, vi);
            acc.below = _mm256_sub_epi64(
                acc.below,
                _mm256_castpd_si256(_mm256_and_pd(_mm256_cmp_pd::<_CMP_LT_OQ>(d, low), v)),
            );
            acc.above = _mm256_sub_epi64(
                acc.above,
                _mm256_castpd_si256(_mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(d, high), v)),
            );
            match k.weights {
                Weights::Linear => {
                    let col = _mm256_add_pd(col_base, _mm256_set1_pd(c as f64));
                    let ratio = _mm256_div_pd(col, hm1);
                    let w = _mm256_sub_pd(one, _mm256_mul_pd(omw, _mm256_min_pd(ratio, one)));
                    _mm256_storeu_pd(wp.add(c), _mm256_and_pd(w, v));
                }
                Weights::Ones => _mm256_storeu_pd(wp.add(c), _mm256_and_pd(one, v)),
                Weights::Skip => {}
            }
        }};
    }
    let mut i = 0;
    while i + 2 <= steps {
        let (c0, c1) = (4 * i, 4 * i + 4);
        let (p0, q0) = (T::load4(lpp.add(c0)), T::load4(lqp.add(c0)));
        let (p1, q1) = (T::load4(lpp.add(c1)), T::load4(lqp.add(c1)));
        let [ep0, eq0, ep1, eq1] = exp4n(&kc, [p0, q0, p1, q1]);
        step!(c0, &mut acc, p0, q0, ep0, eq0);
        step!(c1, &mut acc, p1, q1, ep1, eq1);
        i += 2;
    }
    if i < steps {
        let c0 = 4 * i;
        let (p0, q0) = (T::load4(lpp.add(c0)), T::load4(lqp.add(c0)));
        let [ep0, eq0] = exp4n(&kc, [p0, q0]);
        step!(c0, &mut acc, p0, q0, ep0, eq0);
    }
    let sum = |x: __m256i| {
        let mut l = [0u64; 4];
        _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, x);
        (l[0] + l[1] + l[2] + l[3]) as usize
    };
    let slow = _mm256_movemask_pd(acc.slow) != 0;
    let body = TvStats {
        bad: false,
        tiny: false,
        counts: WindowCounts {
            valid: sum(acc.valid),
            below: sum(acc.below),
            above: sum(acc.above),
        },
    };
    let (head, tail) = span.split_at(4 * steps);
    let tail = tv_span(k, tail);
    if !slow {
        return body.merge(tail);
    }
    // Rare: re-run the generic pass over the body, which says whether a value was bad
    // or only below TINY (same outputs, same counts).
    tv_span(k, head).merge(tail)
}
