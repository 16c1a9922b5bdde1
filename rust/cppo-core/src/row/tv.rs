//! The Binary TV pass over a row's window, branch-free so that it vectorises: the
//! input checks, D_t = |exp(lp_t) - exp(lq_t)| with `vexp` (accurate to 1 ulp; the
//! spec's agreement rule applies), the direction test, the position weights v_t w_t
//! and the adaptive budget's window counts, in one loop. It works on any span of the
//! window (`col0` = the span's first column), so a long row's pass can be split into
//! fixed-size chunks run on several threads: every output element depends on its own
//! position only, and the counts are integer sums, so the result does not depend on the
//! split.

use super::{bad_log_prob, Advantage, Isa, Widen};
use crate::budget::WindowCounts;
use crate::vexp;

/// What the pass writes as weights.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Weights {
    /// Paper Eq. 9 with horizon T > 1.
    Linear,
    /// w = 1 (position weight off, or T <= 1).
    Ones,
    /// Not written (the shuffled ablation fills them afterwards).
    Skip,
}

/// The pass's per-row constants.
pub(super) struct TvConsts {
    /// The adaptive budget's clamp window on D (`budget::clamp_window`), or +-inf.
    pub low: f64,
    pub high: f64,
    pub weights: Weights,
    /// (T - 1) as f64 and 1 - w_min, for `Weights::Linear`.
    pub horizon_m1: f64,
    pub one_minus_w_min: f64,
}

/// What a span's pass found: a bad value somewhere (the caller locates the first one),
/// an argument below `vexp::TINY` (the caller recomputes those), and the counts.
#[derive(Clone, Copy, Default)]
pub(super) struct TvStats {
    pub bad: bool,
    pub tiny: bool,
    pub counts: WindowCounts,
}

impl TvStats {
    pub fn merge(self, o: TvStats) -> TvStats {
        TvStats {
            bad: self.bad | o.bad,
            tiny: self.tiny | o.tiny,
            counts: WindowCounts {
                valid: self.counts.valid + o.counts.valid,
                below: self.counts.below + o.counts.below,
                above: self.counts.above + o.counts.above,
            },
        }
    }
}

/// `col as f64` for col < 2^52, by bits (integer ops vectorise on every target).
#[inline(always)]
fn col_f64(col: u64) -> f64 {
    f64::from_bits(0x4330_0000_0000_0000 | col) - 4_503_599_627_370_496.0
}

/// One span of a row's window for the pass: its first column, the inputs and the
/// outputs, all of the span's length (`weight` may be empty under `Weights::Skip`).
pub(super) struct Span<'a, T> {
    pub col0: usize,
    pub lp: &'a [T],
    pub lq: &'a [T],
    pub adv: Advantage<'a>,
    pub valid: &'a [u8],
    pub div: &'a mut [f64],
    pub toward: &'a mut [u8],
    pub weight: &'a mut [f64],
}

impl<'a, T> Span<'a, T> {
    /// Every slice cut to `valid`'s length; `weight` to none under `Weights::Skip`.
    #[inline(always)]
    pub fn fit(self, weights: Weights) -> Self {
        let n = self.valid.len();
        let w = if weights == Weights::Skip { 0 } else { n };
        Span {
            col0: self.col0,
            lp: &self.lp[..n],
            lq: &self.lq[..n],
            adv: self.adv.sub(0..n),
            valid: self.valid,
            div: &mut self.div[..n],
            toward: &mut self.toward[..n],
            weight: &mut self.weight[..w],
        }
    }

    /// The span's first `mid` positions and the rest (a fitted span; used by the AVX2
    /// pass for its tail and its slow path).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    #[inline(always)]
    pub fn split_at(self, mid: usize) -> (Self, Self) {
        let n = self.valid.len();
        let (lp, lp2) = self.lp.split_at(mid);
        let (lq, lq2) = self.lq.split_at(mid);
        let (valid, valid2) = self.valid.split_at(mid);
        let (div, div2) = self.div.split_at_mut(mid);
        let (toward, toward2) = self.toward.split_at_mut(mid);
        let (weight, weight2) = self.weight.split_at_mut(mid.min(self.weight.len()));
        (
            Span {
                col0: self.col0,
                lp,
                lq,
                adv: self.adv.sub(0..mid),
                valid,
                div,
                toward,
                weight,
            },
            Span {
                col0: self.col0 + mid,
                lp: lp2,
                lq: lq2,
                adv: self.adv.sub(mid..n),
                valid: valid2,
                div: div2,
                toward: toward2,
                weight: weight2,
            },
        )
    }
}

/// The pass over one span.
#[inline(always)]
pub(super) fn tv_span<T: Widen>(k: &TvConsts, span: Span<T>) -> TvStats {
    let Span {
        col0,
        lp,
        lq,
        adv,
        valid,
        div,
        toward,
        weight,
    } = span.fit(k.weights);
    let n = valid.len();
    debug_assert!(((col0 + n) as u64) < (1u64 << 52));
    macro_rules! pass {
        ($adv:expr, $weights:expr) => {{
            let (mut bad, mut tiny) = (0u8, 0u8);
            let mut wc = WindowCounts::default();
            for c in 0..n {
                let v = valid[c] != 0;
                let (p, q, a) = (lp[c].widen(), lq[c].widen(), $adv(c));
                bad |= (v & (bad_log_prob(p) | bad_log_prob(q) | !f64::is_finite(a))) as u8;
                tiny |= (v & ((p < vexp::TINY) | (q < vexp::TINY))) as u8;
                let d = (vexp::exp_fast(p) - vexp::exp_fast(q)).abs();
                let d = if v { d } else { 0.0 };
                div[c] = d;
                toward[c] = (v & (a * (p - q) <= 0.0)) as u8;
                wc.valid += v as usize;
                wc.below += (v & (d < k.low)) as usize;
                wc.above += (v & (d > k.high)) as usize;
                match $weights {
                    Weights::Linear => {
                        // position_weight(col0 + c, T, w_min), the same operations.
                        let ratio = col_f64((col0 + c) as u64) / k.horizon_m1;
                        let w = 1.0 - k.one_minus_w_min * ratio.min(1.0);
                        weight[c] = if v { w } else { 0.0 };
                    }
                    Weights::Ones => weight[c] = if v { 1.0 } else { 0.0 },
                    Weights::Skip => {}
                }
            }
            TvStats {
                bad: bad != 0,
                tiny: tiny != 0,
                counts: wc,
            }
        }};
    }
    macro_rules! with_weights {
        ($adv:expr) => {
            match k.weights {
                Weights::Linear => pass!($adv, Weights::Linear),
                Weights::Ones => pass!($adv, Weights::Ones),
                Weights::Skip => pass!($adv, Weights::Skip),
            }
        };
    }
    match adv {
        Advantage::Row(a) => with_weights!(|_c: usize| a),
        Advantage::Token(adv) => with_weights!(|c: usize| adv[c]),
    }
}

/// `Weights` as a const generic parameter of the vector passes' step loops (an enum
/// cannot be one).
#[cfg(target_arch = "x86_64")]
pub(super) const LINEAR: u8 = 0;
#[cfg(target_arch = "x86_64")]
pub(super) const ONES: u8 = 1;
#[cfg(target_arch = "x86_64")]
pub(super) const SKIP: u8 = 2;

/// The body of a vector pass over one span (`tv_avx2`, `tv_avx512`; `tv_span`'s
/// contract): the span's first multiple of `$width` positions by
/// `$steps::<T, W, TOKEN_ADV>(k, &mut head) -> (TvStats, slow)`, specialised for the
/// weight mode and the kind of advantage, the rest by the generic pass; where `slow`
/// (a bad value or an argument below TINY at a valid position, rare), the generic pass
/// re-runs the body and says which it was (same outputs, same counts).
#[cfg(target_arch = "x86_64")]
macro_rules! vector_pass {
    ($k:expr, $span:expr, $width:expr, $steps:ident) => {{
        use super::tv::{tv_span, Weights, LINEAR, ONES, SKIP};
        let (k, span) = ($k, $span.fit($k.weights));
        let steps = span.valid.len() / $width;
        let (mut head, tail) = span.split_at($width * steps);
        let (body, slow) = match (k.weights, head.adv) {
            (Weights::Linear, Advantage::Row(_)) => $steps::<T, LINEAR, false>(k, &mut head),
            (Weights::Linear, Advantage::Token(_)) => $steps::<T, LINEAR, true>(k, &mut head),
            (Weights::Ones, Advantage::Row(_)) => $steps::<T, ONES, false>(k, &mut head),
            (Weights::Ones, Advantage::Token(_)) => $steps::<T, ONES, true>(k, &mut head),
            (Weights::Skip, Advantage::Row(_)) => $steps::<T, SKIP, false>(k, &mut head),
            (Weights::Skip, Advantage::Token(_)) => $steps::<T, SKIP, true>(k, &mut head),
        };
        let tail = tv_span(k, tail);
        if slow {
            tv_span(k, head).merge(tail)
        } else {
            body.merge(tail)
        }
    }};
}
#[cfg(target_arch = "x86_64")]
pub(super) use vector_pass;

/// `tv_span` for the variant `isa` (inlined into a variant's code): with AVX2 or
/// AVX-512 and float32 or float64 log-probs, the intrinsics version (`tv_avx2`,
/// `tv_avx512`; the same bits);
/// otherwise the generic loop compiled for the variant.
#[inline(always)]
pub(super) fn tv_span_for<T: Widen>(isa: Isa, k: &TvConsts, span: Span<T>) -> TvStats {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.supported() {
        use std::any::TypeId;
        macro_rules! avx2_as {
            ($t:ty) => {
                if TypeId::of::<T>() == TypeId::of::<$t>() {
                    // SAFETY: T is $t (same type id), so the slices reinterpret exactly;
                    // the CPU has the variant's features (checked above).
                    unsafe {
                        let cast =
                            |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const $t, s.len());
                        let span = Span {
                            col0: span.col0,
                            lp: cast(span.lp),
                            lq: cast(span.lq),
                            adv: span.adv,
                            valid: span.valid,
                            div: span.div,
                            toward: span.toward,
                            weight: span.weight,
                        };
                        return if isa == Isa::Avx512 {
                            super::tv_avx512::tv_span_avx512(k, span)
                        } else {
                            super::tv_avx2::tv_span_avx2(k, span)
                        };
                    }
                }
            };
        }
        avx2_as!(f32);
        avx2_as!(f64);
    }
    let _ = isa;
    tv_span(k, span)
}

/// `tv_span` compiled for the variant `isa` (called from worker threads when a row is
/// split, outside the caller's target-feature function).
pub(super) fn tv_span_isa<T: Widen>(isa: Isa, k: &TvConsts, span: Span<T>) -> TvStats {
    isa_variants!(
        isa,
        fn<T: Widen>(k: &TvConsts, span: Span<'_, T>) -> TvStats,
        |v| tv_span_for(v, k, span)
    )
}

/// The Binary TV pass alone over one row, `reps` times, with the variant `isa` (linear
/// weights, a finite clamp window): the 5th-percentile nanoseconds per token (this
/// VM's timings are noisy). For tuning the
/// pass (`examples/tv_bench.rs`); only with the feature `phase-timing`.
#[cfg(feature = "phase-timing")]
#[doc(hidden)]
pub fn bench_tv_pass<T: Widen>(
    isa: Isa,
    lp: &[T],
    lq: &[T],
    adv: f64,
    valid: &[u8],
    reps: usize,
) -> (f64, usize) {
    let n = valid.len();
    let (mut div, mut toward, mut weight) = (vec![0.0; n], vec![0u8; n], vec![0.0; n]);
    let k = TvConsts {
        low: 0.02,
        high: 0.04,
        weights: Weights::Linear,
        horizon_m1: (n - 1) as f64,
        one_minus_w_min: 0.2,
    };
    let mut times = Vec::with_capacity(reps);
    let mut kept = 0;
    for _ in 0..reps {
        let t0 = std::time::Instant::now();
        let span = Span {
            col0: 0,
            lp,
            lq,
            adv: Advantage::Row(adv),
            valid,
            div: &mut div,
            toward: &mut toward,
            weight: &mut weight,
        };
        let s = tv_span_isa(isa, &k, span);
        times.push(t0.elapsed().as_secs_f64() * 1e9 / n as f64);
        kept = s.counts.below
            + s.counts.above
            + s.counts.valid
            + toward.iter().map(|&t| t as usize).sum::<usize>();
    }
    times.sort_by(f64::total_cmp);
    (times[reps / 20], kept)
}
