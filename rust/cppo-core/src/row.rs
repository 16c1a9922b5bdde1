//! The CPPO mask for one row, in float64, exactly as `docs/semantics.md` defines it.
//!
//! Pure Rust: no Python here. The arithmetic mirrors `python/cppo_native/reference.py`
//! operation by operation (same order, same libm calls), so that float64 inputs give
//! bit-identical results.

use crate::budget::{adaptive_budget, clamp_window};
use crate::codes;
use crate::codes::reason::{
    INVALID, KEPT_TOWARD_MU, KEPT_WITHIN_THRESHOLD, MASKED_PREFIX_BUDGET, MASKED_TOKEN_THRESHOLD,
};
use crate::divergence::{binary_kl, LOG_PROB_TOLERANCE};
use crate::params::{Divergence, Params, PositionWeight};
use crate::vexp;
use crate::weights::{position_weight, shuffle_permutation};

/// Which input held a bad value (`codes::field`; `FIELDS` in `_errors.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Field {
    LogProbs = codes::field::LOG_PROBS,
    OldLogProbs = codes::field::OLD_LOG_PROBS,
    Advantages = codes::field::ADVANTAGES,
    Divergence = codes::field::DIVERGENCE,
}

/// The first bad value of a row: its column, which input, and the value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadValue {
    pub row: usize,
    pub column: usize,
    pub field: Field,
    pub value: f64,
}

/// A floating-point element that widens exactly to float64.
pub trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f64;
}

impl Widen for f64 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self as f64
    }
}

impl Widen for half::f16 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self.to_f64()
    }
}

impl Widen for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f64 {
        self.to_f64()
    }
}

/// One row's inputs. Log-probs keep their storage type `T` (read and widened once, in
/// place); the other float inputs are float64.
///
/// `valid` covers the whole row; the float inputs cover only `window`, the span from
/// the first to the last valid position (positions outside it are padding: they are
/// never kept and leave S and W unchanged, so they need no arithmetic).
pub struct RowInput<'a, T: Widen = f64> {
    pub valid: &'a [u8],
    pub window: std::ops::Range<usize>,
    pub log_probs: &'a [T],
    pub old_log_probs: &'a [T],
    /// A_t: one per row, or per position (of the window).
    pub advantages: Advantage<'a>,
    /// Caller-supplied divergence (`Divergence::Given` only).
    pub divergence: Option<&'a [f64]>,
    /// Whether the row's Binary TV pass may be split into `SPLIT_CHUNK`-token chunks run
    /// on the current rayon pool (for batches of few rows; the result is the same).
    pub split: bool,
}

/// A_t of a row: one value for the whole row, or one per position of the window.
#[derive(Clone, Copy)]
pub enum Advantage<'a> {
    Row(f64),
    Token(&'a [f64]),
}

impl Advantage<'_> {
    #[inline(always)]
    fn at(&self, c: usize) -> f64 {
        match self {
            Advantage::Row(a) => *a,
            Advantage::Token(a) => a[c],
        }
    }
    fn sub(&self, range: std::ops::Range<usize>) -> Self {
        match self {
            Advantage::Row(a) => Advantage::Row(*a),
            Advantage::Token(a) => Advantage::Token(&a[range]),
        }
    }
}

/// Chunk size of a split Binary TV pass (fixed: the split never changes a result).
pub const SPLIT_CHUNK: usize = 4096;

/// The span from the first to the last valid position (empty if none is valid).
/// Skips 64-byte blocks of zeros with a vectorisable test (padding is long).
pub fn valid_window(valid: &[u8]) -> std::ops::Range<usize> {
    const BLOCK: usize = 64;
    let any = |b: &[u8]| b.iter().fold(0u8, |acc, &v| acc | v) != 0;
    let mut start = 0;
    while start + BLOCK <= valid.len() && !any(&valid[start..start + BLOCK]) {
        start += BLOCK;
    }
    let first = match valid[start..].iter().position(|&v| v != 0) {
        Some(i) => start + i,
        None => return 0..0,
    };
    let mut end = valid.len();
    while end >= first + BLOCK && !any(&valid[end - BLOCK..end]) {
        end -= BLOCK;
    }
    let last = valid[first..end]
        .iter()
        .rposition(|&v| v != 0)
        .expect("valid[first] != 0");
    first..first + last + 1
}

/// One row's outputs; reason and threshold are both present or both absent, and the
/// soft gate may only be asked for with them.
pub struct RowOutput<'a> {
    pub mask: &'a mut [bool],
    pub reason: Option<&'a mut [i8]>,
    pub threshold: Option<&'a mut [f64]>,
    pub gate: Option<&'a mut [f64]>,
}

/// Per-row results that are not per token.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowSummary {
    /// delta_b_row, the prefix budget this row used.
    pub budget: f64,
    /// Number of positions with each reason code (index = code); only counted when
    /// the reason output is requested.
    pub counts: [u64; 5],
}

/// Per-phase time of the row kernel, summed over calls and threads (nanoseconds):
/// checks + divergence, budget, weights, scan + outputs. Only with the cargo feature
/// `phase-timing` (for `examples/mask_bench.rs` and docs/cpu.md); otherwise a no-op.
#[cfg(feature = "phase-timing")]
pub static PHASE_NS: [std::sync::atomic::AtomicU64; 4] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 4];

struct PhaseClock {
    #[cfg(feature = "phase-timing")]
    last: std::time::Instant,
}

impl PhaseClock {
    #[inline(always)]
    fn start() -> Self {
        PhaseClock {
            #[cfg(feature = "phase-timing")]
            last: std::time::Instant::now(),
        }
    }
    #[inline(always)]
    fn lap(&mut self, _phase: usize) {
        #[cfg(feature = "phase-timing")]
        {
            let now = std::time::Instant::now();
            PHASE_NS[_phase].fetch_add(
                (now - self.last).as_nanos() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            self.last = now;
        }
    }
}

/// Reusable per-thread buffers (row-sized, never batch-sized).
#[derive(Default)]
pub struct Scratch {
    divergence: Vec<f64>,
    weight: Vec<f64>,
    selection: Vec<u64>,
    toward_mu: Vec<u8>,
    prefix_weight: Vec<f64>,
    valid_columns: Vec<usize>,
    permutation: Vec<usize>,
    /// Per token of a group of rows, bit l: row l's Z_t <= c_t (`pair::scan_mask_group`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    lane_bits: Vec<u8>,
}

/// Grows `buf` to at least `n` (never shrinks: rows reuse it without refilling) and
/// returns its first `n` elements, with unspecified contents.
pub(crate) fn sized<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// Valid positions need finite log-probs <= 0 (within LOG_PROB_TOLERANCE).
#[inline(always)]
fn bad_log_prob(x: f64) -> bool {
    !(x > f64::NEG_INFINITY && x <= LOG_PROB_TOLERANCE)
}

/// A given divergence must be finite and >= 0.
#[inline(always)]
fn bad_divergence(x: f64) -> bool {
    !(0.0..f64::INFINITY).contains(&x)
}

/// The instruction-set variants of the row kernel, chosen at run time.
///
/// Every variant compiles the same Rust code (`compute_row_impl`) with another target
/// feature set; the code does only IEEE-754 operations in a fixed order (no implicit
/// FMA contraction, no reassociation; `vexp`'s fused multiply-adds are explicit
/// `mul_add`, correctly rounded in every build), so all variants return bit-identical
/// results (`tests::all_isa_variants_agree`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The crate's compile target (baseline x86-64: SSE2; aarch64: NEON).
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 (F, DQ, BW, VL) and FMA.
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run the variant.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether code with hand-written AVX2 intrinsics (outside the variants' shared Rust)
    /// may run under the variant in use: it is AVX2 or AVX-512 (not `portable`, which
    /// `CPPO_NATIVE_ISA` may choose) and this CPU has AVX2 and FMA.
    pub fn current_has_avx2() -> bool {
        matches!(Isa::current(), Isa::Avx2 | Isa::Avx512) && Isa::Avx2.supported()
    }

    /// The variants this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }

    /// The variant in use: the best one this CPU runs, or the one named by the
    /// environment variable `CPPO_NATIVE_ISA` (`portable`, `avx2`, `avx512`; read once,
    /// for tests and benchmarks; an unsupported name falls back to the best).
    pub fn current() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let best = *Isa::available()
                .last()
                .expect("portable is always available");
            match std::env::var("CPPO_NATIVE_ISA").ok().as_deref() {
                Some(name) => Isa::available()
                    .into_iter()
                    .find(|i| i.name() == name)
                    .unwrap_or(best),
                None => best,
            }
        })
    }
}

/// The body of a function with run-time ISA variants: `isa_variants!(isa, fn(args) ->
/// Ret, |v| body)` compiles `body` once per variant (AVX2+FMA, AVX-512 inside
/// `#[target_feature]` functions, the portable build otherwise), with `v` bound to the
/// variant, and runs the one `isa` names where this CPU supports it. `body` is usually a
/// call to an `#[inline(always)]` function, so each variant is that function compiled
/// with the variant's instructions. Use it as a whole function body (it `return`s).
macro_rules! isa_variants {
    ($isa:expr, fn$(<$($g:ident: $b:path),*>)?($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty, |$v:ident| $body:expr) => {{
        let isa: $crate::row::Isa = $isa;
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2$(<$($g: $b),*>)?($($arg: $ty),*) -> $ret {
                let $v = $crate::row::Isa::Avx2;
                $body
            }
            #[target_feature(enable = "avx2,fma,avx512f,avx512dq,avx512bw,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512$(<$($g: $b),*>)?($($arg: $ty),*) -> $ret {
                let $v = $crate::row::Isa::Avx512;
                $body
            }
            match isa {
                // SAFETY: the CPU supports the features (checked by `supported`).
                $crate::row::Isa::Avx512 if isa.supported() => return unsafe { avx512($($arg),*) },
                $crate::row::Isa::Avx2 if isa.supported() => return unsafe { avx2($($arg),*) },
                _ => {}
            }
        }
        let _ = isa;
        let $v = $crate::row::Isa::Portable;
        $body
    }};
}

/// Computes one row of the mask (and the optional outputs). `row` (the index in the
/// call) is reported in errors; `params.row_offset + row` seeds the shuffled ablation.
/// Runs the variant `Isa::current()`.
pub fn compute_row<T: Widen>(
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    compute_row_isa(Isa::current(), params, row, input, scratch, out)
}

/// `compute_row` that leaves the mask-only scan to the caller (`scan_mask_group`): for
/// outputs without reasons it computes the divergences, weights and budget into
/// `scratch`, writes the mask outside the window, and returns `(summary, true)`; with
/// reasons it computes the whole row and returns `(summary, false)`.
pub fn compute_row_deferred<T: Widen>(
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<(RowSummary, bool), BadValue> {
    let pending = out.reason.is_none() && out.threshold.is_none() && out.gate.is_none();
    let s = dispatch(Isa::current(), params, row, input, scratch, out, pending)?;
    Ok((s, pending))
}

/// `compute_row` with the given variant (which must be `supported`; an unsupported
/// one runs the portable build).
pub fn compute_row_isa<T: Widen>(
    isa: Isa,
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    dispatch(isa, params, row, input, scratch, out, false)
}

fn dispatch<T: Widen>(
    isa: Isa,
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
    defer: bool,
) -> Result<RowSummary, BadValue> {
    isa_variants!(
        isa,
        fn<T: Widen>(
            params: &Params,
            row: usize,
            input: &RowInput<T>,
            scratch: &mut Scratch,
            out: RowOutput,
            defer: bool,
        ) -> Result<RowSummary, BadValue>,
        |v| compute_row_impl(v, params, row, input, scratch, out, defer)
    )
}

#[inline(always)]
fn compute_row_impl<T: Widen>(
    isa: Isa,
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
    defer: bool,
) -> Result<RowSummary, BadValue> {
    let len = input.valid.len();
    let window = input.window.clone();
    let (first, n) = (window.start, window.len());
    let valid = &input.valid[window.clone()];
    let (lp, lq, adv) = (
        &input.log_probs[..n],
        &input.old_log_probs[..n],
        input.advantages.sub(0..n),
    );
    let given = match params.divergence {
        Divergence::Given => Some(&input.divergence.expect("Given divergence needs an array")[..n]),
        _ => None,
    };
    // Horizon T: fixed, or 1 + the last valid index.
    let horizon = if params.horizon > 0 {
        params.horizon
    } else {
        window.end as i64
    };

    // One pass over the valid positions: check the inputs (spec, "Bad input"), compute
    // the token divergence D_t (0 at holes, so they add nothing to S), the direction
    // test A_t (lp_t - lq_t) <= 0, and collect the bit patterns for the adaptive
    // budget's quantile.
    let div = sized(&mut scratch.divergence, n);
    let toward = sized(&mut scratch.toward_mu, n);
    let report = |c: usize, field: Field, value: f64| BadValue {
        row,
        column: first + c,
        field,
        value,
    };
    macro_rules! fill_divergence {
        ($d:expr) => {
            for c in 0..n {
                if valid[c] == 0 {
                    div[c] = 0.0;
                    toward[c] = 0;
                    continue;
                }
                let (p, q, a) = (lp[c].widen(), lq[c].widen(), adv.at(c));
                if bad_log_prob(p) {
                    return Err(report(c, Field::LogProbs, p));
                }
                if bad_log_prob(q) {
                    return Err(report(c, Field::OldLogProbs, q));
                }
                if !a.is_finite() {
                    return Err(report(c, Field::Advantages, a));
                }
                let d: f64 = $d(c, p, q)?;
                div[c] = d;
                toward[c] = (a * (p - q) <= 0.0) as u8;
            }
        };
    }
    let mut clock = PhaseClock::start();
    let mut window_counts = None;
    let mut weights_done = false;
    match params.divergence {
        Divergence::BinaryTv => {
            // One branch-free pass (`tv`): checks, D_t, direction, weights, counts. The
            // first bad value, and the rare arguments below `vexp::TINY` (subnormal
            // exp), are handled after it.
            let (low, high) = clamp_window(params).unwrap_or((f64::NEG_INFINITY, f64::INFINITY));
            let consts = tv::TvConsts {
                low,
                high,
                weights: match params.position_weight {
                    PositionWeight::Shuffled => tv::Weights::Skip,
                    PositionWeight::Linear if horizon > 1 => tv::Weights::Linear,
                    _ => tv::Weights::Ones,
                },
                horizon_m1: (horizon - 1) as f64,
                one_minus_w_min: 1.0 - params.w_min,
            };
            weights_done = consts.weights != tv::Weights::Skip;
            let weight = sized(&mut scratch.weight, n);
            let stats = if input.split && n >= 2 * SPLIT_CHUNK {
                use rayon::prelude::*;
                div.par_chunks_mut(SPLIT_CHUNK)
                    .zip(toward.par_chunks_mut(SPLIT_CHUNK))
                    .zip(weight.par_chunks_mut(SPLIT_CHUNK))
                    .enumerate()
                    .map(|(i, ((d, t), w))| {
                        let cols = i * SPLIT_CHUNK..i * SPLIT_CHUNK + d.len();
                        let span = tv::Span {
                            col0: first + cols.start,
                            lp: &lp[cols.clone()],
                            lq: &lq[cols.clone()],
                            adv: adv.sub(cols.clone()),
                            valid: &valid[cols],
                            div: d,
                            toward: t,
                            weight: w,
                        };
                        tv::tv_span_isa(isa, &consts, span)
                    })
                    .reduce(tv::TvStats::default, tv::TvStats::merge)
            } else {
                let span = tv::Span {
                    col0: first,
                    lp,
                    lq,
                    adv,
                    valid,
                    div,
                    toward,
                    weight,
                };
                tv::tv_span_for(isa, &consts, span)
            };
            if stats.bad {
                fill_divergence!(|_, _, _| Ok(0.0));
                unreachable!("a bad value was flagged");
            }
            let mut wc = stats.counts;
            if stats.tiny {
                for c in 0..n {
                    let (p, q) = (lp[c].widen(), lq[c].widen());
                    if valid[c] != 0 && (p < vexp::TINY || q < vexp::TINY) {
                        let d = (vexp::exp(p) - vexp::exp(q)).abs();
                        wc.below -= (div[c] < low) as usize;
                        wc.above -= (div[c] > high) as usize;
                        wc.below += (d < low) as usize;
                        wc.above += (d > high) as usize;
                        div[c] = d;
                    }
                }
            }
            window_counts = Some(wc);
        }
        Divergence::BinaryKl => fill_divergence!(|_, p, q| Ok(binary_kl(p, q))),
        Divergence::Given => {
            let given = given.unwrap();
            fill_divergence!(|c: usize, _, _| if bad_divergence(given[c]) {
                Err(report(c, Field::Divergence, given[c]))
            } else {
                Ok(given[c])
            })
        }
    }

    clock.lap(0);
    // Per-row budget (Eq. 22).
    let budget = if params.adaptive_budget {
        adaptive_budget(
            params,
            &div[..n],
            valid,
            window_counts,
            &mut scratch.selection,
        )
    } else {
        params.delta_b
    };

    // v_t * w_t (Eq. 9): 0 at holes, so they add nothing to W; the shuffled ablation
    // permutes the weights among the row's valid positions.
    clock.lap(1);
    let weight = sized(&mut scratch.weight, n);
    match params.position_weight {
        _ if weights_done => {}
        PositionWeight::Linear => {
            for (c, w) in weight.iter_mut().enumerate() {
                let pw = position_weight(first + c, horizon, params.w_min);
                *w = if valid[c] != 0 { pw } else { 0.0 };
            }
        }
        PositionWeight::None => {
            for (c, w) in weight.iter_mut().enumerate() {
                *w = if valid[c] != 0 { 1.0 } else { 0.0 };
            }
        }
        PositionWeight::Shuffled => {
            weight.fill(0.0);
            let cols = &mut scratch.valid_columns;
            cols.clear();
            cols.extend((0..n).filter(|&c| valid[c] != 0));
            shuffle_permutation(
                cols.len(),
                params.shuffle_seed,
                params.row_offset.wrapping_add(row as u64),
                &mut scratch.permutation,
            );
            for (k, &c) in cols.iter().enumerate() {
                weight[c] =
                    position_weight(first + cols[scratch.permutation[k]], horizon, params.w_min);
            }
        }
    }

    clock.lap(2);
    let scan = Scan {
        delta: params.delta,
        budget,
        prefix_budget: params.prefix_budget,
        valid,
        toward_mu: &scratch.toward_mu[..n],
        divergence: &scratch.divergence[..n],
        weight: &scratch.weight[..n],
    };
    let RowOutput {
        mask,
        reason,
        threshold,
        gate,
    } = out;
    let mask = &mut mask[..len];
    mask[..first].fill(false);
    mask[window.end..].fill(false);
    let mut counts = [0u64; 5];
    match (reason, threshold) {
        (Some(reason), Some(threshold)) => {
            let (reason, threshold) = (&mut reason[..len], &mut threshold[..len]);
            let mut gate = gate.map(|g| &mut g[..len]);
            let (s_end, w_end) = scan.full(
                &mut mask[window.clone()],
                &mut reason[window.clone()],
                &mut threshold[window.clone()],
                gate.as_mut().map(|g| &mut g[window.clone()]),
                sized(&mut scratch.prefix_weight, n),
                &mut counts,
            );
            // Padding outside the window: never kept; c_t stays at its value before the
            // window (S = W = 0) or after it (the final sums).
            for (range, c_t) in [
                (0..first, scan.threshold(0.0, 0.0)),
                (window.end..len, scan.threshold(s_end, w_end)),
            ] {
                counts[INVALID as usize] += range.len() as u64;
                reason[range.clone()].fill(INVALID);
                if let Some(g) = gate.as_mut() {
                    g[range.clone()].fill(0.0);
                }
                threshold[range].fill(c_t);
            }
        }
        (None, None) if gate.is_none() => {
            if !defer {
                scan.mask_only(&mut mask[window])
            }
        }
        _ => panic!("compute_row: reason and threshold come together, and the gate needs both"),
    }
    clock.lap(3);
    Ok(RowSummary { budget, counts })
}

// The branchless reason arithmetic in `Scan::scan_codes` relies on these values.
const _: () = assert!(
    INVALID == 0
        && KEPT_TOWARD_MU == 1
        && KEPT_WITHIN_THRESHOLD == 2
        && MASKED_TOKEN_THRESHOLD == 3
        && MASKED_PREFIX_BUDGET == 4
);

/// The prefix scan (Eq. 8) and the mask (Eq. 10) over a row's window. Weights and
/// divergences are 0 at holes, so adding them leaves S and W exactly unchanged (both
/// sums are >= +0.0) and the loops need no data-dependent branches.
struct Scan<'a> {
    delta: f64,
    budget: f64,
    prefix_budget: bool,
    valid: &'a [u8],
    /// 1 where A_t (lp_t - lq_t) <= 0 (the update moves pi back toward mu).
    toward_mu: &'a [u8],
    divergence: &'a [f64],
    /// v_t * w_t.
    weight: &'a [f64],
}

impl Scan<'_> {
    /// c_t = min(delta, delta + delta_b_row * W_{t-1} - S_{t-1}).
    #[inline(always)]
    fn threshold(&self, s_sum: f64, w_sum: f64) -> f64 {
        if self.prefix_budget {
            self.delta.min(self.delta + self.budget * w_sum - s_sum)
        } else {
            self.delta
        }
    }

    #[inline(always)]
    fn mask_only(&self, mask: &mut [bool]) {
        if self.prefix_budget {
            self.mask_only_with::<true>(mask)
        } else {
            self.mask_only_with::<false>(mask)
        }
    }

    #[inline(always)]
    fn mask_only_with<const PREFIX: bool>(&self, mask: &mut [bool]) {
        let n = mask.len();
        let (valid, div, weight) = (&self.valid[..n], &self.divergence[..n], &self.weight[..n]);
        let toward = &self.toward_mu[..n];
        let (delta, budget) = (self.delta, self.budget);
        let mut s_sum = 0.0f64; // S_{t-1}
        let mut w_sum = 0.0f64; // W_{t-1}
        for c in 0..n {
            let w = weight[c];
            let z = w * div[c];
            let c_t = if PREFIX {
                delta.min(delta + budget * w_sum - s_sum)
            } else {
                delta
            };
            mask[c] = (valid[c] != 0) & ((toward[c] != 0) | (z <= c_t));
            s_sum += z;
            w_sum += w;
        }
    }

    /// Mask, reasons, thresholds and (if asked) the soft gate; returns the final (S, W).
    /// `w_prev` is row-sized scratch.
    ///
    /// The sequential scan writes the mask, reasons and thresholds and stashes S_t (in
    /// `gate`) and W_{t-1}; the soft gate's divisions then run in a separate loop with
    /// no loop-carried dependency (it vectorises), and the reasons are counted last.
    #[inline(always)]
    fn full(
        &self,
        mask: &mut [bool],
        reason: &mut [i8],
        threshold: &mut [f64],
        gate: Option<&mut [f64]>,
        w_prev: &mut [f64],
        counts: &mut [u64; 5],
    ) -> (f64, f64) {
        let (s_sum, w_sum) = match gate {
            Some(gate) => self.scan_codes::<true>(mask, reason, threshold, gate, w_prev),
            None => self.scan_codes::<false>(mask, reason, threshold, &mut [], &mut []),
        };
        self.count_codes(&reason[..mask.len()], counts);
        (s_sum, w_sum)
    }

    #[inline(always)]
    fn scan_codes<const GATE: bool>(
        &self,
        mask: &mut [bool],
        reason: &mut [i8],
        threshold: &mut [f64],
        gate: &mut [f64],
        w_prev: &mut [f64],
    ) -> (f64, f64) {
        let n = mask.len();
        let (valid, div, weight) = (&self.valid[..n], &self.divergence[..n], &self.weight[..n]);
        let toward = &self.toward_mu[..n];
        let (reason, threshold) = (&mut reason[..n], &mut threshold[..n]);
        let (gate, w_prev) = if GATE {
            (&mut gate[..n], &mut w_prev[..n])
        } else {
            (gate, w_prev)
        };
        let delta = self.delta;
        // Pass 1, sequential: the prefix sums and c_t (and for the gate S_t, W_{t-1}).
        // Only the two running sums carry from one token to the next.
        let mut s_sum = 0.0f64; // S_{t-1}
        let mut w_sum = 0.0f64; // W_{t-1}
        for c in 0..n {
            let w = weight[c];
            let z = w * div[c];
            threshold[c] = self.threshold(s_sum, w_sum);
            s_sum += z;
            if GATE {
                w_prev[c] = w_sum;
                gate[c] = s_sum; // S_t, consumed below
            }
            w_sum += w;
        }
        // Pass 2, independent per token (it vectorises): reason codes and the mask.
        for c in 0..n {
            let z = weight[c] * div[c];
            let within = z <= threshold[c];
            let over_token = z > delta;
            // within implies !over_token (c_t <= delta), so this is 2, 3 or 4.
            let away_code = 4 - over_token as i8 - 2 * within as i8;
            // 0 invalid, 1 toward mu, else away_code; valid and toward are 0 or 1.
            let (v, t) = ((valid[c] != 0) as i8, (toward[c] != 0) as i8);
            let code = v * (t + (1 - t) * away_code);
            reason[c] = code;
            mask[c] = (code as u8).wrapping_sub(1) < 2; // 1 or 2: kept
        }
        if !GATE {
            return (s_sum, w_sum);
        }
        // Soft gate: x = max(Z/delta, S_t / (delta + delta_b_row W_{t-1})), g = min(1, 1/x);
        // 1 toward mu, 0 at invalid positions.
        for c in 0..n {
            let z = weight[c] * div[c];
            let mut x = z / delta;
            if self.prefix_budget {
                x = x.max(gate[c] / (delta + self.budget * w_prev[c]));
            }
            let g = if x <= 1.0 { 1.0 } else { 1.0 / x };
            gate[c] = if valid[c] == 0 {
                0.0
            } else if toward[c] != 0 {
                1.0
            } else {
                g
            };
        }
        (s_sum, w_sum)
    }

    /// Adds the number of positions with each code to `counts` (one pass).
    #[inline(always)]
    fn count_codes(&self, reason: &[i8], counts: &mut [u64; 5]) {
        // u32 lanes per chunk vectorise; u64 per element would not.
        for chunk in reason.chunks(1 << 24) {
            for (code, count) in counts.iter_mut().enumerate() {
                *count += chunk.iter().map(|&r| (r == code as i8) as u32).sum::<u32>() as u64;
            }
        }
    }
}

mod pair;
mod tv;
#[cfg(feature = "phase-timing")]
pub use tv::bench_tv_pass;
mod tv_avx2;
mod tv_avx512;

pub use pair::{scan_mask_group, scan_mask_one, scan_mask_pair, PendingScan};

#[cfg(test)]
mod tests;
