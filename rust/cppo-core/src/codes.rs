//! Integer codes shared with Python and CUDA (defined once here, exported to Python by
//! the binding's `codes()`).

/// Reason codes (spec, "The mask").
pub const INVALID: i8 = 0;
pub const KEPT_TOWARD_MU: i8 = 1;
pub const KEPT_WITHIN: i8 = 2;
pub const MASKED_TOKEN: i8 = 3;
pub const MASKED_PREFIX: i8 = 4;
