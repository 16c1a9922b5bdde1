//! The Python binding: type conversion, GIL release, error mapping. No CPPO logic here.
//!
//! The contract with `python/cppo_native/_cpu.py`: inputs are NumPy arrays of native
//! byte order (float64/32/16, or int16 carrying bfloat16 bit patterns for the float
//! inputs; bool/int/float for the valid mask); outputs are freshly allocated
//! C-contiguous arrays; parameters are already validated.

use numpy::ndarray::{Dimension, IxDyn};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArray, PyReadonlyArray1, PyReadwriteArrayDyn};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use half::f16;

use crate::batch::{
    compute_batch, with_threads, BatchInput, BatchOutput, FloatView, Layout, MaskView,
};
use crate::core::{Divergence, Params, PositionWeight};

/// A float array borrowed from NumPy, of any supported dtype (int16 = bfloat16 bits)
/// and dimensionality `D`.
pub(crate) enum FloatArray<'py, D: Dimension = IxDyn> {
    F64(PyReadonlyArray<'py, f64, D>),
    F32(PyReadonlyArray<'py, f32, D>),
    F16(PyReadonlyArray<'py, f16, D>),
    Bf16(PyReadonlyArray<'py, i16, D>),
}

fn dims<D: Dimension>() -> String {
    D::NDIM.map_or(String::new(), |n| format!("{n}-D "))
}

impl<'py, D: Dimension> FloatArray<'py, D> {
    pub(crate) fn extract(ob: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        macro_rules! try_as {
            ($t:ty, $v:ident) => {
                if let Ok(a) = ob.extract::<PyReadonlyArray<'py, $t, D>>() {
                    return Ok(FloatArray::$v(a));
                }
            };
        }
        try_as!(f64, F64);
        try_as!(f32, F32);
        try_as!(f16, F16);
        try_as!(i16, Bf16);
        Err(PyTypeError::new_err(format!(
            "{name}: expected a {}native-endian float64/float32/float16 array (or int16 bfloat16 bits), got {}",
            dims::<D>(),
            ob.get_type().name()?
        )))
    }

    pub(crate) fn view(&self) -> FloatView<'_, D> {
        match self {
            FloatArray::F64(a) => FloatView::F64(a.as_array()),
            FloatArray::F32(a) => FloatView::F32(a.as_array()),
            FloatArray::F16(a) => FloatView::F16(a.as_array()),
            FloatArray::Bf16(a) => FloatView::Bf16(a.as_array()),
        }
    }
}

/// Valid flags borrowed from NumPy (bool, integer or float; nonzero = valid).
pub(crate) enum MaskArray<'py, D: Dimension = IxDyn> {
    Bool(PyReadonlyArray<'py, bool, D>),
    U8(PyReadonlyArray<'py, u8, D>),
    I8(PyReadonlyArray<'py, i8, D>),
    I32(PyReadonlyArray<'py, i32, D>),
    I64(PyReadonlyArray<'py, i64, D>),
    F32(PyReadonlyArray<'py, f32, D>),
    F64(PyReadonlyArray<'py, f64, D>),
}

impl<'py, D: Dimension> MaskArray<'py, D> {
    pub(crate) fn extract(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        macro_rules! try_as {
            ($t:ty, $v:ident) => {
                if let Ok(a) = ob.extract::<PyReadonlyArray<'py, $t, D>>() {
                    return Ok(MaskArray::$v(a));
                }
            };
        }
        try_as!(bool, Bool);
        try_as!(u8, U8);
        try_as!(i8, I8);
        try_as!(i32, I32);
        try_as!(i64, I64);
        try_as!(f32, F32);
        try_as!(f64, F64);
        Err(PyTypeError::new_err(format!(
            "response_mask: expected a {}bool/uint8/int8/int32/int64/float32/float64 array, got {}",
            dims::<D>(),
            ob.get_type().name()?
        )))
    }

    pub(crate) fn view(&self) -> MaskView<'_, D> {
        match self {
            MaskArray::Bool(a) => MaskView::Bool(a.as_array()),
            MaskArray::U8(a) => MaskView::U8(a.as_array()),
            MaskArray::I8(a) => MaskView::I8(a.as_array()),
            MaskArray::I32(a) => MaskView::I32(a.as_array()),
            MaskArray::I64(a) => MaskView::I64(a.as_array()),
            MaskArray::F32(a) => MaskView::F32(a.as_array()),
            MaskArray::F64(a) => MaskView::F64(a.as_array()),
        }
    }
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    a.as_slice_mut()
        .map_err(|_| PyValueError::new_err(format!("{name}: output buffer must be C-contiguous")))
}

/// The first bad value as `(field, row, column, value)`.
type BadValueTuple = (u8, usize, usize, f64);

/// Computes the CPPO mask into the given output arrays. Returns
/// `(counts, bad)`: the number of positions per reason code, and `None` or the first
/// bad value as `(field, row, column, value)`.
#[pyfunction]
#[pyo3(signature = (
    log_probs, old_log_probs, advantages, advantage_per_row, valid, divergence, cu_seqlens,
    mask_out, reason_out, threshold_out, gate_out, row_budget_out,
    *, delta, delta_b, w_min, horizon, adaptive_budget, budget_quantile, budget_scale,
    position_weight, shuffle_seed, prefix_budget, divergence_mode, num_threads
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
    delta: f64,
    delta_b: f64,
    w_min: f64,
    horizon: i64,
    adaptive_budget: bool,
    budget_quantile: f64,
    budget_scale: f64,
    position_weight: u8,
    shuffle_seed: u64,
    prefix_budget: bool,
    divergence_mode: u8,
    num_threads: usize,
) -> PyResult<([u64; 5], Option<BadValueTuple>)> {
    let params = Params {
        delta,
        delta_b,
        w_min,
        horizon,
        adaptive_budget,
        budget_quantile,
        budget_scale,
        position_weight: match position_weight {
            0 => PositionWeight::Linear,
            1 => PositionWeight::None,
            2 => PositionWeight::Shuffled,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown position_weight code {other}"
                )))
            }
        },
        shuffle_seed,
        prefix_budget,
        divergence: match divergence_mode {
            0 => Divergence::BinaryTv,
            1 => Divergence::BinaryKl,
            2 => Divergence::Given,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown divergence code {other}"
                )))
            }
        },
    };
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
    let result = py.detach(|| with_threads(num_threads, || compute_batch(&params, &input, output)));
    Ok(match result {
        Ok(counts) => (counts, None),
        Err(bad) => (
            [0; 5],
            Some((bad.field as u8, bad.row, bad.column, bad.value)),
        ),
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cppo_mask_into, m)?)?;
    crate::python_divergence::register(m)?;
    crate::python_parquet::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
