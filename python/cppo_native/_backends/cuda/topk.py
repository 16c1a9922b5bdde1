"""CUDA launcher for the fused Top-K divergence from logits (``kernels/topk_logits.cu``).

UNVERIFIED ON HARDWARE: this launcher and its kernel were written without access to a
GPU. The kernel compiles with NVRTC under CuPy 14.2's options for sm_80/sm_90 (no
register spills); its GPU tests (``tests/test_topk_logits_gpu.py``) and benchmark
(``bench/gpu_topk.py``) have not run.

Needs CuPy (``pip install cupy-cuda12x``, or ``pip install '.[cuda12]'`` from a checkout; or ``[cuda13]``) and torch CUDA tensors.
Host path as the mask's: tensors by ``data_ptr()`` and ``stride()`` (no DLPack), the
compiled functions cached per device, launches on torch's current stream by its raw
handle, outputs and temporaries from torch's allocator. The kernel writes one 8-byte
error record (the first bad row and field); ``validate=True`` reads it back (one small
device-to-host copy), ``validate=False`` never synchronises the host. Rows are
processed in chunks so that the temporaries (float64/int64 copies of the small
per-position inputs, when the caller's dtypes differ) stay under ``CHUNK_BYTES``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..._core.errors import TOPK_FIELDS
from ..._core.errors import describe_position as _where
from .. import arrays as _dispatch
from .arrays import RawStream, torch_stream_ptr

# Field codes of the kernel's status words (1 + field * 65536 + slot): the Top-K fields
# of cppo_native.divergence, then the ones only logits can break (TK_* in the .cu).
FIELDS = TOPK_FIELDS + (
    ("logits", "finite or -inf with a finite log-sum-exp (no NaN or +inf, not all -inf)"),
    ("topk_ids", "< the vocabulary size V (negative = padding)"),
    ("sampled_ids", "< the vocabulary size V"),
)

BLOCK = 256  # threads per row
MAX_K = 2048  # shared memory holds 2 (K + 1) doubles and K ints
CHUNK_BYTES = 32 << 20  # temporaries per launch at most (plus one row)
KERNEL_PATH = Path(__file__).parent / "kernels" / "topk_logits.cu"
OPTIONS = ("--std=c++17",)
_DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_NAMES = [f"topk_divergence_from_logits<{dt}, {vec}>" for dt, vec in ((0, 4), (1, 8), (2, 8), (0, 1), (1, 1), (2, 1))]
_ROW_SHIFT = 20  # error key: (row << 20) | status (TK_ROW_SHIFT)
_NO_ERROR = (1 << 64) - 1
_FUNCTIONS: dict = {}  # device -> {name expression: cupy Function}


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            "topk_divergence_from_logits needs CuPy: pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x "
            "(CUDA 13); from a cppo-native checkout: pip install '.[cuda12]' or '.[cuda13]'"
        ) from exc
    return cupy


def _kernel(cp, device: int, dt: int, vec: int):
    fns = _FUNCTIONS.get(device)
    if fns is None:
        with cp.cuda.Device(device):
            module = cp.RawModule(code=KERNEL_PATH.read_text(), options=OPTIONS, name_expressions=_NAMES)
            fns = _FUNCTIONS[device] = {name: module.get_function(name).kernel for name in _NAMES}
    return fns[f"topk_divergence_from_logits<{dt}, {vec}>"]


def shared_bytes(k: int) -> int:
    """Dynamic shared memory of one block: pi and mu at K + 1 buckets, K ids."""
    return 16 * (k + 1) + 4 * k


def chunk_rows(n: int, k: int, converted_bytes_per_row: int) -> int:
    """Rows per launch: all of them when nothing is converted, else as many as keep the
    per-launch temporaries under CHUNK_BYTES."""
    if converted_bytes_per_row == 0:
        return max(n, 1)
    return max(1, min(n, CHUNK_BYTES // converted_bytes_per_row))


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
        validate: read the kernel's 8-byte error record once (one sync) and raise on bad
            values; ``False`` never synchronises the host.
        return_log_probs: also return pi's log-probs at the sampled token ``[...]`` and
            at the top-K ids ``[..., K]`` (float64; no gradient).

    Returns:
        float64 ``[...]`` on the logits' device (or the triple with
        ``return_log_probs``). Extra device memory: the outputs (16 bytes per position,
        plus ``8 K`` with ``return_log_probs``) and, where the small inputs are not
        already int64/float64 and contiguous, their converted copies, made per chunk of
        rows (at most ``CHUNK_BYTES`` = 32 MB at a time).

    Raises:
        ValueError naming the input, position, top-K slot and value (field order: a
        row's log-sum-exp, sampled id, log_probs, old_log_probs, then per slot: id
        range, duplicates, mu's log-prob); TypeError for non-CUDA or unsupported inputs.
    """
    torch = _dispatch._torch()
    if torch is None or not isinstance(logits, torch.Tensor) or logits.device.type != "cuda":
        raise TypeError(f"logits must be a CUDA torch tensor, got {type(logits).__name__}"
                        + (f" on {logits.device}" if torch is not None and isinstance(logits, torch.Tensor) else ""))
    return _compute(logits, topk_ids, topk_old_log_probs, sampled_ids, old_log_probs, response_mask, kind=kind,
                    temperature=temperature, validate=validate, return_log_probs=return_log_probs)


class _CupyLauncher:
    """The compiled functions of one device and torch's current stream on it (the tests
    substitute a launcher that runs the kernel source on the CPU emulator)."""

    def __init__(self, index: int):
        self.cp = _cupy()
        self.index = index
        self.stream = RawStream(torch_stream_ptr(index))

    def scope(self):
        if self.cp.cuda.runtime.getDevice() != self.index:
            return self.cp.cuda.Device(self.index)
        return contextlib.nullcontext()

    def kernel(self, dt: int, vec: int):
        return _kernel(self.cp, self.index, dt, vec)


def _compute(logits, topk_ids, topk_old_log_probs, sampled_ids, old_log_probs, response_mask, *, kind, temperature,
             validate, return_log_probs, launcher=None):
    torch = _dispatch._torch()
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

    if vocab >= 2**31:
        raise ValueError(f"the vocabulary size must be below 2**31, got {vocab}")
    dev = logits.device
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
    out = torch.empty(n, dtype=torch.float64, device=dev)
    out_lp = torch.empty(n, dtype=torch.float64, device=dev)  # also used by error messages
    out_topk = torch.empty((n, k), dtype=torch.float64, device=dev) if return_log_probs else None
    error = torch.full((1,), -1, dtype=torch.int64, device=dev)  # all ones: no error (u64 max)
    ids_all = topk_ids.detach().reshape(n, k)
    mu_all = topk_old_log_probs.detach().reshape(n, k)
    y_all = sampled_ids.detach().reshape(n)
    lq_all = old_log_probs.detach().reshape(n)
    valid_all = None if response_mask is None else response_mask.detach().reshape(n)

    def needs(t, dt):  # bytes per row that a conversion of t to dt (contiguous) takes
        return 0 if t.dtype == dt and t.is_contiguous() else (t.shape[1] if t.dim() > 1 else 1) * 8

    if n:
        elem = 4 if dtype == "float32" else 2
        aligned = flat.data_ptr() % 16 == 0 and (flat.stride(0) * elem) % 16 == 0
        vec = (16 // elem) if aligned else 1
        launcher = _CupyLauncher(index) if launcher is None else launcher
        stream = launcher.stream
        converted = (needs(ids_all, torch.int64) + needs(mu_all, torch.float64) + needs(y_all, torch.int64)
                     + needs(lq_all, torch.float64) + (0 if valid_all is None else 1))
        with launcher.scope():
            kernel = launcher.kernel(_DTYPE_CODES[dtype], vec)
            step = chunk_rows(n, k, converted)
            u64 = np.uint64
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                ids = ids_all[r0:r1].to(torch.int64).contiguous()
                mu = mu_all[r0:r1].to(torch.float64).contiguous()
                y = y_all[r0:r1].to(torch.int64).contiguous()
                lq = lq_all[r0:r1].to(torch.float64).contiguous()
                valid = None if valid_all is None else (valid_all[r0:r1] != 0).to(torch.uint8)
                out_ptr = out.data_ptr() + 8 * r0
                args = (
                    u64(flat.data_ptr() + elem * flat.stride(0) * r0), np.int64(r1 - r0), np.int64(vocab),
                    np.int64(flat.stride(0)), np.float64(temperature), np.float32(math.log2(math.e) / temperature),
                    np.int32(0 if kind == "tv" else 1), np.int32(k),
                    u64(ids.data_ptr() if k else out_ptr), u64(mu.data_ptr() if k else out_ptr),
                    u64(y.data_ptr()), u64(lq.data_ptr()),
                    u64(valid.data_ptr() if valid is not None else out_ptr), np.int32(valid is not None),
                    u64(out_ptr), u64(out_lp.data_ptr() + 8 * r0), np.int32(1),
                    u64(out_topk.data_ptr() + 8 * k * r0 if out_topk is not None and k else out_ptr),
                    np.int32(out_topk is not None and k > 0),
                    u64(error.data_ptr()), np.int64(r0),
                )
                kernel((r1 - r0,), (BLOCK,), args, shared_bytes(k), stream)
        if validate:
            key = int(error.cpu().numpy().view(np.uint64)[0])  # waits for the kernels (one sync)
            if key != _NO_ERROR:
                pos, code = key >> _ROW_SHIFT, (key & ((1 << _ROW_SHIFT) - 1)) - 1
                field, slot = divmod(code, 65536)
                raise _error(field, slot, lead, pos, flat, y_all, lq_all, ids_all, mu_all, out_lp)
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
