//! Binary divergences of one token (over {sampled token, rest}) and the input tolerance
//! they share with the Top-K estimators (`topk`).

/// Log-probs may exceed 0 by this much before they are rejected.
pub const LOG_PROB_TOLERANCE: f64 = 1e-6;
/// Floor on the rest-masses 1 - p and 1 - r in Binary KL (keeps it finite when a
/// log-prob rounds to exactly 0.0).
pub const BINARY_KL_EPS: f64 = 1e-12;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_kl_is_finite_at_certain_tokens() {
        assert!(binary_kl(0.0, -1e-7).is_finite());
        assert_eq!(binary_kl(-0.5, -0.5), 0.0);
        assert!(binary_kl(-0.1, -2.0) > 0.0);
    }
}
