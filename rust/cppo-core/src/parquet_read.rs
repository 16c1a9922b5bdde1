//! Decoding the mask's input columns from Parquet data pages (apache/parquet-format):
//! a list of floats per row (log-probs) or one float per row (advantages).
//!
//! Arrow's reader materialises a repetition and a definition level per value and then
//! derives offsets and validity from them; here the levels are walked as runs, so a row
//! costs O(runs) and a value only its copy. Only what pyarrow-written rollouts use is
//! handled — PLAIN and dictionary-encoded FLOAT/DOUBLE values, v1 and v2 data pages,
//! no null values and no null lists (empty lists are fine) — and anything else is
//! reported as unsupported so the caller reads the row group with pyarrow instead.
//! Page headers and decompression are the caller's (`cppo_native._parquet_read`).

use crate::codes::page_kind::{DATA_V1, DATA_V2, DICTIONARY};
use crate::parquet::bit_width;

/// One page's decompressed parts.
pub struct PageIn<'a> {
    /// `codes::page_kind`: DICTIONARY, DATA_V1 (`body` = levels with length prefixes +
    /// values) or DATA_V2 (`rep`, `def` and `body` = values).
    pub kind: u8,
    /// Level entries (DataPageHeader.num_values); values in a dictionary page.
    pub num_values: usize,
    pub encoding: i32,
    pub rep: &'a [u8],
    pub def: &'a [u8],
    pub body: &'a [u8],
}

#[derive(Debug, PartialEq)]
pub struct Unsupported(pub String);

fn unsupported<T>(why: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(why.into()))
}

/// The column: how its levels read, and the width of its values (4 or 8 bytes).
pub struct ColumnShape {
    pub max_rep: u8,
    pub max_def: u8,
    /// Definition level of a present value.
    pub def_present: u8,
    /// Definition level of an empty list (lists only).
    pub def_empty: u8,
    pub width: usize,
}

/// Decoded column chunk: values (PLAIN bytes, little-endian) and, for lists, row
/// offsets (`rows + 1`, from 0).
pub struct ChunkOut {
    pub values: Vec<u8>,
    pub offsets: Vec<i64>,
    pub rows: usize,
}

const PLAIN: i32 = 0;
const PLAIN_DICTIONARY: i32 = 2;
const RLE_DICTIONARY: i32 = 8;

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    fn varint(&mut self) -> Result<u64, Unsupported> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.data.get(self.pos) else {
                return unsupported("truncated level data");
            };
            self.pos += 1;
            out |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(out);
            }
        }
        unsupported("bad varint")
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Unsupported> {
        if self.pos + n > self.data.len() {
            return unsupported("truncated page data");
        }
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
}

/// Runs of an RLE / bit-packed hybrid stream: RLE runs as (value, count), bit-packed
/// values one by one (merged when equal).
struct Hybrid<'a> {
    src: Bytes<'a>,
    width: u8,
    left: usize,
    // Current run.
    rle: bool,
    value: u32,
    count: usize,
    packed: &'a [u8],
    packed_at: usize,
    packed_len: usize,
}

impl<'a> Hybrid<'a> {
    fn new(data: &'a [u8], width: u8, n: usize) -> Self {
        Hybrid {
            src: Bytes { data, pos: 0 },
            width,
            left: n,
            rle: true,
            value: 0,
            count: 0,
            packed: &[],
            packed_at: 0,
            packed_len: 0,
        }
    }

    fn packed_value(&self, i: usize) -> u32 {
        unpack(self.packed, i, self.width as usize)
    }

    /// The next run (value, count), at most `max` long; None at the end.
    fn next_run(&mut self, max: usize) -> Result<Option<(u32, usize)>, Unsupported> {
        if self.left == 0 {
            return Ok(None);
        }
        if self.count == 0 && self.packed_at >= self.packed_len {
            let header = self.src.varint()?;
            if header & 1 == 0 {
                self.rle = true;
                self.count = (header >> 1) as usize;
                let bytes = (self.width as usize).div_ceil(8);
                let raw = self.src.take(bytes)?;
                let mut v = [0u8; 4];
                v[..bytes].copy_from_slice(raw);
                self.value = u32::from_le_bytes(v);
                if self.count == 0 {
                    return unsupported("empty RLE run");
                }
            } else {
                self.rle = false;
                let groups = (header >> 1) as usize;
                self.packed = self.src.take(groups * self.width as usize)?;
                self.packed_at = 0;
                self.packed_len = groups * 8;
                if groups == 0 {
                    return unsupported("empty bit-packed run");
                }
            }
        }
        let max = max.min(self.left);
        let run = if self.rle {
            let n = self.count.min(max);
            self.count -= n;
            (self.value, n)
        } else {
            let v = self.packed_value(self.packed_at);
            let mut n = 1;
            while n < max
                && self.packed_at + n < self.packed_len
                && self.packed_value(self.packed_at + n) == v
            {
                n += 1;
            }
            self.packed_at += n;
            (v, n)
        };
        self.left -= run.1;
        Ok(Some(run))
    }
}

/// Walks one data page's levels: pushes the start of each row that begins in the page
/// (`base` + values before it in the page) into `offsets`; returns the present values.
fn walk_levels(
    shape: &ColumnShape,
    rep: &[u8],
    def: &[u8],
    n: usize,
    base: i64,
    offsets: &mut Vec<i64>,
) -> Result<usize, Unsupported> {
    let mut reps = Hybrid::new(rep, bit_width(shape.max_rep as u32), n);
    let mut defs = Hybrid::new(def, bit_width(shape.max_def as u32), n);
    let mut present = 0usize;
    let (mut r_run, mut d_run) = ((0u32, 0usize), (0u32, 0usize));
    let mut done = 0usize;
    while done < n {
        if r_run.1 == 0 {
            r_run = if shape.max_rep == 0 {
                (0, n - done)
            } else {
                reps.next_run(n - done)?
                    .ok_or_else(|| Unsupported("too few repetition levels".into()))?
            };
        }
        if d_run.1 == 0 {
            d_run = if shape.max_def == 0 {
                (0, n - done)
            } else {
                defs.next_run(n - done)?
                    .ok_or_else(|| Unsupported("too few definition levels".into()))?
            };
        }
        let k = r_run.1.min(d_run.1);
        let (r, d) = (r_run.0, d_run.0);
        if d == shape.def_present as u32 {
            if r == 0 {
                // k rows, each starting with a value.
                for i in 0..k {
                    offsets.push(base + (present + i) as i64);
                }
            } else if r != 1 || shape.max_rep != 1 {
                return unsupported("nested repetition");
            }
            present += k;
        } else if shape.max_rep == 1 && d == shape.def_empty as u32 && r == 0 {
            for _ in 0..k {
                offsets.push(base + present as i64); // empty rows
            }
        } else {
            return unsupported("null lists or null values");
        }
        r_run.1 -= k;
        d_run.1 -= k;
        done += k;
    }
    Ok(present)
}

/// Appends `present` values of `shape.width` bytes decoded from `data` with `encoding`.
fn push_values(
    shape: &ColumnShape,
    encoding: i32,
    data: &[u8],
    present: usize,
    dictionary: Option<&[u8]>,
    out: &mut Vec<u8>,
) -> Result<(), Unsupported> {
    let w = shape.width;
    match encoding {
        PLAIN => {
            if data.len() < present * w {
                return unsupported("truncated PLAIN values");
            }
            out.extend_from_slice(&data[..present * w]);
        }
        PLAIN_DICTIONARY | RLE_DICTIONARY => {
            let Some(dict) = dictionary else {
                return unsupported("dictionary-encoded page without a dictionary");
            };
            if present == 0 {
                return Ok(());
            }
            let Some((&width, indices)) = data.split_first() else {
                return unsupported("truncated dictionary indices");
            };
            if width > 32 {
                return unsupported("bad index bit width");
            }
            gather_dictionary(dict, w, width, indices, present, out)?;
        }
        other => return unsupported(format!("value encoding {other}")),
    }
    Ok(())
}

/// Index `i` of a bit-packed run of `width`-bit values (LSB first).
#[inline(always)]
fn unpack(packed: &[u8], i: usize, width: usize) -> u32 {
    let bit = i * width;
    let byte = bit / 8;
    let word = if byte + 8 <= packed.len() {
        u64::from_le_bytes(packed[byte..byte + 8].try_into().unwrap())
    } else {
        let mut b = [0u8; 8];
        let tail = &packed[byte..];
        b[..tail.len()].copy_from_slice(tail);
        u64::from_le_bytes(b)
    };
    // width <= 32 and bit % 8 <= 7: the value lies within the 64 bits read.
    ((word >> (bit % 8)) & ((1u64 << width) - 1)) as u32
}

/// Appends `present` dictionary entries (`w` bytes each) chosen by RLE / bit-packed
/// hybrid `indices` of bit width `width`.
fn gather_dictionary(
    dict: &[u8],
    w: usize,
    width: u8,
    indices: &[u8],
    present: usize,
    out: &mut Vec<u8>,
) -> Result<(), Unsupported> {
    let entries = dict.len() / w;
    let start = out.len();
    out.resize(start + present * w, 0);
    let dst = &mut out[start..];
    let mut src = Bytes {
        data: indices,
        pos: 0,
    };
    let width = width as usize;
    let mut i = 0usize;
    while i < present {
        let header = src.varint()?;
        if header & 1 == 0 {
            let n = ((header >> 1) as usize).min(present - i);
            let raw = src.take(width.div_ceil(8))?;
            let mut v = [0u8; 4];
            v[..raw.len()].copy_from_slice(raw);
            let idx = u32::from_le_bytes(v) as usize;
            if idx >= entries || n == 0 {
                return unsupported("bad dictionary run");
            }
            let entry = &dict[idx * w..(idx + 1) * w];
            for chunk in dst[i * w..(i + n) * w].chunks_exact_mut(w) {
                chunk.copy_from_slice(entry);
            }
            i += n;
        } else {
            let groups = (header >> 1) as usize;
            let packed = src.take(groups * width)?;
            let n = (groups * 8).min(present - i);
            if n == 0 {
                return unsupported("empty bit-packed run");
            }
            for (j, chunk) in dst[i * w..(i + n) * w].chunks_exact_mut(w).enumerate() {
                let idx = unpack(packed, j, width) as usize;
                if idx >= entries {
                    return unsupported("dictionary index out of range");
                }
                chunk.copy_from_slice(&dict[idx * w..(idx + 1) * w]);
            }
            i += n;
        }
    }
    Ok(())
}

/// Decodes a column chunk's pages (dictionary page first, if any).
pub fn decode_chunk(shape: &ColumnShape, pages: &[PageIn]) -> Result<ChunkOut, Unsupported> {
    if shape.max_rep > 1 || !(shape.width == 4 || shape.width == 8) {
        return unsupported("column shape");
    }
    let mut dictionary: Option<&[u8]> = None;
    let entries: usize = pages
        .iter()
        .filter(|p| p.kind != DICTIONARY)
        .map(|p| p.num_values)
        .sum();
    let mut values = Vec::with_capacity(entries * shape.width);
    let mut offsets = Vec::new();
    let mut total = 0usize;
    for page in pages {
        match page.kind {
            DICTIONARY => {
                if page.encoding != PLAIN && page.encoding != PLAIN_DICTIONARY {
                    return unsupported("dictionary page encoding");
                }
                if page.body.len() < page.num_values * shape.width {
                    return unsupported("truncated dictionary page");
                }
                dictionary = Some(&page.body[..page.num_values * shape.width]);
            }
            DATA_V1 | DATA_V2 => {
                let (rep, def, data) = if page.kind == DATA_V1 {
                    let mut b = Bytes {
                        data: page.body,
                        pos: 0,
                    };
                    let mut section = |max: u8| -> Result<&[u8], Unsupported> {
                        if max == 0 {
                            return Ok(&[]);
                        }
                        let len = u32::from_le_bytes(b.take(4)?.try_into().unwrap()) as usize;
                        b.take(len)
                    };
                    let rep = section(shape.max_rep)?;
                    let def = section(shape.max_def)?;
                    (rep, def, &page.body[b.pos..])
                } else {
                    (page.rep, page.def, page.body)
                };
                let present =
                    walk_levels(shape, rep, def, page.num_values, total as i64, &mut offsets)?;
                push_values(shape, page.encoding, data, present, dictionary, &mut values)?;
                total += present;
            }
            _ => return unsupported("page type"),
        }
    }
    let rows = offsets.len();
    offsets.push(total as i64);
    if shape.max_rep == 0 {
        // One value per row: offsets are 0..rows.
        if rows != total {
            return unsupported("rows without a value");
        }
    }
    Ok(ChunkOut {
        values,
        offsets,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::tests::list_levels;
    use crate::parquet::{encode_pages, Values};

    fn list_shape(width: usize) -> ColumnShape {
        ColumnShape {
            max_rep: 1,
            max_def: 3,
            def_present: 3,
            def_empty: 1,
            width,
        }
    }

    #[test]
    fn reads_back_what_the_encoder_writes() {
        // Rows of lengths 3, 0, 1, 5 (one empty row), doubles, PLAIN, two pages.
        let offsets = [0i64, 3, 3, 4, 9];
        let vals: Vec<f64> = (0..9).map(|i| i as f64 * 0.5).collect();
        let levels = list_levels(&offsets, None);
        let mut buf = Vec::new();
        let pages = encode_pages(&levels, Values::F64(&vals), 4, &mut buf).unwrap();
        let mut start = 0;
        let mut ins = Vec::new();
        for p in &pages {
            ins.push(PageIn {
                kind: 1,
                num_values: p.num_values as usize,
                encoding: PLAIN,
                rep: &[],
                def: &[],
                body: &buf[start..p.end],
            });
            start = p.end;
        }
        let out = decode_chunk(&list_shape(8), &ins).unwrap();
        assert_eq!(out.offsets, offsets);
        assert_eq!(out.rows, 4);
        let got: Vec<f64> = out
            .values
            .chunks(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, vals);
    }

    #[test]
    fn dictionary_pages_and_bit_packed_levels() {
        let dict: Vec<u8> = [1.5f32, -2.0, 7.25]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        // v2 page: rows [a, b, a] and [c]. Every stream is one bit-packed group of 8
        // (header 0x03), 4 entries used: reps 0,1,1,0 at width 1; defs 3 x 4 at width
        // 2; indices 0,1,0,2 at width 2 (after the bit-width byte).
        let rep = [0x03u8, 0b0000_0110];
        let def = [0x03u8, 0xff, 0xff];
        let data = [2u8, 0x03, 0b1000_0100, 0x00];
        let pages = [
            PageIn {
                kind: 0,
                num_values: 3,
                encoding: PLAIN,
                rep: &[],
                def: &[],
                body: &dict,
            },
            PageIn {
                kind: 2,
                num_values: 4,
                encoding: RLE_DICTIONARY,
                rep: &rep,
                def: &def,
                body: &data,
            },
        ];
        let out = decode_chunk(&list_shape(4), &pages).unwrap();
        assert_eq!(out.offsets, [0, 3, 4]);
        let got: Vec<f32> = out
            .values
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, [1.5, -2.0, 1.5, 7.25]);
    }

    #[test]
    fn nulls_are_unsupported() {
        let offsets = [0i64, 2, 2];
        let levels = list_levels(&offsets, Some(&[false, true]));
        let mut buf = Vec::new();
        let p = encode_pages(&levels, Values::F64(&[1.0, 2.0]), 100, &mut buf).unwrap();
        let ins = [PageIn {
            kind: 1,
            num_values: p[0].num_values as usize,
            encoding: PLAIN,
            rep: &[],
            def: &[],
            body: &buf,
        }];
        assert!(decode_chunk(&list_shape(8), &ins).is_err());
    }
}
