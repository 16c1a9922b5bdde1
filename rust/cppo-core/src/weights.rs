//! Position weights (paper Eq. 9) and the shuffled ablation's seeded permutation.

/// Paper Eq. 9: w_t with t - 1 = `column` and T = `horizon`.
#[inline(always)]
pub fn position_weight(column: usize, horizon: i64, w_min: f64) -> f64 {
    if horizon <= 1 {
        return 1.0;
    }
    let ratio = column as f64 / (horizon - 1) as f64;
    1.0 - (1.0 - w_min) * ratio.min(1.0)
}

/// The shuffled ablation's generator (same constants in Python and CUDA).
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded for the row with index `row` in the input (the call's `row_offset` plus
    /// the row's index in the call): `seed ^ (row + 1) * 0xD1B54A32D192ED03`, wrapping.
    pub fn new(seed: u64, row: u64) -> Self {
        SplitMix64(seed ^ row.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fisher-Yates permutation of 0..n driven by SplitMix64(seed, row), into `perm`
/// (`row`: the row's index in the input).
pub fn shuffle_permutation(n: usize, seed: u64, row: u64, perm: &mut Vec<usize>) {
    perm.clear();
    perm.extend(0..n);
    let mut rng = SplitMix64::new(seed, row);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_python_constants() {
        // Known answers from reference.py (SplitMix64 and shuffle_permutation).
        let mut g = SplitMix64::new(0, 0);
        assert_eq!(g.next_u64(), 0x2d0f_28c7_e7e7_86b2);
        assert_eq!(g.next_u64(), 0x7585_6f74_5165_f252);
        let mut perm = Vec::new();
        shuffle_permutation(10, 3, 2, &mut perm);
        assert_eq!(perm, [0, 7, 8, 9, 2, 3, 6, 1, 5, 4]);
        // reference.shuffle_permutation(10, 3, 2, row_offset=2**64 - 1): wraps to row 1.
        shuffle_permutation(10, 3, u64::MAX.wrapping_add(2), &mut perm);
        let mut row1 = Vec::new();
        shuffle_permutation(10, 3, 1, &mut row1);
        assert_eq!(perm, row1);
        assert_eq!(perm, [8, 1, 0, 6, 3, 7, 4, 9, 2, 5]);
    }
}
