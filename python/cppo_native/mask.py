"""The public CPPO mask (semantics: ``docs/semantics.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np

from ._backends import dispatch
from ._core.codes import REASON_NAMES
from ._core.params import check_num_threads, divergence_array, make_params

__all__ = ["REASON_NAMES", "MaskInfo", "cppo_mask"]


@dataclass(frozen=True)
class MaskInfo:
    """Everything the mask pass computes besides the mask, in the caller's framework.

    - ``reason``: int8 per position: 0 invalid, 1 kept (toward mu), 2 kept (within
      threshold), 3 masked by the token threshold, 4 masked by the prefix budget.
    - ``threshold``: float64 per position, the effective threshold c_t (defined at every
      position, padding included, from the running sums S_{t-1} and W_{t-1}).
    - ``gate``: float64 per position, the soft-gate value (0 at invalid positions).
    - ``row_budget``: float64 ``[B]``, delta_b_row used by each row.
    - ``reason_counts``: int64 ``[5]``, positions per reason code.
    """

    reason: Any
    threshold: Any
    gate: Any
    row_budget: Any
    reason_counts: Any

    @property
    def fractions(self) -> dict:
        """Share of valid tokens per outcome (reads ``reason_counts`` on the host)."""
        counts = np.asarray(_host(self.reason_counts), dtype=np.float64)
        valid = counts[1:].sum()
        out = {name: (float(counts[code] / valid) if valid else 0.0) for code, name in enumerate(REASON_NAMES) if code}
        out["kept"] = out["kept_toward_mu"] + out["kept_within_threshold"]
        out["masked"] = out["masked_token_threshold"] + out["masked_prefix_budget"]
        out["num_valid"] = int(valid)
        return out


def _host(x: Any) -> Any:
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        return x.get()
    if hasattr(x, "cpu"):  # torch
        return x.cpu().numpy()
    return x


# The checked knobs of recent calls, by the ids of the values given: a training loop
# passes the same objects every step (a config's values, the defaults), and checking
# twelve knobs again costs ~40 us once a large batch has left the caches cold (a small
# call's Python part, docs/cpu.md). Each entry keeps its values alive, so that an id is
# not reused while the entry exists; only plain immutable values (exact bool, int,
# float, str, None) are kept, never an array given as ``divergence``.
_CHECKED: dict = {}
_CHECKED_SIZE = 64
_PLAIN = frozenset((bool, int, float, str, type(None)))


def _remember(key: tuple, knobs: tuple, params: Any, num_threads: Optional[int], backend: str) -> None:
    if not _PLAIN.issuperset(map(type, knobs)):
        return
    if len(_CHECKED) >= _CHECKED_SIZE:
        _CHECKED.clear()
    _CHECKED[key] = (knobs, params, num_threads, backend)


def cppo_mask(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any,
    response_mask: Any = None,
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
    cu_seqlens: Any = None,
    per_row_advantages: Optional[bool] = None,
    return_info: bool = False,
    validate: bool = True,
    num_threads: Optional[int] = None,
    backend: str = "native",
):
    """CPPO token mask (paper Eq. 10): which token terms the policy loss keeps.

    Args:
        log_probs: log pi(y_t|s_t) of the policy being optimised, ``[B, L]`` padded or
            ``[N]`` packed (with ``cu_seqlens``); float16/bfloat16/float32/float64.
        old_log_probs: log mu(y_t|s_t) of the rollout policy, same shape.
        advantages: per token (the log-probs' shape) or per row ``[B]``.
        response_mask: valid flags (nonzero = a generated token); ``None`` = all valid.
        delta: token threshold scale (> 0). delta_b: prefix-average budget (>= 0).
        w_min: position-weight floor in (0, 1].
        horizon: ``"sequence"`` (T = 1 + last valid index of the row) or a fixed int T.
        adaptive_budget: per-row budget clamp(budget_scale * Q_q(D), delta_b,
            budget_ceiling * delta_b) with q = ``budget_quantile`` (paper Eq. 22).
        budget_ceiling: m >= 1 of the adaptive budget (2: the paper and UniRL; 5: the
            head of the authors' verl pull request).
        position_weight: ``True`` (Eq. 9), ``False`` (w = 1) or ``"shuffled"`` (weights
            permuted among a row's valid positions, seeded by ``shuffle_seed`` and the row).
        prefix_budget: ``False`` gives c_t = delta (position weight only).
        divergence: ``None``/``"binary_tv"``, ``"binary_kl"``, or an array D (any
            estimator) of the log-probs' shape.
        cu_seqlens: packed layout offsets ``[B + 1]`` (flash-attention style).
        per_row_advantages: ``None`` infers from the shape (the log-probs' shape is per
            token, ``[B]`` is per row) and raises where both fit (a packed batch with as
            many tokens as rows); ``True``/``False`` says which.
        return_info: also return a :class:`MaskInfo` from the same pass.
        validate: on CUDA and with ``backend="torch"``, check values at valid positions
            (one host read). The native CPU backend always validates (it costs nothing
            measurable).
        num_threads: CPU threads of the native backend (default: all cores).
        backend: ``"native"`` (default: Rust on CPU, CUDA kernels through CuPy on GPU) or
            ``"torch"``: float64 torch operations on the inputs' device, held to the
            spec's tolerance rule (docs/semantics.md, "Backends"). Never chosen
            implicitly. With ``"torch"``, NumPy inputs are computed on the CPU through
            ``torch.from_numpy`` and come back as NumPy arrays.

    Returns:
        ``mask`` (bool, the log-probs' shape, same framework and device as the input),
        or ``(mask, info)`` with ``return_info=True``.

    Raises:
        ValueError/TypeError naming the offending (row, column) and value, or the
        shapes/dtypes/devices/parameters received. Inputs are never written.
    """
    knobs = (delta, delta_b, w_min, horizon, adaptive_budget, budget_quantile, budget_scale, budget_ceiling,
             position_weight, shuffle_seed, prefix_budget, divergence, num_threads, backend)
    key = tuple(map(id, knobs))
    hit = _CHECKED.get(key)
    if hit is not None:
        _, params, num_threads, backend = hit
    else:
        params = make_params(
            delta=delta, delta_b=delta_b, w_min=w_min, horizon=horizon, adaptive_budget=adaptive_budget,
            budget_quantile=budget_quantile, budget_scale=budget_scale, budget_ceiling=budget_ceiling,
            position_weight=position_weight, shuffle_seed=shuffle_seed, prefix_budget=prefix_budget,
            divergence=divergence,
        )
        num_threads = check_num_threads(num_threads)
        backend = dispatch.check_backend(backend)
        _remember(key, knobs, params, num_threads, backend)
    if not return_info and cu_seqlens is None and per_row_advantages is None and divergence_array(divergence) is None:
        mask = dispatch.fast_mask(log_probs, old_log_probs, advantages, response_mask, params,
                                  num_threads=num_threads, backend=backend)
        if mask is not None:
            return mask
    prep = dispatch.prepare_mask_inputs(
        log_probs, old_log_probs, advantages, response_mask, divergence_array(divergence), cu_seqlens,
        per_row_advantages, backend=backend,
    )
    mask, reason, threshold, gate, row_budget, counts = dispatch.run_mask(
        prep, params, return_info=return_info, validate=validate, num_threads=num_threads, backend=backend
    )
    if not return_info:
        return mask
    return mask, MaskInfo(reason=reason, threshold=threshold, gate=gate, row_budget=row_budget,
                          reason_counts=counts)


