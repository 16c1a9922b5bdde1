//! Parquet data pages for the added CPPO columns (format: apache/parquet-format,
//! Encodings.md and the v1 data page layout).
//!
//! Arrow's Parquet writer builds repetition and definition levels token by token and
//! run-length encodes them value by value, which costs more than the mask itself on
//! list columns. The levels of a list column depend only on the row offsets, so here
//! they are written as runs: O(rows), not O(tokens). Values are written as PLAIN
//! (booleans bit-packed, doubles copied) or, for the five reason codes, as
//! dictionary indices bit-packed at 3 bits. Compression, page headers and the file
//! layout are the caller's (`cppo_native._parquet`).

/// What one page's values are made of.
#[derive(Clone, Copy)]
pub enum Values<'a> {
    /// BOOLEAN, PLAIN: keep_t derived from the reason codes (1 or 2 = kept).
    KeepFromCodes(&'a [i8]),
    /// INT32 dictionary indices (RLE_DICTIONARY, bit width 3) over the dictionary
    /// [0, 1, 2, 3, 4]: the reason code is its own index.
    Codes(&'a [i8]),
    /// DOUBLE, PLAIN.
    F64(&'a [f64]),
    /// DOUBLE, PLAIN, but the values are left out of the output: the caller appends
    /// each page's values from its own array (no copy). Pages hold levels only.
    F64Levels(&'a [f64]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::KeepFromCodes(v) | Values::Codes(v) => v.len(),
            Values::F64(v) | Values::F64Levels(v) => v.len(),
        }
    }
}

/// The level structure of one column: a list per row (`offsets`) or one value per row,
/// with optional null rows.
#[derive(Clone, Copy)]
pub struct Levels<'a> {
    /// Row offsets into the values (`rows + 1`, from 0); `None`: one value per row.
    pub offsets: Option<&'a [i64]>,
    /// True where the row is null (it owns no values).
    pub nulls: Option<&'a [bool]>,
    pub rows: usize,
    pub max_rep: u8,
    pub max_def: u8,
    pub def_null: u8,
    /// Definition level of an empty list (unused without offsets).
    pub def_empty: u8,
    pub def_present: u8,
}

/// One encoded page: its bytes end at `end` in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Page {
    pub end: usize,
    /// Level entries (values, empty lists and nulls): DataPageHeader.num_values.
    pub num_values: u64,
    pub num_rows: u64,
    /// Non-null values in the page.
    pub num_present: u64,
}

#[derive(Debug, PartialEq)]
pub enum EncodeError {
    Shape(String),
}

/// Bits needed to store levels up to `max` (Parquet's bit width of the level stream).
pub fn bit_width(max: u32) -> u8 {
    (32 - max.leading_zeros()) as u8
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// RLE / bit-packed hybrid encoder fed with runs (only RLE runs are written).
pub struct RunEncoder<'a> {
    out: &'a mut Vec<u8>,
    value_bytes: usize,
    value: u32,
    count: u64,
}

/// Longest RLE run written in one header (readers decode the header into 32 bits).
const MAX_RUN: u64 = 1 << 30;

impl<'a> RunEncoder<'a> {
    pub fn new(out: &'a mut Vec<u8>, bit_width: u8) -> Self {
        RunEncoder {
            out,
            value_bytes: (bit_width as usize).div_ceil(8),
            value: 0,
            count: 0,
        }
    }

    pub fn push(&mut self, value: u32, count: u64) {
        if count == 0 {
            return;
        }
        if self.count > 0 && value != self.value {
            self.flush();
        }
        self.value = value;
        self.count += count;
    }

    fn flush(&mut self) {
        while self.count > 0 {
            let n = self.count.min(MAX_RUN);
            put_varint(self.out, n << 1);
            self.out
                .extend_from_slice(&self.value.to_le_bytes()[..self.value_bytes]);
            self.count -= n;
        }
    }

    pub fn finish(mut self) {
        self.flush();
    }
}

/// Appends `[u32 little-endian length][RLE runs]` for one level stream of rows
/// `rows` (`rep`: repetition levels, else definition levels).
fn level_section(out: &mut Vec<u8>, levels: &Levels, rows: std::ops::Range<usize>, rep: bool) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let width = bit_width(if rep { levels.max_rep } else { levels.max_def } as u32);
    let mut enc = RunEncoder::new(out, width);
    for r in rows {
        if levels.nulls.is_some_and(|n| n[r]) {
            enc.push(if rep { 0 } else { levels.def_null as u32 }, 1);
            continue;
        }
        let Some(off) = levels.offsets else {
            enc.push(if rep { 0 } else { levels.def_present as u32 }, 1);
            continue;
        };
        let n = (off[r + 1] - off[r]) as u64;
        if n == 0 {
            enc.push(if rep { 0 } else { levels.def_empty as u32 }, 1);
        } else if rep {
            enc.push(0, 1);
            enc.push(1, n - 1);
        } else {
            enc.push(levels.def_present as u32, n);
        }
    }
    enc.finish();
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// keep_t (reason code 1 or 2) packed LSB-first, 8 to a byte (the last byte
/// zero-padded): BOOLEAN PLAIN.
fn pack_keep(out: &mut Vec<u8>, codes: &[i8]) {
    let keep = |c: i8| ((c as u8).wrapping_sub(1) < 2) as u8;
    let start = out.len();
    out.resize(start + codes.len().div_ceil(8), 0);
    let dst = &mut out[start..];
    let mut chunks = codes.chunks_exact(8);
    for (byte, chunk) in dst.iter_mut().zip(chunks.by_ref()) {
        let mut b = 0u8;
        for (i, &c) in chunk.iter().enumerate() {
            b |= keep(c) << i;
        }
        *byte = b;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = 0u8;
        for (i, &c) in rest.iter().enumerate() {
            b |= keep(c) << i;
        }
        dst[codes.len() / 8] = b;
    }
}

/// Doubles as PLAIN: little-endian IEEE 754, back to back.
fn put_f64(out: &mut Vec<u8>, v: &[f64]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any initialised f64 slice is readable as bytes (u8 has alignment 1,
        // no invalid bit patterns); on little-endian targets these are the PLAIN bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
        };
        out.extend_from_slice(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Reason codes as RLE_DICTIONARY data: the bit width (3), then one bit-packed run of
/// ceil(n / 8) groups of eight 3-bit indices (24 bits per group, LSB first).
fn pack_codes(out: &mut Vec<u8>, codes: &[i8]) {
    out.push(3);
    let groups = codes.len().div_ceil(8);
    put_varint(out, ((groups as u64) << 1) | 1);
    let start = out.len();
    out.resize(start + 3 * groups, 0);
    let dst = &mut out[start..];
    let mut chunks = codes.chunks_exact(8);
    for (g, chunk) in chunks.by_ref().enumerate() {
        let mut word = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            word |= ((c as u8 & 7) as u32) << (3 * i);
        }
        dst[3 * g..3 * g + 3].copy_from_slice(&word.to_le_bytes()[..3]);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let g = codes.len() / 8;
        let mut word = 0u32;
        for (i, &c) in rest.iter().enumerate() {
            word |= ((c as u8 & 7) as u32) << (3 * i);
        }
        dst[3 * g..3 * g + 3].copy_from_slice(&word.to_le_bytes()[..3]);
    }
}

fn values_section(out: &mut Vec<u8>, values: Values, range: std::ops::Range<usize>) {
    match values {
        Values::KeepFromCodes(codes) => pack_keep(out, &codes[range]),
        Values::Codes(codes) => {
            if !range.is_empty() {
                pack_codes(out, &codes[range]);
            } else {
                out.push(3);
            }
        }
        Values::F64(v) => put_f64(out, &v[range]),
        Values::F64Levels(_) => {}
    }
}

/// Encodes a column's rows as v1 data pages (uncompressed: `[rep levels][def levels]
/// [values]`, level sections only where the max level is > 0), starting a new page at
/// a row boundary once a page holds `page_values` level entries. Appends the bytes to
/// `out` and returns the pages.
pub fn encode_pages(
    levels: &Levels,
    values: Values,
    page_values: usize,
    out: &mut Vec<u8>,
) -> Result<Vec<Page>, EncodeError> {
    let rows = levels.rows;
    let present_of = |r: usize| -> usize {
        if levels.nulls.is_some_and(|n| n[r]) {
            return 0;
        }
        match levels.offsets {
            Some(off) => (off[r + 1] - off[r]) as usize,
            None => 1,
        }
    };
    if let Some(off) = levels.offsets {
        if off.len() != rows + 1 || off[0] != 0 || off.windows(2).any(|w| w[1] < w[0]) {
            return Err(EncodeError::Shape(format!(
                "offsets must be {} non-decreasing values from 0",
                rows + 1
            )));
        }
        if levels
            .nulls
            .is_some_and(|n| (0..rows).any(|r| n[r] && off[r + 1] != off[r]))
        {
            return Err(EncodeError::Shape("a null row owns values".into()));
        }
    }
    if levels.nulls.is_some_and(|n| n.len() != rows) {
        return Err(EncodeError::Shape(format!(
            "nulls must have {rows} entries"
        )));
    }
    let total: usize = match levels.offsets {
        Some(off) => off[rows] as usize,
        None => (0..rows).map(present_of).sum(),
    };
    if values.len() != total {
        return Err(EncodeError::Shape(format!(
            "{} values for {} present positions",
            values.len(),
            total
        )));
    }
    let page_values = page_values.max(1);
    // Room for every page: levels (two short runs per row, at most ~12 bytes), values
    // and per-page headers of the bit-packed runs.
    let value_bytes = match values {
        Values::KeepFromCodes(_) => total / 8,
        Values::Codes(_) => 3 * total / 8,
        Values::F64(_) => 8 * total,
        Values::F64Levels(_) => 0,
    };
    out.reserve(value_bytes + 24 * rows + 64);
    let mut pages = Vec::new();
    let (mut r0, mut v0) = (0usize, 0usize);
    while r0 < rows {
        // Rows [r0, r1): at least one, then whole rows while the page has room.
        let (mut r1, mut entries, mut present) = (r0, 0usize, 0usize);
        while r1 < rows {
            let p = present_of(r1);
            let e = p.max(1);
            if r1 > r0 && entries + e > page_values {
                break;
            }
            entries += e;
            present += p;
            r1 += 1;
        }
        if levels.max_rep > 0 {
            level_section(out, levels, r0..r1, true);
        }
        if levels.max_def > 0 {
            level_section(out, levels, r0..r1, false);
        }
        values_section(out, values, v0..v0 + present);
        pages.push(Page {
            end: out.len(),
            num_values: entries as u64,
            num_rows: (r1 - r0) as u64,
            num_present: present as u64,
        });
        v0 += present;
        r0 = r1;
    }
    Ok(pages)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes an RLE / bit-packed hybrid stream of `n` values (test oracle).
    fn decode_hybrid(mut data: &[u8], width: u8, n: usize) -> Vec<u32> {
        let mut out = Vec::new();
        while out.len() < n {
            let mut header = 0u64;
            let mut shift = 0;
            loop {
                let b = data[0];
                data = &data[1..];
                header |= ((b & 0x7f) as u64) << shift;
                shift += 7;
                if b < 0x80 {
                    break;
                }
            }
            if header & 1 == 0 {
                let bytes = (width as usize).div_ceil(8);
                let mut v = [0u8; 4];
                v[..bytes].copy_from_slice(&data[..bytes]);
                data = &data[bytes..];
                for _ in 0..header >> 1 {
                    out.push(u32::from_le_bytes(v));
                }
            } else {
                let count = (header >> 1) as usize * 8;
                let bits = &data[..count * width as usize / 8];
                data = &data[count * width as usize / 8..];
                for i in 0..count {
                    let mut v = 0u32;
                    for b in 0..width as usize {
                        let bit = i * width as usize + b;
                        v |= (((bits[bit / 8] >> (bit % 8)) & 1) as u32) << b;
                    }
                    out.push(v);
                }
            }
        }
        out.truncate(n);
        out
    }

    fn section(data: &[u8]) -> (&[u8], &[u8]) {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        (&data[4..4 + len], &data[4 + len..])
    }

    /// Levels of a nullable list<nullable element> column (as pyarrow writes list<T>).
    pub(crate) fn list_levels<'a>(offsets: &'a [i64], nulls: Option<&'a [bool]>) -> Levels<'a> {
        Levels {
            offsets: Some(offsets),
            nulls,
            rows: offsets.len() - 1,
            max_rep: 1,
            max_def: 3,
            def_null: 0,
            def_empty: 1,
            def_present: 3,
        }
    }

    #[test]
    fn list_levels_and_codes_round_trip() {
        // Rows: [a, b, c], null, [], [d].
        let offsets = [0i64, 3, 3, 3, 4];
        let nulls = [false, true, false, false];
        let codes = [1i8, 4, 2, 3];
        let mut out = Vec::new();
        let pages = encode_pages(
            &list_levels(&offsets, Some(&nulls)),
            Values::Codes(&codes),
            100,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            pages,
            vec![Page {
                end: out.len(),
                num_values: 6,
                num_rows: 4,
                num_present: 4
            }]
        );
        let (rep, rest) = section(&out);
        let (def, values) = section(rest);
        assert_eq!(decode_hybrid(rep, 1, 6), vec![0, 1, 1, 0, 0, 0]);
        assert_eq!(decode_hybrid(def, 2, 6), vec![3, 3, 3, 0, 1, 3]);
        assert_eq!(values[0], 3);
        assert_eq!(decode_hybrid(&values[1..], 3, 4), vec![1, 4, 2, 3]);
    }

    #[test]
    fn keep_bits_and_doubles() {
        let offsets = [0i64, 2, 11];
        let codes = [1i8, 3, 2, 2, 4, 0, 1, 1, 1, 2, 4];
        let mut out = Vec::new();
        encode_pages(
            &list_levels(&offsets, None),
            Values::KeepFromCodes(&codes),
            100,
            &mut out,
        )
        .unwrap();
        let (_, rest) = section(&out);
        let (_, values) = section(rest);
        let bits: Vec<bool> = (0..codes.len())
            .map(|i| values[i / 8] >> (i % 8) & 1 == 1)
            .collect();
        let want: Vec<bool> = codes.iter().map(|&c| c == 1 || c == 2).collect();
        assert_eq!(bits, want);
        assert_eq!(values.len(), 2);

        let budget = [0.5f64, 0.25];
        let levels = Levels {
            offsets: None,
            nulls: Some(&[false, true, false]),
            rows: 3,
            max_rep: 0,
            max_def: 1,
            def_null: 0,
            def_empty: 0,
            def_present: 1,
        };
        let mut out = Vec::new();
        let pages = encode_pages(&levels, Values::F64(&budget), 100, &mut out).unwrap();
        assert_eq!(pages[0].num_values, 3);
        let (def, values) = section(&out);
        assert_eq!(decode_hybrid(def, 1, 3), vec![1, 0, 1]);
        assert_eq!(
            values,
            [0.5f64.to_le_bytes(), 0.25f64.to_le_bytes()].concat()
        );
    }

    #[test]
    fn levels_only_pages_leave_the_values_out() {
        let offsets = [0i64, 2, 5];
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let pa = encode_pages(&list_levels(&offsets, None), Values::F64(&v), 100, &mut a).unwrap();
        let pb = encode_pages(
            &list_levels(&offsets, None),
            Values::F64Levels(&v),
            100,
            &mut b,
        )
        .unwrap();
        assert_eq!(a.len(), b.len() + 40);
        assert_eq!(a[..b.len()], b[..]);
        assert_eq!(
            (pa[0].num_values, pa[0].num_present),
            (pb[0].num_values, pb[0].num_present)
        );
    }

    #[test]
    fn pages_split_at_row_boundaries() {
        let offsets = [0i64, 4, 8, 8, 20, 21];
        let values: Vec<f64> = (0..21).map(|i| i as f64).collect();
        let mut out = Vec::new();
        let pages = encode_pages(
            &list_levels(&offsets, None),
            Values::F64(&values),
            9,
            &mut out,
        )
        .unwrap();
        // [4, 4, empty] = 9 entries; the 12-value row alone; then the last row.
        let rows: Vec<u64> = pages.iter().map(|p| p.num_rows).collect();
        let present: Vec<u64> = pages.iter().map(|p| p.num_present).collect();
        assert_eq!(rows, vec![3, 1, 1]);
        assert_eq!(present, vec![8, 12, 1]);
        assert_eq!(pages.last().unwrap().end, out.len());
    }

    #[test]
    fn shape_errors_and_empty() {
        let mut out = Vec::new();
        assert!(encode_pages(
            &list_levels(&[0, 2], None),
            Values::F64(&[1.0]),
            10,
            &mut out
        )
        .is_err());
        assert!(encode_pages(
            &list_levels(&[1, 2], None),
            Values::F64(&[1.0]),
            10,
            &mut out
        )
        .is_err());
        let pages = encode_pages(&list_levels(&[0], None), Values::F64(&[]), 10, &mut out).unwrap();
        assert!(pages.is_empty());
    }

    #[test]
    fn long_runs_split_headers() {
        let mut out = Vec::new();
        let mut enc = RunEncoder::new(&mut out, 1);
        enc.push(1, MAX_RUN + 5);
        enc.finish();
        assert_eq!(decode_hybrid(&out, 1, 3).len(), 3);
        // Two runs: MAX_RUN then 5.
        assert_eq!(out.len(), 5 + 1 + 1 + 1);
    }
}
