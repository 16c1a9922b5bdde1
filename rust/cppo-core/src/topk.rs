//! Token divergences outside the mask: Top-K reduced TV/KL and the elementwise Binary
//! TV/KL, over flattened positions, with rayon. Pure Rust (no Python here).
//!
//! The arithmetic mirrors `python/cppo_native/divergence.py` (`topk_divergence_reference`)
//! operation by operation, so float64 inputs give bit-identical results.
//!
//! Top-K buckets at one position (spec, "Top-K reduced TV / KL"): mu's top-K token ids,
//! the sampled token when it is not among them, and one "other" bucket holding the rest
//! of the vocabulary. Decisions (see `docs/divergences.md`):
//! - a top-K entry with a negative id is padding: skipped entirely (values not read);
//! - the sampled token is "among the top-K" when its id equals a (non-padding) top-K id;
//!   its bucket then uses the top-K entry's two log-probs, and the sampled-token
//!   log-probs only enter the validation;
//! - log-probs are clamped to <= 0 (the validator tolerates +1e-6); top-K log-probs may
//!   be -inf (zero mass);
//! - the "other" mass is `max(0, 1 - sum of listed masses)`, evaluated as
//!   `-expm1(l_max) - sum of the other listed masses` (`rest_mass`), buckets in top-K
//!   order and then the sampled bucket;
//! - KL uses `mu_b * (max(log mu_b, ln eps) - max(log pi_b, ln eps))` per bucket with
//!   mu_b > 0 (0 log 0 = 0), eps = `TOPK_EPS`, and the total is clamped at >= 0.

use rayon::prelude::*;

use crate::codes::topk_field;

use crate::divergence::{binary_kl, binary_tv, LOG_PROB_TOLERANCE};
pub use crate::views::{Float1, Float2, Ids1, Ids2, Valid1};

/// Probability floor inside the logarithms of the Top-K KL.
pub const TOPK_EPS: f64 = 1e-12;

/// Which divergence between the bucketed mu and pi.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKKind {
    Tv,
    Kl,
}

/// Which input held a bad value (`codes::topk_field`; `TOPK_FIELDS` in `divergence.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum TopKField {
    LogProbs = topk_field::LOG_PROBS,
    OldLogProbs = topk_field::OLD_LOG_PROBS,
    SampledIds = topk_field::SAMPLED_IDS,
    TopkIds = topk_field::TOPK_IDS,
    TopkOldLogProbs = topk_field::TOPK_OLD_LOG_PROBS,
    TopkLogProbs = topk_field::TOPK_LOG_PROBS,
}

/// The first bad value: flat position, input, top-K slot (0 for per-position inputs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopKBad {
    pub position: usize,
    pub field: TopKField,
    pub slot: usize,
    pub value: f64,
}

/// One position's inputs, widened to float64 / int64.
pub struct TopKPosition<'a> {
    pub topk_ids: &'a [i64],
    /// log mu at the top-K ids.
    pub topk_old_log_probs: &'a [f64],
    /// log pi at the top-K ids.
    pub topk_log_probs: &'a [f64],
    pub sampled_id: i64,
    /// log mu(y_t).
    pub old_log_prob: f64,
    /// log pi(y_t).
    pub log_prob: f64,
}

#[inline(always)]
fn bad(field: TopKField, slot: usize, value: f64) -> TopKBad {
    TopKBad {
        position: 0,
        field,
        slot,
        value,
    }
}

/// Validation of one (valid) position, in the documented order.
pub fn check_position(p: &TopKPosition) -> Result<(), TopKBad> {
    if !(p.log_prob.is_finite() && p.log_prob <= LOG_PROB_TOLERANCE) {
        return Err(bad(TopKField::LogProbs, 0, p.log_prob));
    }
    if !(p.old_log_prob.is_finite() && p.old_log_prob <= LOG_PROB_TOLERANCE) {
        return Err(bad(TopKField::OldLogProbs, 0, p.old_log_prob));
    }
    if p.sampled_id < 0 {
        return Err(bad(TopKField::SampledIds, 0, p.sampled_id as f64));
    }
    for k in 0..p.topk_ids.len() {
        let id = p.topk_ids[k];
        if id < 0 {
            continue;
        }
        if p.topk_ids[..k].contains(&id) {
            return Err(bad(TopKField::TopkIds, k, id as f64));
        }
        let a = p.topk_old_log_probs[k];
        if a.is_nan() || a > LOG_PROB_TOLERANCE {
            return Err(bad(TopKField::TopkOldLogProbs, k, a));
        }
        let b = p.topk_log_probs[k];
        if b.is_nan() || b > LOG_PROB_TOLERANCE {
            return Err(bad(TopKField::TopkLogProbs, k, b));
        }
    }
    Ok(())
}

/// One bucket: clamped log-probs under mu and pi and their exponentials.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bucket {
    pub log_mu: f64,
    pub log_pi: f64,
    pub mu: f64,
    pub pi: f64,
}

impl Bucket {
    #[inline(always)]
    fn new(log_mu: f64, log_pi: f64) -> Self {
        let (log_mu, log_pi) = (log_mu.min(0.0), log_pi.min(0.0));
        Bucket {
            log_mu,
            log_pi,
            mu: log_mu.exp(),
            pi: log_pi.exp(),
        }
    }
}

/// The mass outside the listed buckets, `max(0, 1 - sum_b exp(l_b))`, computed as
/// `-expm1(l_max) - sum_{b != max} exp(l_b)` so that a listed mass close to 1 (a near
/// certain token) does not cancel catastrophically. `l_max` is the first largest
/// log-prob; `logs` yields `(l_b, exp(l_b))`.
pub fn rest_mass(logs: impl Iterator<Item = (f64, f64)> + Clone) -> f64 {
    let mut best: Option<(usize, f64)> = None;
    for (i, (l, _)) in logs.clone().enumerate() {
        if best.is_none_or(|(_, m)| l > m) {
            best = Some((i, l));
        }
    }
    let Some((j, l_max)) = best else {
        return 1.0;
    };
    let mut rest = -l_max.exp_m1();
    for (i, (_, e)) in logs.enumerate() {
        if i != j {
            rest -= e;
        }
    }
    rest.max(0.0)
}

/// Top-K reduced divergence at one position (inputs already validated). `buckets` is
/// scratch space for the listed buckets.
pub fn topk_divergence(kind: TopKKind, p: &TopKPosition, buckets: &mut Vec<Bucket>) -> f64 {
    buckets.clear();
    let mut sampled_listed = false;
    for k in 0..p.topk_ids.len() {
        let id = p.topk_ids[k];
        if id < 0 {
            continue;
        }
        sampled_listed |= id == p.sampled_id;
        buckets.push(Bucket::new(p.topk_old_log_probs[k], p.topk_log_probs[k]));
    }
    if !sampled_listed {
        buckets.push(Bucket::new(p.old_log_prob, p.log_prob));
    }
    let other_mu = rest_mass(buckets.iter().map(|b| (b.log_mu, b.mu)));
    let other_pi = rest_mass(buckets.iter().map(|b| (b.log_pi, b.pi)));
    match kind {
        TopKKind::Tv => {
            let mut acc = 0.0f64;
            for b in buckets.iter() {
                acc += (b.mu - b.pi).abs();
            }
            0.5 * (acc + (other_mu - other_pi).abs())
        }
        TopKKind::Kl => {
            let log_eps = TOPK_EPS.ln();
            let mut acc = 0.0f64;
            for b in buckets.iter() {
                if b.mu > 0.0 {
                    acc += b.mu * (b.log_mu.max(log_eps) - b.log_pi.max(log_eps));
                }
            }
            if other_mu > 0.0 {
                acc += other_mu * (other_mu.max(TOPK_EPS).ln() - other_pi.max(TOPK_EPS).ln());
            }
            if acc > 0.0 {
                acc
            } else {
                0.0
            }
        }
    }
}

/// Positions per rayon task (small enough to balance, large enough to amortise).
const CHUNK: usize = 1024;

/// Keeps the error with the smallest flat position.
fn first_bad(a: Option<TopKBad>, b: Option<TopKBad>) -> Option<TopKBad> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if x.position <= y.position { x } else { y }),
        (x, y) => x.or(y),
    }
}

pub struct TopKInput<'a> {
    pub topk_ids: Ids2<'a>,
    pub topk_old_log_probs: Float2<'a>,
    pub topk_log_probs: Float2<'a>,
    pub sampled_ids: Ids1<'a>,
    pub old_log_probs: Float1<'a>,
    pub log_probs: Float1<'a>,
    pub valid: Option<Valid1<'a>>,
}

/// Top-K divergence at every position into `out` (`[N]`, 0 at invalid positions).
/// Shapes are checked by the caller (Python). Returns the first bad value, by position.
pub fn topk_divergence_batch(
    kind: TopKKind,
    input: &TopKInput,
    out: &mut [f64],
) -> Result<(), TopKBad> {
    let err = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(chunk, slots)| {
            let mut ids = Vec::new();
            let mut mu = Vec::new();
            let mut pi = Vec::new();
            let mut buckets = Vec::new();
            for (j, slot) in slots.iter_mut().enumerate() {
                let i = chunk * CHUNK + j;
                if let Some(v) = &input.valid {
                    if !v.at(i) {
                        *slot = 0.0;
                        continue;
                    }
                }
                input.topk_ids.row_into(i, &mut ids);
                input.topk_old_log_probs.row_into(i, &mut mu);
                input.topk_log_probs.row_into(i, &mut pi);
                let pos = TopKPosition {
                    topk_ids: &ids,
                    topk_old_log_probs: &mu,
                    topk_log_probs: &pi,
                    sampled_id: input.sampled_ids.at(i),
                    old_log_prob: input.old_log_probs.at(i),
                    log_prob: input.log_probs.at(i),
                };
                if let Err(e) = check_position(&pos) {
                    return Some(TopKBad { position: i, ..e });
                }
                *slot = topk_divergence(kind, &pos, &mut buckets);
            }
            None
        })
        .reduce(|| None, first_bad);
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Binary TV or KL (`divergence::binary_tv` / `divergence::binary_kl`) at every position into `out`,
/// 0 at invalid positions; log-probs at valid positions must be finite and <= 0 (+tol).
/// The error's field is 0 (log_probs) or 1 (old_log_probs).
pub fn binary_divergence_batch(
    kind: TopKKind,
    log_probs: &Float1,
    old_log_probs: &Float1,
    valid: Option<&Valid1>,
    out: &mut [f64],
) -> Result<(), TopKBad> {
    let err = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(chunk, slots)| {
            for (j, slot) in slots.iter_mut().enumerate() {
                let i = chunk * CHUNK + j;
                if let Some(v) = valid {
                    if !v.at(i) {
                        *slot = 0.0;
                        continue;
                    }
                }
                let lp = log_probs.at(i);
                if !(lp.is_finite() && lp <= LOG_PROB_TOLERANCE) {
                    return Some(TopKBad {
                        position: i,
                        field: TopKField::LogProbs,
                        slot: 0,
                        value: lp,
                    });
                }
                let lq = old_log_probs.at(i);
                if !(lq.is_finite() && lq <= LOG_PROB_TOLERANCE) {
                    return Some(TopKBad {
                        position: i,
                        field: TopKField::OldLogProbs,
                        slot: 0,
                        value: lq,
                    });
                }
                *slot = match kind {
                    TopKKind::Tv => binary_tv(lp, lq),
                    TopKKind::Kl => binary_kl(lp, lq),
                };
            }
            None
        })
        .reduce(|| None, first_bad);
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos<'a>(
        ids: &'a [i64],
        mu: &'a [f64],
        pi: &'a [f64],
        y: i64,
        lq: f64,
        lp: f64,
    ) -> TopKPosition<'a> {
        TopKPosition {
            topk_ids: ids,
            topk_old_log_probs: mu,
            topk_log_probs: pi,
            sampled_id: y,
            old_log_prob: lq,
            log_prob: lp,
        }
    }

    #[test]
    fn full_vocabulary_gives_exact_tv_and_kl() {
        let mu = [0.5f64, 0.3, 0.2];
        let pi = [0.2f64, 0.3, 0.5];
        let lmu: Vec<f64> = mu.iter().map(|x| x.ln()).collect();
        let lpi: Vec<f64> = pi.iter().map(|x| x.ln()).collect();
        let ids = [0, 1, 2];
        let p = pos(&ids, &lmu, &lpi, 1, lmu[1], lpi[1]);
        let tv = topk_divergence(TopKKind::Tv, &p, &mut Vec::new());
        assert!((tv - 0.3).abs() < 1e-12, "{tv}");
        let kl = topk_divergence(TopKKind::Kl, &p, &mut Vec::new());
        let want: f64 = mu.iter().zip(pi).map(|(m, q)| m * (m / q).ln()).sum();
        assert!((kl - want).abs() < 1e-12, "{kl} vs {want}");
    }

    #[test]
    fn empty_topk_reduces_to_binary() {
        let (lp, lq) = (-0.3f64, -1.2f64);
        let p = pos(&[], &[], &[], 7, lq, lp);
        assert!(
            (topk_divergence(TopKKind::Tv, &p, &mut Vec::new()) - binary_tv(lp, lq)).abs() < 1e-15
        );
        assert!(
            (topk_divergence(TopKKind::Kl, &p, &mut Vec::new()) - binary_kl(lp, lq)).abs() < 1e-12
        );
        // a near-certain token keeps its tiny rest mass exactly (no 1 - exp cancellation)
        let p = pos(&[], &[], &[], 7, -1e-14, -2e-14);
        let want = binary_kl(-2e-14, -1e-14);
        assert!((topk_divergence(TopKKind::Kl, &p, &mut Vec::new()) - want).abs() <= 1e-6 * want);
    }

    #[test]
    fn padding_slots_are_skipped_and_duplicates_rejected() {
        let ids = [3, -1, 3];
        let v = [-1.0, f64::NAN, -1.0];
        let p = pos(&ids, &v, &v, 3, -1.0, -1.0);
        let e = check_position(&p).unwrap_err();
        assert_eq!((e.field, e.slot), (TopKField::TopkIds, 2));
        let ids = [3, -1, 4];
        let v = [-1.0, f64::NAN, -2.0];
        assert!(check_position(&pos(&ids, &v, &v, 3, -1.0, -1.0)).is_ok());
        assert_eq!(
            topk_divergence(
                TopKKind::Tv,
                &pos(&ids, &v, &v, 3, -1.0, -1.0),
                &mut Vec::new()
            ),
            0.0
        );
    }

    #[test]
    fn kl_with_zero_pi_mass_is_finite() {
        let ids = [0, 1];
        let mu = [(0.9f64).ln(), (0.1f64).ln()];
        let pi = [0.0, f64::NEG_INFINITY];
        let d = topk_divergence(
            TopKKind::Kl,
            &pos(&ids, &mu, &pi, 0, mu[0], 0.0),
            &mut Vec::new(),
        );
        assert!(d.is_finite() && d > 0.0);
    }
}
