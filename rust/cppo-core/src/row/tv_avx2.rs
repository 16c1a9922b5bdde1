//! The Binary TV pass (`tv::tv_span`) for AVX2+FMA, for float32 and float64 log-probs:
//! its `exp` in hand-allocated assembly, the rest in intrinsics.
//!
//! Why assembly: LLVM's register allocation of interleaved `exp` evaluations for AVX2
//! (16 vector registers, no broadcast memory operands) spent about 45% of the loop's
//! instructions on spills, reloads and register copies (~47 instructions a token,
//! callgrind), whatever the source's order. `exp_pair` below evaluates two vectors in
//! twelve registers with no spill; the loop around it is specialised for the weight mode
//! and the kind of advantage (no branch inside), keeps its counters in registers and
//! advances a column vector instead of converting the column each step: ~33
//! instructions a token, and the pass ~25% faster on an AMD EPYC (Zen 3)
//! (`examples/tv_bench.rs`; docs/cpu.md).
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
use std::mem::MaybeUninit;

use super::tv::{tv_span, Span, TvConsts, TvStats, Weights};
use super::{Advantage, Widen};
use crate::budget::WindowCounts;
use crate::divergence::LOG_PROB_TOLERANCE;
use crate::vexp;

/// Loads four log-probs as float64.
pub(super) trait Load4: Widen {
    /// float32 (else float64).
    const F32: bool;
    /// # Safety
    /// `p` points at four readable elements; AVX2 is available.
    unsafe fn load4(p: *const Self) -> __m256d;
}

impl Load4 for f64 {
    const F32: bool = false;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f64) -> __m256d {
        _mm256_loadu_pd(p)
    }
}

impl Load4 for f32 {
    const F32: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load4(p: *const f32) -> __m256d {
        _mm256_cvtps_pd(_mm_loadu_ps(p))
    }
}

/// `exp_pair`'s constants, each in four lanes (read as memory operands). Byte offsets:
/// 0 LOG2E, 32 SHIFTER, 64 LN2_HI, 96 LN2_LO, 128 1.0, 160 + 32 i the
/// polynomial's C[i].
#[repr(C, align(32))]
struct ExpConsts([[f64; 4]; 17]);

static EXP_CONSTS: ExpConsts = {
    let head = [vexp::LOG2E, vexp::SHIFTER, vexp::LN2_HI, vexp::LN2_LO, 1.0];
    let mut t = [[0.0; 4]; 17];
    let mut i = 0;
    while i < 17 {
        t[i] = [if i < 5 { head[i] } else { vexp::C[i - 5] }; 4];
        i += 1;
    }
    ExpConsts(t)
};

/// `vexp::exp_fast` of the four log-probs at `p0` and of the four at `p1`, widened to
/// float64: the same operations in the same order, lane by lane (`vexp::reduce`,
/// `vexp::exp_reduced`), the two evaluations interleaved instruction by instruction.
/// Twelve vector registers, no spill: every constant is a memory operand, and the two
/// values of each evaluation that wait longest (k << 52 and r_lo) go to a stack slot and
/// come back as memory operands. The log-probs are loaded here: the caller reloads them
/// after, rather than have them kept in registers across the block.
///
/// One difference in form: the scale 2^k is applied by adding k << 52 to the bits of
/// exp(r) (in [0.70, 1.42]) instead of multiplying by 2^k. For x >= `vexp::TINY` the
/// product is a normal number, so the two are the same bits (the pass takes the slow
/// path below TINY).
///
/// # Safety
/// `p0` and `p1` each point at four readable elements; AVX2 and FMA are available.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_pair<T: Load4>(p0: *const T, p1: *const T) -> (__m256d, __m256d) {
    let mut slot = MaybeUninit::<[__m256d; 4]>::uninit();
    let (x0, x1): (__m256d, __m256d);
    // SAFETY (the block below): it reads four elements at p0 and at p1 (the caller's
    // contract), EXP_CONSTS (32-byte aligned, 544 bytes) and `slot` (32-byte aligned, 128
    // bytes), which it writes before reading; it touches no other memory, no stack and
    // no flags, and every vector register it writes is an operand.
    macro_rules! exp_asm {
        ($load:literal) => {
            std::arch::asm!(
                concat!($load, " {x0}, [{p0}]"),
                concat!($load, " {x1}, [{p1}]"),
                // t = fma(x, LOG2E, SHIFTER); kk = t - SHIFTER (in a)
                "vmovapd {t0}, [{k} + 32]",
                "vmovapd {t1}, [{k} + 32]",
                "vfmadd231pd {t0}, {x0}, [{k}]",
                "vfmadd231pd {t1}, {x1}, [{k}]",
                "vsubpd {a0}, {t0}, [{k} + 32]",
                "vsubpd {a1}, {t1}, [{k} + 32]",
                // hi = fma(-kk, LN2_HI, x) (in x)
                "vfnmadd231pd {x0}, {a0}, [{k} + 64]",
                "vfnmadd231pd {x1}, {a1}, [{k} + 64]",
                // k << 52 (the low bits of t hold k), to slot 0
                "vpsllq {t0}, {t0}, 52",
                "vpsllq {t1}, {t1}, 52",
                "vmovapd [{s}], {t0}",
                "vmovapd [{s} + 64], {t1}",
                // r = fma(-kk, LN2_LO, hi)
                "vmovapd {r0}, {x0}",
                "vmovapd {r1}, {x1}",
                "vfnmadd231pd {r0}, {a0}, [{k} + 96]",
                "vfnmadd231pd {r1}, {a1}, [{k} + 96]",
                // r_lo = fma(-kk, LN2_LO, hi - r), to slot 1
                "vsubpd {x0}, {x0}, {r0}",
                "vsubpd {x1}, {x1}, {r1}",
                "vfnmadd231pd {x0}, {a0}, [{k} + 96]",
                "vfnmadd231pd {x1}, {a1}, [{k} + 96]",
                "vmovapd [{s} + 32], {x0}",
                "vmovapd [{s} + 96], {x1}",
                // r2 (t); p01 = fma(C1, r, C0) (a); p23 (b); p03 = fma(p23, r2, p01) (a)
                "vmulpd {t0}, {r0}, {r0}",
                "vmulpd {t1}, {r1}, {r1}",
                "vmovapd {a0}, [{k} + 160]",
                "vmovapd {a1}, [{k} + 160]",
                "vfmadd231pd {a0}, {r0}, [{k} + 192]",
                "vfmadd231pd {a1}, {r1}, [{k} + 192]",
                "vmovapd {b0}, [{k} + 224]",
                "vmovapd {b1}, [{k} + 224]",
                "vfmadd231pd {b0}, {r0}, [{k} + 256]",
                "vfmadd231pd {b1}, {r1}, [{k} + 256]",
                "vfmadd231pd {a0}, {b0}, {t0}",
                "vfmadd231pd {a1}, {b1}, {t1}",
                // p45 (b); p67 (c); p47 = fma(p67, r2, p45) (b)
                "vmovapd {b0}, [{k} + 288]",
                "vmovapd {b1}, [{k} + 288]",
                "vfmadd231pd {b0}, {r0}, [{k} + 320]",
                "vfmadd231pd {b1}, {r1}, [{k} + 320]",
                "vmovapd {c0}, [{k} + 352]",
                "vmovapd {c1}, [{k} + 352]",
                "vfmadd231pd {c0}, {r0}, [{k} + 384]",
                "vfmadd231pd {c1}, {r1}, [{k} + 384]",
                "vfmadd231pd {b0}, {c0}, {t0}",
                "vfmadd231pd {b1}, {c1}, {t1}",
                // r4 (x); p07 = fma(p47, r4, p03) (a)
                "vmulpd {x0}, {t0}, {t0}",
                "vmulpd {x1}, {t1}, {t1}",
                "vfmadd231pd {a0}, {b0}, {x0}",
                "vfmadd231pd {a1}, {b1}, {x1}",
                // p89 (b); p1011 (c); p811 = fma(p1011, r2, p89) (b)
                "vmovapd {b0}, [{k} + 416]",
                "vmovapd {b1}, [{k} + 416]",
                "vfmadd231pd {b0}, {r0}, [{k} + 448]",
                "vfmadd231pd {b1}, {r1}, [{k} + 448]",
                "vmovapd {c0}, [{k} + 480]",
                "vmovapd {c1}, [{k} + 480]",
                "vfmadd231pd {c0}, {r0}, [{k} + 512]",
                "vfmadd231pd {c1}, {r1}, [{k} + 512]",
                "vfmadd231pd {b0}, {c0}, {t0}",
                "vfmadd231pd {b1}, {c1}, {t1}",
                // r8 (x); q = fma(p811, r8, p07) (a)
                "vmulpd {x0}, {x0}, {x0}",
                "vmulpd {x1}, {x1}, {x1}",
                "vfmadd231pd {a0}, {b0}, {x0}",
                "vfmadd231pd {a1}, {b1}, {x1}",
                // a = fma(r2, q, r_lo)
                "vfmadd213pd {a0}, {t0}, [{s} + 32]",
                "vfmadd213pd {a1}, {t1}, [{s} + 96]",
                // h = 1 + r (b); lo = (1 - h) + r (c); e = h + (lo + a); x = e * scale
                "vaddpd {b0}, {r0}, [{k} + 128]",
                "vaddpd {b1}, {r1}, [{k} + 128]",
                "vmovapd {c0}, [{k} + 128]",
                "vmovapd {c1}, [{k} + 128]",
                "vsubpd {c0}, {c0}, {b0}",
                "vsubpd {c1}, {c1}, {b1}",
                "vaddpd {c0}, {c0}, {r0}",
                "vaddpd {c1}, {c1}, {r1}",
                "vaddpd {c0}, {c0}, {a0}",
                "vaddpd {c1}, {c1}, {a1}",
                "vaddpd {b0}, {b0}, {c0}",
                "vaddpd {b1}, {b1}, {c1}",
                "vpaddq {x0}, {b0}, [{s}]",
                "vpaddq {x1}, {b1}, [{s} + 64]",
                k = in(reg) EXP_CONSTS.0.as_ptr(),
                s = in(reg) slot.as_mut_ptr(),
                p0 = in(reg) p0,
                p1 = in(reg) p1,
                x0 = out(ymm_reg) x0,
                x1 = out(ymm_reg) x1,
                t0 = out(ymm_reg) _,
                r0 = out(ymm_reg) _,
                a0 = out(ymm_reg) _,
                b0 = out(ymm_reg) _,
                c0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                r1 = out(ymm_reg) _,
                a1 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                c1 = out(ymm_reg) _,
                options(nostack, preserves_flags),
            )
        };
    }
    if T::F32 {
        exp_asm!("vcvtps2pd")
    } else {
        exp_asm!("vmovupd")
    }
    (x0, x1)
}

/// The pass over one span; `tv::tv_span`'s contract.
///
/// # Safety
/// AVX2 and FMA are available.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn tv_span_avx2<T: Load4>(k: &TvConsts, span: Span<T>) -> TvStats {
    let span = span.fit(k.weights);
    let steps = span.valid.len() / 4;
    let (mut head, tail) = span.split_at(4 * steps);
    let (body, slow) = match (k.weights, head.adv) {
        (Weights::Linear, Advantage::Row(_)) => steps_avx2::<T, LINEAR, false>(k, &mut head),
        (Weights::Linear, Advantage::Token(_)) => steps_avx2::<T, LINEAR, true>(k, &mut head),
        (Weights::Ones, Advantage::Row(_)) => steps_avx2::<T, ONES, false>(k, &mut head),
        (Weights::Ones, Advantage::Token(_)) => steps_avx2::<T, ONES, true>(k, &mut head),
        (Weights::Skip, Advantage::Row(_)) => steps_avx2::<T, SKIP, false>(k, &mut head),
        (Weights::Skip, Advantage::Token(_)) => steps_avx2::<T, SKIP, true>(k, &mut head),
    };
    let tail = tv_span(k, tail);
    if !slow {
        return body.merge(tail);
    }
    // Rare: re-run the generic pass over the body, which says whether a value was bad
    // or only below TINY (same outputs, same counts).
    tv_span(k, head).merge(tail)
}

/// `Weights` as a const generic parameter of `steps_avx2` (an enum cannot be one).
const LINEAR: u8 = 0;
const ONES: u8 = 1;
const SKIP: u8 = 2;

/// The pass over a span whose length is a multiple of four, for one weight mode
/// (`W`: `LINEAR`, `ONES` or `SKIP`) and one kind of advantage; returns the counts and
/// whether a valid position held a bad value or an argument below TINY.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn steps_avx2<T: Load4, const W: u8, const TOKEN_ADV: bool>(
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
        let (ep, eq) = exp_pair(lpp.add(c), lqp.add(c));
        let (p, q) = (T::load4(lpp.add(c)), T::load4(lqp.add(c)));
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
