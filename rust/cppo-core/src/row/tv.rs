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

/// The pass over one span (all slices of the span's length).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn tv_span<T: Widen>(
    k: &TvConsts,
    col0: usize,
    lp: &[T],
    lq: &[T],
    adv: Advantage,
    valid: &[u8],
    div: &mut [f64],
    toward: &mut [u8],
    weight: &mut [f64],
) -> TvStats {
    let n = valid.len();
    let (lp, lq, div, toward) = (&lp[..n], &lq[..n], &mut div[..n], &mut toward[..n]);
    let weight = if k.weights == Weights::Skip {
        &mut weight[..0]
    } else {
        &mut weight[..n]
    };
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
        Advantage::Token(adv) => {
            let adv = &adv[..n];
            with_weights!(|c: usize| adv[c])
        }
    }
}

/// `tv_span` for the variant `isa` (inlined into a variant's code): with AVX2 and
/// float32 or float64 log-probs, the intrinsics version (`tv_avx2`, the same bits);
/// otherwise the generic loop compiled for the variant.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn tv_span_for<T: Widen>(
    isa: Isa,
    k: &TvConsts,
    col0: usize,
    lp: &[T],
    lq: &[T],
    adv: Advantage,
    valid: &[u8],
    div: &mut [f64],
    toward: &mut [u8],
    weight: &mut [f64],
) -> TvStats {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && isa.supported() {
        use std::any::TypeId;
        macro_rules! avx2_as {
            ($t:ty) => {
                if TypeId::of::<T>() == TypeId::of::<$t>() {
                    // SAFETY: T is $t (same type id), so the slices reinterpret exactly;
                    // the CPU has AVX2 and FMA (checked above).
                    unsafe {
                        let cast =
                            |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const $t, s.len());
                        return super::tv_avx2::tv_span_avx2(
                            k,
                            col0,
                            cast(lp),
                            cast(lq),
                            adv,
                            valid,
                            div,
                            toward,
                            weight,
                        );
                    }
                }
            };
        }
        avx2_as!(f32);
        avx2_as!(f64);
    }
    let _ = isa;
    tv_span(k, col0, lp, lq, adv, valid, div, toward, weight)
}

/// `tv_span` compiled for the variant `isa` (called from worker threads when a row is
/// split, outside the caller's target-feature function).
#[allow(clippy::too_many_arguments)]
pub(super) fn tv_span_isa<T: Widen>(
    isa: Isa,
    k: &TvConsts,
    col0: usize,
    lp: &[T],
    lq: &[T],
    adv: Advantage,
    valid: &[u8],
    div: &mut [f64],
    toward: &mut [u8],
    weight: &mut [f64],
) -> TvStats {
    isa_variants!(
        isa,
        fn<T: Widen>(
            k: &TvConsts,
            col0: usize,
            lp: &[T],
            lq: &[T],
            adv: Advantage,
            valid: &[u8],
            div: &mut [f64],
            toward: &mut [u8],
            weight: &mut [f64],
        ) -> TvStats,
        |v| tv_span_for(v, k, col0, lp, lq, adv, valid, div, toward, weight)
    )
}
