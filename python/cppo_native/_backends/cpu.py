"""CPU backend: the Rust extension (``cppo_native._native``), rayon over rows."""

from __future__ import annotations

import operator
import sys

import numpy as np

from .._core.errors import bad_value_error
from .._core.native import native_module
from .._core.params import MaskParams
from .arrays import MASK_DTYPES, Prepared, check_offsets


def compute(prep: Prepared, params: MaskParams, return_info: bool, num_threads: int, want_gate: bool = True,
            first_row: int = 0):
    """Returns (mask, reason, threshold, gate, row_budget, counts) as NumPy arrays;
    the info arrays are None unless ``return_info`` (and the gate unless ``want_gate``).

    ``first_row``: the index of the batch's first row in a larger input (the Arrow
    layer's ``row_offset``), passed to the extension as ``row_offset``: the shuffled
    ablation seeds row r of the call as row ``first_row + r``, so results do not depend
    on how the input is batched. Errors still name the row within the batch.
    """
    native = native_module()
    first_row = operator.index(first_row)
    if not 0 <= first_row < 2**64:
        raise ValueError(f"row_offset (the batch's first row in the input) must be in [0, 2**64), got {first_row}")
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
        row_offset=first_row,
    )
    _raise_bad_value(bad, cu)
    return mask, reason, threshold, gate, row_budget, np.asarray(counts, dtype=np.int64)


def _raise_bad_value(bad, cu) -> None:
    """The extension's first bad value ``(field, row, column, value)`` as the ValueError
    naming it (with the flat index in the packed layout), or nothing for None."""
    if bad is not None:
        field, row, column, value = bad
        flat = int(cu[row]) + column if cu is not None else None
        raise bad_value_error(field, row, column, value, flat)


def fast_mask(log_probs, old_log_probs, advantages, response_mask, params: MaskParams, num_threads: int):
    """The mask of the commonest call, without the general path's conversions: C-order
    2-D float32/float64 log-probs (both of one dtype), float32/float64 advantages per
    row ``[B]`` or per token, a response mask of a dtype the kernel reads as it is
    (bool, uint8, int8, int32, int64, float32, float64; nonzero is valid) or None; all
    NumPy arrays, or all CPU torch tensors (read through ``Tensor.numpy()``, the mask
    returned as a tensor). Returns None for anything else, and the caller takes the
    general path (:func:`~cppo_native._backends.prepare.prepare`, then
    :func:`compute`), which accepts these same inputs, passes the extension the same
    arrays and raises every error.

    The checks run in the extension (``_native.FastMask``, one per parameters and thread
    count, kept here): in Python they cost ~25 us a call once a large batch had left the
    caches cold, which a batch of 16 x 16384 at two threads (~0.55 ms) felt in its
    1 -> 2 thread scaling (docs/cpu.md)."""
    fast = masker(params, num_threads)
    result, wrap = fast(log_probs, old_log_probs, advantages, response_mask), None
    if result is None:
        torch = sys.modules.get("torch")
        views = None if torch is None else _torch_views(torch, log_probs, old_log_probs, advantages, response_mask)
        if views is None:
            return None
        result, wrap = fast(*views), torch.from_numpy
        if result is None:
            return None
    mask, bad = result
    if bad is not None:
        _raise_bad_value(bad, None)
    return mask if wrap is None else wrap(mask)


def _torch_views(torch, log_probs, old_log_probs, advantages, response_mask):
    """NumPy views of four CPU torch tensors (``torch.Tensor`` itself, not subclasses),
    or None where there are none (a CUDA, meta or sparse tensor, bfloat16, a tensor
    with the negative or conjugate bit), which the general path handles."""
    tensor = torch.Tensor
    if type(log_probs) is not tensor or log_probs.is_cuda or not (
            type(old_log_probs) is tensor and type(advantages) is tensor
            and (response_mask is None or type(response_mask) is tensor)):
        return None  # CUDA: without raising and catching .numpy()'s error on every call
    try:
        return (log_probs.detach().numpy(), old_log_probs.detach().numpy(), advantages.detach().numpy(),
                None if response_mask is None else response_mask.detach().numpy())
    except (TypeError, RuntimeError):
        return None


# FastMask objects by (id of the parameters, thread count); each entry keeps its
# parameters alive, so that their id is not reused while the entry exists.
_MASKERS: dict = {}
_MASKERS_SIZE = 64


def masker(params: MaskParams, num_threads: int):
    """The extension's ``FastMask`` for these parameters and thread count (0: all cores)."""
    key = (id(params), num_threads)
    hit = _MASKERS.get(key)
    if hit is not None:
        return hit[1]
    fast = native_module().FastMask(params, num_threads)
    if len(_MASKERS) >= _MASKERS_SIZE:
        _MASKERS.clear()
    _MASKERS[key] = (params, fast)
    return fast
