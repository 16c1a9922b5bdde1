"""CPU backend: the Rust extension (``cppo_native._native``), rayon over rows."""

from __future__ import annotations

import numpy as np

from ._dispatch import MASK_DTYPES, Prepared
from ._errors import bad_value_error
from ._params import MaskParams

try:
    from . import _native
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _native = None
    _IMPORT_ERROR = exc


def native_module():
    """The compiled extension, or a clear error saying how to get it."""
    if _native is None:
        raise ImportError(
            "cppo_native's Rust extension (cppo_native._native) is not built or failed to load "
            f"({_IMPORT_ERROR}). Install the wheel (pip install cppo-native) or build it from a checkout "
            "with `pip install .` (needs a Rust toolchain). The NumPy reference "
            "cppo_native.reference.cppo_mask_reference is available but is not used as a silent fallback."
        )
    return _native


def check_offsets(cu: np.ndarray, total: int) -> np.ndarray:
    """cu_seqlens as contiguous int64, checked: starts at 0, non-decreasing, ends at total."""
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i + 1}]={int(cu[i + 1])} < cu_seqlens[{i}]={int(cu[i])}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens {total}, got {int(cu[-1])}")
    return cu


def compute(prep: Prepared, params: MaskParams, return_info: bool, num_threads: int, want_gate: bool = True):
    """Returns (mask, reason, threshold, gate, row_budget, counts) as NumPy arrays;
    the info arrays are None unless ``return_info`` (and the gate unless ``want_gate``)."""
    native = native_module()
    token_shape = tuple(prep.log_probs.shape)
    cu = None
    if prep.cu_seqlens is not None:
        cu = check_offsets(prep.cu_seqlens, token_shape[0])
    valid = prep.valid
    if valid is not None and prep.bf16.get("response_mask"):
        valid = (valid & 0x7FFF) != 0  # bfloat16 bits: -0.0 is zero too
    elif valid is not None and str(valid.dtype) not in MASK_DTYPES:
        valid = valid != 0
    mask = np.empty(token_shape, dtype=np.bool_)
    reason = threshold = gate = row_budget = None
    if return_info:
        reason = np.empty(token_shape, dtype=np.int8)
        threshold = np.empty(token_shape, dtype=np.float64)
        gate = np.empty(token_shape, dtype=np.float64) if want_gate else None
        row_budget = np.empty(prep.num_rows, dtype=np.float64)
    counts, bad = native.cppo_mask_into(
        prep.log_probs,
        prep.old_log_probs,
        prep.advantages,
        prep.advantage_per_row,
        valid,
        prep.divergence,
        cu,
        mask,
        reason,
        threshold,
        gate,
        row_budget,
        params=params,
        num_threads=num_threads,
    )
    if bad is not None:
        field, row, column, value = bad
        flat = int(cu[row]) + column if cu is not None else None
        raise bad_value_error(field, row, column, value, flat)
    return mask, reason, threshold, gate, row_budget, np.asarray(counts, dtype=np.int64)
