//! Typed, strided input views: every supported dtype of every input, in one place.
//!
//! The mask reads `FloatView`/`MaskView` of any dimensionality (dynamic for padded or
//! packed batches); the Top-K divergences read the fixed 1-D/2-D aliases and the id
//! views below. The binding crate builds them from borrowed NumPy arrays.

use half::{bf16, f16};
use ndarray::{ArrayView, ArrayView1, ArrayView2, Dimension, Ix1, Ix2, IxDyn};

/// A floating-point input of any supported dtype and dimensionality (dynamic for the
/// mask's padded/packed inputs; fixed 1-D/2-D views serve `topk`). `Bf16` holds
/// bfloat16 bit patterns.
pub enum FloatView<'a, D: Dimension = IxDyn> {
    F64(ArrayView<'a, f64, D>),
    F32(ArrayView<'a, f32, D>),
    F16(ArrayView<'a, f16, D>),
    Bf16(ArrayView<'a, i16, D>),
}

/// Valid flags in any supported dtype (nonzero = valid).
pub enum MaskView<'a, D: Dimension = IxDyn> {
    Bool(ArrayView<'a, bool, D>),
    U8(ArrayView<'a, u8, D>),
    I8(ArrayView<'a, i8, D>),
    I32(ArrayView<'a, i32, D>),
    I64(ArrayView<'a, i64, D>),
    F32(ArrayView<'a, f32, D>),
    F64(ArrayView<'a, f64, D>),
}

impl<D: Dimension> FloatView<'_, D> {
    pub fn shape(&self) -> &[usize] {
        match self {
            FloatView::F64(v) => v.shape(),
            FloatView::F32(v) => v.shape(),
            FloatView::F16(v) => v.shape(),
            FloatView::Bf16(v) => v.shape(),
        }
    }
}

impl<D: Dimension> MaskView<'_, D> {
    pub fn shape(&self) -> &[usize] {
        match self {
            MaskView::Bool(v) => v.shape(),
            MaskView::U8(v) => v.shape(),
            MaskView::I8(v) => v.shape(),
            MaskView::I32(v) => v.shape(),
            MaskView::I64(v) => v.shape(),
            MaskView::F32(v) => v.shape(),
            MaskView::F64(v) => v.shape(),
        }
    }
}

/// A float input, 1-D `[N]` (bfloat16 as its int16 bit patterns).
pub type Float1<'a> = FloatView<'a, Ix1>;

impl FloatView<'_, Ix1> {
    pub fn len(&self) -> usize {
        match self {
            Float1::F64(v) => v.len(),
            Float1::F32(v) => v.len(),
            Float1::F16(v) => v.len(),
            Float1::Bf16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline(always)]
    pub(crate) fn at(&self, i: usize) -> f64 {
        match self {
            Float1::F64(v) => v[i],
            Float1::F32(v) => v[i] as f64,
            Float1::F16(v) => v[i].to_f64(),
            Float1::Bf16(v) => bf16::from_bits(v[i] as u16).to_f64(),
        }
    }
}

/// A float input, 2-D `[N, K]`.
pub type Float2<'a> = FloatView<'a, Ix2>;

impl FloatView<'_, Ix2> {
    pub fn dim(&self) -> (usize, usize) {
        match self {
            Float2::F64(v) => v.dim(),
            Float2::F32(v) => v.dim(),
            Float2::F16(v) => v.dim(),
            Float2::Bf16(v) => v.dim(),
        }
    }
    pub(crate) fn row_into(&self, i: usize, out: &mut Vec<f64>) {
        out.clear();
        match self {
            Float2::F64(v) => out.extend(v.row(i).iter().copied()),
            Float2::F32(v) => out.extend(v.row(i).iter().map(|&x| x as f64)),
            Float2::F16(v) => out.extend(v.row(i).iter().map(|x| x.to_f64())),
            Float2::Bf16(v) => {
                out.extend(v.row(i).iter().map(|&x| bf16::from_bits(x as u16).to_f64()))
            }
        }
    }
}

/// Token ids, 1-D `[N]`.
pub enum Ids1<'a> {
    I64(ArrayView1<'a, i64>),
    I32(ArrayView1<'a, i32>),
}

impl Ids1<'_> {
    pub fn len(&self) -> usize {
        match self {
            Ids1::I64(v) => v.len(),
            Ids1::I32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline(always)]
    pub(crate) fn at(&self, i: usize) -> i64 {
        match self {
            Ids1::I64(v) => v[i],
            Ids1::I32(v) => v[i] as i64,
        }
    }
}

/// Token ids, 2-D `[N, K]`.
pub enum Ids2<'a> {
    I64(ArrayView2<'a, i64>),
    I32(ArrayView2<'a, i32>),
}

impl Ids2<'_> {
    pub fn dim(&self) -> (usize, usize) {
        match self {
            Ids2::I64(v) => v.dim(),
            Ids2::I32(v) => v.dim(),
        }
    }
    pub(crate) fn row_into(&self, i: usize, out: &mut Vec<i64>) {
        out.clear();
        match self {
            Ids2::I64(v) => out.extend(v.row(i).iter().copied()),
            Ids2::I32(v) => out.extend(v.row(i).iter().map(|&x| x as i64)),
        }
    }
}

/// Valid flags, 1-D `[N]` (nonzero = valid).
pub type Valid1<'a> = MaskView<'a, Ix1>;

impl MaskView<'_, Ix1> {
    pub fn len(&self) -> usize {
        match self {
            Valid1::Bool(v) => v.len(),
            Valid1::U8(v) => v.len(),
            Valid1::I8(v) => v.len(),
            Valid1::I32(v) => v.len(),
            Valid1::I64(v) => v.len(),
            Valid1::F32(v) => v.len(),
            Valid1::F64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    #[inline(always)]
    pub(crate) fn at(&self, i: usize) -> bool {
        match self {
            Valid1::Bool(v) => v[i],
            Valid1::U8(v) => v[i] != 0,
            Valid1::I8(v) => v[i] != 0,
            Valid1::I32(v) => v[i] != 0,
            Valid1::I64(v) => v[i] != 0,
            Valid1::F32(v) => v[i] != 0.0,
            Valid1::F64(v) => v[i] != 0.0,
        }
    }
}
