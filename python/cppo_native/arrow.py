"""CPPO masks for Apache Arrow data: one response per row, per-token values in list columns.

A rollout table holds one response per row; per-token columns are ``list<float>`` (or
``large_list<float>``) and the advantage is either such a list (per token) or a plain
numeric column (one value per row). Arrow already stores a list column packed: one flat
child array plus ``offsets`` of length ``rows + 1``. That *is* the packed layout of
:func:`cppo_native.cppo_mask` (``cu_seqlens``), so this module hands the child arrays to
the Rust backend as zero-copy NumPy views and the offsets as ``cu_seqlens``: no Python
loop over rows and no per-row copies. Outputs are new list columns sharing the input's
row structure::

    import pyarrow.parquet as pq
    from cppo_native.arrow import mask_table

    table = pq.read_table("rollouts.parquet")
    out = mask_table(table, delta=0.15, delta_b=0.02)   # adds cppo_mask, cppo_reason, ...

Column names default to verl's batch keys (``log_probs``, ``old_log_probs``,
``advantages``, ``response_mask``); see :class:`Columns`.

Decisions (where the spec is silent):

- **Null lists.** ``null_rows="error"`` (default) rejects a null list in any per-token
  column with an error naming the column and row. ``null_rows="empty"`` reads a null
  list as an empty one (a response with no tokens); the output lists of a row whose
  log-prob list is null are null, and so is its row budget. Either way, a row must have
  the same number of values in every per-token column.
- **Null values inside a list** (a null token) read as NaN: harmless at positions the
  response mask marks invalid, and at a valid position the usual bad-value error
  (``... got nan at row R, token C``). Null flags in the response mask are an error.
- **Per-row advantage nulls** read as NaN too, so they are an error only for a row
  that has a valid token.
- ``position_weight="shuffled"`` seeds each row's permutation with its index in the
  input (``row_offset`` plus its index in the batch), so results do not depend on how
  the input is batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np

from ._backends import dispatch
from ._core.params import KNOB_NAMES, check_num_threads, divergence_array, make_params

try:
    import pyarrow as pa
except ImportError as exc:  # pragma: no cover - exercised only without pyarrow
    raise ImportError(
        "cppo_native.arrow needs pyarrow; install it with `pip install pyarrow` "
        f"(or, from a cppo-native checkout, `pip install '.[arrow]'`): {exc}"
    ) from exc

from ._io.arrow_columns import (  # noqa: E402 (after the pyarrow check)
    _check_same_rows,
    _column,
    _flag_values,
    _float_values,
    _from_np,
    _is_list,
    _list_column,
    _np,
    _rewrite_bad_value,
)

__all__ = [
    "AUTO",
    "Columns",
    "ArrowMaskResult",
    "compute_batch",
    "mask_record_batch",
    "mask_table",
    "mask_batches",
    "output_schema",
    "knob_names",
    "validate_knobs",
    "sample_batches",
    "sample_table",
]


class _Auto:
    """Marker: use the optional column under its default name if the data has it."""

    def __repr__(self) -> str:
        return "AUTO"

    def __reduce__(self) -> str:
        return "AUTO"  # unpickles as this module's singleton (Ray ships Columns to workers)


AUTO: Any = _Auto()

# Keyword arguments of cppo_mask that this module passes through: the knob table's, and
# num_threads.
_KNOBS = KNOB_NAMES + ("num_threads",)


def knob_names() -> tuple:
    """The CPPO keyword arguments accepted by this module (those of ``cppo_mask``)."""
    return _KNOBS


@dataclass(frozen=True)
class Columns:
    """Input and output column names.

    Inputs: ``log_probs`` (current policy, list of floats), ``old_log_probs`` (rollout
    policy, list of floats), ``advantages`` (list of floats per token, or a numeric column
    with one value per row), ``response_mask`` (optional list of flags; nonzero = a
    generated token; default: used when the data has a ``response_mask`` column, else
    every token is valid; ``None``: never), ``divergence`` (optional list of floats: a
    precomputed D_t, used as given; default ``None``: the estimator named by the
    ``divergence`` knob).

    Outputs: ``mask`` list<bool> (keep_t), ``reason`` list<int8> (0..4, see
    :data:`cppo_native.REASON_NAMES`), ``threshold`` list<double> (c_t), ``row_budget``
    double (delta_b_row), and ``gate`` list<double> (soft gate) when ``include_gate``.
    """

    log_probs: str = "log_probs"
    old_log_probs: str = "old_log_probs"
    advantages: str = "advantages"
    response_mask: Any = AUTO
    divergence: Optional[str] = None
    mask: str = "cppo_mask"
    reason: str = "cppo_reason"
    threshold: str = "cppo_threshold"
    row_budget: str = "cppo_row_budget"
    gate: str = "cppo_gate"

    def resolved_response_mask(self, names: Iterable[str]) -> Optional[str]:
        if isinstance(self.response_mask, _Auto):
            return "response_mask" if "response_mask" in set(names) else None
        return self.response_mask

    def outputs(self, include_gate: bool) -> list:
        out = [self.mask, self.reason, self.threshold, self.row_budget]
        return out + [self.gate] if include_gate else out


@dataclass
class ArrowMaskResult:
    """The added columns for one batch, and the positions per reason code."""

    mask: "pa.Array"  # list<bool>
    reason: "pa.Array"  # list<int8>
    threshold: "pa.Array"  # list<double>
    row_budget: "pa.Array"  # double
    gate: Optional["pa.Array"]  # list<double> or None
    reason_counts: np.ndarray  # int64 [5]
    # Flat NumPy views of the outputs and the row offsets (for summaries and plots).
    offsets: np.ndarray  # int64 [rows + 1]
    nulls: Optional[np.ndarray]  # bool [rows] where the lists are null, or None
    reason_values: np.ndarray  # int8 [tokens]
    threshold_values: np.ndarray  # float64 [tokens]
    row_budget_values: np.ndarray  # float64 [rows]
    gate_values: Optional[np.ndarray]  # float64 [tokens] with include_gate
    # The flat NumPy inputs handed to cppo_mask (views of the batch's buffers).
    inputs: dict


# ---------------------------------------------------------------------------------------
# Reading list columns as (flat values, offsets) without copying.


def _knobs(knobs: dict) -> dict:
    unknown = sorted(set(knobs) - set(_KNOBS))
    if unknown:
        raise TypeError(f"unknown CPPO option(s): {', '.join(unknown)}; expected some of {', '.join(_KNOBS)}")
    if "delta" not in knobs or "delta_b" not in knobs:
        raise TypeError("delta and delta_b are required (paper: delta=0.15 dense / 0.20 MoE, delta_b=0.015-0.02)")
    div = knobs.get("divergence")
    if div is not None and not isinstance(div, str):
        raise TypeError(
            "divergence must be None, 'binary_tv' or 'binary_kl' here; a precomputed divergence "
            "is read from a column (Columns(divergence='name'))"
        )
    return knobs


def validate_knobs(**knobs: Any) -> None:
    """Check the CPPO options up front (same rules and messages as ``cppo_mask``)."""
    knobs = dict(_knobs(knobs))
    check_num_threads(knobs.pop("num_threads", None))
    make_params(**knobs)


def compute_batch(
    batch: Union["pa.RecordBatch", "pa.Table"],
    *,
    columns: Columns = Columns(),
    null_rows: str = "error",
    include_gate: bool = False,
    row_offset: int = 0,
    **knobs: Any,
) -> ArrowMaskResult:
    """CPPO mask, reasons, thresholds and row budgets for one RecordBatch.

    ``knobs`` are the keyword arguments of :func:`cppo_native.cppo_mask` (``delta`` and
    ``delta_b`` required; ``divergence`` may name an estimator). ``row_offset`` is the
    batch's first row within a larger table: added to row numbers in error messages, and
    part of the shuffled ablation's seed (rows are seeded by their index in the table).
    A Table is accepted and has its chunks combined (one copy) — prefer
    :func:`mask_table`, which works chunk by chunk.
    """
    knobs = _knobs(dict(knobs))
    if null_rows not in ("error", "empty"):
        raise ValueError(f"null_rows must be 'error' or 'empty', got {null_rows!r}")
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else pa.RecordBatch.from_pylist([], schema=batch.schema)
    elif not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"expected a pyarrow RecordBatch or Table, got {type(batch).__name__}")

    lp = _list_column(_column(batch, columns.log_probs), columns.log_probs, null_rows, row_offset, "float")
    lq = _list_column(_column(batch, columns.old_log_probs), columns.old_log_probs, null_rows, row_offset, "float")
    _check_same_rows(lp, lq, row_offset)
    cols = {"log_probs": lp, "old_log_probs": lq}

    adv_arr = _column(batch, columns.advantages)
    if _is_list(adv_arr.type):
        adv_col = _list_column(adv_arr, columns.advantages, null_rows, row_offset, "float")
        _check_same_rows(lp, adv_col, row_offset)
        advantages = _float_values(adv_col)
        per_row = False
    else:
        t = adv_arr.type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise TypeError(
                f"column {columns.advantages!r} must be numeric (one advantage per row) or a list of "
                f"floats (per token), got {t}"
            )
        per_row = True
        advantages = _np(adv_arr)  # nulls -> NaN
        if not pa.types.is_floating(t):
            advantages = advantages.astype(np.float64)

    valid = None
    mask_name = columns.resolved_response_mask(batch.schema.names)
    if mask_name is not None:
        vcol = _list_column(_column(batch, mask_name), mask_name, null_rows, row_offset, "bool")
        _check_same_rows(lp, vcol, row_offset)
        valid = _flag_values(vcol, row_offset)

    divergence = knobs.pop("divergence", None)
    if columns.divergence is not None:
        if divergence is not None:
            raise ValueError(
                f"divergence={divergence!r} and a divergence column ({columns.divergence!r}) were both "
                "given; use one"
            )
        dcol = _list_column(_column(batch, columns.divergence), columns.divergence, null_rows, row_offset, "float")
        _check_same_rows(lp, dcol, row_offset)
        divergence = _float_values(dcol)

    names = {
        "log_probs": columns.log_probs,
        "old_log_probs": columns.old_log_probs,
        "advantages": columns.advantages,
        "divergence": columns.divergence or "divergence",
    }
    lp_values = _float_values(cols["log_probs"])
    lq_values = _float_values(cols["old_log_probs"])
    try:
        threads = check_num_threads(knobs.pop("num_threads", None))
        params = make_params(divergence=divergence, **knobs)
        prep = dispatch.prepare_mask_inputs(lp_values, lq_values, advantages, valid, divergence_array(divergence),
                                            lp.offsets, per_row)
        mask, reason, threshold, gate, row_budget, counts = dispatch.run_mask_numpy(
            prep, params, num_threads=threads, want_gate=include_gate, first_row=row_offset
        )
    except ValueError as exc:
        raise _rewrite_bad_value(exc, names, row_offset) from None

    # Output lists share the log-probs' row structure (and its nulls).
    offsets = lp.offsets
    large = lp.large
    off_buf = pa.py_buffer(offsets if large else offsets.astype(np.int32))
    validity = None
    if lp.nulls is not None and lp.nulls.any():
        validity = pa.py_buffer(np.packbits(~lp.nulls, bitorder="little"))
    list_type = pa.large_list if large else pa.list_
    rows = offsets.shape[0] - 1

    def as_list(values: np.ndarray, value_type: "pa.DataType") -> "pa.Array":
        child = _from_np(values, value_type)
        return pa.Array.from_buffers(list_type(value_type), rows, [validity, off_buf], children=[child])

    budget = _from_np(row_budget, pa.float64(), lp.nulls)
    return ArrowMaskResult(
        mask=as_list(mask, pa.bool_()),
        reason=as_list(reason, pa.int8()),
        threshold=as_list(threshold, pa.float64()),
        row_budget=budget,
        gate=as_list(gate, pa.float64()) if include_gate else None,
        reason_counts=counts,
        offsets=offsets,
        nulls=lp.nulls,
        reason_values=reason,
        threshold_values=threshold,
        row_budget_values=row_budget,
        gate_values=gate,
        inputs=dict(
            log_probs=lp_values,
            old_log_probs=lq_values,
            advantages=advantages,
            advantage_per_row=per_row,
            valid=valid,
            divergence=None if columns.divergence is None else divergence,
        ),
    )


def output_schema(schema: "pa.Schema", *, columns: Columns = Columns(), include_gate: bool = False) -> "pa.Schema":
    """The input schema plus the added columns (list types follow the log-probs column)."""
    outputs = columns.outputs(include_gate)
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"output column names must differ, got {outputs}")
    for name in outputs:
        if name in schema.names:
            raise ValueError(
                f"output column {name!r} already exists in the input; choose another output name "
                "(Columns(mask=..., reason=..., threshold=..., row_budget=...); CLI --mask-column etc.)"
            )
    idx = schema.get_field_index(columns.log_probs)
    if idx < 0:
        have = ", ".join(repr(n) for n in schema.names)
        raise KeyError(f"column {columns.log_probs!r} not found (columns: {have})")
    large = pa.types.is_large_list(schema.field(idx).type)
    lst = pa.large_list if large else pa.list_
    fields = [
        pa.field(columns.mask, lst(pa.bool_())),
        pa.field(columns.reason, lst(pa.int8())),
        pa.field(columns.threshold, lst(pa.float64())),
        pa.field(columns.row_budget, pa.float64()),
    ]
    if include_gate:
        fields.append(pa.field(columns.gate, lst(pa.float64())))
    return pa.schema(list(schema) + fields, metadata=schema.metadata)


def _append(batch: "pa.RecordBatch", res: ArrowMaskResult, schema: "pa.Schema") -> "pa.RecordBatch":
    arrays = list(batch.columns) + [res.mask, res.reason, res.threshold, res.row_budget]
    if res.gate is not None:
        arrays.append(res.gate)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def mask_record_batch(
    batch: "pa.RecordBatch",
    *,
    columns: Columns = Columns(),
    null_rows: str = "error",
    include_gate: bool = False,
    row_offset: int = 0,
    **knobs: Any,
) -> "pa.RecordBatch":
    """The batch with the mask, reason, threshold and row-budget columns appended."""
    schema = output_schema(batch.schema, columns=columns, include_gate=include_gate)
    res = compute_batch(
        batch, columns=columns, null_rows=null_rows, include_gate=include_gate, row_offset=row_offset, **knobs
    )
    return _append(batch, res, schema)


def mask_batches(
    batches: Iterable["pa.RecordBatch"],
    *,
    columns: Columns = Columns(),
    null_rows: str = "error",
    include_gate: bool = False,
    **knobs: Any,
) -> Iterator[tuple]:
    """Stream: yields ``(output_batch, result)`` per input batch (row numbers in errors
    count from the first batch)."""
    _knobs(dict(knobs))
    row_offset = 0
    schema = None
    for batch in batches:
        if schema is None:
            schema = output_schema(batch.schema, columns=columns, include_gate=include_gate)
        res = compute_batch(
            batch, columns=columns, null_rows=null_rows, include_gate=include_gate, row_offset=row_offset, **knobs
        )
        row_offset += batch.num_rows
        yield _append(batch, res, schema), res


def mask_table(
    table: "pa.Table",
    *,
    columns: Columns = Columns(),
    null_rows: str = "error",
    include_gate: bool = False,
    **knobs: Any,
) -> "pa.Table":
    """The table with the added columns, computed chunk by chunk (chunked columns are
    walked as aligned record batches; no chunk is copied)."""
    if isinstance(table, pa.RecordBatch):
        return mask_record_batch(table, columns=columns, null_rows=null_rows, include_gate=include_gate, **knobs)
    if not isinstance(table, pa.Table):
        raise TypeError(f"expected a pyarrow Table or RecordBatch, got {type(table).__name__}")
    schema = output_schema(table.schema, columns=columns, include_gate=include_gate)
    out = [
        b
        for b, _ in mask_batches(
            table.to_batches(), columns=columns, null_rows=null_rows, include_gate=include_gate, **knobs
        )
    ]
    if not out:
        validate_knobs(**knobs)
        for name in (columns.log_probs, columns.old_log_probs, columns.advantages):
            if name not in table.schema.names:
                have = ", ".join(repr(n) for n in table.schema.names)
                raise KeyError(f"column {name!r} not found (columns: {have})")
        return schema.empty_table()
    return pa.Table.from_batches(out, schema=schema)


# ---------------------------------------------------------------------------------------
# Built-in sample rollouts as Arrow (deterministic; see cppo_native.sample).

SAMPLE_CHUNK_ROWS = 256


def sample_batches(rows: int, length: int = 512, *, seed: int = 0, chunk_rows: int = SAMPLE_CHUNK_ROWS,
                   drift: float = 0.08) -> Iterator["pa.RecordBatch"]:
    """Synthetic GRPO-like rollouts, ``chunk_rows`` per batch: ``uid`` (int64),
    ``log_probs`` and ``old_log_probs`` (list<float>, the response tokens only) and
    ``advantages`` (float, one per response). Chunk k is
    ``make_rollout_batch(chunk, length, seed=(seed, k))``, so the data depend only on
    (rows, length, seed, chunk_rows, drift)."""
    from .sample import make_rollout_batch

    if rows < 0 or length < 1 or chunk_rows < 1:
        raise ValueError(f"sample needs rows >= 0, length >= 1, chunk_rows >= 1; got {rows}, {length}, {chunk_rows}")
    done = 0
    k = 0
    while done < rows:
        n = min(chunk_rows, rows - done)
        b = make_rollout_batch(n, length, seed=(seed, k), drift=drift)  # type: ignore[arg-type]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(b.lengths, out=offsets[1:])
        off = pa.array(offsets)
        # Right-padded rows: boolean indexing walks row-major, so this is the packed layout.
        lp = pa.ListArray.from_arrays(off, pa.array(b.log_probs[b.response_mask]))
        lq = pa.ListArray.from_arrays(off, pa.array(b.old_log_probs[b.response_mask]))
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(done, done + n, dtype=np.int64)), lp, lq, pa.array(b.advantages)],
            names=["uid", "log_probs", "old_log_probs", "advantages"],
        )
        done += n
        k += 1


def sample_table(rows: int, length: int = 512, *, seed: int = 0, drift: float = 0.08) -> "pa.Table":
    """:func:`sample_batches` as one Table."""
    batches = list(sample_batches(rows, length, seed=seed, drift=drift))
    if not batches:
        schema = pa.schema([("uid", pa.int64()), ("log_probs", pa.list_(pa.float32())),
                            ("old_log_probs", pa.list_(pa.float32())), ("advantages", pa.float32())])
        return schema.empty_table()
    return pa.Table.from_batches(batches)
