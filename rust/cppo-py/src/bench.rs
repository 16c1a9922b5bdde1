//! Benchmark helpers (`bench/cpu.py`): the memory floor, the compute control and the row
//! kernel's variant.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cppo_core::pool::with_threads;

/// One pass over the bytes the mask reads (`read`: contiguous uint8 views of the
/// inputs) and writes (`copy_from` copied into `copy_to`, a byte per token), on
/// `num_threads` threads (0: all cores), with the GIL released. Returns the OR of the
/// words read.
#[pyfunction]
#[pyo3(signature = (read, copy_from, copy_to, *, num_threads))]
fn memory_floor(
    py: Python<'_>,
    read: Vec<PyReadonlyArray1<'_, u8>>,
    copy_from: PyReadonlyArray1<'_, u8>,
    mut copy_to: PyReadwriteArray1<'_, u8>,
    num_threads: usize,
) -> PyResult<u64> {
    let not_contiguous = |_| PyValueError::new_err("memory_floor: arrays must be contiguous");
    let read: Vec<&[u8]> = read
        .iter()
        .map(|a| a.as_slice().map_err(not_contiguous))
        .collect::<PyResult<_>>()?;
    let from = copy_from.as_slice().map_err(not_contiguous)?;
    let to = copy_to.as_slice_mut().map_err(not_contiguous)?;
    if from.len() != to.len() {
        return Err(PyValueError::new_err(
            "memory_floor: copy_from and copy_to differ in length",
        ));
    }
    py.detach(|| {
        with_threads(num_threads, || {
            cppo_core::floor::memory_floor(&read, from, to)
        })
    })
    .map_err(crate::pool_error)
}

/// The benchmark's compute control (`cppo_core::floor::fp_control`): `tokens` tokens'
/// worth of independent fused multiply-adds on `num_threads` threads (0: all cores),
/// with the GIL released. Returns a checksum.
#[pyfunction]
#[pyo3(signature = (tokens, *, num_threads))]
fn fp_control(py: Python<'_>, tokens: usize, num_threads: usize) -> PyResult<f64> {
    py.detach(|| with_threads(num_threads, || cppo_core::floor::fp_control(tokens)))
        .map_err(crate::pool_error)
}

/// Dev builds with the cargo feature `phase-timing` only: the row kernel's phase clock
/// (`cppo_core::row::PHASE_NS`, nanoseconds summed over threads and calls), read and
/// reset. Not in the wheel (and so not in the type stub).
#[cfg(feature = "phase-timing")]
#[pyfunction]
fn phase_ns() -> Vec<u64> {
    cppo_core::row::PHASE_NS
        .iter()
        .map(|a| a.swap(0, std::sync::atomic::Ordering::Relaxed))
        .collect()
}

/// The row kernel's instruction-set variant on this CPU: "portable", "avx2" or
/// "avx512" (`CPPO_NATIVE_ISA` may choose a lower one).
#[pyfunction]
fn simd_variant() -> &'static str {
    cppo_core::row::Isa::current().name()
}

/// Adds the benchmark helpers to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(memory_floor, m)?)?;
    m.add_function(wrap_pyfunction!(fp_control, m)?)?;
    m.add_function(wrap_pyfunction!(simd_variant, m)?)?;
    #[cfg(feature = "phase-timing")]
    m.add_function(wrap_pyfunction!(phase_ns, m)?)?;
    Ok(())
}
