//! A batch's valid flags: a row's flags from any mask dtype (`MaskView`), its valid
//! window found in the mask's own dtype, and the row costs that order the queue.

use std::ops::Range;

use ndarray::ArrayView1;

use super::{row_of, BatchInput, Layout};
use crate::row::{sized, valid_window};
use crate::views::MaskView;

/// A response-mask element: valid where nonzero (floats: anything but +-0.0, NaN
/// included). The one reading of every mask dtype, for flags and windows alike.
pub(super) trait Flag: Copy {
    fn valid(self) -> bool;
}

impl Flag for bool {
    #[inline(always)]
    fn valid(self) -> bool {
        self
    }
}

macro_rules! nonzero_flag {
    ($($t:ty: $zero:expr),*) => {$(
        impl Flag for $t {
            #[inline(always)]
            fn valid(self) -> bool {
                self != $zero
            }
        }
    )*};
}
nonzero_flag!(u8: 0, i8: 0, i32: 0, i64: 0, f32: 0.0, f64: 0.0);

/// `body` with `$row`, row `r` of the mask as a typed `ArrayView1`, whatever its dtype.
macro_rules! with_row {
    ($mask:expr, $layout:expr, $r:expr, |$row:ident| $body:expr) => {
        match $mask {
            MaskView::Bool(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::U8(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::I8(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::I32(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::I64(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::F32(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
            MaskView::F64(v) => {
                let $row = row_of(v, $layout, $r);
                $body
            }
        }
    };
}

/// The flags of `row[span]` into `out[span]`, `out` sized to the row; the rest of `out`
/// is left as it was.
fn flags_into<T: Flag>(row: ArrayView1<T>, out: &mut Vec<u8>, span: Range<usize>) {
    let out = &mut sized(out, row.len())[span.clone()];
    match row.as_slice() {
        Some(s) => out
            .iter_mut()
            .zip(&s[span])
            .for_each(|(o, &x)| *o = x.valid() as u8),
        None => out
            .iter_mut()
            .zip(row.iter().skip(span.start))
            .for_each(|(o, &x)| *o = x.valid() as u8),
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
        let (start, end) = layout.bounds(r);
        self.row_flags_in(layout, r, buf, 0..end - start)
    }

    /// Row `r`'s flags where only `window` (the row's valid window, from `row_window`)
    /// is guaranteed: a contiguous bool row is borrowed whole; any other row converts
    /// just that span into `buf`, positions outside it left as they were (no one reads
    /// them: the kernel reads a row's flags inside its window only).
    pub(super) fn row_flags_in<'v>(
        &'v self,
        layout: &Layout,
        r: usize,
        buf: &'v mut Vec<u8>,
        window: Range<usize>,
    ) -> &'v [u8] {
        if let Some(s) = bool_row(self, layout, r) {
            return s;
        }
        with_row!(self, layout, r, |row| flags_into(row, buf, window));
        let (start, end) = layout.bounds(r);
        &buf[..end - start]
    }
}

/// Row `r` of a contiguous bool mask as bytes that are 0 or 1, borrowed in place; None
/// for any other mask dtype or a strided row.
pub(super) fn bool_row<'v>(mask: &'v MaskView, layout: &Layout, r: usize) -> Option<&'v [u8]> {
    let MaskView::Bool(v) = mask else {
        return None;
    };
    let s = row_of(v, layout, r).to_slice()?;
    // SAFETY: bool has the size and alignment of u8, and its values are 0 or 1.
    Some(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), s.len()) })
}

/// Row `r`'s valid window (first to last valid position; empty if none), found where
/// the row's mask is contiguous (any dtype), with the flags `MaskView::row_flags`
/// gives; None otherwise (no mask, or a strided row).
pub(super) fn row_window(input: &BatchInput, r: usize) -> Option<Range<usize>> {
    let (layout, mask) = (&input.layout, input.valid.as_ref()?);
    if let Some(s) = bool_row(mask, layout, r) {
        return Some(valid_window(s));
    }
    with_row!(mask, layout, r, |row| row.to_slice().map(window_range))
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

/// The span from the first to the last valid element (0..0 if none), scanning from
/// both ends in blocks (a row's padding is skipped quickly).
pub(super) fn window_range<T: Flag>(s: &[T]) -> Range<usize> {
    const BLOCK: usize = 16;
    let any = |b: &[T]| b.iter().fold(false, |acc, &x| acc | x.valid());
    let mut start = 0;
    while start + BLOCK <= s.len() && !any(&s[start..start + BLOCK]) {
        start += BLOCK;
    }
    let Some(i) = s[start..].iter().position(|&x| x.valid()) else {
        return 0..0;
    };
    let first = start + i;
    let mut end = s.len();
    while end >= first + BLOCK && !any(&s[end - BLOCK..end]) {
        end -= BLOCK;
    }
    let last = s[first..end]
        .iter()
        .rposition(|&x| x.valid())
        .expect("s[first] is valid");
    first..first + last + 1
}
