"""PyTorch face of cppo-native: the CPPO policy loss (paper Eq. 11) and its pieces.

Per valid token the loss term is ``-A_t * sg(min(rho_t, C)) * log_probs_t * keep_t``
with ``rho_t = exp(clamp(log_probs_t - old_log_probs_t, -20, 20))``, ``C`` the truncation
cap (``clip_ratio_c``) and ``sg`` a stop-gradient, so the gradient w.r.t. the policy's
log-probs equals that of ``-A_t * rho_t * keep_t`` below the cap. ``keep_t`` is the CPPO
mask (or the soft gate, ``soft=True``), computed without gradient by
:func:`cppo_native.cppo_mask`. Gradients flow only through ``log_probs``.

Aggregation follows verl's ``agg_loss`` conventions (``token-mean``, ``token-sum``,
``seq-mean-token-sum``, ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``); every
denominator counts *valid* tokens (``response_mask``), not kept ones.

This module is ``cppo_native.torch``; its own ``import torch`` is an absolute import
and gets PyTorch.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Union

try:
    import torch  # PyTorch itself: absolute import, not this module
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("cppo_native.torch needs PyTorch: pip install torch (or, from a cppo-native checkout, pip install '.[torch]')") from exc

from .ops import binary_divergence, mask_with_info

LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)

# rho_t = exp(clamp(log pi - log mu, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), as verl does.
LOG_RATIO_CLAMP = 20.0


def _tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    return x


def _valid_flags(response_mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if response_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    _tensor(response_mask, "response_mask")
    if tuple(response_mask.shape) != tuple(like.shape):
        raise ValueError(
            f"response_mask must have the shape of log_probs {tuple(like.shape)}, got {tuple(response_mask.shape)}"
        )
    if response_mask.device != like.device:
        raise ValueError(f"all tensors must be on one device: log_probs is on {like.device}, response_mask is on {response_mask.device}")
    return response_mask.detach() != 0


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (bf16/fp16 are widened)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_advantages(advantages: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Per-token view of per-token ``[B, L]`` or per-row ``[B]``/``[B, 1]`` advantages."""
    a_shape = tuple(advantages.shape)
    if a_shape == shape:
        return advantages
    if len(shape) == 2 and a_shape in ((shape[0],), (shape[0], 1)):
        return advantages.reshape(shape[0], 1).expand(shape)
    want = f"{shape} (per token)" + (f" or ({shape[0]},) (per row)" if len(shape) == 2 else "")
    raise ValueError(f"advantages must have shape {want}, got {a_shape}")


def _positive_int(name: str, v: Any, allow_none: bool = True, pending: Optional[list] = None) -> Optional[int]:
    """A number > 0, or a one-element tensor (e.g. a global token count from an
    all-reduce) holding one. A CPU tensor is checked at once. A CUDA tensor is checked
    by reading it on the host (one synchronisation) unless ``pending`` is given: then it
    is appended there and the caller checks it in a host read it makes anyway."""
    if v is None and allow_none:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number > 0 or a one-element tensor, got a tensor of shape {tuple(v.shape)}")
        if v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{name} must be a real number > 0, got a tensor of dtype {v.dtype}")
        if pending is not None and v.device.type != "cpu":
            pending.append((name, v))
        else:
            _check_positive_scalars([(name, v)], [bool(v.detach().reshape(()) > 0)])
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}a number > 0, got {v!r}")
    return v


def _check_positive_scalars(named: list, ok: list) -> None:
    for (name, v), good in zip(named, ok):
        if not good:
            raise ValueError(f"{name} must be > 0, got a tensor holding {v.detach().reshape(()).item()!r}")


def aggregate_loss(
    loss_mat: torch.Tensor,
    response_mask: Optional[torch.Tensor],
    loss_agg_mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, L]`` to a scalar the way verl's ``agg_loss`` does.

    - ``token-mean``: sum over valid tokens / number of valid tokens.
    - ``token-sum``: sum over valid tokens.
    - ``seq-mean-token-sum``: per-row sums, averaged over rows with >= 1 valid token.
    - ``seq-mean-token-mean``: per-row means over valid tokens, averaged likewise.
    - ``seq-mean-token-sum-norm``: ``seq-mean-token-sum / loss_scale_factor`` (default:
      the padded length ``L``).

    Data parallel (as in verl): with ``dp_size > 1`` pass the global ``batch_num_tokens``
    (token modes) or ``global_batch_size`` (sequence modes); the result is multiplied by
    ``dp_size`` so that averaging gradients over ranks gives the global mean. A
    micro-batch with no valid token gives 0 in every mode (verl would give NaN).

    ``batch_num_tokens``, ``global_batch_size`` and ``loss_scale_factor`` may be numbers
    or one-element tensors; either must be > 0 (``ValueError`` otherwise). A CUDA
    tensor is checked with one device-to-host read here;
    :func:`cppo_policy_loss` folds that check into its single metrics read instead.
    """
    return _aggregate(loss_mat, response_mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                      global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor, pending=None)


def _aggregate(loss_mat, response_mask, loss_agg_mode, *, dp_size, batch_num_tokens, global_batch_size,
               loss_scale_factor, pending):
    _tensor(loss_mat, "loss_mat")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral) or dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    batch_num_tokens = _positive_int("batch_num_tokens", batch_num_tokens, pending=pending)
    global_batch_size = _positive_int("global_batch_size", global_batch_size, pending=pending)
    loss_scale_factor = _positive_int("loss_scale_factor", loss_scale_factor, pending=pending)
    valid = _valid_flags(response_mask, loss_mat)
    zero = torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    masked = torch.where(valid, loss_mat, zero)

    if loss_agg_mode in ("token-mean", "token-sum"):
        total = masked.sum()
        if loss_agg_mode == "token-sum":
            return total * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("token-mean with dp_size > 1 needs the global batch_num_tokens")
            batch_num_tokens = valid.sum().clamp(min=1)
        return total / batch_num_tokens * dp_size

    if loss_mat.dim() != 2:
        raise ValueError(f"{loss_agg_mode} needs a 2-D [batch, length] loss, got shape {tuple(loss_mat.shape)}")
    row_sum = masked.sum(-1)
    row_tokens = valid.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        row_sum = row_sum / row_tokens.clamp(min=1)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"{loss_agg_mode} with dp_size > 1 needs the global global_batch_size")
        global_batch_size = (row_tokens > 0).sum().clamp(min=1)
    loss = row_sum.sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        # The default factor is the padded length L; L = 0 (no tokens) divides by 1, so an
        # empty batch gives 0 here as in every other mode.
        loss = loss / (max(loss_mat.shape[-1], 1) if loss_scale_factor is None else loss_scale_factor)
    return loss


def masked_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor],
    weight: torch.Tensor,
    *,
    clip_ratio_c: float = 20.0,
    loss_agg_mode: str = "token-mean",
    token_weights: Optional[torch.Tensor] = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
):
    """The truncated-IS loss with any per-token keep-mask or gate ``weight`` (bool or
    float, detached): ``-A * sg(min(rho, C)) * log_probs * weight`` (times the optional
    detached ``token_weights``, e.g. verl's rollout IS weights), then
    :func:`aggregate_loss`. Use it with :mod:`cppo_native.baselines` masks for matched
    comparisons. Returns ``(loss, loss_mat)``; ``loss_mat`` is 0 at invalid positions.

    The computation runs in float32 (float64 when an input is float64); values at
    invalid positions (NaN, garbage) never reach the loss or the gradient.
    """
    return _masked_policy_loss(
        log_probs, old_log_probs, advantages, response_mask, weight, clip_ratio_c=clip_ratio_c,
        loss_agg_mode=loss_agg_mode, token_weights=token_weights, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor, pending=None,
    )


def _masked_policy_loss(log_probs, old_log_probs, advantages, response_mask, weight, *, clip_ratio_c, loss_agg_mode,
                        token_weights, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor, pending):
    for name, x in (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages),
                    ("weight", weight)):
        _tensor(x, name)
        if x.device != log_probs.device:
            raise ValueError(f"all tensors must be on one device: log_probs is on {log_probs.device}, {name} is on {x.device}")
    shape = tuple(log_probs.shape)
    if not log_probs.is_floating_point():
        raise TypeError(f"log_probs: dtype {log_probs.dtype} is not supported; use a float dtype")
    for name, x in (("old_log_probs", old_log_probs), ("weight", weight)):
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have the shape of log_probs {shape}, got {tuple(x.shape)}")
    if token_weights is not None:
        _tensor(token_weights, "token_weights")
        if tuple(token_weights.shape) != shape:
            raise ValueError(f"token_weights must have the shape of log_probs {shape}, got {tuple(token_weights.shape)}")
    if isinstance(clip_ratio_c, bool) or not isinstance(clip_ratio_c, numbers.Real) or not clip_ratio_c > 0:
        raise ValueError(f"clip_ratio_c must be a number > 0 (math.inf: no truncation), got {clip_ratio_c!r}")
    valid = _valid_flags(response_mask, log_probs)
    adv = _row_advantages(advantages, shape)
    cd = _compute_dtype(log_probs, old_log_probs)
    zero = torch.zeros((), dtype=cd, device=log_probs.device)
    with torch.no_grad():
        log_ratio = (log_probs.detach().to(cd) - old_log_probs.detach().to(cd)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        factor = weight.detach().to(cd)
        if token_weights is not None:
            factor = factor * token_weights.detach().to(cd)
        # Select, never multiply by 0: a huge advantage (inf after the cast to float32, or
        # A * rho overflowing) times a 0 weight would be NaN at a masked token.
        kept = valid & (factor != 0)
        coef = torch.where(kept, -adv.detach().to(cd) * log_ratio.exp().clamp(max=clip_ratio_c) * factor, zero)
    # where() on log_probs itself keeps NaN/-inf at dropped positions out of the loss and
    # the gradient.
    loss_mat = coef * torch.where(kept, log_probs.to(cd), zero)
    loss = _aggregate(
        loss_mat, valid, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor, pending=pending,
    )
    return loss, loss_mat


def cppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: Optional[torch.Tensor] = None,
    *,
    delta: float,
    delta_b: float,
    w_min: float = 0.8,
    horizon: Union[str, int] = "sequence",
    adaptive_budget: bool = False,
    budget_quantile: float = 0.9,
    budget_scale: float = 1.0,
    budget_ceiling: float = 2.0,
    position_weight: Union[bool, str] = True,
    shuffle_seed: int = 0,
    prefix_budget: bool = True,
    divergence: Any = None,
    soft: bool = False,
    clip_ratio_c: float = 20.0,
    loss_agg_mode: str = "token-mean",
    token_weights: Optional[torch.Tensor] = None,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
    validate: bool = True,
    num_threads: Optional[int] = None,
    backend: str = "native",
    metrics_as_tensors: bool = False,
):
    """CPPO policy loss (spec "Loss (paper Eq. 11)") and its metrics.

    Args:
        log_probs: log pi(y_t|s_t) ``[B, L]`` of the policy being optimised (carries the
            gradient); any float dtype.
        old_log_probs: log mu(y_t|s_t) of the *rollout* policy ``[B, L]`` (verl: bypass
            mode, where old_log_probs = rollout log-probs).
        advantages: ``[B, L]`` per token or ``[B]`` per row.
        response_mask: valid flags ``[B, L]`` (``None``: all valid).
        delta, delta_b, w_min, horizon, adaptive_budget, budget_quantile, budget_scale,
        budget_ceiling, position_weight, shuffle_seed, prefix_budget, divergence: the mask's knobs,
            exactly as :func:`cppo_native.cppo_mask` (``divergence``: ``None`` /
            ``"binary_tv"``, ``"binary_kl"`` or a tensor D, e.g. from
            :func:`cppo_native.divergence.topk_divergence`).
        soft: use the soft gate (paper Appendix C) instead of the hard mask.
        clip_ratio_c: truncation cap C of the IS ratio (``math.inf``: none).
        loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor:
            see :func:`aggregate_loss`.
        token_weights: optional detached per-token factors (e.g. rollout IS weights).
        validate, num_threads: passed to the mask.
        backend: the mask's backend, ``"native"`` (default) or ``"torch"`` (float64 torch
            operations on the tensors' device), as :func:`cppo_native.cppo_mask`.
        metrics_as_tensors: return the metrics as 0-d float64 tensors on the device
            (no host read) instead of Python floats. Needed under
            ``torch.compile(..., fullgraph=True)``: reading floats is a graph break.

    The mask runs through the custom op ``torch.ops.cppo_native.mask``
    (:mod:`cppo_native.ops`), so that ``torch.compile`` traces this function whole.

    Returns:
        ``(loss, metrics)``: ``loss`` a scalar tensor; ``metrics`` a dict of Python
        floats (0-d tensors with ``metrics_as_tensors=True``) over valid tokens: ``masked_frac`` and the share of each reason
        (``kept_toward_mu_frac``, ``kept_within_threshold_frac``,
        ``masked_token_threshold_frac``, ``masked_prefix_budget_frac``),
        ``row_budget_mean`` (delta_b_row over rows with a valid token),
        ``divergence_mean`` (mean D used by the mask), ``approx_kl_k1`` (mean of
        log mu - log pi, the k1 estimator of KL(mu || pi) on tokens sampled from mu; the
        quantity verl logs as ``ppo_kl``), ``approx_kl_k3`` (mean of ``r - 1 - log r``
        with r = pi/mu: k3, non-negative), ``truncated_frac`` (kept tokens with
        rho > C), ``gate_mean`` (soft only) and ``num_valid_tokens``.

    Raises:
        ValueError/TypeError as :func:`cppo_native.cppo_mask` (bad values name the
        (row, column)), or for shapes, devices and loss options.
    """
    for name, x in (("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages)):
        _tensor(x, name)
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be 2-D [batch, length], got shape {tuple(log_probs.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    given_d = divergence is not None and not isinstance(divergence, str)
    if given_d:
        _tensor(divergence, "divergence")
    with torch.no_grad():
        keep, info = mask_with_info(
            log_probs.detach(), old_log_probs.detach(), advantages.detach(),
            None if response_mask is None else response_mask.detach(),
            delta=delta, delta_b=delta_b, w_min=w_min, horizon=horizon, adaptive_budget=adaptive_budget,
            budget_quantile=budget_quantile, budget_scale=budget_scale, budget_ceiling=budget_ceiling,
            position_weight=position_weight,
            shuffle_seed=shuffle_seed, prefix_budget=prefix_budget,
            divergence=divergence.detach() if given_d else divergence,
            validate=validate, num_threads=num_threads, backend=backend,
        )
    weight = info.gate if soft else keep
    pending: list = []  # device scalars (batch_num_tokens, ...) checked in the metrics' host read
    loss, _ = _masked_policy_loss(
        log_probs, old_log_probs, advantages, response_mask, weight,
        clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode, token_weights=token_weights, dp_size=dp_size,
        batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
        pending=pending,
    )
    metrics = _cppo_metrics(log_probs, old_log_probs, response_mask, keep, info, weight, divergence, soft,
                            clip_ratio_c, delta_b, num_threads, backend, metrics_as_tensors, pending)
    return loss, metrics


def _cppo_metrics(log_probs, old_log_probs, response_mask, keep, info, weight, divergence, soft, clip_ratio_c,
                  delta_b, num_threads, backend, as_tensors, pending=()) -> dict:
    dev = log_probs.device
    f64 = torch.float64
    valid = _valid_flags(response_mask, log_probs)
    with torch.no_grad():
        lp = log_probs.detach().to(f64)
        lq = old_log_probs.detach().to(f64)
        zero = torch.zeros((), dtype=f64, device=dev)
        n_valid = valid.sum().to(f64)
        denom = n_valid.clamp(min=1)

        def mean(x):
            return torch.where(valid, x.to(f64), zero).sum() / denom

        if divergence is None or isinstance(divergence, str):
            d = binary_divergence(log_probs.detach(), old_log_probs.detach(), valid,
                                  kind="kl" if divergence == "binary_kl" else "tv", validate=False,
                                  num_threads=num_threads, backend=backend)
        else:
            d = divergence.detach()
        log_ratio = (lp - lq).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        counts = info.reason_counts.to(device=dev, dtype=f64)
        rows = valid.any(-1)
        budget = info.row_budget.to(device=dev, dtype=f64)
        n_rows = rows.sum()
        row_budget_mean = torch.where(
            n_rows > 0, torch.where(rows, budget, zero).sum() / n_rows.clamp(min=1).to(f64),
            torch.full((), float(delta_b), dtype=f64, device=dev),
        )
        kept = weight.detach().to(f64) > 0
        values = [
            (counts[3] + counts[4]) / denom,
            counts[1] / denom,
            counts[2] / denom,
            counts[3] / denom,
            counts[4] / denom,
            row_budget_mean,
            mean(d.to(dev)),
            mean(-log_ratio),
            mean(torch.expm1(log_ratio) - log_ratio),
            mean((log_ratio.exp() > clip_ratio_c) & kept),
            n_valid,
        ]
        names = [
            "masked_frac", "kept_toward_mu_frac", "kept_within_threshold_frac", "masked_token_threshold_frac",
            "masked_prefix_budget_frac", "row_budget_mean", "divergence_mean", "approx_kl_k1", "approx_kl_k3",
            "truncated_frac", "num_valid_tokens",
        ]
        if soft:
            values.append(mean(info.gate.to(dev)))
            names.append("gate_mean")
        stacked = torch.stack([v.to(f64).reshape(()) for v in values])
        if as_tensors and not pending:
            return dict(zip(names, stacked.unbind()))
        # Tensor-valued normalisers on the device are checked in the same host read (with
        # metrics_as_tensors, that read exists only for them).
        checks = [(v.detach().reshape(()).to(dev) > 0).to(f64) for _, v in pending]
        host = torch.cat([stacked, torch.stack(checks)]).tolist() if checks else stacked.tolist()
    _check_positive_scalars(list(pending), [h > 0 for h in host[len(values):]])
    if as_tensors:
        return dict(zip(names, stacked.unbind()))
    return dict(zip(names, host[:len(values)]))
