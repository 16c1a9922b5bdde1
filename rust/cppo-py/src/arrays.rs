//! NumPy arrays borrowed as the core's typed views (`cppo_core::views`): one enum per
//! input kind, extracted by trying each supported dtype in turn.

use numpy::ndarray::{Dimension, IxDyn};
use numpy::{PyReadonlyArray, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use half::f16;

use cppo_core::views::{FloatView, Ids1, Ids2, MaskView};

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

/// Token ids `[N]` borrowed from NumPy (int64 or int32).
pub(crate) enum I1<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    I32(PyReadonlyArray1<'py, i32>),
}

impl<'py> I1<'py> {
    pub(crate) fn extract(ob: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = ob.extract::<PyReadonlyArray1<i64>>() {
            return Ok(I1::I64(a));
        }
        if let Ok(a) = ob.extract::<PyReadonlyArray1<i32>>() {
            return Ok(I1::I32(a));
        }
        Err(PyTypeError::new_err(format!(
            "{name}: expected a 1-D int64/int32 array, got {}",
            ob.get_type().name()?
        )))
    }
    pub(crate) fn view(&self) -> Ids1<'_> {
        match self {
            I1::I64(a) => Ids1::I64(a.as_array()),
            I1::I32(a) => Ids1::I32(a.as_array()),
        }
    }
}

/// Token ids `[N, K]` borrowed from NumPy (int64 or int32).
pub(crate) enum I2<'py> {
    I64(PyReadonlyArray2<'py, i64>),
    I32(PyReadonlyArray2<'py, i32>),
}

impl<'py> I2<'py> {
    pub(crate) fn extract(ob: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = ob.extract::<PyReadonlyArray2<i64>>() {
            return Ok(I2::I64(a));
        }
        if let Ok(a) = ob.extract::<PyReadonlyArray2<i32>>() {
            return Ok(I2::I32(a));
        }
        Err(PyTypeError::new_err(format!(
            "{name}: expected a 2-D int64/int32 array, got {}",
            ob.get_type().name()?
        )))
    }
    pub(crate) fn view(&self) -> Ids2<'_> {
        match self {
            I2::I64(a) => Ids2::I64(a.as_array()),
            I2::I32(a) => Ids2::I32(a.as_array()),
        }
    }
}
