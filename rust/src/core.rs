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

/// Advantage of a row: one value broadcast, or one per token.
#[derive(Clone, Copy)]
pub enum Advantage<'a> {
    Row(f64),
    Token(&'a [f64]),
}

impl Advantage<'_> {
    #[inline(always)]
    fn at(&self, column: usize) -> f64 {
        match self {
            Advantage::Row(a) => *a,
            Advantage::Token(a) => a[column],
        }
    }
}

/// One row's inputs, widened to float64 (`valid` is 0/1).
pub struct RowInput<'a> {
    pub log_probs: &'a [f64],
    pub old_log_probs: &'a [f64],
    pub advantage: Advantage<'a>,
    pub valid: &'a [u8],
    /// Caller-supplied divergence (`Divergence::Given` only).
    pub divergence: Option<&'a [f64]>,
}

/// One row's outputs; the optional ones are written only when present.
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
    /// Number of positions with each reason code (index = code).
    pub counts: [u64; 5],
}

/// Reusable per-thread buffers (row-sized, never batch-sized).
#[derive(Default)]
pub struct Scratch {
    divergence: Vec<f64>,
    weight: Vec<f64>,
    selection: Vec<f64>,
    valid_columns: Vec<usize>,
    permutation: Vec<usize>,
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
        SplitMix64(seed ^ (row as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
    pub fn next(&mut self) -> u64 {
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
        let j = (rng.next() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
}

/// Spec quantile (linear interpolation) of `values`, which it reorders. `values` is
/// non-empty and holds no NaN.
pub fn quantile_linear(values: &mut [f64], q: f64) -> f64 {
    let n = values.len();
    let h = q * (n - 1) as f64;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    let (_, &mut x_lo, right) = values.select_nth_unstable_by(lo, f64::total_cmp);
    let x_hi = if hi == lo {
        x_lo
    } else {
        right.iter().copied().fold(f64::INFINITY, f64::min)
    };
    x_lo + (h - lo as f64) * (x_hi - x_lo)
}

#[inline(always)]
fn bad(column: usize, field: Field, value: f64) -> BadValue {
    BadValue { row: 0, column, field, value }
}

/// Checks the spec's rules at every valid position; returns the first violation.
fn check_row(params: &Params, input: &RowInput) -> Result<(), BadValue> {
    for column in 0..input.valid.len() {
        if input.valid[column] == 0 {
            continue;
        }
        let lp = input.log_probs[column];
        if !(lp.is_finite() && lp <= LOG_PROB_TOLERANCE) {
            return Err(bad(column, Field::LogProbs, lp));
        }
        let lq = input.old_log_probs[column];
        if !(lq.is_finite() && lq <= LOG_PROB_TOLERANCE) {
            return Err(bad(column, Field::OldLogProbs, lq));
        }
        let a = input.advantage.at(column);
        if !a.is_finite() {
            return Err(bad(column, Field::Advantages, a));
        }
        if params.divergence == Divergence::Given {
            let d = input.divergence.expect("Given divergence needs an array")[column];
            if !(d.is_finite() && d >= 0.0) {
                return Err(bad(column, Field::Divergence, d));
            }
        }
    }
    Ok(())
}

/// Computes one row of the mask (and the optional outputs). `row` seeds the shuffled
/// ablation and is reported in errors.
pub fn compute_row(
    params: &Params,
    row: usize,
    input: &RowInput,
    scratch: &mut Scratch,
    out: RowOutput,
) -> Result<RowSummary, BadValue> {
    let len = input.valid.len();
    check_row(params, input).map_err(|e| BadValue { row, ..e })?;

    // Horizon T: fixed, or 1 + the last valid index.
    let horizon = if params.horizon > 0 {
        params.horizon
    } else {
        input.valid.iter().rposition(|&v| v != 0).map_or(0, |c| c as i64 + 1)
    };

    // Token divergence D_t at valid positions (Binary TV/KL or given).
    let div = &mut scratch.divergence;
    div.clear();
    div.resize(len, 0.0);
    match params.divergence {
        Divergence::BinaryTv => {
            for c in 0..len {
                if input.valid[c] != 0 {
                    div[c] = binary_tv(input.log_probs[c], input.old_log_probs[c]);
                }
            }
        }
        Divergence::BinaryKl => {
            for c in 0..len {
                if input.valid[c] != 0 {
                    div[c] = binary_kl(input.log_probs[c], input.old_log_probs[c]);
                }
            }
        }
        Divergence::Given => {
            let given = input.divergence.expect("Given divergence needs an array");
            for c in 0..len {
                if input.valid[c] != 0 {
                    div[c] = given[c];
                }
            }
        }
    }

    // Position weights; the shuffled ablation permutes them among valid positions.
    let shuffled = params.position_weight == PositionWeight::Shuffled;
    if shuffled {
        let weight = &mut scratch.weight;
        weight.clear();
        weight.resize(len, 1.0);
        let cols = &mut scratch.valid_columns;
        cols.clear();
        cols.extend((0..len).filter(|&c| input.valid[c] != 0));
        shuffle_permutation(cols.len(), params.shuffle_seed, row, &mut scratch.permutation);
        for (k, &c) in cols.iter().enumerate() {
            weight[c] = position_weight(cols[scratch.permutation[k]], horizon, params.w_min);
        }
    }

    // Per-row budget (Eq. 22).
    let mut budget = params.delta_b;
    if params.adaptive_budget {
        let sel = &mut scratch.selection;
        sel.clear();
        sel.extend((0..len).filter(|&c| input.valid[c] != 0).map(|c| div[c]));
        if !sel.is_empty() {
            let q = quantile_linear(sel, params.budget_quantile);
            budget = (params.budget_scale * q).max(params.delta_b).min(2.0 * params.delta_b);
        }
    }

    // Prefix scan (Eq. 8) and the mask (Eq. 10). S and W include every valid token.
    let RowOutput { mask, mut reason, mut threshold, mut gate } = out;
    let mut counts = [0u64; 5];
    let mut s_sum = 0.0f64; // S_{t-1}
    let mut w_sum = 0.0f64; // W_{t-1}
    let delta = params.delta;
    for c in 0..len {
        let c_t = if params.prefix_budget {
            delta.min(delta + budget * w_sum - s_sum)
        } else {
            delta
        };
        if let Some(t) = threshold.as_deref_mut() {
            t[c] = c_t;
        }
        if input.valid[c] == 0 {
            mask[c] = false;
            if let Some(r) = reason.as_deref_mut() {
                r[c] = INVALID;
            }
            if let Some(g) = gate.as_deref_mut() {
                g[c] = 0.0;
            }
            counts[0] += 1;
            continue;
        }
        let w = match params.position_weight {
            PositionWeight::Linear => position_weight(c, horizon, params.w_min),
            PositionWeight::None => 1.0,
            PositionWeight::Shuffled => scratch.weight[c],
        };
        let z = w * div[c];
        let lp = input.log_probs[c];
        let lq = input.old_log_probs[c];
        let toward_mu = input.advantage.at(c) * (lp - lq) <= 0.0;
        let s_next = s_sum + z;
        let code = if toward_mu {
            KEPT_TOWARD_MU
        } else if z <= c_t {
            KEPT_WITHIN
        } else if z > delta {
            MASKED_TOKEN
        } else {
            MASKED_PREFIX
        };
        mask[c] = code == KEPT_TOWARD_MU || code == KEPT_WITHIN;
        if let Some(r) = reason.as_deref_mut() {
            r[c] = code;
        }
        if let Some(g) = gate.as_deref_mut() {
            g[c] = if toward_mu {
                1.0
            } else {
                let mut x = z / delta;
                if params.prefix_budget {
                    x = x.max(s_next / (delta + budget * w_sum));
                }
                if x <= 1.0 {
                    1.0
                } else {
                    1.0 / x
                }
            };
        }
        counts[code as usize] += 1;
        s_sum = s_next;
        w_sum += w;
    }
    Ok(RowSummary { budget, counts })
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

    fn run(p: &Params, adv: f64, d: &[f64], valid: &[u8]) -> (Vec<bool>, Vec<i8>, Vec<f64>, RowSummary) {
        let n = d.len();
        let lp = vec![-1.0; n];
        let lq = vec![-1.1; n];
        let input = RowInput {
            log_probs: &lp,
            old_log_probs: &lq,
            advantage: Advantage::Row(adv),
            valid,
            divergence: Some(d),
        };
        let (mut m, mut r, mut t, mut g) = (vec![false; n], vec![0i8; n], vec![0.0; n], vec![0.0; n]);
        let out = RowOutput { mask: &mut m, reason: Some(&mut r), threshold: Some(&mut t), gate: Some(&mut g) };
        let s = compute_row(p, 0, &input, &mut Scratch::default(), out).unwrap();
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
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile_linear(&mut v, 0.9), 4.0 + (0.9 * 4.0 - 3.0) * 1.0);
        let mut one = vec![7.0];
        assert_eq!(quantile_linear(&mut one, 0.9), 7.0);
    }

    #[test]
    fn binary_kl_is_finite_at_certain_tokens() {
        assert!(binary_kl(0.0, -1e-7).is_finite());
        assert_eq!(binary_kl(-0.5, -0.5), 0.0);
        assert!(binary_kl(-0.1, -2.0) > 0.0);
    }

    #[test]
    fn splitmix_matches_python_constants() {
        // First outputs of the reference generator for seed 0, row 0 (reference.py).
        let mut g = SplitMix64::new(0, 0);
        let first = g.next();
        let mut g2 = SplitMix64::new(0, 0);
        assert_eq!(first, g2.next());
        let mut perm = Vec::new();
        shuffle_permutation(10, 3, 2, &mut perm);
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn empty_row() {
        let (m, _, _, s) = run(&params(), 1.0, &[], &[]);
        assert!(m.is_empty());
        assert_eq!(s.budget, 0.02);
    }
}
