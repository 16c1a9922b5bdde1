"""CPU backend: the Rust extension (``cppo_native._native``), rayon over rows."""

from __future__ import annotations

import numpy as np

from .._core.errors import bad_value_error
from .._core.native import native_module
from .._core.params import MaskParams
from .arrays import MASK_DTYPES, Prepared, check_offsets


def compute(prep: Prepared, params: MaskParams, return_info: bool, num_threads: int, want_gate: bool = True,
            first_row: int = 0):
    """Returns (mask, reason, threshold, gate, row_budget, counts) as NumPy arrays;
    the info arrays are None unless ``return_info`` (and the gate unless ``want_gate``).

    ``first_row`` (packed layout only): the index of the batch's first row in a larger
    input, so that the shuffled ablation, seeded by the row index, does not depend on
    how the input is batched. The extension seeds row r of a call with ``shuffle_seed ^
    (r + 1) * C``, which no change of the seed can shift; so the call gets ``first_row``
    empty rows in front (O(first_row) extra work, shuffled mode only) and their outputs
    are dropped. A ``row_offset`` argument of the extension would make this free.
    """
    native = native_module()
    token_shape = tuple(prep.log_probs.shape)
    cu = None
    if prep.cu_seqlens is not None:
        cu = check_offsets(prep.cu_seqlens, token_shape[0])
    advantages = prep.advantages
    skip = 0
    if first_row and params.position_weight == "shuffled":
        if cu is None:
            raise ValueError("first_row needs the packed layout (cu_seqlens)")
        skip = int(first_row)
        cu = np.concatenate((np.zeros(skip, np.int64), cu))
        if prep.advantage_per_row:
            advantages = np.concatenate((np.zeros(skip, advantages.dtype), advantages))
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
        row_budget = np.empty(prep.num_rows + skip, dtype=np.float64)
    counts, bad = native.cppo_mask_into(
        prep.log_probs,
        prep.old_log_probs,
        advantages,
        prep.advantage_per_row,
        valid,
        prep.divergence,
        cu,
        mask,
        reason,
        threshold,
        gate,
        row_budget,
        delta=params.delta,
        delta_b=params.delta_b,
        w_min=params.w_min,
        horizon=params.horizon,
        adaptive_budget=params.adaptive_budget,
        budget_quantile=params.budget_quantile,
        budget_scale=params.budget_scale,
        position_weight=params.position_weight_code,
        shuffle_seed=params.shuffle_seed,
        prefix_budget=params.prefix_budget,
        divergence_mode=params.divergence_code,
        num_threads=num_threads,
    )
    if bad is not None:
        field, row, column, value = bad
        flat = int(cu[row]) + column if cu is not None else None
        raise bad_value_error(field, row - skip, column, value, flat)
    if skip and row_budget is not None:
        row_budget = row_budget[skip:]
    return mask, reason, threshold, gate, row_budget, np.asarray(counts, dtype=np.int64)
