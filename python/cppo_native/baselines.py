"""Baseline trust-region masks under the CPPO mask's API (spec, "Baselines").

For matched comparisons every function takes the mask's inputs ``(log_probs,
old_log_probs, advantages, response_mask)`` and returns a bool keep-mask of the
log-probs' shape in the caller's framework and device (NumPy or torch); plug it into
:func:`cppo_native.torch.masked_policy_loss` to get the same truncated-IS loss as CPPO
with only the mask changed.

- :func:`ppo_clip_mask`: PPO/GRPO ratio clipping as a mask (clip-higher: separate
  ``eps_low``/``eps_high``): masked when A > 0 and rho > 1 + eps_high, or A < 0 and
  rho < 1 - eps_low, with rho = exp(log_probs - old_log_probs).
- :func:`dppo_mask`: DPPO (Qi et al. 2026): masked when moving away from mu and
  D_t > delta; the CPPO mask with ``position_weight=False, prefix_budget=False``.
  Options: asymmetric ``delta_low``/``delta_high`` and verl's A = 0 convention
  (``zero_advantage="negative"``).
- :func:`trm_mask` (:func:`trm_max_mask`, :func:`trm_avg_mask`): TRM (Li et al. 2025):
  a row is dropped entirely when max_t D_t > delta_max or mean_t D_t > delta_avg over
  its valid tokens. The original uses a KL estimator, so D defaults to Binary KL here.

Everything is float64; invalid positions are never kept and never read; values at valid
positions are validated like the mask's (ValueError naming the first (row, column)).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ._backends import arrays as _dispatch
from ._core.errors import LOG_PROB_TOLERANCE, bad_value_error


class _Arrays:
    """The caller's arrays as float64 NumPy arrays (NumPy callers) or torch tensors
    (torch callers, any device), plus the few operations that differ between the two."""

    def __init__(self, named: list):
        first = named[0][1]
        self.src = _dispatch.common_source(named, same_framework_on_cuda=False)
        self.torch = _dispatch._torch() if _dispatch._is_torch(first) else None
        self.device = first.device if self.torch is not None else None

    def float64(self, x: Any, name: str):
        if not (name == "advantages" and _dispatch.dtype_name(x).startswith(("int", "uint"))):
            _dispatch.check_float(x, name)
        if self.torch is not None:
            t = x.detach() if _dispatch._is_torch(x) else self.torch.from_numpy(np.asarray(x))
            return t.to(device=self.device, dtype=self.torch.float64)
        if _dispatch._is_torch(x):
            return x.detach().to(_dispatch._torch().float64).numpy()
        return np.asarray(x, dtype=np.float64)

    def flags(self, x: Any, shape: tuple):
        if x is None:
            if self.torch is not None:
                return self.torch.ones(shape, dtype=self.torch.bool, device=self.device)
            return np.ones(shape, dtype=bool)
        if tuple(x.shape) != shape:
            raise ValueError(f"response_mask must have the shape of log_probs {shape}, got {tuple(x.shape)}")
        if self.torch is not None:
            t = x.detach() if _dispatch._is_torch(x) else self.torch.from_numpy(np.asarray(x))
            return t.to(self.device) != 0
        if _dispatch._is_torch(x):
            return x.detach().numpy() != 0
        return np.asarray(x) != 0

    def exp(self, x):
        return x.exp() if self.torch is not None else np.exp(x)

    def isfinite(self, x):
        return self.torch.isfinite(x) if self.torch is not None else np.isfinite(x)

    def where(self, c, a, b):
        if self.torch is not None:
            return self.torch.where(c, a, self.torch.as_tensor(b, dtype=a.dtype, device=a.device))
        return np.where(c, a, b)

    def wrap(self, mask):
        if self.torch is not None:
            return mask
        return _dispatch.from_numpy(np.ascontiguousarray(mask), self.src)

    def first_bad_position(self, bad) -> Optional[int]:
        if self.torch is not None:
            flat = bad.reshape(-1)
            if not bool(flat.any()):
                return None
            return int(self.torch.argmax(flat.to(self.torch.uint8)))
        flat = bad.reshape(-1)
        return int(np.argmax(flat)) if flat.any() else None


def _advantages(ops: _Arrays, advantages: Any, shape: tuple):
    adv = ops.float64(advantages, "advantages")
    a_shape = tuple(adv.shape)
    if a_shape == shape:
        return adv
    if len(shape) == 2 and a_shape in ((shape[0],), (shape[0], 1)):
        return adv.reshape(shape[0], 1) + (adv.new_zeros(shape) if ops.torch is not None else np.zeros(shape))
    want = f"{shape} (per token)" + (f" or ({shape[0]},) (per row)" if len(shape) == 2 else "")
    raise ValueError(f"advantages must have shape {want}, got {a_shape}")


def _check(ops: _Arrays, valid, shape: tuple, fields: list) -> None:
    """ValueError for the first valid position (row-major) breaking a rule; within a
    position, fields in the mask's order (log_probs, old_log_probs, advantages, D)."""
    bads = []
    for code, values in fields:
        if code in (0, 1):
            ok = ops.isfinite(values) & (values <= LOG_PROB_TOLERANCE)
        elif code == 2:
            ok = ops.isfinite(values)
        else:
            ok = ops.isfinite(values) & (values >= 0)
        bads.append((code, values, valid & ~ok))
    any_bad = bads[0][2]
    for _, _, b in bads[1:]:
        any_bad = any_bad | b
    pos = ops.first_bad_position(any_bad)
    if pos is None:
        return
    idx = np.unravel_index(pos, shape)
    row, column = (int(idx[0]), int(idx[1])) if len(shape) == 2 else (0, int(idx[0]))
    for code, values, b in bads:
        if bool(b.reshape(-1)[pos]):
            raise bad_value_error(code, row, column, float(values.reshape(-1)[pos]))


def ppo_clip_mask(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any,
    response_mask: Any = None,
    *,
    eps_low: float = 0.2,
    eps_high: Optional[float] = None,
):
    """PPO/GRPO ratio clipping as a keep-mask; ``eps_high`` defaults to ``eps_low``
    (clip-higher, e.g. DAPO's 0.2/0.28, sets it larger). Shapes: log-probs any shape;
    advantages per token, or per row ``[B]``/``[B, 1]`` for 2-D log-probs."""
    eps_high = eps_low if eps_high is None else eps_high
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    ops = _Arrays([("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages),
                   ("response_mask", response_mask)])
    shape = tuple(log_probs.shape)
    lp = ops.float64(log_probs, "log_probs")
    lq = ops.float64(old_log_probs, "old_log_probs")
    if tuple(lq.shape) != shape:
        raise ValueError(f"old_log_probs must have the shape of log_probs {shape}, got {tuple(lq.shape)}")
    adv = _advantages(ops, advantages, shape)
    valid = ops.flags(response_mask, shape)
    _check(ops, valid, shape, [(0, lp), (1, lq), (2, adv)])
    with np.errstate(over="ignore", invalid="ignore"):  # garbage at invalid positions
        rho = ops.exp(ops.where(valid, lp - lq, 0.0))
    clipped = ((adv > 0) & (rho > 1.0 + eps_high)) | ((adv < 0) & (rho < 1.0 - eps_low))
    return ops.wrap(valid & ~clipped)


ZERO_ADVANTAGE_CONVENTIONS = ("toward_mu", "negative")


def dppo_mask(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any,
    response_mask: Any = None,
    *,
    delta: Optional[float] = None,
    delta_low: Optional[float] = None,
    delta_high: Optional[float] = None,
    zero_advantage: str = "toward_mu",
    divergence: Any = None,
    cu_seqlens: Any = None,
    return_info: bool = False,
):
    """DPPO's uniform divergence mask: kept when moving toward mu or D_t <= the threshold.

    With one ``delta`` this is exactly :func:`cppo_native.cppo_mask` with
    ``position_weight=False`` and ``prefix_budget=False`` (same inputs, layouts, devices
    and errors). Options for reproducing verl's DPPO losses (``docs/conventions.md``):

    - ``delta_high`` / ``delta_low``: separate thresholds for tokens moving away from mu
      with A > 0 (pi(y_t) pushed up: verl's ``clip_ratio_high``) and with A < 0 (pushed
      down: ``clip_ratio_low``); each defaults to ``delta``.
    - ``zero_advantage``: ``"toward_mu"`` (default, the spec: A = 0 is kept) or
      ``"negative"`` (verl: A = 0 takes the A < 0 branch, so a token with A = 0 and
      lp < lq is tested against ``delta_low``). A = 0 contributes nothing to the loss;
      the convention changes the mask and its masked fraction only.

    The options need NumPy or torch advantages. Asymmetric thresholds are computed as
    two mask passes, one per advantage sign (each token is tested in exactly one); with
    them ``return_info`` is refused, since the pass's ``threshold`` would name one delta.
    """
    from .mask import cppo_mask

    if zero_advantage not in ZERO_ADVANTAGE_CONVENTIONS:
        raise ValueError(f'zero_advantage must be "toward_mu" or "negative", got {zero_advantage!r}')
    if delta is None and (delta_low is None or delta_high is None):
        raise ValueError("dppo_mask needs delta, or both delta_low and delta_high")
    low = delta if delta_low is None else delta_low
    high = delta if delta_high is None else delta_high
    common = dict(delta_b=0.0, position_weight=False, prefix_budget=False, divergence=divergence,
                  cu_seqlens=cu_seqlens)
    if low == high and zero_advantage == "toward_mu":
        return cppo_mask(log_probs, old_log_probs, advantages, response_mask, delta=low, return_info=return_info,
                         **common)
    if np.isscalar(advantages) or not (isinstance(advantages, np.ndarray) or _dispatch._is_torch(advantages)):
        raise TypeError("dppo_mask with delta_low/delta_high or zero_advantage='negative' needs NumPy or torch "
                        f"advantages, got {type(advantages).__name__}")
    where = _dispatch._torch().where if _dispatch._is_torch(advantages) else np.where
    adv = advantages.detach() if _dispatch._is_torch(advantages) else advantages
    if zero_advantage == "negative":
        adv = where(adv == 0, -1, adv)  # only the sign of A enters the mask
    if low == high:
        return cppo_mask(log_probs, old_log_probs, adv, response_mask, delta=low, return_info=return_info, **common)
    if return_info:
        raise ValueError("dppo_mask: return_info is not available with delta_low != delta_high")
    # Zeroing the other sign makes those tokens "toward mu" (kept) in that pass; NaN/inf
    # stay in both passes and are reported as in the mask.
    up = cppo_mask(log_probs, old_log_probs, where(adv < 0, 0, adv), response_mask, delta=high, **common)
    down = cppo_mask(log_probs, old_log_probs, where(adv > 0, 0, adv), response_mask, delta=low, **common)
    return up & down


def trm_mask(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any = None,
    response_mask: Any = None,
    *,
    delta_max: Optional[float] = None,
    delta_avg: Optional[float] = None,
    divergence: Any = "binary_kl",
):
    """TRM row mask over padded ``[B, L]`` inputs: a row keeps all its valid tokens
    unless max_t D_t > ``delta_max`` or mean_t D_t > ``delta_avg`` (each criterion only
    when given; at least one is required). ``divergence``: ``"binary_kl"`` (default, the
    original's estimator), ``"binary_tv"`` or an array D. ``advantages`` is accepted for
    a uniform signature and only checked (finite at valid positions) when given."""
    if delta_max is None and delta_avg is None:
        raise ValueError("trm_mask needs delta_max and/or delta_avg")
    for name, v in (("delta_max", delta_max), ("delta_avg", delta_avg)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0):
            raise ValueError(f"{name} must be None or a finite number >= 0, got {v!r}")
    named = [("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages),
             ("response_mask", response_mask)]
    if divergence is not None and not isinstance(divergence, str):
        named.append(("divergence", divergence))
    ops = _Arrays(named)
    shape = tuple(log_probs.shape)
    if len(shape) != 2:
        raise ValueError(f"log_probs must be 2-D [batch, length] for TRM (rows are dropped whole), got shape {shape}")
    lp = ops.float64(log_probs, "log_probs")
    lq = ops.float64(old_log_probs, "old_log_probs")
    if tuple(lq.shape) != shape:
        raise ValueError(f"old_log_probs must have the shape of log_probs {shape}, got {tuple(lq.shape)}")
    valid = ops.flags(response_mask, shape)
    fields = [(0, lp), (1, lq)]
    if advantages is not None:
        fields.append((2, _advantages(ops, advantages, shape)))
    if divergence is None or isinstance(divergence, str):
        if divergence not in (None, "binary_tv", "binary_kl"):
            raise ValueError(f'divergence must be "binary_tv", "binary_kl" or an array, got {divergence!r}')
        _check(ops, valid, shape, fields)
        from . import divergence as dv

        fn = dv.binary_tv if divergence == "binary_tv" else dv.binary_kl
        d = fn(lp, lq, valid)
    else:
        d = ops.float64(divergence, "divergence")
        if tuple(d.shape) != shape:
            raise ValueError(f"divergence must have the shape of log_probs {shape}, got {tuple(d.shape)}")
        fields.append((3, d))
        _check(ops, valid, shape, fields)
    d = ops.where(valid, d, 0.0)
    if shape[1] == 0:
        return ops.wrap(valid)  # no tokens: nothing to keep
    row_ok = valid.any(-1) if ops.torch is not None else valid.any(axis=-1)
    if delta_max is not None:
        row_max = d.max(-1).values if ops.torch is not None else d.max(axis=-1, initial=0.0)
        row_ok = row_ok & (row_max <= delta_max)
    if delta_avg is not None:
        n = valid.sum(-1) if ops.torch is not None else valid.sum(axis=-1)
        total = d.sum(-1) if ops.torch is not None else d.sum(axis=-1)
        mean = total / (n.clamp(min=1) if ops.torch is not None else np.maximum(n, 1))
        row_ok = row_ok & (mean <= delta_avg)
    return ops.wrap(valid & row_ok[:, None])


def trm_max_mask(log_probs, old_log_probs, advantages=None, response_mask=None, *, delta: float,
                 divergence: Any = "binary_kl"):
    """TRM-Max: drop a row when max_t D_t > ``delta``."""
    return trm_mask(log_probs, old_log_probs, advantages, response_mask, delta_max=delta, divergence=divergence)


def trm_avg_mask(log_probs, old_log_probs, advantages=None, response_mask=None, *, delta_avg: float,
                 divergence: Any = "binary_kl"):
    """TRM-Avg: drop a row when the mean of D_t over its valid tokens exceeds ``delta_avg``."""
    return trm_mask(log_probs, old_log_probs, advantages, response_mask, delta_avg=delta_avg, divergence=divergence)
