//! The Python binding of cppo-core: the extension module `cppo_native._native`.
//!
//! One module per concern, each with a `register` function; they only convert types,
//! release the GIL and map errors. No CPPO logic here.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod arrays;
mod bench;
mod codes;
mod divergence;
mod mask;
mod parquet;

/// A thread pool that could not start: a `RuntimeError` naming `num_threads`.
fn pool_error(e: cppo_core::pool::PoolError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    mask::register(m)?;
    divergence::register(m)?;
    parquet::register(m)?;
    codes::register(m)?;
    bench::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
