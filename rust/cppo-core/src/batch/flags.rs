//! A batch's valid flags: a row's flags from any mask dtype (`MaskView`), its valid
//! window found in the mask's own dtype, and the row costs that order the queue.

use std::ops::Range;

use ndarray::ArrayView1;

use super::{row_of, BatchInput, Layout};
use crate::row::{sized, valid_window};
use crate::views::MaskView;

fn flags_into<T: Copy>(row: ArrayView1<T>, out: &mut Vec<u8>, f: impl Fn(T) -> bool) {
    let out = sized(out, row.len());
    match row.as_slice() {
        Some(s) => out.iter_mut().zip(s).for_each(|(o, &x)| *o = f(x) as u8),
        None => out
            .iter_mut()
            .zip(row.iter())
            .for_each(|(o, &x)| *o = f(x) as u8),
    }
}

impl MaskView<'_> {
    /// Row `r`'s flags as bytes that are 0 or 1: borrowed in place when the row is a
    /// contiguous bool array (bool is 0 or 1 by construction); otherwise converted
    /// into `buf`.
    pub(super) fn row_flags<'v>(
        &'v self,
        layout: &Layout,
        r: usize,
        buf: &'v mut Vec<u8>,
    ) -> &'v [u8] {
        if let MaskView::Bool(v) = self {
            if let Some(s) = row_of(v, layout, r).to_slice() {
                // SAFETY: bool has the size and alignment of u8, and its values are 0 or 1.
                return unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len()) };
            }
        }
        self.row_into(layout, r, buf);
        &buf[..layout.bounds(r).1 - layout.bounds(r).0]
    }

    /// Row `r`'s flags where only `window` (the row's valid window, from `row_window`)
    /// is guaranteed: a contiguous non-bool row converts just that span into `buf`;
    /// positions outside it are left as they were (no one reads them: the kernel reads
    /// a row's flags inside its window only). Otherwise as `row_flags`.
    pub(super) fn row_flags_in<'v>(
        &'v self,
        layout: &Layout,
        r: usize,
        buf: &'v mut Vec<u8>,
        window: Range<usize>,
    ) -> &'v [u8] {
        let len = layout.bounds(r).1 - layout.bounds(r).0;
        macro_rules! span {
            ($v:expr, $f:expr) => {
                if let Some(s) = row_of($v, layout, r).to_slice() {
                    let out = sized(buf, len);
                    for (o, &x) in out[window.clone()].iter_mut().zip(&s[window]) {
                        *o = $f(x) as u8;
                    }
                    return &buf[..len];
                }
            };
        }
        match self {
            MaskView::Bool(_) => {}
            MaskView::U8(v) => span!(v, |x: u8| x != 0),
            MaskView::I8(v) => span!(v, |x: i8| x != 0),
            MaskView::I32(v) => span!(v, |x: i32| x != 0),
            MaskView::I64(v) => span!(v, |x: i64| x != 0),
            MaskView::F32(v) => span!(v, |x: f32| x != 0.0),
            MaskView::F64(v) => span!(v, |x: f64| x != 0.0),
        }
        self.row_flags(layout, r, buf)
    }

    pub(super) fn row_into(&self, layout: &Layout, r: usize, out: &mut Vec<u8>) {
        match self {
            MaskView::Bool(v) => flags_into(row_of(v, layout, r), out, |x| x),
            MaskView::U8(v) => flags_into(row_of(v, layout, r), out, |x| x != 0),
            MaskView::I8(v) => flags_into(row_of(v, layout, r), out, |x| x != 0),
            MaskView::I32(v) => flags_into(row_of(v, layout, r), out, |x| x != 0),
            MaskView::I64(v) => flags_into(row_of(v, layout, r), out, |x| x != 0),
            MaskView::F32(v) => flags_into(row_of(v, layout, r), out, |x| x != 0.0),
            MaskView::F64(v) => flags_into(row_of(v, layout, r), out, |x| x != 0.0),
        }
    }
}

/// Row `r`'s valid window (first to last valid position; empty if none), found where
/// the row's mask is contiguous (any dtype), with the flags `MaskView::row_into`
/// gives; None otherwise (no mask, or a strided row).
pub(super) fn row_window(input: &BatchInput, r: usize) -> Option<Range<usize>> {
    let layout = &input.layout;
    macro_rules! window {
        ($v:expr, $key:expr) => {
            row_of($v, layout, r)
                .to_slice()
                .map(|s| window_range(s, $key))
        };
    }
    match input.valid.as_ref()? {
        MaskView::Bool(v) => row_of(v, layout, r).to_slice().map(|s| {
            // SAFETY: bool has the size and alignment of u8, and its values are 0 or 1.
            valid_window(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len()) })
        }),
        // Keys that are 0 exactly where `MaskView::row_into` reads "not valid" (for
        // floats: +-0.0; NaN is valid).
        MaskView::U8(v) => window!(v, |x: u8| x),
        MaskView::I8(v) => window!(v, |x: i8| x as u8),
        MaskView::I32(v) => window!(v, |x: i32| x as u32),
        MaskView::I64(v) => window!(v, |x: i64| x as u64),
        MaskView::F32(v) => window!(v, |x: f32| x.to_bits() << 1),
        MaskView::F64(v) => window!(v, |x: f64| x.to_bits() << 1),
    }
}

/// The work of a row, for ordering jobs longest first: the length of its valid window
/// `window` (from `row_window`) where known, else its length.
pub(super) fn cost_of(input: &BatchInput, r: usize, window: &Option<Range<usize>>) -> usize {
    window.as_ref().map_or_else(
        || {
            let (start, end) = input.layout.bounds(r);
            end - start
        },
        |w| w.len(),
    )
}

#[cfg(test)]
pub(super) fn row_cost(input: &BatchInput, r: usize) -> usize {
    cost_of(input, r, &row_window(input, r))
}

/// The span from the first to the last element whose `key` is nonzero (0..0 if none),
/// scanning from both ends in blocks (a row's padding is skipped quickly).
pub(super) fn window_range<T: Copy, K>(s: &[T], key: impl Fn(T) -> K) -> Range<usize>
where
    K: Copy + Default + PartialEq + std::ops::BitOr<Output = K>,
{
    const BLOCK: usize = 16;
    let zero = K::default();
    let any = |b: &[T]| b.iter().fold(zero, |acc, &x| acc | key(x)) != zero;
    let mut start = 0;
    while start + BLOCK <= s.len() && !any(&s[start..start + BLOCK]) {
        start += BLOCK;
    }
    let Some(i) = s[start..].iter().position(|&x| key(x) != zero) else {
        return 0..0;
    };
    let first = start + i;
    let mut end = s.len();
    while end >= first + BLOCK && !any(&s[end - BLOCK..end]) {
        end -= BLOCK;
    }
    let last = s[first..end]
        .iter()
        .rposition(|&x| key(x) != zero)
        .expect("s[first] is nonzero");
    first..first + last + 1
}
