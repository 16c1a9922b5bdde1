"""Arrow list columns as the mask's packed layout: offsets, values and null rows of
``list<float>`` / ``large_list<float>`` columns read without per-row Python, and the
mask's bad-value errors rewritten with column names and table rows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa


@dataclass
class _ListColumn:
    name: str
    values: "pa.Array"  # the flat child values of rows [0, rows), nothing before or after
    offsets: np.ndarray  # int64 [rows + 1], starting at 0
    nulls: Optional[np.ndarray]  # bool [rows] where the list is null, or None
    large: bool


def _is_list(t: "pa.DataType") -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _column(batch: "pa.RecordBatch", name: str) -> "pa.Array":
    idx = batch.schema.get_field_index(name)
    if idx < 0:
        have = ", ".join(repr(n) for n in batch.schema.names)
        raise KeyError(f"column {name!r} not found (columns: {have})")
    col = batch.column(idx)
    if isinstance(col, pa.ChunkedArray):  # pragma: no cover - RecordBatch columns are Arrays
        col = col.combine_chunks()
    return col


def _first_true(flags: np.ndarray) -> int:
    return int(np.argmax(flags))


_NUMPY_TYPES = {
    "halffloat": np.float16, "float": np.float32, "double": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
}


def _bits(buf: "pa.Buffer", offset: int, n: int) -> np.ndarray:
    """An Arrow bitmap (LSB first) as a NumPy bool array of n flags."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=(offset + n + 7) // 8)
    return np.unpackbits(raw, bitorder="little", count=offset + n)[offset:].view(np.bool_)


def _from_np(values: np.ndarray, value_type: "pa.DataType", nulls: Optional[np.ndarray] = None) -> "pa.Array":
    """A NumPy array as an Arrow array (zero-copy for numbers; bools are bit-packed),
    without ``pa.array``'s pandas import."""
    values = np.ascontiguousarray(values)
    n = values.shape[0]
    validity = None
    if nulls is not None and nulls.any():
        validity = pa.py_buffer(np.packbits(~nulls, bitorder="little"))
    if pa.types.is_boolean(value_type):
        data = pa.py_buffer(np.packbits(values.view(np.bool_), bitorder="little"))
    else:
        data = pa.py_buffer(values)
    return pa.Array.from_buffers(value_type, n, [validity, data])


def _np(arr: "pa.Array") -> np.ndarray:
    """A primitive (numeric or bool) Arrow array as NumPy: a zero-copy view of its data
    buffer when it has no nulls; nulls become NaN (numeric) in a copy. Reads the buffers
    directly (``Array.to_numpy`` would import pandas, ~0.2 s, when it is installed)."""
    t = arr.type
    n = len(arr)
    bufs = arr.buffers()
    if pa.types.is_boolean(t):
        if arr.null_count:
            raise ValueError("null flags")  # callers check before
        return _bits(bufs[1], arr.offset, n) if n else np.zeros(0, np.bool_)
    dtype = _NUMPY_TYPES.get(str(t))
    if dtype is None:
        raise TypeError(f"unsupported Arrow type {t}")
    if n == 0:
        return np.zeros(0, dtype)
    values = np.frombuffer(bufs[1], dtype=dtype, count=n, offset=arr.offset * np.dtype(dtype).itemsize)
    if arr.null_count:
        valid = _bits(bufs[0], arr.offset, n)
        values = values.astype(np.float64 if dtype not in (np.float16, np.float32) else dtype, copy=True)
        values[~valid] = np.nan
    return values


def _list_column(arr: "pa.Array", name: str, null_rows: str, row_offset: int, what: str) -> _ListColumn:
    """Flat child values and rebased offsets of a list column (zero-copy without nulls)."""
    t = arr.type
    if pa.types.is_dictionary(t):
        arr = arr.dictionary_decode()
        t = arr.type
    if not _is_list(t):
        raise TypeError(f"column {name!r} must be a list<{what}> column (one list per response), got {t}")
    large = pa.types.is_large_list(t)
    if arr.null_count:
        nulls = _np(arr.is_null())
        if null_rows == "error":
            r = _first_true(nulls)
            raise ValueError(
                f"column {name!r} is null at row {row_offset + r}; drop or fill null rows first, "
                "or read null lists as empty responses (null_rows='empty', CLI --null-rows empty)"
            )
        # A null list may own a non-empty child range: flatten() drops it; lengths count 0.
        import pyarrow.compute as pc  # only here: importing it costs ~35 ms

        lengths = _np(pc.fill_null(pc.list_value_length(arr), 0))
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _ListColumn(name, arr.flatten(), offsets, nulls, large)
    raw = _np(arr.offsets)  # int32/int64 [rows + 1], slice-aware
    start, stop = int(raw[0]), int(raw[-1])
    offsets = raw.astype(np.int64, copy=True)
    if start:
        offsets -= start
    return _ListColumn(name, arr.values.slice(start, stop - start), offsets, None, large)


_FLOAT_TYPES = ("halffloat", "float", "double")


def _float_values(col: _ListColumn) -> np.ndarray:
    """The child values as a NumPy float array (zero-copy unless they hold nulls -> NaN)."""
    values = col.values
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not pa.types.is_floating(values.type):
        raise TypeError(
            f"column {col.name!r} must hold floats (list<float> or list<double>), got list<{values.type}>"
        )
    return _np(values)  # zero-copy; nulls become NaN


def _flag_values(col: _ListColumn, row_offset: int) -> np.ndarray:
    """Response-mask flags as NumPy (bool bitmaps are unpacked: one pass, unavoidable)."""
    values = col.values
    t = values.type
    if not (pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise TypeError(f"column {col.name!r} must hold bool, int or float flags, got list<{t}>")
    if values.null_count:
        flat = _first_true(_np(values.is_null()))
        row = int(np.searchsorted(col.offsets, flat, side="right")) - 1
        token = flat - int(col.offsets[row])
        raise ValueError(
            f"column {col.name!r} has a null flag at row {row_offset + row}, token {token}; "
            "fill it with 0 (not a generated token) or 1"
        )
    return _np(values)  # bool bitmaps are unpacked (one pass); others zero-copy


def _check_same_rows(ref: _ListColumn, other: _ListColumn, row_offset: int) -> None:
    if other.offsets.shape == ref.offsets.shape and np.array_equal(other.offsets, ref.offsets):
        return
    ref_len = np.diff(ref.offsets)
    other_len = np.diff(other.offsets)
    r = _first_true(ref_len != other_len)
    raise ValueError(
        f"column {other.name!r} has {int(other_len[r])} values at row {row_offset + r} but column "
        f"{ref.name!r} has {int(ref_len[r])}; every per-token column needs one value per token"
    )


# cppo_mask's bad-value message (cppo_native._errors.bad_value_error) for packed inputs.
_BAD_VALUE = re.compile(
    r"^(?P<field>\w+) must be (?P<rule>.+) at valid positions; got (?P<value>.+) at "
    r"\(row (?P<row>\d+), column (?P<col>\d+)(?:; flat index \d+)?\)$"
)


def _rewrite_bad_value(exc: ValueError, names: dict, row_offset: int) -> ValueError:
    """The backend's (row, column) in a batch -> the column name, the table row and token."""
    m = _BAD_VALUE.match(str(exc))
    if not m:
        return exc
    field, value = m["field"], m["value"]
    name = names.get(field, field)
    hint = " (NaN or a null value in the data)" if value == "nan" else ""
    return ValueError(
        f"column {name!r} must be {m['rule']} at valid tokens; got {value}{hint} at row "
        f"{row_offset + int(m['row'])}, token {m['col']}"
    )


# ---------------------------------------------------------------------------------------
# The mask.
