//! The mask's hyper-parameters, validated once on the Python side.

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
