//! Token divergences (`cppo_core::topk`): type conversion, GIL release, error mapping only.
//!
//! Contract with `python/cppo_native/divergence.py`: per-position inputs are 1-D `[N]`,
//! top-K inputs 2-D `[N, K]` (any strides), floats as float64/32/16 or int16 bfloat16
//! bits, ids as int64/int32, valid flags bool/uint8/int8/int32/int64/float32/float64;
//! the output is a fresh C-contiguous float64 `[N]`; shapes are checked in Python.

use numpy::ndarray::{Ix1, Ix2};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cppo_core::pool::with_threads;
use cppo_core::topk::{
    binary_divergence_batch, topk_divergence_batch, TopKBad, TopKInput, TopKKind,
};

use crate::arrays::{FloatArray, MaskArray, I1, I2};

fn kind_of(kind: &str) -> PyResult<TopKKind> {
    match kind {
        "tv" => Ok(TopKKind::Tv),
        "kl" => Ok(TopKKind::Kl),
        other => Err(PyValueError::new_err(format!(
            "kind must be 'tv' or 'kl', got {other:?}"
        ))),
    }
}

type BadTuple = Option<(u8, usize, usize, f64)>;

fn bad_tuple(r: Result<(), TopKBad>) -> BadTuple {
    r.err()
        .map(|b| (b.field as u8, b.position, b.slot, b.value))
}

/// Top-K reduced TV or KL at `N` positions into `out` (float64 `[N]`). Returns `None`
/// or the first bad value as `(field, position, slot, value)`.
#[pyfunction]
#[pyo3(signature = (kind, topk_ids, topk_old_log_probs, topk_log_probs, sampled_ids, old_log_probs, log_probs, valid, out, *, num_threads))]
#[allow(clippy::too_many_arguments)]
fn topk_divergence_into<'py>(
    py: Python<'py>,
    kind: &str,
    topk_ids: &Bound<'py, PyAny>,
    topk_old_log_probs: &Bound<'py, PyAny>,
    topk_log_probs: &Bound<'py, PyAny>,
    sampled_ids: &Bound<'py, PyAny>,
    old_log_probs: &Bound<'py, PyAny>,
    log_probs: &Bound<'py, PyAny>,
    valid: Option<&Bound<'py, PyAny>>,
    out: &Bound<'py, PyArray1<f64>>,
    num_threads: usize,
) -> PyResult<BadTuple> {
    let kind = kind_of(kind)?;
    let ids = I2::extract(topk_ids, "topk_ids")?;
    let mu = FloatArray::<Ix2>::extract(topk_old_log_probs, "topk_old_log_probs")?;
    let pi = FloatArray::<Ix2>::extract(topk_log_probs, "topk_log_probs")?;
    let y = I1::extract(sampled_ids, "sampled_ids")?;
    let lq = FloatArray::<Ix1>::extract(old_log_probs, "old_log_probs")?;
    let lp = FloatArray::<Ix1>::extract(log_probs, "log_probs")?;
    let v = valid.map(MaskArray::<Ix1>::extract).transpose()?;
    let input = TopKInput {
        topk_ids: ids.view(),
        topk_old_log_probs: mu.view(),
        topk_log_probs: pi.view(),
        sampled_ids: y.view(),
        old_log_probs: lq.view(),
        log_probs: lp.view(),
        valid: v.as_ref().map(|m| m.view()),
    };
    let n = input.log_probs.len();
    let k = input.topk_ids.dim().1;
    if input.old_log_probs.len() != n
        || input.sampled_ids.len() != n
        || input.topk_ids.dim().0 != n
        || input.topk_old_log_probs.dim() != (n, k)
        || input.topk_log_probs.dim() != (n, k)
        || input.valid.as_ref().is_some_and(|v| v.len() != n)
    {
        return Err(PyValueError::new_err(
            "topk_divergence_into: inconsistent shapes",
        ));
    }
    let mut out_rw = out.readwrite();
    let out_slice = out_rw
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be C-contiguous"))?;
    if out_slice.len() != n {
        return Err(PyValueError::new_err("out must have N entries"));
    }
    let result = py
        .detach(|| {
            with_threads(num_threads, || {
                topk_divergence_batch(kind, &input, out_slice)
            })
        })
        .map_err(crate::pool_error)?;
    Ok(bad_tuple(result))
}

/// Binary TV or KL at `N` positions into `out` (float64 `[N]`); same error tuple.
#[pyfunction]
#[pyo3(signature = (kind, log_probs, old_log_probs, valid, out, *, num_threads))]
fn binary_divergence_into<'py>(
    py: Python<'py>,
    kind: &str,
    log_probs: &Bound<'py, PyAny>,
    old_log_probs: &Bound<'py, PyAny>,
    valid: Option<&Bound<'py, PyAny>>,
    out: &Bound<'py, PyArray1<f64>>,
    num_threads: usize,
) -> PyResult<BadTuple> {
    let kind = kind_of(kind)?;
    let lp = FloatArray::<Ix1>::extract(log_probs, "log_probs")?;
    let lq = FloatArray::<Ix1>::extract(old_log_probs, "old_log_probs")?;
    let v = valid.map(MaskArray::<Ix1>::extract).transpose()?;
    let (lpv, lqv) = (lp.view(), lq.view());
    let vv = v.as_ref().map(|m| m.view());
    let mut out_rw = out.readwrite();
    let out_slice = out_rw
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be C-contiguous"))?;
    let n = out_slice.len();
    if lpv.len() != n || lqv.len() != n || vv.as_ref().is_some_and(|v| v.len() != n) {
        return Err(PyValueError::new_err(
            "binary_divergence_into: inconsistent shapes",
        ));
    }
    let result = py
        .detach(|| {
            with_threads(num_threads, || {
                binary_divergence_batch(kind, &lpv, &lqv, vv.as_ref(), out_slice)
            })
        })
        .map_err(crate::pool_error)?;
    Ok(bad_tuple(result))
}

/// Adds this file's functions to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk_divergence_into, m)?)?;
    m.add_function(wrap_pyfunction!(binary_divergence_into, m)?)?;
    Ok(())
}
