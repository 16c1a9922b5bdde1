"""CUDA launcher for the fused Top-K divergence from logits (``kernels/topk_logits.cu``).

UNVERIFIED ON HARDWARE: this launcher and its kernel were written without access to a
GPU. The kernel compiles with NVRTC for sm_90 (no register spills); its tests
(``tests/test_topk_logits_gpu.py``) and benchmark (``bench/gpu_topk.py``) have not run.

Needs CuPy (``pip install cupy-cuda12x``, or ``pip install '.[cuda12]'`` from a checkout; or ``[cuda13]``) and torch CUDA tensors.
The kernel is compiled once per process (NVRTC, cached by CuPy) and launched on torch's
current stream; the host is synchronised only to check for bad values
(``validate=True``, one small read).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..._core.errors import TOPK_FIELDS
from ..._core.errors import describe_position as _where
from .. import arrays as _dispatch

# Field codes of the kernel's status words (1 + field * 65536 + slot): the Top-K fields
# of cppo_native.divergence, then the ones only logits can break.
FIELDS = TOPK_FIELDS + (
    ("logits", "finite or -inf with a finite log-sum-exp (no NaN or +inf, not all -inf)"),
    ("topk_ids", "< the vocabulary size V (negative = padding)"),
    ("sampled_ids", "< the vocabulary size V"),
)

BLOCK = 256  # threads per row
MAX_K = 2048  # shared memory holds 2 (K + 1) doubles
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_NAMES = [f"topk_divergence_from_logits<{dt}, {vec}>" for dt, vec in ((0, 4), (1, 8), (2, 8), (0, 1), (1, 1), (2, 1))]
_module = None


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            "topk_divergence_from_logits needs CuPy: pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x "
            "(CUDA 13); from a cppo-native checkout: pip install '.[cuda12]' or '.[cuda13]'"
        ) from exc
    return cupy


def _kernel(cp, dt: int, vec: int):
    global _module
    if _module is None:
        src = (Path(__file__).parent / "kernels" / "topk_logits.cu").read_text()
        _module = cp.RawModule(code=src, options=("--std=c++17",), name_expressions=_NAMES)
    return _module.get_function(f"topk_divergence_from_logits<{dt}, {vec}>")


def _to_cupy(cp, t):
    """A CuPy view of a CUDA tensor (bfloat16 as its int16 bits)."""
    torch = _dispatch._torch()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cp.from_dlpack(t.detach())


def topk_divergence_from_logits(
    logits: Any,
    topk_ids: Any,
    topk_old_log_probs: Any,
    sampled_ids: Any,
    old_log_probs: Any,
    response_mask: Any = None,
    *,
    kind: str = "tv",
    temperature: float = 1.0,
    validate: bool = True,
    return_log_probs: bool = False,
):
    """Top-K reduced TV or KL(mu || pi) with pi = softmax(logits / temperature), in one
    fused pass over the logits (semantics: :mod:`cppo_native.divergence`).

    Args:
        logits: the policy's logits ``[..., V]`` (float32/float16/bfloat16, CUDA torch
            tensor, last dimension contiguous; leading dims must flatten without a copy).
        topk_ids: mu's top-K ids ``[..., K]`` (negative = padding slot).
        topk_old_log_probs: mu's log-probs at those ids ``[..., K]``.
        sampled_ids: sampled tokens ``[...]``; old_log_probs: log mu(y) ``[...]``.
        response_mask: optional ``[...]``; invalid positions give 0 and skip the row read.
        kind: ``"tv"`` or ``"kl"``. temperature: T > 0.
        validate: read the per-row status once and raise on bad values.
        return_log_probs: also return pi's log-probs at the sampled token ``[...]`` and
            at the top-K ids ``[..., K]`` (float64; no gradient).

    Returns:
        float64 ``[...]`` on the logits' device (or the triple with
        ``return_log_probs``). Extra device memory: the float64 copies of the small
        per-position inputs and the outputs (about ``N * (16 K + 40)`` bytes).

    Raises:
        ValueError naming the input, position, top-K slot and value (field order: a
        row's log-sum-exp, sampled id, log_probs, old_log_probs, then per slot: id
        range, duplicates, mu's log-prob); TypeError for non-CUDA or unsupported inputs.
    """
    torch = _dispatch._torch()
    if torch is None or not isinstance(logits, torch.Tensor) or logits.device.type != "cuda":
        raise TypeError(f"logits must be a CUDA torch tensor, got {type(logits).__name__}"
                        + (f" on {logits.device}" if torch is not None and isinstance(logits, torch.Tensor) else ""))
    if kind not in ("tv", "kl"):
        raise ValueError(f"kind must be 'tv' or 'kl', got {kind!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    dtype = str(logits.dtype).replace("torch.", "")
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"logits: dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [..., V] with at least 2 dimensions, got shape {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    vocab = int(logits.shape[-1])
    if logits.stride(-1) != 1 and vocab > 1:
        raise ValueError(f"logits must have a contiguous last dimension (stride 1), got strides {logits.stride()}")
    try:
        flat = logits.view(-1, vocab)
    except RuntimeError as exc:
        raise ValueError(f"logits' leading dimensions must flatten without a copy; strides {logits.stride()}") from exc
    n = flat.shape[0]

    named = [("topk_ids", topk_ids), ("topk_old_log_probs", topk_old_log_probs), ("sampled_ids", sampled_ids),
             ("old_log_probs", old_log_probs)]
    if response_mask is not None:
        named.append(("response_mask", response_mask))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor, got {type(x).__name__}")
        if x.device != logits.device:
            raise ValueError(f"all tensors must be on one device: logits is on {logits.device}, {name} is on {x.device}")
    k = int(topk_ids.shape[-1]) if topk_ids.dim() == len(lead) + 1 else -1
    for name, x in named:
        want = lead + (k,) if name.startswith("topk_") else lead
        if tuple(x.shape) != want or k < 0:
            raise ValueError(f"{name} must have shape {want if k >= 0 else lead + ('K',)}, got {tuple(x.shape)}")
    if k > MAX_K:
        raise ValueError(f"K must be <= {MAX_K}, got {k}")
    if topk_ids.is_floating_point() or sampled_ids.is_floating_point():
        raise TypeError("topk_ids and sampled_ids must be integer tensors")
    if not topk_old_log_probs.is_floating_point() or not old_log_probs.is_floating_point():
        raise TypeError("topk_old_log_probs and old_log_probs must be float tensors")

    dev = logits.device
    ids = topk_ids.detach().reshape(n, k).to(torch.int64).contiguous()
    mu = topk_old_log_probs.detach().reshape(n, k).to(torch.float64).contiguous()
    y = sampled_ids.detach().reshape(n).to(torch.int64).contiguous()
    lq = old_log_probs.detach().reshape(n).to(torch.float64).contiguous()
    valid = None if response_mask is None else (response_mask.detach().reshape(n) != 0).to(torch.uint8).contiguous()
    out = torch.empty(n, dtype=torch.float64, device=dev)
    out_lp = torch.empty(n, dtype=torch.float64, device=dev)  # also used by error messages
    out_topk = torch.empty((n, k), dtype=torch.float64, device=dev) if return_log_probs else None
    status = torch.empty(n, dtype=torch.int32, device=dev)

    if n:
        cp = _cupy()
        elem = 4 if dtype == "float32" else 2
        aligned = flat.data_ptr() % 16 == 0 and (flat.stride(0) * elem) % 16 == 0
        vec = (16 // elem) if aligned else 1
        with cp.cuda.Device(dev.index or 0):
            kernel = _kernel(cp, _DTYPE_CODES[dtype], vec)
            c = lambda t: _to_cupy(cp, t)  # noqa: E731
            out_cp = c(out)
            dummy = out_cp  # stands in for absent optional arrays (never read: flag 0 / K == 0)
            args = (
                c(flat), np.int64(n), np.int64(vocab), np.int64(flat.stride(0)),
                np.float64(temperature), np.float32(math.log2(math.e) / temperature),
                np.int32(0 if kind == "tv" else 1), np.int32(k),
                c(ids) if k else dummy, c(mu) if k else dummy, c(y), c(lq),
                c(valid) if valid is not None else dummy, np.int32(valid is not None),
                out_cp, c(out_lp), np.int32(1),
                c(out_topk) if out_topk is not None and k else dummy, np.int32(out_topk is not None and k > 0),
                c(status),
            )
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(dev).cuda_stream)
            with stream:
                kernel((n,), (BLOCK,), args, shared_mem=16 * (k + 1))
        if validate:
            bad = status != 0
            if bool(bad.any()):
                pos = int(torch.argmax(bad.to(torch.uint8)))
                code = int(status[pos]) - 1
                field, slot = divmod(code, 65536)
                raise _error(field, slot, lead, pos, flat, y, lq, ids, mu, out_lp)
    shape = lead
    d = out.reshape(shape)
    if return_log_probs:
        return d, out_lp.reshape(shape), out_topk.reshape(shape + (k,))
    return d


def _error(field, slot, shape, pos, flat, y, lq, ids, mu, out_lp) -> ValueError:
    name, rule = FIELDS[field]
    where = _where(shape, pos)
    if field in (3, 4, 7):
        where += f", top-K slot {slot}"
    if field == 6:
        row = flat[pos].float()
        what = f"a row with {int(row.isnan().sum())} NaN, {int((row == float('inf')).sum())} +inf"
        return ValueError(f"{name} must be {rule} at valid positions; got {what} at {where}")
    value = {0: lambda: float(out_lp[pos]), 1: lambda: float(lq[pos]), 2: lambda: int(y[pos]),
             3: lambda: int(ids[pos, slot]), 4: lambda: float(mu[pos, slot]), 7: lambda: int(ids[pos, slot]),
             8: lambda: int(y[pos])}[field]()
    what = "duplicate id" if field == 3 else "value"
    return ValueError(f"{name} must be {rule} at valid positions; got {what} {value!r} at {where}")
