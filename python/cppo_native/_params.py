"""Hyper-parameters of the CPPO mask, validated once before any backend runs.

Every backend (NumPy reference, Rust CPU, CUDA) receives a ``MaskParams``; none of
them re-validates parameters.  Names follow ``shared/spec/CPPO.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# Integer codes shared with the native backends (Rust `core.rs`, CUDA `cppo_mask.cu`).
POSITION_WEIGHT_MODES = {"linear": 0, "none": 1, "shuffled": 2}
DIVERGENCE_MODES = {"binary_tv": 0, "binary_kl": 1, "given": 2}

# Floor on the "rest" probability mass (1 - p) in Binary KL, so that a token whose
# log-prob rounds to exactly 0.0 in fp32/bf16 does not give an infinite divergence.
BINARY_KL_EPS = 1e-12


@dataclass(frozen=True)
class MaskParams:
    """Validated CPPO hyper-parameters (see the spec for each symbol)."""

    delta: float
    delta_b: float
    w_min: float = 0.8
    horizon: int = 0  # 0 means horizon="sequence"; otherwise the fixed T >= 1
    adaptive_budget: bool = False
    budget_quantile: float = 0.9
    budget_scale: float = 1.0
    position_weight: str = "linear"  # "linear" | "none" | "shuffled"
    shuffle_seed: int = 0
    prefix_budget: bool = True
    divergence: str = "binary_tv"  # "binary_tv" | "binary_kl" | "given"
    budget_ceiling: float = 2.0  # m: adaptive budget = clamp(k * Q, delta_b, m * delta_b)

    @property
    def position_weight_code(self) -> int:
        return POSITION_WEIGHT_MODES[self.position_weight]

    @property
    def divergence_code(self) -> int:
        return DIVERGENCE_MODES[self.divergence]


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def make_params(
    *,
    delta: Any,
    delta_b: Any,
    w_min: Any = 0.8,
    horizon: Any = "sequence",
    adaptive_budget: Any = False,
    budget_quantile: Any = 0.9,
    budget_scale: Any = 1.0,
    position_weight: Any = True,
    shuffle_seed: Any = 0,
    prefix_budget: Any = True,
    divergence: str = "binary_tv",
) -> MaskParams:
    """Check every knob and return a frozen ``MaskParams``.

    ``divergence`` here is the mode name; an array-valued divergence is mapped to
    ``"given"`` by the caller before this is called.
    """
    delta = _real("delta", delta)
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta!r}")
    delta_b = _real("delta_b", delta_b)
    if delta_b < 0:
        raise ValueError(f"delta_b must be >= 0, got {delta_b!r}")
    w_min = _real("w_min", w_min)
    if not 0 < w_min <= 1:
        raise ValueError(f"w_min must be in (0, 1], got {w_min!r}")

    if isinstance(horizon, str):
        if horizon != "sequence":
            raise ValueError(f'horizon must be "sequence" or an int >= 1, got {horizon!r}')
        horizon_t = 0
    elif isinstance(horizon, numbers.Integral) and not isinstance(horizon, bool):
        horizon_t = int(horizon)
        if horizon_t < 1:
            raise ValueError(f'horizon must be "sequence" or an int >= 1, got {horizon!r}')
    else:
        raise TypeError(f'horizon must be "sequence" or an int >= 1, got {horizon!r}')

    if not isinstance(adaptive_budget, (bool, numbers.Integral)):
        raise TypeError(f"adaptive_budget must be a bool, got {adaptive_budget!r}")
    budget_quantile = _real("budget_quantile", budget_quantile)
    if not 0 <= budget_quantile <= 1:
        raise ValueError(f"budget_quantile must be in [0, 1], got {budget_quantile!r}")
    budget_scale = _real("budget_scale", budget_scale)
    if budget_scale < 0:
        raise ValueError(f"budget_scale must be >= 0, got {budget_scale!r}")

    if position_weight is True:
        pw = "linear"
    elif position_weight is False:
        pw = "none"
    elif isinstance(position_weight, str) and position_weight in POSITION_WEIGHT_MODES:
        pw = position_weight
    else:
        raise ValueError(
            f'position_weight must be True, False, "linear", "none" or "shuffled", got {position_weight!r}'
        )
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, numbers.Integral):
        raise TypeError(f"shuffle_seed must be an int, got {shuffle_seed!r}")
    if not 0 <= int(shuffle_seed) < 2**64:
        raise ValueError(f"shuffle_seed must be in [0, 2**64), got {shuffle_seed!r}")

    if not isinstance(prefix_budget, (bool, numbers.Integral)):
        raise TypeError(f"prefix_budget must be a bool, got {prefix_budget!r}")
    if divergence not in DIVERGENCE_MODES:
        raise ValueError(
            f'divergence must be None, "binary_tv", "binary_kl" or an array, got {divergence!r}'
        )
    return MaskParams(
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        horizon=horizon_t,
        adaptive_budget=bool(adaptive_budget),
        budget_quantile=budget_quantile,
        budget_scale=budget_scale,
        position_weight=pw,
        shuffle_seed=int(shuffle_seed),
        prefix_budget=bool(prefix_budget),
        divergence=divergence,
    )
