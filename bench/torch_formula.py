"""The CPPO mask as public trainers write it in PyTorch: vectorised over a padded
[B, L] batch with cumsum, a one-token shift and nanquantile. The benchmarks' baseline
(eager and under torch.compile); tests/test_torch_formula.py checks it against the
reference (shared/spec/CPPO.md) under the spec's tolerance rule.

Scope: padded layout, linear position weight with horizon "sequence" or a fixed int,
prefix budget on, Binary TV from log-probs or a given divergence, fixed or adaptive
budget. Arithmetic is float64 as the spec requires (float32 prefix sums drift on long
rows, where delta_b * W - S is a difference of two large numbers).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F


def cppo_mask_torch(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta: float,
    delta_b: float,
    w_min: float = 0.8,
    horizon: Union[str, int] = "sequence",
    adaptive_budget: bool = False,
    budget_quantile: float = 0.9,
    budget_scale: float = 1.0,
    divergence: Optional[torch.Tensor] = None,
    return_threshold: bool = False,
):
    """Keep-mask [B, L] (bool) of paper Eq. 10; advantages [B] or [B, L]. With
    ``return_threshold``: (mask, c_t) (for the tests)."""
    f64 = torch.float64
    valid = response_mask != 0
    lp = log_probs.to(f64)
    lq = old_log_probs.to(f64)
    adv = advantages.to(f64)
    if adv.dim() == 1:
        adv = adv[:, None]
    # D_t (Binary TV unless given); garbage at padding never reaches a sum.
    d = (lp.exp() - lq.exp()).abs() if divergence is None else divergence.to(f64)
    d = torch.where(valid, d, 0.0)

    # Position weight (Eq. 9): T = 1 + last valid index, or fixed.
    length = lp.shape[-1]
    col = torch.arange(length, device=lp.device, dtype=f64)
    if horizon == "sequence":
        t = torch.where(valid, col + 1, 0.0).amax(dim=-1, keepdim=True) if length else lp.new_zeros(lp.shape[0], 1)
    else:
        t = lp.new_full((lp.shape[0], 1), float(horizon))
    ratio = torch.clamp(col / torch.clamp(t - 1, min=1.0), max=1.0)
    w = torch.where(t > 1, 1.0 - (1.0 - w_min) * ratio, 1.0)
    w = torch.where(valid, w, 0.0)
    z = w * d  # Z_t

    # S_{t-1}, W_{t-1} (Eq. 8): inclusive cumsum shifted right by one token.
    s_prev = F.pad(z.cumsum(-1)[:, :-1], (1, 0))
    w_prev = F.pad(w.cumsum(-1)[:, :-1], (1, 0))

    # Per-row budget (Eq. 22): clamp(k * Q_q(D over valid), delta_b, 2 delta_b).
    if adaptive_budget and lp.numel() > 0:
        q = torch.nanquantile(torch.where(valid, d, float("nan")), budget_quantile, dim=-1, keepdim=True)
        budget = torch.where(q.isnan(), delta_b, torch.clamp(budget_scale * q, delta_b, 2.0 * delta_b))
    else:
        budget = delta_b

    c = torch.clamp(delta + budget * w_prev - s_prev, max=delta)  # c_t
    toward_mu = adv * (lp - lq) <= 0
    keep = valid & (toward_mu | (z <= c))
    return (keep, c) if return_threshold else keep
