"""The alternatives a user has without cppo-native, written as public trainers write
them: vectorised tensor code with cumsum, a one-token shift and nanquantile.

Both follow docs/semantics.md (horizon="sequence", Binary TV from log-probs, fixed or
adaptive budget) in float64; tests/test_baselines.py checks them against the reference.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def torch_cppo_mask(log_probs, old_log_probs, advantages, response_mask, *, delta=0.15, delta_b=0.02,
                    w_min=0.8, adaptive_budget=True, budget_quantile=0.9, budget_scale=1.0,
                    budget_ceiling=2.0):
    """CPPO keep-mask [B, L] from padded torch tensors; advantages [B] or [B, L]."""
    m = response_mask.to(torch.float64)
    lp = log_probs.to(torch.float64)
    lq = old_log_probs.to(torch.float64)
    adv = advantages.to(torch.float64)
    if adv.dim() == 1:
        adv = adv[:, None]
    d = (lp.exp() - lq.exp()).abs()
    length = lp.shape[-1]
    pos = torch.arange(length, device=lp.device, dtype=torch.float64)
    horizon = ((pos + 1) * m).amax(dim=-1, keepdim=True)  # 1 + last valid index
    w = 1.0 - (1.0 - w_min) * torch.clamp(pos / (horizon - 1).clamp(min=1.0), max=1.0)
    w = torch.where(horizon > 1, w, torch.ones_like(w))
    z = torch.where(m > 0, w * d, 0.0)  # padding may hold NaN/inf: keep it out of the sums
    s_prev = F.pad(z.cumsum(-1)[:, :-1], (1, 0))  # S_{t-1}
    w_prev = F.pad((m * w).cumsum(-1)[:, :-1], (1, 0))  # W_{t-1}
    if adaptive_budget:
        q = torch.nanquantile(d.masked_fill(m == 0, float("nan")), budget_quantile, dim=-1, keepdim=True)
        budget = torch.clamp(budget_scale * q, delta_b, budget_ceiling * delta_b).nan_to_num(delta_b)
    else:
        budget = torch.full_like(horizon, delta_b)
    c = torch.clamp(delta + budget * w_prev - s_prev, max=delta)
    toward = adv * (lp - lq) <= 0
    return (m > 0) & (toward | (z <= c))


def numpy_cppo_mask(log_probs, old_log_probs, advantages, response_mask, *, delta=0.15, delta_b=0.02,
                    w_min=0.8, adaptive_budget=True, budget_quantile=0.9, budget_scale=1.0,
                    budget_ceiling=2.0):
    """The same formula in vectorised NumPy."""
    m = response_mask.astype(np.float64)
    lp = log_probs.astype(np.float64)
    lq = old_log_probs.astype(np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    if adv.ndim == 1:
        adv = adv[:, None]
    d = np.abs(np.exp(lp) - np.exp(lq))
    length = lp.shape[-1]
    pos = np.arange(length, dtype=np.float64)
    horizon = ((pos + 1) * m).max(axis=-1, keepdims=True, initial=0.0)
    w = 1.0 - (1.0 - w_min) * np.minimum(pos / np.maximum(horizon - 1, 1.0), 1.0)
    w = np.where(horizon > 1, w, 1.0)
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.where(m > 0, w * d, 0.0)  # padding may hold NaN/inf: keep it out of the sums
    s_prev = np.pad(np.cumsum(z, -1)[:, :-1], ((0, 0), (1, 0)))
    w_prev = np.pad(np.cumsum(m * w, -1)[:, :-1], ((0, 0), (1, 0)))
    if adaptive_budget:
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q = np.nanquantile(np.where(m > 0, d, np.nan), budget_quantile, axis=-1, keepdims=True)
        budget = np.nan_to_num(np.clip(budget_scale * q, delta_b, budget_ceiling * delta_b), nan=delta_b)
    else:
        budget = np.full_like(horizon, delta_b)
    c = np.minimum(delta + budget * w_prev - s_prev, delta)
    toward = adv * (lp - lq) <= 0
    return (m > 0) & (toward | (z <= c))
