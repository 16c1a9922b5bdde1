//! Python binding of `parquet.rs`: type conversion, GIL release, error mapping only.
//!
//! Contract with `python/cppo_native/_parquet.py`: `offsets` is int64 `[rows + 1]` from
//! 0 (absent for a one-value-per-row column), `nulls` bool `[rows]`, `codes` int8 and
//! `values` float64 hold the present values only, all C-contiguous.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::parquet::{encode_pages, EncodeError, Levels, Values};

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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(encode_parquet_pages, m)?)?;
    Ok(())
}
