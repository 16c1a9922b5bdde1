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
    }
}
