//! The per-row prefix budget (paper Eq. 22): the spec's linear-interpolation quantile
//! and the clamped adaptive budget.

use crate::params::Params;
use crate::row::sized;

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

/// delta_b_row = clamp(k Q_q(D), delta_b, m delta_b) over the row's valid positions
/// (paper Eq. 22 with the ceiling m = `budget_ceiling`, 2 in the paper; delta_b for a
/// row with no valid token).
///
/// Most rows' quantile falls clearly below or above the clamp window, and then the clamp
/// decides the budget without the exact quantile: one counting pass tells. Otherwise
/// only the values inside the window (with a 1e-9 relative margin) are selected from.
/// The result equals the spec's formula exactly, since the margin covers every rounding
/// in Q's interpolation and in k Q.
pub(crate) fn adaptive_budget(
    params: &Params,
    div: &[f64],
    valid: &[u8],
    scratch: &mut Vec<u64>,
) -> f64 {
    let (delta_b, k) = (params.delta_b, params.budget_scale);
    let ceiling = params.budget_ceiling * delta_b;
    let clamp = |q: f64| (k * q).max(delta_b).min(ceiling);
    let n = valid.iter().filter(|&&v| v != 0).count();
    if n == 0 {
        return delta_b;
    }
    let h = params.budget_quantile * (n - 1) as f64;
    let (lo, hi) = (h.floor() as usize, h.ceil() as usize);
    if k > 0.0 && delta_b > 0.0 {
        let low = delta_b / k * (1.0 - 1e-9);
        let high = ceiling / k * (1.0 + 1e-9);
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
            return ceiling; // x[lo] > high: k Q > m delta_b
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
