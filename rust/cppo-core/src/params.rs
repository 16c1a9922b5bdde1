//! The mask's hyper-parameters, validated once on the Python side.

use crate::codes;

/// Position weights w_t (paper Eq. 9) or an ablation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PositionWeight {
    Linear = codes::position_weight::LINEAR,
    /// w_t = 1 everywhere.
    None = codes::position_weight::NONE,
    /// The linear weights permuted among a row's valid positions (seeded).
    Shuffled = codes::position_weight::SHUFFLED,
}

impl PositionWeight {
    /// The mode with this code (`codes::position_weight`), if any.
    pub fn from_code(code: u8) -> Option<Self> {
        [Self::Linear, Self::None, Self::Shuffled]
            .into_iter()
            .find(|m| *m as u8 == code)
    }
}

/// The token divergence D_t.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Divergence {
    BinaryTv = codes::divergence::BINARY_TV,
    BinaryKl = codes::divergence::BINARY_KL,
    /// A caller-supplied array, used as given.
    Given = codes::divergence::GIVEN,
}

impl Divergence {
    /// The mode with this code (`codes::divergence`), if any.
    pub fn from_code(code: u8) -> Option<Self> {
        [Self::BinaryTv, Self::BinaryKl, Self::Given]
            .into_iter()
            .find(|m| *m as u8 == code)
    }
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
    /// m >= 1: the adaptive budget is at most m * delta_b (2 in the paper's Eq. 22).
    pub budget_ceiling: f64,
    pub position_weight: PositionWeight,
    pub shuffle_seed: u64,
    /// The index of the call's first row in the whole input: row `r` of the call is
    /// seeded as row `row_offset + r` (wrapping) in the shuffled ablation, so results do
    /// not depend on how the input is split into calls.
    pub row_offset: u64,
    pub prefix_budget: bool,
    pub divergence: Divergence,
}
