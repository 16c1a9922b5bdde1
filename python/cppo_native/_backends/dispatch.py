"""Backend choice: the one place that branches on the device and on ``backend``.

``run_mask`` takes checked knobs and caller arrays, prepares them once
(:mod:`.prepare`), runs the chosen backend and hands the results back in the caller's
framework on the caller's device:

- ``backend="native"`` (default): the Rust CPU backend for CPU arrays, the CUDA backend
  (CuPy kernels) for CUDA arrays; a CUDA input without CuPy raises ImportError.
- ``backend="torch"``: float64 torch operations (:mod:`.torch_ops`) on the inputs'
  device, chosen explicitly only; never a fallback.
"""

from __future__ import annotations

from typing import Any, Optional

from .._core.params import MaskParams
from . import cpu
from .arrays import Prepared, from_numpy, from_torch
from .prepare import prepare

BACKENDS = ("native", "torch")


def check_backend(backend: Any) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f'backend must be "native" or "torch", got {backend!r}')
    return backend


def prepare_mask_inputs(log_probs, old_log_probs, advantages, response_mask, divergence, cu_seqlens,
                        per_row_advantages, backend: str = "native") -> Prepared:
    """Checked and converted inputs of a mask call (``divergence``: an array or None)."""
    return prepare(log_probs, old_log_probs, advantages, response_mask, divergence, cu_seqlens, per_row_advantages,
                   backend=check_backend(backend))


def fast_mask(log_probs, old_log_probs, advantages, response_mask, params: MaskParams, *,
              num_threads: Optional[int], backend: str) -> Any:
    """The mask of the commonest call (NumPy, C order, float32/float64, bool mask: see
    :func:`.cpu.fast_mask`) without :func:`prepare_mask_inputs`, or None for any other
    call (then prepare and :func:`run_mask`). For the mask alone, without info, a packed
    layout or a given divergence."""
    if backend != "native":
        return None
    return cpu.fast_mask(log_probs, old_log_probs, advantages, response_mask, params, num_threads or 0)


def run_mask(prep: Prepared, params: MaskParams, *, return_info: bool, validate: bool,
             num_threads: Optional[int], want_gate: bool = True, backend: str = "native") -> tuple:
    """``(mask, reason, threshold, gate, row_budget, counts)`` in the caller's framework,
    shaped like the caller's log-probs (info entries None unless ``return_info``).
    ``prep`` must come from :func:`prepare_mask_inputs` with the same ``backend``."""
    if check_backend(backend) == "torch":
        from . import torch_ops

        out = torch_ops.compute(prep, params, return_info, validate)
        wrap: Any = from_torch
    elif prep.source.device == "cpu":
        out = cpu.compute(prep, params, return_info, num_threads or 0, want_gate=want_gate)
        wrap = from_numpy
    else:
        from .cuda import arrays as cuda_arrays, mask as cuda_mask

        out = cuda_mask.compute(prep, params, return_info, validate)
        wrap = cuda_arrays.from_cupy
    mask, reason, threshold, gate, row_budget, counts = out
    src, shape = prep.source, prep.shape

    def token(x):
        return None if x is None else wrap(x.reshape(shape), src)

    return (
        token(mask),
        token(reason),
        token(threshold),
        token(gate),
        None if row_budget is None else wrap(row_budget, src),
        None if counts is None else wrap(counts, src),
    )


def run_mask_numpy(prep: Prepared, params: MaskParams, *, num_threads: Optional[int], want_gate: bool,
                   first_row: int = 0) -> tuple:
    """The CPU backend's NumPy outputs with info (for the Arrow layer, which writes only
    what it keeps); ``first_row``: the batch's first row in the input (seeds the
    shuffled ablation by the row's index in the input)."""
    if prep.source.device != "cpu":  # pragma: no cover - the Arrow layer hands NumPy arrays
        raise TypeError("expected CPU arrays")
    return cpu.compute(prep, params, True, num_threads or 0, want_gate=want_gate, first_row=first_row)
