//! The mask (`cppo_core::batch`): type conversion, GIL release, error mapping only.
//!
//! The contract with `python/cppo_native/_backends/cpu.py`: inputs are NumPy arrays of native
//! byte order (float64/32/16, or int16 carrying bfloat16 bit patterns for the float
//! inputs; bool/int/float for the valid mask); outputs are freshly allocated
//! C-contiguous arrays; parameters are already validated.

use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadwriteArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cppo_core::batch::{compute_batch_threads, BatchInput, BatchOutput, Layout};
use cppo_core::params::{Divergence, Params, PositionWeight};

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
        Err(bad) => (
            [0; 5],
            Some((bad.field as u8, bad.row, bad.column, bad.value)),
        ),
    })
}

/// Adds the mask's functions to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cppo_mask_into, m)?)?;
    Ok(())
}
