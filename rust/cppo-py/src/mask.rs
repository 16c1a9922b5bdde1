//! The mask (`cppo_core::batch`): type conversion, GIL release, error mapping only.
//!
//! The contract with `python/cppo_native/_backends/cpu.py`: inputs are NumPy arrays of native
//! byte order (float64/32/16, or int16 carrying bfloat16 bit patterns for the float
//! inputs; bool/int/float for the valid mask); outputs are freshly allocated
//! C-contiguous arrays; parameters are already validated.

use numpy::{
    IxDyn, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadwriteArrayDyn, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cppo_core::batch::{compute_batch_threads, BatchInput, BatchOutput, Layout};
use cppo_core::params::{Divergence, Params, PositionWeight};
use cppo_core::row::BadValue;

use crate::arrays::{FloatArray, MaskArray};

fn contiguous<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{name}: output buffer must be C-contiguous")))
}

/// The first bad value as `(field, row, column, value)`.
type BadValueTuple = (u8, usize, usize, f64);

fn bad_tuple(bad: BadValue) -> BadValueTuple {
    (bad.field as u8, bad.row, bad.column, bad.value)
}

/// The mask's parameters, read from `cppo_native._core.params.MaskParams` by attribute
/// (validated there, once); codes as in `cppo_core::codes`.
#[derive(FromPyObject)]
struct MaskParams {
    delta: f64,
    delta_b: f64,
    w_min: f64,
    /// 0: horizon = "sequence".
    horizon: i64,
    adaptive_budget: bool,
    budget_quantile: f64,
    budget_scale: f64,
    budget_ceiling: f64,
    position_weight_code: u8,
    shuffle_seed: u64,
    prefix_budget: bool,
    divergence_code: u8,
}

impl MaskParams {
    fn to_core(&self, row_offset: u64) -> PyResult<Params> {
        Ok(Params {
            delta: self.delta,
            delta_b: self.delta_b,
            w_min: self.w_min,
            horizon: self.horizon,
            adaptive_budget: self.adaptive_budget,
            budget_quantile: self.budget_quantile,
            budget_scale: self.budget_scale,
            budget_ceiling: self.budget_ceiling,
            position_weight: PositionWeight::from_code(self.position_weight_code).ok_or_else(
                || {
                    PyValueError::new_err(format!(
                        "unknown position_weight code {}",
                        self.position_weight_code
                    ))
                },
            )?,
            shuffle_seed: self.shuffle_seed,
            row_offset,
            prefix_budget: self.prefix_budget,
            divergence: Divergence::from_code(self.divergence_code).ok_or_else(|| {
                PyValueError::new_err(format!("unknown divergence code {}", self.divergence_code))
            })?,
        })
    }
}

/// Computes the CPPO mask into the given output arrays. Returns
/// `(counts, bad)`: the number of positions per reason code, and `None` or the first
/// bad value as `(field, row, column, value)`, with `row` the index in this call.
/// `row_offset`: the index of the call's first row in the whole input (seeds the
/// shuffled ablation by the row's index in the input).
#[pyfunction]
#[pyo3(signature = (
    log_probs, old_log_probs, advantages, advantage_per_row, valid, divergence, cu_seqlens,
    mask_out, reason_out, threshold_out, gate_out, row_budget_out, *, params, num_threads,
    row_offset = 0
))]
#[allow(clippy::too_many_arguments)]
fn cppo_mask_into<'py>(
    py: Python<'py>,
    log_probs: &Bound<'py, PyAny>,
    old_log_probs: &Bound<'py, PyAny>,
    advantages: &Bound<'py, PyAny>,
    advantage_per_row: bool,
    valid: Option<&Bound<'py, PyAny>>,
    divergence: Option<&Bound<'py, PyAny>>,
    cu_seqlens: Option<PyReadonlyArray1<'py, i64>>,
    mask_out: &Bound<'py, PyArrayDyn<bool>>,
    reason_out: Option<&Bound<'py, PyArrayDyn<i8>>>,
    threshold_out: Option<&Bound<'py, PyArrayDyn<f64>>>,
    gate_out: Option<&Bound<'py, PyArrayDyn<f64>>>,
    row_budget_out: Option<&Bound<'py, PyArrayDyn<f64>>>,
    params: MaskParams,
    num_threads: usize,
    row_offset: u64,
) -> PyResult<([u64; 5], Option<BadValueTuple>)> {
    let params = params.to_core(row_offset)?;
    let lp = FloatArray::extract(log_probs, "log_probs")?;
    let lq = FloatArray::extract(old_log_probs, "old_log_probs")?;
    let adv = FloatArray::extract(advantages, "advantages")?;
    let mask_in = valid.map(MaskArray::extract).transpose()?;
    let div = divergence
        .map(|d| FloatArray::extract(d, "divergence"))
        .transpose()?;
    if (params.divergence == Divergence::Given) != div.is_some() {
        return Err(PyValueError::new_err(
            "divergence array given iff divergence_mode is 'given'",
        ));
    }
    let offsets = cu_seqlens
        .as_ref()
        .map(|c| c.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err("cu_seqlens must be C-contiguous int64"))?;
    let shape = lp.view().shape().to_vec();
    let layout = match offsets {
        Some(o) => Layout::Packed { offsets: o },
        None if shape.len() == 2 => Layout::Padded {
            rows: shape[0],
            cols: shape[1],
        },
        None => {
            return Err(PyValueError::new_err(format!(
                "padded inputs must be 2-D, got shape {shape:?}"
            )))
        }
    };

    let mut mask_rw = mask_out.readwrite();
    let mut reason_rw = reason_out.map(|a| a.readwrite());
    let mut threshold_rw = threshold_out.map(|a| a.readwrite());
    let mut gate_rw = gate_out.map(|a| a.readwrite());
    let mut budget_rw = row_budget_out.map(|a| a.readwrite());
    let output = BatchOutput {
        mask: contiguous(&mut mask_rw, "mask")?,
        reason: reason_rw
            .as_mut()
            .map(|a| contiguous(a, "reason"))
            .transpose()?,
        threshold: threshold_rw
            .as_mut()
            .map(|a| contiguous(a, "threshold"))
            .transpose()?,
        gate: gate_rw
            .as_mut()
            .map(|a| contiguous(a, "gate"))
            .transpose()?,
        row_budget: budget_rw
            .as_mut()
            .map(|a| contiguous(a, "row_budget"))
            .transpose()?,
    };
    let input = BatchInput {
        layout,
        log_probs: lp.view(),
        old_log_probs: lq.view(),
        advantages: adv.view(),
        advantage_per_row,
        valid: mask_in.as_ref().map(|m| m.view()),
        divergence: div.as_ref().map(|d| d.view()),
    };
    // One thread or a small batch: on this thread, no pool handoff (same results).
    let result = py
        .detach(|| compute_batch_threads(num_threads, &params, &input, output))
        .map_err(crate::pool_error)?;
    Ok(match result {
        Ok(counts) => (counts, None),
        Err(bad) => ([0; 5], Some(bad_tuple(bad))),
    })
}

/// The commonest call with its parameters and thread count fixed
/// (`cppo_native._backends.cpu.fast_mask`): `masker(log_probs, old_log_probs,
/// advantages, response_mask)` checks in native code that the inputs are that call's
/// (NumPy `ndarray`s, not subclasses, of native byte order: C-contiguous 2-D
/// float32/float64 log-probs of one dtype and shape, float32/float64 advantages `[B]` or
/// of the log-probs' shape, a mask of their shape (bool, uint8, int8, int32, int64,
/// float32 or float64: nonzero is valid, as on the general path) or None), allocates
/// the mask and computes it; returns `(mask, bad)` (`bad` as `cppo_mask_into`'s), or None for any
/// other inputs, which the general path takes. A call costs a few microseconds where
/// the same checks in Python cost tens once a large batch has left the caches cold.
#[pyclass(frozen, module = "cppo_native._native")]
struct FastMask {
    params: Params,
    num_threads: usize,
}

/// `ob` is a NumPy `ndarray` itself (not a subclass).
fn exact_ndarray(ob: &Bound<'_, PyAny>) -> bool {
    // SAFETY: a type check on a live object (the numpy crate loads NumPy's C API).
    unsafe { numpy::npyffi::PyArray_CheckExact(ob.py(), ob.as_ptr()) != 0 }
}

/// A float32 or float64 `ndarray` (native byte order), borrowed.
fn fast_float<'py>(ob: &Bound<'py, PyAny>) -> Option<FloatArray<'py, numpy::IxDyn>> {
    if !exact_ndarray(ob) {
        return None;
    }
    if let Ok(a) = ob.cast::<PyArrayDyn<f32>>() {
        return a.try_readonly().ok().map(FloatArray::F32);
    }
    if let Ok(a) = ob.cast::<PyArrayDyn<f64>>() {
        return a.try_readonly().ok().map(FloatArray::F64);
    }
    None
}

#[pymethods]
impl FastMask {
    #[new]
    fn new(params: MaskParams, num_threads: usize) -> PyResult<Self> {
        Ok(FastMask {
            params: params.to_core(0)?,
            num_threads,
        })
    }

    #[pyo3(signature = (log_probs, old_log_probs, advantages, response_mask))]
    #[allow(clippy::type_complexity)]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        log_probs: &Bound<'py, PyAny>,
        old_log_probs: &Bound<'py, PyAny>,
        advantages: &Bound<'py, PyAny>,
        response_mask: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<(Bound<'py, PyArrayDyn<bool>>, Option<BadValueTuple>)>> {
        let (Some(lp), Some(lq), Some(adv)) = (
            fast_float(log_probs),
            fast_float(old_log_probs),
            fast_float(advantages),
        ) else {
            return Ok(None);
        };
        let same_dtype = matches!(
            (&lp, &lq),
            (FloatArray::F32(_), FloatArray::F32(_)) | (FloatArray::F64(_), FloatArray::F64(_))
        );
        let (lpa, lqa) = (
            log_probs.cast::<PyUntypedArray>()?,
            old_log_probs.cast::<PyUntypedArray>()?,
        );
        let shape = lpa.shape();
        if !same_dtype
            || shape.len() != 2
            || lqa.shape() != shape
            || !lpa.is_c_contiguous()
            || !lqa.is_c_contiguous()
        {
            return Ok(None);
        }
        let adv_shape = advantages.cast::<PyUntypedArray>()?.shape();
        let per_row = if adv_shape == [shape[0]] {
            true
        } else if adv_shape == shape {
            false
        } else {
            return Ok(None);
        };
        let valid = match response_mask {
            None => None,
            Some(m) => {
                if !exact_ndarray(m) || m.cast::<PyUntypedArray>()?.shape() != shape {
                    return Ok(None);
                }
                match MaskArray::extract(m) {
                    Ok(a) => Some(a),
                    Err(_) => return Ok(None),
                }
            }
        };
        let (rows, cols) = (shape[0], shape[1]);
        // Uninitialised like np.empty: the kernel writes every position of the mask.
        // SAFETY: a fresh C-order array of the given shape, owned by no one else yet.
        let mask = unsafe { PyArrayDyn::<bool>::new(py, IxDyn(&[rows, cols]), false) };
        let mut mask_rw = mask.readwrite();
        let output = BatchOutput {
            mask: contiguous(&mut mask_rw, "mask")?,
            reason: None,
            threshold: None,
            gate: None,
            row_budget: None,
        };
        let input = BatchInput {
            layout: Layout::Padded { rows, cols },
            log_probs: lp.view(),
            old_log_probs: lq.view(),
            advantages: adv.view(),
            advantage_per_row: per_row,
            valid: valid.as_ref().map(|m| m.view()),
            divergence: None,
        };
        let (params, threads) = (&self.params, self.num_threads);
        let result = py
            .detach(|| compute_batch_threads(threads, params, &input, output))
            .map_err(crate::pool_error)?;
        drop(mask_rw);
        Ok(Some((mask, result.err().map(bad_tuple))))
    }
}

/// Adds the mask's functions to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cppo_mask_into, m)?)?;
    m.add_class::<FastMask>()?;
    Ok(())
}
