//! Parquet pages (`cppo_core::parquet`, `cppo_core::parquet_read`): type conversion, GIL release, error mapping only.
//!
//! Contract with `python/cppo_native/_parquet.py`: `offsets` is int64 `[rows + 1]` from
//! 0 (absent for a one-value-per-row column), `nulls` bool `[rows]`, `codes` int8 and
//! `values` float64 hold the present values only, all C-contiguous.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use cppo_core::parquet::{encode_pages, EncodeError, Levels, Values};
use cppo_core::parquet_read::{decode_chunk, ColumnShape, PageIn};

type Encoded<'py> = (
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
);

/// Encodes one column of a batch as uncompressed v1 data pages. `kind`: "keep" (BOOLEAN
/// from the reason codes), "codes" (dictionary indices of the reason codes), "f64" or
/// "f64_levels" (the levels only; the caller appends each page's values).
/// Returns (bytes, page ends, page stats `[pages, 3]` flattened: level entries, rows,
/// present values).
#[pyfunction]
#[pyo3(signature = (kind, rows, offsets, nulls, codes, values, max_rep, max_def, def_null, def_empty, def_present, page_values))]
#[allow(clippy::too_many_arguments)]
fn encode_parquet_pages<'py>(
    py: Python<'py>,
    kind: &str,
    rows: usize,
    offsets: Option<PyReadonlyArray1<'py, i64>>,
    nulls: Option<PyReadonlyArray1<'py, bool>>,
    codes: Option<PyReadonlyArray1<'py, i8>>,
    values: Option<PyReadonlyArray1<'py, f64>>,
    max_rep: u8,
    max_def: u8,
    def_null: u8,
    def_empty: u8,
    def_present: u8,
    page_values: usize,
) -> PyResult<Encoded<'py>> {
    let contiguous = "offsets, nulls, codes and values must be C-contiguous";
    let offsets = offsets
        .as_ref()
        .map(|a| a.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err(contiguous))?;
    let nulls = nulls
        .as_ref()
        .map(|a| a.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err(contiguous))?;
    let codes = codes
        .as_ref()
        .map(|a| a.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err(contiguous))?;
    let values = values
        .as_ref()
        .map(|a| a.as_slice())
        .transpose()
        .map_err(|_| PyValueError::new_err(contiguous))?;
    let vals = match (kind, codes, values) {
        ("keep", Some(c), None) => Values::KeepFromCodes(c),
        ("codes", Some(c), None) => Values::Codes(c),
        ("f64", None, Some(v)) => Values::F64(v),
        ("f64_levels", None, Some(v)) => Values::F64Levels(v),
        _ => {
            return Err(PyValueError::new_err(format!(
                "encode_parquet_pages: kind {kind:?} needs codes (keep, codes) or values (f64, f64_levels)"
            )))
        }
    };
    let levels = Levels {
        offsets,
        nulls,
        rows,
        max_rep,
        max_def,
        def_null,
        def_empty,
        def_present,
    };
    let result = py.detach(|| {
        let mut out = Vec::new();
        encode_pages(&levels, vals, page_values, &mut out).map(|pages| (out, pages))
    });
    let (out, pages) = result.map_err(|EncodeError::Shape(msg)| PyValueError::new_err(msg))?;
    let ends: Vec<i64> = pages.iter().map(|p| p.end as i64).collect();
    let stats: Vec<i64> = pages
        .iter()
        .flat_map(|p| [p.num_values as i64, p.num_rows as i64, p.num_present as i64])
        .collect();
    Ok((
        out.into_pyarray(py),
        ends.into_pyarray(py),
        stats.into_pyarray(py),
    ))
}

type Decoded<'py> = (
    Option<Bound<'py, PyArray1<u8>>>,
    Option<Bound<'py, PyArray1<i64>>>,
    Option<String>,
);

/// Decodes one column chunk's decompressed pages (`kinds`: 0 dictionary, 1 data v1,
/// 2 data v2; `reps`/`defs` are the v2 level bytes, empty otherwise). Returns (values
/// as little-endian bytes, row offsets, None), or (None, None, why) when the chunk uses
/// something this reader does not handle (the caller then uses pyarrow).
#[pyfunction]
#[pyo3(signature = (kinds, num_values, encodings, reps, defs, bodies, max_rep, max_def, def_present, def_empty, width))]
#[allow(clippy::too_many_arguments)]
fn decode_parquet_chunk<'py>(
    py: Python<'py>,
    kinds: Vec<u8>,
    num_values: Vec<usize>,
    encodings: Vec<i32>,
    reps: Vec<PyReadonlyArray1<'py, u8>>,
    defs: Vec<PyReadonlyArray1<'py, u8>>,
    bodies: Vec<PyReadonlyArray1<'py, u8>>,
    max_rep: u8,
    max_def: u8,
    def_present: u8,
    def_empty: u8,
    width: usize,
) -> PyResult<Decoded<'py>> {
    let n = kinds.len();
    if [
        num_values.len(),
        encodings.len(),
        reps.len(),
        defs.len(),
        bodies.len(),
    ]
    .iter()
    .any(|&l| l != n)
    {
        return Err(PyValueError::new_err(
            "decode_parquet_chunk: one entry per page in every list",
        ));
    }
    fn slice<'a>(a: &'a PyReadonlyArray1<'_, u8>) -> PyResult<&'a [u8]> {
        a.as_slice()
            .map_err(|_| PyValueError::new_err("page buffers must be contiguous"))
    }
    let mut pages = Vec::with_capacity(n);
    for i in 0..n {
        pages.push(PageIn {
            kind: kinds[i],
            num_values: num_values[i],
            encoding: encodings[i],
            rep: slice(&reps[i])?,
            def: slice(&defs[i])?,
            body: slice(&bodies[i])?,
        });
    }
    let shape = ColumnShape {
        max_rep,
        max_def,
        def_present,
        def_empty,
        width,
    };
    Ok(match py.detach(|| decode_chunk(&shape, &pages)) {
        Ok(out) => (
            Some(out.values.into_pyarray(py)),
            Some(out.offsets.into_pyarray(py)),
            None,
        ),
        Err(why) => (None, None, Some(why.0)),
    })
}

/// Adds the Parquet page functions to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_parquet_pages, m)?)?;
    m.add_function(wrap_pyfunction!(decode_parquet_chunk, m)?)?;
    Ok(())
}
