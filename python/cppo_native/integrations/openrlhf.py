"""CPPO as a drop-in for OpenRLHF's ``PolicyLoss`` (tested with openrlhf 0.11.2).

OpenRLHF builds ``openrlhf.models.loss.PolicyLoss`` in ``openrlhf/trainer/ray/ppo_actor.py``
and calls it as ``loss_fn(action_log_probs, old_action_log_probs, advantages,
action_mask=..., rollout_log_probs=experience.rollout_log_probs, **loss_batch_info)``,
unpacking ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``. :class:`PolicyLoss`
here has the same constructor parameters (plus keyword-only CPPO knobs from the knob
table), the same ``forward`` signature and the same return convention, and computes the
loss with :func:`cppo_native.torch.cppo_policy_loss`:

- mu is ``rollout_log_probs`` (the vLLM log-probs). OpenRLHF fetches them only when
  ``--algo.advantage.is_correction_level`` is ``token`` or ``seq``; without them
  ``forward`` raises.
- OpenRLHF's train/rollout correction: CPPO's ratio is already pi / mu, so the IS weight
  pi_old / mu is not applied again. Its *filter* (``is_correction_mode="mask"``: drop
  tokens or sequences whose statistic leaves ``is_correction_threshold``) is applied as
  an extra keep factor, computed as OpenRLHF computes it; ``"clip"`` mode (a clamped IS
  weight) is refused. ``--algo.advantage.is_correction_threshold 0 inf`` with ratio
  gating filters nothing.
- ``token_level_loss`` True is ``loss_agg_mode="token-mean"``, False is
  ``"seq-mean-token-mean"``; ``dp_size``, ``batch_num_tokens`` and ``global_batch_size``
  are honoured as in OpenRLHF.
- ``clip_eps_low`` / ``clip_eps_high`` are accepted and not used (CPPO's trust region is
  ``delta``); ``dual_clip`` and ``policy_loss_type="gspo"`` are refused.
- Returns: ``clip_ratio`` is the share of valid tokens the CPPO mask removes,
  ``ppo_kl`` the mean of ``old_log_probs - log_probs`` (as OpenRLHF), ``vllm_kl`` and
  ``is_filter_ratio`` as OpenRLHF (``None`` when the correction is off). Every
  ``cppo_native.torch`` metric of the last call is in ``self.last_metrics``.

Use :func:`policy_loss_class` to bind knobs, and :func:`install` to put that class where
``ppo_actor.py`` looks it up (``docs/openrlhf.md``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .._core.params import KNOB_NAMES, defaults, make_params
from ..torch import cppo_policy_loss

# Loss options besides the mask's knobs.
LOSS_OPTIONS = {"soft": False, "clip_ratio_c": 20.0, "num_threads": None}


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dim=None) -> torch.Tensor:
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


class PolicyLoss(torch.nn.Module):
    """CPPO policy loss with OpenRLHF's ``PolicyLoss`` interface (see the module doc)."""

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: list = (0.5, 5.0),
        **cppo: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(cppo) - set(KNOB_NAMES) - set(LOSS_OPTIONS))
        if unknown:
            raise TypeError(f"unknown CPPO option(s): {', '.join(unknown)}; expected some of "
                            f"{', '.join(KNOB_NAMES + tuple(LOSS_OPTIONS))}")
        knobs = {**defaults(paper=True), **{k: v for k, v in cppo.items() if k in KNOB_NAMES}}
        if not isinstance(knobs["divergence"], (str, type(None))):
            raise ValueError("divergence must be None, 'binary_tv' or 'binary_kl' here (no per-batch arrays)")
        make_params(**knobs)  # checks every knob now rather than at the first step
        self.cppo_knobs = knobs
        self.loss_options = {**LOSS_OPTIONS, **{k: v for k, v in cppo.items() if k in LOSS_OPTIONS}}
        if dual_clip is not None:
            raise ValueError("dual_clip is not used by CPPO (it truncates the ratio at clip_ratio_c): pass None")
        if policy_loss_type != "ppo":
            raise ValueError(f"the CPPO loss is token-level; policy_loss_type must be 'ppo', got {policy_loss_type!r}")
        if is_correction_level not in {"off", "token", "seq"}:
            raise ValueError(f"is_correction_level must be off/token/seq, got {is_correction_level}")
        if is_correction_mode != "mask":
            raise ValueError("is_correction_mode must be 'mask' with CPPO: its ratio is already pi/mu (truncated at "
                             f"clip_ratio_c), so a clamped pi_old/mu weight does not apply; got {is_correction_mode!r}")
        if is_correction_gating not in {"ratio", "binary_kl", "tv"}:
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {is_correction_gating}")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"is_correction_gating={is_correction_gating} takes an upper bound only (a single delta)")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        self.last_metrics: dict = {}

    def _correction_filter(self, old_log_probs, rollout_log_probs, action_mask):
        """OpenRLHF's mask-mode filter: (keep, filtered fraction), keep broadcastable to the tokens."""
        low, high = self.is_correction_threshold
        seq_level = self.is_correction_level == "seq"
        is_log_ratio = (old_log_probs - rollout_log_probs).detach()
        if self.is_correction_gating == "ratio":
            stat = _masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
            stat = stat.exp()
        else:
            p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
            if self.is_correction_gating == "binary_kl":
                stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
            else:
                stat = (p - q).abs()
            if seq_level:
                stat = _masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
        keep = (stat >= low) & (stat <= high)
        if seq_level:
            filtered_frac = (~keep).float().mean()
        else:
            filtered_frac = _masked_mean((~keep).float(), action_mask)
        return keep.expand_as(old_log_probs), filtered_frac

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ) -> torch.Tensor:
        if rollout_log_probs is None:
            raise ValueError(
                "the CPPO loss needs the rollout policy's log-probs (experience.rollout_log_probs), which OpenRLHF "
                "fetches from vLLM only with --algo.advantage.is_correction_level token (or seq); add "
                "--algo.advantage.is_correction_threshold 0 inf to keep its extra filter from dropping tokens"
            )
        token_weights = None
        vllm_kl = is_filter_ratio = None
        if self.is_correction_level != "off":
            keep, is_filter_ratio = self._correction_filter(old_log_probs, rollout_log_probs, action_mask)
            token_weights = keep.to(log_probs.dtype)
            vllm_kl = _masked_mean((rollout_log_probs - old_log_probs).detach(), action_mask)
        loss, metrics = cppo_policy_loss(
            log_probs, rollout_log_probs, advantages, action_mask,
            loss_agg_mode="token-mean" if self.token_level_loss else "seq-mean-token-mean",
            token_weights=token_weights, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, **self.cppo_knobs, **self.loss_options,
        )
        self.last_metrics = metrics
        clip_ratio = torch.tensor(metrics["masked_frac"], dtype=torch.float32, device=log_probs.device)
        ppo_kl = _masked_mean((old_log_probs - log_probs).detach(), action_mask)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def policy_loss_class(**cppo: Any) -> type:
    """A :class:`PolicyLoss` subclass whose CPPO knobs default to ``cppo`` (checked now),
    for code that constructs ``PolicyLoss(...)`` with OpenRLHF's arguments only."""
    PolicyLoss(**cppo)  # check the options once, here

    class BoundPolicyLoss(PolicyLoss):
        @functools.wraps(PolicyLoss.__init__)  # keeps OpenRLHF's signature visible
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**cppo, **kwargs})

    BoundPolicyLoss.__name__ = BoundPolicyLoss.__qualname__ = "PolicyLoss"
    BoundPolicyLoss.cppo_options = dict(cppo)
    return BoundPolicyLoss


def install(**cppo: Any) -> type:
    """Make OpenRLHF's PPO actor build the CPPO loss in this process: replaces
    ``openrlhf.trainer.ray.ppo_actor.PolicyLoss`` (the name ``ppo_actor.py`` calls) by
    :func:`policy_loss_class` ``(**cppo)`` and returns that class. Run it in every Ray
    worker that hosts the actor, e.g. as a Ray ``worker_process_setup_hook``."""
    from openrlhf.trainer.ray import ppo_actor

    cls = policy_loss_class(**cppo)
    ppo_actor.PolicyLoss = cls
    return cls
