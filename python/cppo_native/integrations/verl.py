"""CPPO as verl policy-loss modes (tested with verl 0.9.1).

Importing this module registers, in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.register_policy_loss``):

- ``cppo``: the CPPO hard mask (paper Eq. 10) in the truncated-IS loss (Eq. 11);
- ``cppo_soft``: the soft gate (paper Appendix C) instead of the mask.

verl finds them through ``get_policy_loss_fn(actor.policy_loss.loss_mode)``. cppo-native
declares this module as a ``verl.plugins`` entry point, which verl (>= 0.9.1) imports
whenever ``verl`` is imported, so the modes exist in every process, Ray workers
included; ``VERL_USE_EXTERNAL_MODULES=cppo_native.integrations.verl`` or an explicit
import do the same.

Configuration (``actor_rollout_ref.actor.*``), the keys public verl CPPO users write:

- ``clip_ratio``: the token threshold scale delta (0.15 dense, 0.20 MoE in the paper);
- ``clip_ratio_c``: the truncation cap C of the IS ratio (verl's default is 3.0; the
  paper uses 20);
- ``loss_agg_mode`` and verl's global batch info (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``) as for every verl loss;
- ``policy_loss.cppo_*``: the other CPPO knobs, one key per entry of the knob table
  (``VERL_KEYS`` below; the budget keys keep the names of the authors' verl recipe):
  ``cppo_w_min`` (0.8), ``cppo_delta_b`` (0.02, the budget floor), ``cppo_delta_b_q``
  (0.9), ``cppo_delta_b_k`` (1.0) and ``cppo_delta_b_max_mult`` (the ceiling m, 2.0; the
  head of the authors' verl pull request uses 5): per-row budget
  ``clamp(k * Q_q(D), delta_b, m * delta_b)``; ``cppo_adaptive_budget`` (True here, as
  in the authors' verl recipe for base models; the library's default is False),
  ``cppo_horizon`` (``"sequence"``, ``"padded"`` = the micro-batch's padded response
  length, as verl's public recipe does, or an int), ``cppo_divergence`` (``"binary_tv"``
  or ``"binary_kl"``), ``cppo_position_weight``, ``cppo_shuffle_seed``,
  ``cppo_prefix_budget``. Also read from a nested ``policy_loss.cppo`` mapping.

verl 0.9.1's ``PolicyLossConfig`` dataclass rejects unknown keys, so point its
``_target_`` at :class:`CPPOPolicyLossConfig` (a subclass with these fields), see
``docs/verl.md``. ``old_log_prob`` must be the rollout policy mu: run verl in bypass mode
(``algorithm.rollout_correction.bypass_mode=True``, V1 trainer) so that
old_log_probs = rollout_log_probs.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch

try:
    from verl.trainer.ppo import core_algos as _core_algos
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfig
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "cppo_native.integrations.verl needs verl (tested with verl==0.9.1): pip install verl. "
        f"Importing verl failed with: {exc}"
    ) from exc

from .._core.params import defaults, make_params
from ..torch import cppo_policy_loss

_logger = logging.getLogger(__name__)

MODES = {"cppo": False, "cppo_soft": True}  # loss_mode -> soft gate

# verl config key (under actor.policy_loss) -> knob of the table (_core/params.py). delta
# is verl's actor.clip_ratio. tests/test_knobs.py checks every knob has a key.
VERL_KEYS = {
    "cppo_w_min": "w_min",
    "cppo_delta_b": "delta_b",
    "cppo_delta_b_q": "budget_quantile",
    "cppo_delta_b_k": "budget_scale",
    "cppo_delta_b_max_mult": "budget_ceiling",
    "cppo_adaptive_budget": "adaptive_budget",
    "cppo_horizon": "horizon",
    "cppo_divergence": "divergence",
    "cppo_position_weight": "position_weight",
    "cppo_shuffle_seed": "shuffle_seed",
    "cppo_prefix_budget": "prefix_budget",
}
# Where this adapter's defaults differ from the table's, and why: the authors' verl
# recipe turns the adaptive budget on (the paper uses it for base models), and a config
# value names the estimator instead of None.
_DEFAULT_OVERRIDES = {"adaptive_budget": True, "divergence": "binary_tv"}
DEFAULTS = {key: _DEFAULT_OVERRIDES.get(name, defaults(paper=True)[name]) for key, name in VERL_KEYS.items()}


@dataclass
class CPPOPolicyLossConfig(_PolicyLossConfig):
    """verl's ``PolicyLossConfig`` plus the CPPO keys (use it as ``policy_loss._target_``)."""

    cppo_w_min: float = 0.8
    cppo_delta_b: float = 0.02
    cppo_delta_b_q: float = 0.9
    cppo_delta_b_k: float = 1.0
    cppo_delta_b_max_mult: float = 2.0
    cppo_adaptive_budget: bool = True
    cppo_horizon: Any = "sequence"
    cppo_divergence: str = "binary_tv"
    cppo_position_weight: Any = True
    cppo_shuffle_seed: int = 0
    cppo_prefix_budget: bool = True


_MISSING = object()


def _lookup(cfg: Any, key: str) -> Any:
    if cfg is None:
        return _MISSING
    try:
        value = cfg.get(key, _MISSING)
    except AttributeError:
        value = getattr(cfg, key, _MISSING)
    return value


def cppo_settings(config: Any, padded_length: int) -> dict:
    """The :func:`cppo_native.torch.cppo_policy_loss` keywords for a verl actor config
    (``ActorConfig`` dataclass, ``DictConfig`` or plain mapping)."""
    if config is None:
        raise ValueError("the cppo policy loss needs verl's actor config (config=None was passed)")
    delta = _lookup(config, "clip_ratio")
    if delta is _MISSING or delta is None:
        raise ValueError("the cppo policy loss reads delta from actor.clip_ratio, which is not set")
    clip_c = _lookup(config, "clip_ratio_c")
    policy_loss = _lookup(config, "policy_loss")
    policy_loss = None if policy_loss is _MISSING else policy_loss
    nested = _lookup(policy_loss, "cppo")
    nested = None if nested is _MISSING else nested
    values = {}
    for key, default in DEFAULTS.items():
        v = _lookup(policy_loss, key)
        if v is _MISSING or v is None:
            v = _lookup(nested, key)
        values[key] = default if v is _MISSING or v is None else v
    knobs = {VERL_KEYS[key]: value for key, value in values.items()}
    horizon = knobs["horizon"]
    if horizon == "padded":
        knobs["horizon"] = max(int(padded_length), 1)
    elif isinstance(horizon, str) and horizon != "sequence":
        raise ValueError(f'policy_loss.cppo_horizon must be "sequence", "padded" or an int >= 1, got {horizon!r}')
    elif not isinstance(horizon, str) and not isinstance(horizon, numbers.Integral):
        raise ValueError(f'policy_loss.cppo_horizon must be "sequence", "padded" or an int >= 1, got {horizon!r}')
    if knobs["divergence"] not in ("binary_tv", "binary_kl"):
        raise ValueError(
            f'policy_loss.cppo_divergence must be "binary_tv" or "binary_kl", got {knobs["divergence"]!r}'
        )
    knobs["delta"] = delta
    try:
        make_params(**knobs)  # the table's checks, with verl's key names in the message
    except (TypeError, ValueError) as exc:
        raise type(exc)(_verl_names(str(exc))) from None
    return dict(knobs, clip_ratio_c=20.0 if clip_c is _MISSING or clip_c is None else float(clip_c))


def _verl_names(message: str) -> str:
    for key, name in VERL_KEYS.items():
        if message.startswith(name + " "):
            return f"{message} (verl key: actor.policy_loss.{key})"
    if message.startswith("delta "):
        return f"{message} (verl key: actor.clip_ratio)"
    return message


def _global_batch_info(config: Any) -> dict:
    info = _lookup(config, "global_batch_info")
    if info is _MISSING or info is None:
        return {}
    out = {}
    for key in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"):
        v = info.get(key) if hasattr(info, "get") else None
        if v is not None:
            out[key] = int(v) if key == "dp_size" else v
    return out


def _policy_loss(soft: bool, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                 rollout_is_weights):
    settings = cppo_settings(config, log_prob.shape[-1])
    loss, m = cppo_policy_loss(
        log_prob, old_log_prob, advantages, response_mask, soft=soft, loss_agg_mode=loss_agg_mode,
        token_weights=rollout_is_weights, **settings, **_global_batch_info(config),
    )
    metrics = {
        # verl's usual names, with CPPO's meaning: the share of valid tokens the mask
        # removes, the k1 KL(mu || pi) estimate, the share of kept tokens with rho > C.
        "actor/pg_clipfrac": m["masked_frac"],
        "actor/ppo_kl": m["approx_kl_k1"],
        "actor/pg_clipfrac_lower": m["truncated_frac"],
    }
    metrics.update({f"actor/cppo/{k}": v for k, v in m.items()})
    return loss, metrics


def compute_policy_loss_cppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """verl policy loss ``cppo``: returns ``(loss, metrics)`` with Python-float metrics."""
    return _policy_loss(False, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


def compute_policy_loss_cppo_soft(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """verl policy loss ``cppo_soft`` (soft gate, paper Appendix C)."""
    return _policy_loss(True, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                        rollout_is_weights)


_FUNCTIONS = {"cppo": compute_policy_loss_cppo, "cppo_soft": compute_policy_loss_cppo_soft}


def register() -> None:
    """Registers the modes in verl's registry (idempotent; replaces a ``cppo`` that
    another package or a newer verl registered, with a warning)."""
    registry = _core_algos.POLICY_LOSS_REGISTRY
    for name, fn in _FUNCTIONS.items():
        current = registry.get(name)
        if current is not None and current is not fn:
            _logger.warning("cppo-native replaces the verl policy loss %r registered by %s", name,
                            getattr(current, "__module__", "?"))
        _core_algos.register_policy_loss(name)(fn)


register()
