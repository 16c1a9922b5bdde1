"""Ray Data scale-out: CPPO masks over a Dataset of rollouts, one Arrow batch at a time.

    import ray
    from cppo_native.ray import mask_dataset

    ds = ray.data.read_parquet("s3://bucket/rollouts/")
    masked = mask_dataset(ds, delta=0.15, delta_b=0.02)
    masked.write_parquet("s3://bucket/rollouts_masked/")

Each block is handed to :func:`cppo_native.arrow.mask_table` as a ``pyarrow.Table``
(``batch_format="pyarrow"``, zero-copy batches), so the result is the same as masking
the whole table in one process (except ``position_weight="shuffled"``, whose seed uses
the row index within a batch).
"""

from __future__ import annotations

from typing import Any, Optional

from .arrow import Columns, _knobs, mask_table, validate_knobs

__all__ = ["mask_dataset"]


def _mask_block(table, *, columns: Columns, null_rows: str, include_gate: bool, knobs: dict):
    return mask_table(table, columns=columns, null_rows=null_rows, include_gate=include_gate, **knobs)


def mask_dataset(
    ds: Any,
    *,
    columns: Columns = Columns(),
    null_rows: str = "error",
    include_gate: bool = False,
    batch_size: Optional[int] = 4096,
    num_cpus: float = 1,
    **knobs: Any,
):
    """``ds`` with the CPPO columns added (lazy, like every Ray Data transform).

    ``knobs`` are :func:`cppo_native.cppo_mask`'s keyword arguments (``delta`` and
    ``delta_b`` required); they are checked here, before anything runs. Each task uses
    ``num_cpus`` Ray CPUs and, unless ``num_threads`` is given, as many mask threads.
    ``batch_size`` rows per call (``None``: whole blocks).
    """
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "cppo_native.ray needs Ray Data; install it with `pip install 'ray[data]'` "
            f"(or, from a cppo-native checkout, `pip install '.[ray]'`): {exc}"
        ) from exc
    knobs = dict(_knobs(dict(knobs)))
    if knobs.get("num_threads") is None:
        knobs["num_threads"] = max(1, int(num_cpus))
    validate_knobs(**knobs)
    if null_rows not in ("error", "empty"):
        raise ValueError(f"null_rows must be 'error' or 'empty', got {null_rows!r}")
    if not isinstance(columns, Columns):
        raise TypeError(f"columns must be a cppo_native.arrow.Columns, got {type(columns).__name__}")
    return ds.map_batches(
        _mask_block,
        batch_format="pyarrow",
        batch_size=batch_size,
        zero_copy_batch=True,
        num_cpus=num_cpus,
        fn_kwargs=dict(columns=columns, null_rows=null_rows, include_gate=include_gate, knobs=knobs),
    )
