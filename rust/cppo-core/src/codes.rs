//! Every integer code that crosses a language boundary, defined once for Rust.
//!
//! Python reads them through the binding's `_native.codes()` (a dict of dicts built from
//! the `NAMES` tables below) and checks its own constants against them; the CUDA
//! kernels use the same values. The Rust enums that carry these codes take their
//! discriminants from here.

/// Reason codes (int8, one per position; spec, "The mask").
pub mod reason {
    pub const INVALID: i8 = 0;
    pub const KEPT_TOWARD_MU: i8 = 1;
    pub const KEPT_WITHIN_THRESHOLD: i8 = 2;
    pub const MASKED_TOKEN_THRESHOLD: i8 = 3;
    pub const MASKED_PREFIX_BUDGET: i8 = 4;
    /// Number of reason codes (the length of the per-code counts).
    pub const COUNT: usize = 5;
    pub const NAMES: [(&str, i8); COUNT] = [
        ("invalid", INVALID),
        ("kept_toward_mu", KEPT_TOWARD_MU),
        ("kept_within_threshold", KEPT_WITHIN_THRESHOLD),
        ("masked_token_threshold", MASKED_TOKEN_THRESHOLD),
        ("masked_prefix_budget", MASKED_PREFIX_BUDGET),
    ];
}

/// Position-weight modes (`MaskParams.position_weight_code`).
pub mod position_weight {
    pub const LINEAR: u8 = 0;
    pub const NONE: u8 = 1;
    pub const SHUFFLED: u8 = 2;
    pub const NAMES: [(&str, u8); 3] = [("linear", LINEAR), ("none", NONE), ("shuffled", SHUFFLED)];
}

/// Divergence modes of the mask (`MaskParams.divergence_code`).
pub mod divergence {
    pub const BINARY_TV: u8 = 0;
    pub const BINARY_KL: u8 = 1;
    /// A caller-supplied array, used as given.
    pub const GIVEN: u8 = 2;
    pub const NAMES: [(&str, u8); 3] = [
        ("binary_tv", BINARY_TV),
        ("binary_kl", BINARY_KL),
        ("given", GIVEN),
    ];
}

/// Which input of the mask held a bad value.
pub mod field {
    pub const LOG_PROBS: u8 = 0;
    pub const OLD_LOG_PROBS: u8 = 1;
    pub const ADVANTAGES: u8 = 2;
    pub const DIVERGENCE: u8 = 3;
    pub const NAMES: [(&str, u8); 4] = [
        ("log_probs", LOG_PROBS),
        ("old_log_probs", OLD_LOG_PROBS),
        ("advantages", ADVANTAGES),
        ("divergence", DIVERGENCE),
    ];
}

/// Which input of the Top-K / Binary divergences held a bad value (the Binary ones use
/// the first two).
pub mod topk_field {
    pub const LOG_PROBS: u8 = 0;
    pub const OLD_LOG_PROBS: u8 = 1;
    pub const SAMPLED_IDS: u8 = 2;
    pub const TOPK_IDS: u8 = 3;
    pub const TOPK_OLD_LOG_PROBS: u8 = 4;
    pub const TOPK_LOG_PROBS: u8 = 5;
    pub const NAMES: [(&str, u8); 6] = [
        ("log_probs", LOG_PROBS),
        ("old_log_probs", OLD_LOG_PROBS),
        ("sampled_ids", SAMPLED_IDS),
        ("topk_ids", TOPK_IDS),
        ("topk_old_log_probs", TOPK_OLD_LOG_PROBS),
        ("topk_log_probs", TOPK_LOG_PROBS),
    ];
}

/// Kinds of the decompressed Parquet pages handed to the page decoder.
pub mod page_kind {
    pub const DICTIONARY: u8 = 0;
    pub const DATA_V1: u8 = 1;
    pub const DATA_V2: u8 = 2;
    pub const NAMES: [(&str, u8); 3] = [
        ("dictionary", DICTIONARY),
        ("data_v1", DATA_V1),
        ("data_v2", DATA_V2),
    ];
}

/// Every table, by the name `_native.codes()` gives it, with its codes widened to i64.
pub fn tables() -> Vec<(&'static str, Vec<(&'static str, i64)>)> {
    fn widen<T: Copy + Into<i64>>(names: &[(&'static str, T)]) -> Vec<(&'static str, i64)> {
        names.iter().map(|&(n, c)| (n, c.into())).collect()
    }
    vec![
        ("reason", widen(&reason::NAMES)),
        ("position_weight", widen(&position_weight::NAMES)),
        ("divergence", widen(&divergence::NAMES)),
        ("field", widen(&field::NAMES)),
        ("topk_field", widen(&topk_field::NAMES)),
        ("page_kind", widen(&page_kind::NAMES)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each table's codes are 0..n in order (Python indexes tuples by them).
    #[test]
    fn codes_are_dense_and_ordered() {
        for (table, names) in tables() {
            for (i, (name, code)) in names.iter().enumerate() {
                assert_eq!(*code, i as i64, "{table}.{name}");
            }
        }
    }
}
