"""cppo-native as ``torch.library`` custom ops, so that ``torch.compile`` sees them whole.

- ``torch.ops.cppo_native.mask``: the CPPO mask pass (any backend), returning
  ``(mask bool, reason int8, threshold float64, gate float64, row_budget float64 [B],
  reason_counts int64 [5])``; :func:`mask_with_info` is its keyword face.
- ``torch.ops.cppo_native.topk_divergence``: :func:`cppo_native.divergence.topk_divergence`
  (float64 of the log-probs' shape).
- ``torch.ops.cppo_native.binary_divergence``: Binary TV / KL (the loss's
  ``divergence_mean`` metric).

Each has a fake (meta) implementation giving the output shapes and dtypes, so that
``torch.compile(..., fullgraph=True)`` of code calling them (e.g.
:func:`cppo_native.torch.cppo_policy_loss`) traces without a graph break; inside, the op
runs eagerly as an opaque call (the Rust/CUDA backends are not traceable, and need not
be). The knobs cross the op boundary as schema types: floats, ints, bools and strings
(``horizon``: 0 means ``"sequence"``; ``shuffle_seed``: the int64 with the seed's 64 bits;
``per_row_advantages``: -1 infer, 0 per token, 1 per row; ``num_threads``: 0 = all cores).
No op has a gradient: the mask and the divergences are computed without one.

This module does not use ``from __future__ import annotations``: ``custom_op`` reads the
schema from the annotations.
"""

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from . import divergence as _dv
from ._backends import dispatch
from ._core.params import MaskParams, check_num_threads, divergence_array, make_params
from .mask import MaskInfo

_U64 = 1 << 64


@torch.library.custom_op("cppo_native::mask", mutates_args=())
def _mask_op(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Optional[Tensor],
    divergence: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    per_row_advantages: int,
    delta: float,
    delta_b: float,
    w_min: float,
    horizon: int,
    adaptive_budget: bool,
    budget_quantile: float,
    budget_scale: float,
    budget_ceiling: float,
    position_weight: str,
    shuffle_seed: int,
    prefix_budget: bool,
    divergence_mode: str,
    validate: bool,
    num_threads: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    params = MaskParams(
        delta=delta, delta_b=delta_b, w_min=w_min, horizon=horizon, adaptive_budget=adaptive_budget,
        budget_quantile=budget_quantile, budget_scale=budget_scale, budget_ceiling=budget_ceiling,
        position_weight=position_weight, shuffle_seed=shuffle_seed % _U64, prefix_budget=prefix_budget,
        divergence=divergence_mode,
    )
    per_row = None if per_row_advantages < 0 else bool(per_row_advantages)
    prep = dispatch.prepare_mask_inputs(log_probs, old_log_probs, advantages, response_mask, divergence, cu_seqlens,
                                        per_row, backend=backend)
    out = dispatch.run_mask(prep, params, return_info=True, validate=validate, num_threads=num_threads or None,
                            backend=backend)
    return out  # fresh tensors (from_numpy/from_dlpack views of new arrays, or new torch tensors)


@_mask_op.register_fake
def _mask_fake(log_probs, old_log_probs, advantages, response_mask, divergence, cu_seqlens, *args):
    shape = log_probs.shape
    rows = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else shape[0]
    new = log_probs.new_empty
    return (
        new(shape, dtype=torch.bool),
        new(shape, dtype=torch.int8),
        new(shape, dtype=torch.float64),
        new(shape, dtype=torch.float64),
        new((rows,), dtype=torch.float64),
        new((5,), dtype=torch.int64),
    )


def mask_with_info(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    response_mask: Optional[Tensor] = None,
    *,
    divergence: Any = None,
    cu_seqlens: Optional[Tensor] = None,
    per_row_advantages: Optional[bool] = None,
    validate: bool = True,
    num_threads: Optional[int] = None,
    backend: str = "native",
    **knobs: Any,
) -> Tuple[Tensor, MaskInfo]:
    """``cppo_mask(..., return_info=True)`` for torch tensors through the custom op
    ``torch.ops.cppo_native.mask`` (same arguments, knobs and errors; traceable by
    ``torch.compile``). Returns ``(mask, MaskInfo)``."""
    params = make_params(divergence=divergence, **knobs)
    dispatch.check_backend(backend)
    threads = check_num_threads(num_threads)
    seed = params.shuffle_seed - _U64 if params.shuffle_seed >= 1 << 63 else params.shuffle_seed
    mask, reason, threshold, gate, row_budget, counts = _mask_op(
        log_probs, old_log_probs, advantages, response_mask, divergence_array(divergence), cu_seqlens,
        -1 if per_row_advantages is None else int(bool(per_row_advantages)),
        params.delta, params.delta_b, params.w_min, params.horizon, params.adaptive_budget, params.budget_quantile,
        params.budget_scale, params.budget_ceiling, params.position_weight, seed, params.prefix_budget,
        params.divergence, validate, threads or 0, backend,
    )
    return mask, MaskInfo(reason=reason, threshold=threshold, gate=gate, row_budget=row_budget,
                          reason_counts=counts)


@torch.library.custom_op("cppo_native::topk_divergence", mutates_args=())
def _topk_op(
    log_probs: Tensor,
    old_log_probs: Tensor,
    topk_log_probs: Tensor,
    topk_old_log_probs: Tensor,
    topk_ids: Tensor,
    sampled_ids: Tensor,
    response_mask: Optional[Tensor],
    kind: str,
    validate: bool,
    num_threads: int,
) -> Tensor:
    out = _dv.topk_divergence(log_probs, old_log_probs, topk_log_probs, topk_old_log_probs, topk_ids, sampled_ids,
                              response_mask, kind=kind, num_threads=num_threads or None, validate=validate)
    return out.clone() if _aliases(out, (log_probs, old_log_probs)) else out


@_topk_op.register_fake
def _topk_fake(log_probs, *args):
    return log_probs.new_empty(log_probs.shape, dtype=torch.float64)


def topk_divergence(log_probs: Tensor, old_log_probs: Tensor, topk_log_probs: Tensor, topk_old_log_probs: Tensor,
                    topk_ids: Tensor, sampled_ids: Tensor, response_mask: Optional[Tensor] = None, *,
                    kind: str = "tv", num_threads: Optional[int] = None, validate: bool = True) -> Tensor:
    """:func:`cppo_native.divergence.topk_divergence` through the custom op
    ``torch.ops.cppo_native.topk_divergence`` (torch tensors; traceable)."""
    if kind not in ("tv", "kl"):
        raise ValueError(f"kind must be 'tv' or 'kl', got {kind!r}")
    return _topk_op(log_probs, old_log_probs, topk_log_probs, topk_old_log_probs, topk_ids, sampled_ids,
                    response_mask, kind, validate, check_num_threads(num_threads) or 0)


@torch.library.custom_op("cppo_native::binary_divergence", mutates_args=())
def _binary_op(log_probs: Tensor, old_log_probs: Tensor, response_mask: Optional[Tensor], kind: str,
               validate: bool, num_threads: int, backend: str) -> Tensor:
    if backend == "torch":  # torch operations on the inputs' device, like the mask
        out = _dv._binary_torch(kind, log_probs, old_log_probs, response_mask, validate)
    else:
        fn = _dv.binary_kl if kind == "kl" else _dv.binary_tv
        out = fn(log_probs, old_log_probs, response_mask, num_threads=num_threads or None, validate=validate)
    return out.clone() if _aliases(out, (log_probs, old_log_probs)) else out


@_binary_op.register_fake
def _binary_fake(log_probs, *args):
    return log_probs.new_empty(log_probs.shape, dtype=torch.float64)


def binary_divergence(log_probs: Tensor, old_log_probs: Tensor, response_mask: Optional[Tensor] = None, *,
                      kind: str = "tv", validate: bool = True, num_threads: Optional[int] = None,
                      backend: str = "native") -> Tensor:
    """Binary TV (``kind="tv"``) or KL (``"kl"``) through ``torch.ops.cppo_native.binary_divergence``."""
    return _binary_op(log_probs, old_log_probs, response_mask, kind, validate, check_num_threads(num_threads) or 0,
                      dispatch.check_backend(backend))


def _aliases(out: Tensor, inputs: tuple) -> bool:
    """Whether ``out`` shares memory with an input (a float64 input passed through)."""
    ptr = out.untyped_storage().data_ptr()
    return any(x.untyped_storage().data_ptr() == ptr for x in inputs if x.numel() and out.numel())


__all__ = ["binary_divergence", "mask_with_info", "topk_divergence"]
