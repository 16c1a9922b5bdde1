"""Token divergences D_t between the rollout policy mu and the current policy pi.

Binary TV / Binary KL (spec, "Inputs for one response") from the sampled token's two
log-probs, and the Top-K reduced TV / KL (the paper's main setting) from mu's top-K
token ids and log-probs. Every function takes NumPy arrays or torch tensors and returns
a float64 array of the log-probs' shape in the same framework and on the same device.

Backends: CPU inputs (NumPy, CPU torch) run in the Rust extension (rayon, GIL
released), bit-identical to the plain-Python references here and in
:mod:`cppo_native.reference`; CUDA torch tensors run as float64 torch operations
(equal to the references up to summation order and the device's exp/log rounding).
From raw logits on the GPU see :func:`topk_divergence_from_logits`.

Top-K decisions (written down in ``docs/divergences.md``):

- Buckets at a position: each top-K id, the sampled token when its id is not among
  them, and "other" (the rest of the vocabulary).
- A top-K entry with a negative id is padding (for engines that return fewer than K
  entries): it is skipped, its log-probs are not read.
- The sampled token counts as listed when its id equals a non-padding top-K id; its
  bucket then uses that top-K entry's log-probs (mu and pi), and the sampled-token
  log-probs are only validated.
- Log-probs are clamped to <= 0 (validation tolerates +1e-6); top-K log-probs may be
  ``-inf`` (zero mass), the sampled token's must be finite.
- Other mass: ``max(0, 1 - sum of listed masses)``, separately for mu and pi, evaluated
  as ``-expm1(l_max) - sum of the other listed masses`` (l_max the largest listed
  log-prob, first on ties; buckets in top-K order, then the sampled one) so that a
  near-certain token does not lose its small rest mass to cancellation.
- TV = 1/2 * sum over buckets |mu_b - pi_b|.
- KL = sum over buckets with mu_b > 0 of ``mu_b * (max(log mu_b, log eps) -
  max(log pi_b, log eps))`` with eps = ``TOPK_EPS`` = 1e-12 (so pi_b = 0 stays finite),
  clamped at >= 0 (the clamps of the other bucket can make it a hair negative).
- Invalid positions (``response_mask`` 0) give D = 0 and are not read or validated.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ._backends import arrays as _dispatch
from ._core.errors import LOG_PROB_TOLERANCE, TOPK_EPS, TOPK_FIELDS  # noqa: F401 (TOPK_FIELDS: public name)
from ._core.errors import binary_error as _binary_error
from ._core.errors import topk_error as _topk_error
from ._core.native import native_module
from ._core.params import BINARY_KL_EPS, check_num_threads
from .reference import check_position_reference as _check_position_reference
from .reference import rest_mass_reference, topk_divergence_reference, topk_position_reference  # noqa: F401 (public)

_KINDS = ("tv", "kl")


# ---------------------------------------------------------------------------------------
# Input handling.


def _shape(x: Any) -> tuple:
    return tuple(x.shape)


def _num_threads(num_threads: Optional[int]) -> int:
    """0 (all cores) for None; else checked like the mask's (at most max(64, 4 x cores))."""
    return check_num_threads(num_threads) or 0


def _np_floats(x: Any, name: str, n: int, k: Optional[int] = None) -> np.ndarray:
    arr = _dispatch.to_numpy(x, name)  # bfloat16 arrives as int16 bits
    return arr.reshape(n) if k is None else arr.reshape(n, k)


def _np_ints(x: Any, name: str, n: int, k: Optional[int] = None) -> np.ndarray:
    arr = _dispatch.to_numpy(x, name)
    if arr.dtype not in (np.int64, np.int32):
        arr = arr.astype(np.int64)
    return arr.reshape(n) if k is None else arr.reshape(n, k)


def _np_mask(x: Any, n: int) -> np.ndarray:
    arr = _dispatch.to_numpy(x, "response_mask")
    if str(arr.dtype) not in _dispatch.MASK_DTYPES:
        arr = arr != 0
    return arr.reshape(n)


# ---------------------------------------------------------------------------------------
# Binary TV / KL.


def _binary(kind: str, log_probs: Any, old_log_probs: Any, response_mask: Any, num_threads, validate: bool):
    named = [("log_probs", log_probs), ("old_log_probs", old_log_probs)]
    if response_mask is not None:
        named.append(("response_mask", response_mask))
    src = _dispatch.common_source(named)
    _dispatch.check_float(log_probs, "log_probs")
    _dispatch.check_float(old_log_probs, "old_log_probs")
    shape = _shape(log_probs)
    for name, x in named[1:]:
        if _shape(x) != shape:
            raise ValueError(f"{name} must have the shape of log_probs {shape}, got {_shape(x)}")
    if response_mask is not None:
        _dispatch.check_mask(response_mask)
    threads = _num_threads(num_threads)
    if src.device == "cuda":
        return _binary_torch(kind, log_probs, old_log_probs, response_mask, validate)
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float64)
    bad = native_module().binary_divergence_into(
        kind,
        _np_floats(log_probs, "log_probs", n),
        _np_floats(old_log_probs, "old_log_probs", n),
        None if response_mask is None else _np_mask(response_mask, n),
        out,
        num_threads=threads,
    )
    if bad is not None:
        field, position, _, value = bad
        raise _binary_error(field, shape, position, value)
    return _dispatch.from_numpy(out.reshape(shape), src)


def _first_bad(flags) -> Optional[int]:
    """Flat index of the first True in a torch bool tensor (one host read), or None."""
    t = _dispatch._torch()
    flat = flags.reshape(-1)
    if not bool(flat.any()):
        return None
    return int(t.argmax(flat.to(t.uint8)))


def _binary_torch(kind: str, log_probs, old_log_probs, response_mask, validate: bool):
    t = _dispatch._torch()
    shape = _shape(log_probs)
    lp = log_probs.detach().to(t.float64)
    lq = old_log_probs.detach().to(t.float64)
    valid = None if response_mask is None else response_mask.detach() != 0
    if validate:
        bad_lp = ~(t.isfinite(lp) & (lp <= LOG_PROB_TOLERANCE))
        bad = bad_lp | ~(t.isfinite(lq) & (lq <= LOG_PROB_TOLERANCE))
        if valid is not None:
            bad &= valid
        pos = _first_bad(bad)
        if pos is not None:
            field = 0 if bool(bad_lp.reshape(-1)[pos]) else 1
            raise _binary_error(field, shape, pos, float((lp if field == 0 else lq).reshape(-1)[pos]))
    if kind == "tv":
        d = (lp.exp() - lq.exp()).abs()
    else:
        a = lq.clamp(max=0.0)
        b = lp.clamp(max=0.0)
        p = a.exp()
        p_rest = (-t.expm1(a)).clamp(min=BINARY_KL_EPS)
        r_rest = (-t.expm1(b)).clamp(min=BINARY_KL_EPS)
        d = (p * (a - b) + p_rest * t.log(p_rest / r_rest)).clamp(min=0.0)
    if valid is not None:
        d = t.where(valid, d, t.zeros((), dtype=d.dtype, device=d.device))
    return d


def binary_tv(log_probs: Any, old_log_probs: Any, response_mask: Any = None, *,
              num_threads: Optional[int] = None, validate: bool = True):
    """Binary TV ``|exp(log_probs) - exp(old_log_probs)|`` per position (spec default D_t).

    Args:
        log_probs: log pi(y_t|s_t), any shape, float16/bfloat16/float32/float64.
        old_log_probs: log mu(y_t|s_t), same shape.
        response_mask: optional valid flags; invalid positions give 0 and are not read.
        num_threads: CPU threads (default: all cores).
        validate: on CUDA, check values (one host read); the CPU backend always checks.

    Returns:
        float64, the log-probs' shape, same framework and device.

    Raises:
        ValueError naming the first valid position whose log-prob is not finite and <= 0.
    """
    return _binary("tv", log_probs, old_log_probs, response_mask, num_threads, validate)


def binary_kl(log_probs: Any, old_log_probs: Any, response_mask: Any = None, *,
              num_threads: Optional[int] = None, validate: bool = True):
    """Binary KL(mu || pi) over {sampled token, rest} per position, exactly
    :func:`cppo_native.reference.binary_kl` (log-probs clamped to <= 0, rest masses
    floored at ``BINARY_KL_EPS`` = 1e-12, result clamped at >= 0). Same arguments,
    returns and errors as :func:`binary_tv`."""
    return _binary("kl", log_probs, old_log_probs, response_mask, num_threads, validate)


# ---------------------------------------------------------------------------------------
# Top-K reduced TV / KL.


def topk_divergence(
    log_probs: Any,
    old_log_probs: Any,
    topk_log_probs: Any,
    topk_old_log_probs: Any,
    topk_ids: Any,
    sampled_ids: Any,
    response_mask: Any = None,
    *,
    kind: str = "tv",
    num_threads: Optional[int] = None,
    validate: bool = True,
):
    """Top-K reduced TV or KL between mu and pi at every position (module docstring).

    Args:
        log_probs: log pi(y_t|s_t) of the sampled token, shape ``S`` (e.g. ``[B, L]``).
        old_log_probs: log mu(y_t|s_t) (rollout engine), shape ``S``.
        topk_log_probs: log pi at mu's top-K ids, shape ``S + (K,)``.
        topk_old_log_probs: mu's top-K log-probs (rollout engine), shape ``S + (K,)``.
        topk_ids: mu's top-K token ids, shape ``S + (K,)``, int; negative = padding.
        sampled_ids: the sampled token ids y_t, shape ``S``, int.
        response_mask: optional valid flags, shape ``S``; invalid positions give 0.
        kind: ``"tv"`` or ``"kl"`` (KL(mu || pi)).
        num_threads: CPU threads (default: all cores).
        validate: on CUDA, check values (one host read); the CPU backend always checks.

    Returns:
        float64 of shape ``S`` in the inputs' framework and device; pass it to
        :func:`cppo_native.cppo_mask` as ``divergence=``.

    Raises:
        ValueError/TypeError naming the offending input, position, top-K slot and value,
        or the shapes/dtypes/devices received.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'tv' or 'kl', got {kind!r}")
    named = [
        ("log_probs", log_probs),
        ("old_log_probs", old_log_probs),
        ("topk_log_probs", topk_log_probs),
        ("topk_old_log_probs", topk_old_log_probs),
        ("topk_ids", topk_ids),
        ("sampled_ids", sampled_ids),
    ]
    if response_mask is not None:
        named.append(("response_mask", response_mask))
    src = _dispatch.common_source(named)
    for name in ("log_probs", "old_log_probs", "topk_log_probs", "topk_old_log_probs"):
        _dispatch.check_float(dict(named)[name], name)
    _dispatch.check_int(topk_ids, "topk_ids")
    _dispatch.check_int(sampled_ids, "sampled_ids")
    if response_mask is not None:
        _dispatch.check_mask(response_mask)
    shape = _shape(log_probs)
    if len(shape) < 1:
        raise ValueError("log_probs must have at least one dimension")
    ids_shape = _shape(topk_ids)
    if len(ids_shape) != len(shape) + 1 or ids_shape[:-1] != shape:
        raise ValueError(f"topk_ids must have shape {shape} + (K,), got {ids_shape}")
    k = ids_shape[-1]
    for name, x in named[1:]:
        want = shape + (k,) if name.startswith("topk_") else shape
        if _shape(x) != want:
            raise ValueError(f"{name} must have shape {want}, got {_shape(x)}")
    threads = _num_threads(num_threads)
    if src.device == "cuda":
        return _topk_torch(kind, log_probs, old_log_probs, topk_log_probs, topk_old_log_probs, topk_ids,
                           sampled_ids, response_mask, validate)
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float64)
    bad = native_module().topk_divergence_into(
        kind,
        _np_ints(topk_ids, "topk_ids", n, k),
        _np_floats(topk_old_log_probs, "topk_old_log_probs", n, k),
        _np_floats(topk_log_probs, "topk_log_probs", n, k),
        _np_ints(sampled_ids, "sampled_ids", n),
        _np_floats(old_log_probs, "old_log_probs", n),
        _np_floats(log_probs, "log_probs", n),
        None if response_mask is None else _np_mask(response_mask, n),
        out,
        num_threads=threads,
    )
    if bad is not None:
        field, position, slot, value = bad
        raise _topk_error(field, shape, position, slot, value)
    return _dispatch.from_numpy(out.reshape(shape), src)


def topk_tv(*args, **kwargs):
    """:func:`topk_divergence` with ``kind="tv"``."""
    return topk_divergence(*args, kind="tv", **kwargs)


def topk_kl(*args, **kwargs):
    """:func:`topk_divergence` with ``kind="kl"``: KL(mu || pi) over the buckets."""
    return topk_divergence(*args, kind="kl", **kwargs)


def _topk_torch(kind, log_probs, old_log_probs, topk_log_probs, topk_old_log_probs, topk_ids, sampled_ids,
                response_mask, validate: bool = True):
    """Vectorised float64 torch version (any device); used for CUDA tensors."""
    t = _dispatch._torch()
    shape = _shape(log_probs)
    k = _shape(topk_ids)[-1]
    f64 = t.float64
    n = int(np.prod(shape, dtype=np.int64))
    lp = log_probs.detach().to(f64).reshape(n)
    lq = old_log_probs.detach().to(f64).reshape(n)
    pi_raw = topk_log_probs.detach().to(f64).reshape(n, k)
    mu_raw = topk_old_log_probs.detach().to(f64).reshape(n, k)
    ids = topk_ids.detach().to(t.int64).reshape(n, k)
    y = sampled_ids.detach().to(t.int64).reshape(n)
    valid = None if response_mask is None else (response_mask.detach() != 0).reshape(n)
    listed = ids >= 0

    if validate:
        tol = LOG_PROB_TOLERANCE
        bad = ~(t.isfinite(lp) & (lp <= tol)) | ~(t.isfinite(lq) & (lq <= tol)) | (y < 0)
        slot_bad = listed & (t.isnan(mu_raw) | (mu_raw > tol) | t.isnan(pi_raw) | (pi_raw > tol))
        bad |= slot_bad.any(-1)
        if k > 1:
            srt = t.sort(t.where(listed, ids, t.full_like(ids, -1)), dim=-1).values
            bad |= ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1)
        if valid is not None:
            bad &= valid
        pos = _first_bad(bad)
        if pos is not None:
            # Re-check that one position on the host for the field/slot, in reference order.
            found = _check_position_reference(
                float(lp[pos]), float(lq[pos]), int(y[pos]), ids[pos].tolist(), mu_raw[pos].tolist(),
                pi_raw[pos].tolist(),
            )
            raise _topk_error(found[0], shape, pos, found[1], found[2])

    zero = t.zeros((), dtype=f64, device=lp.device)
    neg_inf = t.full((), -math.inf, dtype=f64, device=lp.device)
    in_topk = ((ids == y[:, None]) & listed).any(-1)
    # Buckets [n, K + 1]: the top-K slots, then the sampled token (absent when listed).
    present = t.cat([listed, ~in_topk[:, None]], dim=-1)
    a = t.where(present, t.cat([mu_raw, lq[:, None]], dim=-1).clamp(max=0.0), neg_inf)
    b = t.where(present, t.cat([pi_raw, lp[:, None]], dim=-1).clamp(max=0.0), neg_inf)
    other_mu = _rest_mass_torch(a)
    other_pi = _rest_mass_torch(b)
    m = a.exp()
    p = b.exp()
    if kind == "tv":
        d = 0.5 * ((m - p).abs().sum(-1) + (other_mu - other_pi).abs())
    else:
        log_eps = math.log(TOPK_EPS)
        listed_terms = t.where(m > 0, m * (a.clamp(min=log_eps) - b.clamp(min=log_eps)), zero).sum(-1)
        other_term = t.where(
            other_mu > 0,
            other_mu * (other_mu.clamp(min=TOPK_EPS).log() - other_pi.clamp(min=TOPK_EPS).log()),
            zero,
        )
        d = (listed_terms + other_term).clamp(min=0.0)
    if valid is not None:
        d = t.where(valid, d, zero)
    return d.reshape(shape)


def _rest_mass_torch(logs):
    """Row-wise :func:`rest_mass_reference` over ``[n, B]`` (absent buckets = -inf)."""
    t = _dispatch._torch()
    top = logs.max(dim=-1)
    others = t.ones_like(logs, dtype=t.bool).scatter_(-1, top.indices[:, None], False)
    rest = -t.expm1(top.values) - t.where(others, logs.exp(), t.zeros((), dtype=logs.dtype, device=logs.device)).sum(-1)
    return rest.clamp(min=0.0)


def topk_divergence_from_logits(logits: Any, topk_ids: Any, topk_old_log_probs: Any, sampled_ids: Any,
                                old_log_probs: Any, response_mask: Any = None, **kwargs):
    """Top-K divergence straight from the policy's logits ``[N, V]`` on a CUDA device, in
    one fused pass (online log-sum-exp + gather), never materialising ``[N, V]`` float32.
    See :func:`cppo_native._backends.cuda.topk.topk_divergence_from_logits` (needs CuPy).

    UNVERIFIED ON HARDWARE: written and compile-checked without a GPU.
    """
    from ._backends.cuda import topk as _topk_cuda

    return _topk_cuda.topk_divergence_from_logits(
        logits, topk_ids, topk_old_log_probs, sampled_ids, old_log_probs, response_mask, **kwargs
    )
