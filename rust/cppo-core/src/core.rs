//! The CPPO mask for one row, in float64, exactly as `shared/spec/CPPO.md` defines it.
//!
//! Pure Rust: no Python here. The arithmetic mirrors `python/cppo_native/reference.py`
//! operation by operation (same order, same libm calls), so that float64 inputs give
//! bit-identical results.

/// Log-probs may exceed 0 by this much before they are rejected.
pub const LOG_PROB_TOLERANCE: f64 = 1e-6;
/// Floor on the rest-masses 1 - p and 1 - r in Binary KL (keeps it finite when a
/// log-prob rounds to exactly 0.0).
pub const BINARY_KL_EPS: f64 = 1e-12;

/// Reason codes (spec, "The mask").
pub const INVALID: i8 = 0;
pub const KEPT_TOWARD_MU: i8 = 1;
pub const KEPT_WITHIN: i8 = 2;
pub const MASKED_TOKEN: i8 = 3;
pub const MASKED_PREFIX: i8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionWeight {
    Linear,
    None,
    Shuffled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Divergence {
    BinaryTv,
    BinaryKl,
    /// A caller-supplied array, used as given.
    Given,
}

/// Validated hyper-parameters (validation happens once, in Python).
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub delta: f64,
    pub delta_b: f64,
    pub w_min: f64,
    /// 0 means horizon = "sequence" (T = 1 + last valid index); otherwise a fixed T.
    pub horizon: i64,
    pub adaptive_budget: bool,
    pub budget_quantile: f64,
    pub budget_scale: f64,
    pub position_weight: PositionWeight,
    pub shuffle_seed: u64,
    pub prefix_budget: bool,
    pub divergence: Divergence,
}

/// Which input held a bad value (the index matches `FIELDS` in `_errors.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    LogProbs = 0,
    OldLogProbs = 1,
    Advantages = 2,
    Divergence = 3,
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
pub trait Widen: Copy + Send + Sync {
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
    /// A_t per position (a per-row advantage is broadcast by the caller).
    pub advantages: &'a [f64],
    /// Caller-supplied divergence (`Divergence::Given` only).
    pub divergence: Option<&'a [f64]>,
}

/// The span from the first to the last valid position (empty if none is valid).
pub fn valid_window(valid: &[u8]) -> std::ops::Range<usize> {
    match valid.iter().position(|&v| v != 0) {
        Some(first) => first..valid.iter().rposition(|&v| v != 0).map_or(first, |l| l + 1),
        None => 0..0,
    }
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
}

/// Grows `buf` to at least `n` (never shrinks: rows reuse it without refilling) and
/// returns its first `n` elements, with unspecified contents.
pub(crate) fn sized<T: Copy + Default>(buf: &mut Vec<T>, n: usize) -> &mut [T] {
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    &mut buf[..n]
}

/// Paper Eq. 9: w_t with t - 1 = `column` and T = `horizon`.
#[inline(always)]
pub fn position_weight(column: usize, horizon: i64, w_min: f64) -> f64 {
    if horizon <= 1 {
        return 1.0;
    }
    let ratio = column as f64 / (horizon - 1) as f64;
    1.0 - (1.0 - w_min) * ratio.min(1.0)
}

/// |pi(y) - mu(y)|: total variation over {sampled token, rest}.
#[inline(always)]
pub fn binary_tv(lp: f64, lq: f64) -> f64 {
    (lp.exp() - lq.exp()).abs()
}

/// `binary_tv` with a given exp function (bit-identical to `f64::exp`, see `libm_exp`).
#[inline(always)]
fn binary_tv_with(exp: extern "C" fn(f64) -> f64, lp: f64, lq: f64) -> f64 {
    (exp(lp) - exp(lq)).abs()
}

/// KL(mu || pi) over {sampled token, rest}; see `reference.binary_kl`.
#[inline]
pub fn binary_kl(lp: f64, lq: f64) -> f64 {
    let a = lq.min(0.0);
    let b = lp.min(0.0);
    let p = a.exp();
    let p_rest = (-a.exp_m1()).max(BINARY_KL_EPS);
    let r_rest = (-b.exp_m1()).max(BINARY_KL_EPS);
    let d = p * (a - b) + p_rest * (p_rest / r_rest).ln();
    if d > 0.0 {
        d
    } else {
        0.0
    }
}

/// The shuffled ablation's generator (same constants in Python and CUDA).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64, row: usize) -> Self {
        SplitMix64(
            seed ^ (row as u64)
                .wrapping_add(1)
                .wrapping_mul(0xD1B5_4A32_D192_ED03),
        )
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fisher-Yates permutation of 0..n driven by SplitMix64(seed, row), into `perm`.
pub fn shuffle_permutation(n: usize, seed: u64, row: usize, perm: &mut Vec<usize>) {
    perm.clear();
    perm.extend(0..n);
    let mut rng = SplitMix64::new(seed, row);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
}

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

/// `x[lo] + (h - floor h) (x[hi] - x[lo])` where x[r] is the value of rank r in `bits`
/// (`lo` = floor h and `hi` = ceil h shifted by the same offset, if `bits` is a window).
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

/// delta_b_row = clamp(k Q_q(D), delta_b, 2 delta_b) over the row's valid positions
/// (paper Eq. 22; delta_b for a row with no valid token).
///
/// Most rows' quantile falls clearly below or above the clamp window, and then the clamp
/// decides the budget without the exact quantile: one counting pass tells. Otherwise
/// only the values inside the window (with a 1e-9 relative margin) are selected from.
/// The result equals the spec's formula exactly, since the margin covers every rounding
/// in Q's interpolation and in k Q.
fn adaptive_budget(params: &Params, div: &[f64], valid: &[u8], scratch: &mut Vec<u64>) -> f64 {
    let (delta_b, k) = (params.delta_b, params.budget_scale);
    let clamp = |q: f64| (k * q).max(delta_b).min(2.0 * delta_b);
    let n = valid.iter().filter(|&&v| v != 0).count();
    if n == 0 {
        return delta_b;
    }
    let h = params.budget_quantile * (n - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    if k > 0.0 && delta_b > 0.0 {
        let low = delta_b / k * (1.0 - 1e-9);
        let high = 2.0 * delta_b / k * (1.0 + 1e-9);
        let (mut below, mut above) = (0usize, 0usize);
        for (&d, &v) in div.iter().zip(valid) {
            let v = v != 0;
            below += (v & (d < low)) as usize;
            above += (v & (d > high)) as usize;
        }
        if hi < below {
            return delta_b; // x[hi] < low: k Q < delta_b
        }
        if lo >= n - above {
            return 2.0 * delta_b; // x[lo] > high: k Q > 2 delta_b
        }
        if lo >= below && hi < n - above {
            // Both ranks lie inside the window: select among its values only, compacted
            // without branches (the window holds a data-dependent mix).
            let bits = sized(scratch, div.len());
            let mut m = 0;
            for (&d, &v) in div.iter().zip(valid) {
                bits[m] = d.to_bits();
                m += ((v != 0) & (d >= low) & (d <= high)) as usize;
            }
            return clamp(quantile_ranks(&mut bits[..m], h, lo - below, hi - below));
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

/// Computes one row of the mask (and the optional outputs). `row` seeds the shuffled
/// ablation and is reported in errors.
///
/// On x86-64 CPUs with AVX2 the same code is compiled a second time with AVX2 enabled
/// and chosen at run time (the wheel targets baseline x86-64): the loops without a
/// loop-carried dependency then work on 4 doubles at a time. Both builds do the same
/// IEEE operations in the same order (no FMA contraction), so results are identical.
pub fn compute_row<T: Widen>(
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { compute_row_avx2(params, row, input, scratch, out) };
    }
    compute_row_impl(params, row, input, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn compute_row_avx2<T: Widen>(
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    compute_row_impl(params, row, input, scratch, out)
}

#[inline(always)]
fn compute_row_impl<T: Widen>(
    params: &Params,
    row: usize,
    input: &RowInput<T>,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    let len = input.valid.len();
    let window = input.window.clone();
    let (first, n) = (window.start, window.len());
    let valid = &input.valid[window.clone()];
    let (lp, lq, adv) = (
        &input.log_probs[..n],
        &input.old_log_probs[..n],
        &input.advantages[..n],
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
                let (p, q, a) = (lp[c].widen(), lq[c].widen(), adv[c]);
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
    match params.divergence {
        Divergence::BinaryTv => {
            let exp = crate::libm_exp::exp_fn();
            fill_divergence!(|_, p, q| Ok(binary_tv_with(exp, p, q)))
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

    // Per-row budget (Eq. 22).
    let budget = if params.adaptive_budget {
        adaptive_budget(params, &div[..n], valid, &mut scratch.selection)
    } else {
        params.delta_b
    };

    // v_t * w_t (Eq. 9): 0 at holes, so they add nothing to W; the shuffled ablation
    // permutes the weights among the row's valid positions.
    let weight = sized(&mut scratch.weight, n);
    match params.position_weight {
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
                row,
                &mut scratch.permutation,
            );
            for (k, &c) in cols.iter().enumerate() {
                weight[c] =
                    position_weight(first + cols[scratch.permutation[k]], horizon, params.w_min);
            }
        }
    }

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
        (None, None) if gate.is_none() => scan.mask_only(&mut mask[window]),
        _ => panic!("compute_row: reason and threshold come together, and the gate needs both"),
    }
    Ok(RowSummary { budget, counts })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            delta: 0.15,
            delta_b: 0.02,
            w_min: 0.8,
            horizon: 0,
            adaptive_budget: false,
            budget_quantile: 0.9,
            budget_scale: 1.0,
            position_weight: PositionWeight::Linear,
            shuffle_seed: 0,
            prefix_budget: true,
            divergence: Divergence::Given,
        }
    }

    /// The worked-example setting: lp = -1, lq = -1.1 (away from mu for adv > 0).
    fn run(
        p: &Params,
        adv: f64,
        d: &[f64],
        valid: &[u8],
    ) -> (Vec<bool>, Vec<i8>, Vec<f64>, RowSummary) {
        let n = d.len();
        let (m, r, t, _, s) = eval_row(
            p,
            &vec![-1.0; n],
            &vec![-1.1; n],
            &vec![adv; n],
            valid,
            Some(d),
        )
        .unwrap();
        (m, r, t, s)
    }

    #[test]
    fn worked_example() {
        let d = [0.10, 0.12, 0.30, 0.05, 0.14];
        let (m, r, t, s) = run(&params(), 1.0, &d, &[1; 5]);
        assert_eq!(m, [true, false, false, false, false]);
        assert_eq!(r, [2, 4, 3, 4, 4]);
        let want = [0.15, 0.07, -0.025, -0.277, -0.3025];
        for (a, b) in t.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        assert_eq!(s.counts, [0, 0, 1, 1, 3]);
        let (m, r, _, _) = run(&params(), -1.0, &d, &[1; 5]);
        assert_eq!(m, [true; 5]);
        assert_eq!(r, [1; 5]);
    }

    #[test]
    fn padding_is_never_kept_and_never_summed() {
        let d = [0.10, 9.0, 0.12];
        let (m, r, t, _) = run(&params(), 1.0, &d, &[1, 0, 1]);
        assert_eq!(r[1], INVALID);
        assert!(!m[1]);
        // The hole contributes nothing to S or W.
        assert!((t[2] - (0.15f64 + 0.02 * 1.0 - 0.10).min(0.15)).abs() < 1e-15);
    }

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

    #[test]
    fn binary_kl_is_finite_at_certain_tokens() {
        assert!(binary_kl(0.0, -1e-7).is_finite());
        assert_eq!(binary_kl(-0.5, -0.5), 0.0);
        assert!(binary_kl(-0.1, -2.0) > 0.0);
    }

    #[test]
    fn splitmix_matches_python_constants() {
        // Known answers from reference.py (SplitMix64 and shuffle_permutation).
        let mut g = SplitMix64::new(0, 0);
        assert_eq!(g.next_u64(), 0x2d0f_28c7_e7e7_86b2);
        assert_eq!(g.next_u64(), 0x7585_6f74_5165_f252);
        let mut perm = Vec::new();
        shuffle_permutation(10, 3, 2, &mut perm);
        assert_eq!(perm, [0, 7, 8, 9, 2, 3, 6, 1, 5, 4]);
    }

    #[test]
    fn empty_row() {
        let (m, _, _, s) = run(&params(), 1.0, &[], &[]);
        assert!(m.is_empty());
        assert_eq!(s.budget, 0.02);
    }

    /// The row's inputs cut to its valid window, as the batch layer hands them over.
    fn windowed<'a>(
        valid: &'a [u8],
        lp: &'a [f64],
        lq: &'a [f64],
        adv: &'a [f64],
        d: Option<&'a [f64]>,
    ) -> RowInput<'a> {
        let w = valid_window(valid);
        RowInput {
            valid,
            window: w.clone(),
            log_probs: &lp[w.clone()],
            old_log_probs: &lq[w.clone()],
            advantages: &adv[w.clone()],
            divergence: d.map(|d| &d[w.clone()]),
        }
    }

    /// Every output of one row: (mask, reason, threshold, gate, summary).
    #[allow(clippy::type_complexity)]
    fn eval_row(
        p: &Params,
        lp: &[f64],
        lq: &[f64],
        adv: &[f64],
        valid: &[u8],
        d: Option<&[f64]>,
    ) -> Result<(Vec<bool>, Vec<i8>, Vec<f64>, Vec<f64>, RowSummary), BadValue> {
        let n = valid.len();
        let input = windowed(valid, lp, lq, adv, d);
        let (mut m, mut r, mut t, mut g) =
            (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
        let out = RowOutput {
            mask: &mut m,
            reason: Some(&mut r),
            threshold: Some(&mut t),
            gate: Some(&mut g),
        };
        let s = compute_row(p, 0, &input, &mut Scratch::default(), out)?;
        Ok((m, r, t, g, s))
    }

    #[allow(clippy::type_complexity)]
    fn full_row(
        p: &Params,
        lp: &[f64],
        lq: &[f64],
        adv: &[f64],
        valid: &[u8],
        d: Option<&[f64]>,
    ) -> Result<(Vec<i8>, Vec<f64>, Vec<f64>, RowSummary), BadValue> {
        eval_row(p, lp, lq, adv, valid, d).map(|(_, r, t, g, s)| (r, t, g, s))
    }

    #[test]
    fn first_bad_value_is_reported_in_field_order() {
        let mut p = params();
        p.divergence = Divergence::BinaryTv;
        let lp = [-0.1, f64::NAN, -0.2, 0.5];
        let lq = [-0.1, -0.1, f64::INFINITY, -0.1];
        let adv = [1.0; 4];
        let e = full_row(&p, &lp, &lq, &adv, &[1, 1, 1, 1], None).unwrap_err();
        assert_eq!((e.column, e.field), (1, Field::LogProbs));
        // Invalid positions may hold anything.
        let e = full_row(&p, &lp, &lq, &adv, &[1, 0, 1, 1], None).unwrap_err();
        assert_eq!((e.column, e.field), (2, Field::OldLogProbs));
        let ok = full_row(&p, &lp, &lq, &adv, &[1, 0, 0, 0], None);
        assert!(ok.is_ok());
        let e = full_row(
            &p,
            &[-0.1, -0.1],
            &[-0.1, -0.1],
            &[1.0, f64::NAN],
            &[1, 1],
            None,
        )
        .unwrap_err();
        assert_eq!((e.column, e.field), (1, Field::Advantages));
        p.divergence = Divergence::Given;
        let e = full_row(
            &p,
            &[-0.1; 2],
            &[-0.1; 2],
            &[1.0; 2],
            &[1, 1],
            Some(&[0.0, -1e-9]),
        )
        .unwrap_err();
        assert_eq!((e.column, e.field, e.value), (1, Field::Divergence, -1e-9));
    }

    #[test]
    fn adaptive_budget_is_clamped_quantile() {
        let mut p = params();
        p.adaptive_budget = true;
        let n = 11;
        let (lp, lq, adv) = (vec![-1.0; n], vec![-1.2; n], vec![1.0; n]);
        // D = 0, 0.003, ..., 0.03: Q_0.9 = 0.027 -> within [0.02, 0.04].
        let d: Vec<f64> = (0..n).map(|i| i as f64 * 0.003).collect();
        let (_, _, _, s) = full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&d)).unwrap();
        assert!((s.budget - 0.027).abs() < 1e-15, "{}", s.budget);
        let small: Vec<f64> = d.iter().map(|x| x * 0.1).collect();
        assert_eq!(
            full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&small))
                .unwrap()
                .3
                .budget,
            0.02
        );
        let big: Vec<f64> = d.iter().map(|x| x * 10.0).collect();
        assert_eq!(
            full_row(&p, &lp, &lq, &adv, &vec![1; n], Some(&big))
                .unwrap()
                .3
                .budget,
            0.04
        );
    }

    #[test]
    fn fixed_horizon_and_ablation_switches() {
        let d = [0.10, 0.12, 0.30, 0.05, 0.14];
        let (lp, lq, adv) = ([-1.0; 5], [-1.2; 5], [1.0; 5]);
        // No prefix budget: c_t = delta everywhere, only the token threshold masks.
        let mut p = params();
        p.prefix_budget = false;
        let (r, t, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&d)).unwrap();
        assert_eq!(r, [2, 2, 3, 2, 2]);
        assert!(t.iter().all(|&x| x == 0.15));
        // A long fixed horizon keeps weights near 1: Z_2 = 0.12 * (1 - 0.2 / 99) > c_2.
        let mut p = params();
        p.horizon = 100;
        let (r, _, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&d)).unwrap();
        assert_eq!(r[..2], [2, 4]);
        // Shuffled weights are a permutation of the linear ones (same W at the end).
        let mut p = params();
        p.position_weight = PositionWeight::Shuffled;
        p.shuffle_seed = 7;
        let ones = [1.0; 5];
        let (_, t_shuf, _, _) = full_row(&p, &lp, &lq, &adv, &[1; 5], Some(&ones)).unwrap();
        let (_, t_lin, _, _) = full_row(&params(), &lp, &lq, &adv, &[1; 5], Some(&ones)).unwrap();
        // With D = 1 everywhere, S_{t-1} = W_{t-1}, so the prefix sums' order differs but
        // the first threshold (nothing summed yet) is the same.
        assert_eq!(t_shuf[0], t_lin[0]);
    }

    #[test]
    fn soft_gate_matches_spec() {
        let d = [0.10, 0.12, 0.30];
        let (_, _, g, _) = full_row(
            &params(),
            &[-1.0; 3],
            &[-1.2; 3],
            &[1.0; 3],
            &[1; 3],
            Some(&d),
        )
        .unwrap();
        assert_eq!(g[0], 1.0);
        // T = 3, so w_2 = 0.9: x_2 = max(0.108 / 0.15, 0.208 / (0.15 + 0.02 * 1.0)) = 1.2235...
        let x2 = (0.9f64 * 0.12 / 0.15).max((0.1 + 0.9 * 0.12) / (0.15 + 0.02 * 1.0));
        assert_eq!(g[1], 1.0 / x2);
        // Toward mu: gate 1 whatever the divergence.
        let (_, _, g, _) = full_row(
            &params(),
            &[-1.0; 3],
            &[-1.2; 3],
            &[-1.0; 3],
            &[1; 3],
            Some(&d),
        )
        .unwrap();
        assert_eq!(g, [1.0; 3]);
    }

    /// Reasons and thresholds without the soft gate equal those computed with it, on
    /// rows with holes, padding on both sides and every outcome.
    #[test]
    fn outputs_without_the_gate_match() {
        let p = params();
        // Valid 1..=8 but 3: within, token threshold, toward (A = 0), prefix budget,
        // toward, away, away, away.
        let lp = [-0.1, -0.1, -0.05, -2.0, -0.2, -0.01, -4.0, -0.1, -0.1, -0.2];
        let lq = [-0.2, -0.2, -0.1, -0.1, -0.3, -2.0, -0.2, -0.3, -0.3, -0.2];
        let adv = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0];
        let valid = [0u8, 1, 1, 0, 1, 1, 1, 1, 1, 0];
        let d = [0.0, 0.01, 0.2, 0.5, 0.16, 0.05, 0.1, 0.14, 0.001, 0.3];
        let (m, r, t, _, s) = eval_row(&p, &lp, &lq, &adv, &valid, Some(&d)).unwrap();
        let n = valid.len();
        let input = windowed(&valid, &lp, &lq, &adv, Some(&d));
        let (mut m2, mut r2, mut t2) = (vec![true; n], vec![9i8; n], vec![9.0; n]);
        let out = RowOutput {
            mask: &mut m2,
            reason: Some(&mut r2),
            threshold: Some(&mut t2),
            gate: None,
        };
        let s2 = compute_row(&p, 0, &input, &mut Scratch::default(), out).unwrap();
        assert_eq!((m, r, t, s), (m2, r2, t2, s2));
        assert!(
            s.counts.iter().all(|&c| c > 0),
            "every outcome occurs: {:?}",
            s.counts
        );
    }

    /// The run-time dispatched build (AVX2 where the CPU has it) and the baseline build
    /// give bit-identical outputs on random rows with holes, for the main knob settings.
    #[test]
    fn avx2_and_baseline_builds_agree() {
        let mut rng = SplitMix64::new(7, 0);
        let mut uniform = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        for case in 0..60 {
            let n = 1 + (uniform() * 700.0) as usize;
            let lp: Vec<f64> = (0..n).map(|_| -3.0 * uniform()).collect();
            let lq: Vec<f64> = (0..n).map(|_| -3.0 * uniform()).collect();
            let adv: Vec<f64> = (0..n).map(|_| uniform() - 0.5).collect();
            let valid: Vec<u8> = (0..n).map(|_| (uniform() < 0.9) as u8).collect();
            let mut p = params();
            p.divergence = if case % 2 == 0 {
                Divergence::BinaryTv
            } else {
                Divergence::BinaryKl
            };
            p.prefix_budget = case % 3 != 0;
            p.adaptive_budget = case % 4 == 1;
            p.position_weight = [
                PositionWeight::Linear,
                PositionWeight::None,
                PositionWeight::Shuffled,
            ][case % 3];
            p.horizon = if case % 5 == 0 { 512 } else { 0 };
            let input = windowed(&valid, &lp, &lq, &adv, None);
            let call = |dispatch: bool, out: RowOutput| {
                let mut scratch = Scratch::default();
                if dispatch {
                    compute_row(&p, case, &input, &mut scratch, out)
                } else {
                    compute_row_impl(&p, case, &input, &mut scratch, out)
                }
                .unwrap()
            };
            let run = |dispatch: bool, gate: bool| {
                let (mut m, mut r, mut t, mut g) =
                    (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
                let out = RowOutput {
                    mask: &mut m,
                    reason: Some(&mut r),
                    threshold: Some(&mut t),
                    gate: if gate { Some(&mut g) } else { None },
                };
                let s = call(dispatch, out);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                (m, r, bits(&t), bits(&g), s.budget.to_bits(), s.counts)
            };
            for gate in [false, true] {
                assert_eq!(run(true, gate), run(false, gate), "case {case}");
            }
            let mask_only = |dispatch: bool| {
                let mut m = vec![false; n];
                let out = RowOutput {
                    mask: &mut m,
                    reason: None,
                    threshold: None,
                    gate: None,
                };
                let s = call(dispatch, out);
                (m, s.budget.to_bits())
            };
            assert_eq!(mask_only(true), mask_only(false), "case {case}");
            assert_eq!(mask_only(true).0, run(false, false).0, "case {case}");
        }
    }
}
