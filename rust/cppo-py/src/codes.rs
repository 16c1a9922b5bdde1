//! The integer codes of `cppo_core::codes`, for Python: `_native.codes()`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Every integer code shared with the extension, as a dict of dicts:
/// `{"reason": {"invalid": 0, ...}, "position_weight": {...}, "divergence": {...},
/// "field": {...}, "topk_field": {...}, "page_kind": {...}}`.
#[pyfunction]
fn codes(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let all = PyDict::new(py);
    for (table, names) in cppo_core::codes::tables() {
        let d = PyDict::new(py);
        for (name, code) in names {
            d.set_item(name, code)?;
        }
        all.set_item(table, d)?;
    }
    Ok(all)
}

/// Adds `codes` to `cppo_native._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(codes, m)?)?;
    Ok(())
}
