//! cppo-core: the CPPO trust-region mask (`shared/spec/CPPO.md`), pure Rust.
//!
//! `core` computes one row; `batch` runs typed, strided batches over rayon. Nothing here
//! knows about Python: the binding crate (`rust/cppo-py`) only converts types, releases
//! the GIL and maps errors.

pub mod batch;
pub mod core;
pub mod libm_exp;
/// Parquet data pages of the added columns (levels as runs).
pub mod parquet;
/// Decoding the mask's input columns from Parquet pages (levels as runs).
pub mod parquet_read;
/// Token divergences (Top-K reduced, Binary) over positions.
pub mod topk;
