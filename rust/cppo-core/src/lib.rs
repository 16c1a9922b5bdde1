//! cppo-core: the CPPO trust-region mask (`docs/semantics.md`), pure Rust.
//!
//! `row` computes one row; `batch` runs typed, strided batches (`views`) over rayon.
//! Nothing here knows about Python: the binding crate (`rust/cppo-py`) only converts
//! types, releases the GIL and maps errors.

pub mod batch;
/// The per-row prefix budget (quantile, clamp).
pub mod budget;
/// Integer codes shared with Python and CUDA.
pub mod codes;
/// Binary token divergences.
pub mod divergence;
/// The benchmark's memory floor (one pass over the mask's bytes).
pub mod floor;
pub mod params;
/// Parquet data pages of the added columns (levels as runs).
pub mod parquet;
/// Decoding the mask's input columns from Parquet pages (levels as runs).
pub mod parquet_read;
/// Rayon thread pools for an explicit thread count.
pub mod pool;
/// The row kernel.
pub mod row;
/// Token divergences (Top-K reduced, Binary) over positions.
pub mod topk;
/// The vectorisable exp (accurate to 1 ulp, identical bits in every build).
pub mod vexp;
pub mod views;
/// Position weights and the shuffled ablation.
pub mod weights;
