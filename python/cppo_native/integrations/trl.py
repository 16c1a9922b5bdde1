"""CPPO in TRL's ``GRPOTrainer`` (tested with trl 1.16.0).

TRL has no loss registry: ``GRPOTrainer._compute_loss`` is a fixed chain over
``loss_type``. :class:`CPPOGRPOTrainer` overrides it to compute the policy loss with
:func:`cppo_native.torch.cppo_policy_loss` (the CPPO mask, or the soft gate, in the
truncated-IS loss of paper Eq. 11); :class:`CPPOGRPOConfig` is ``GRPOConfig`` plus one
``cppo_<knob>`` field per entry of the knob table (``_core.params.KNOBS``) and
``cppo_soft``, ``cppo_clip_ratio_c``.

mu, the policy that sampled the tokens, is ``inputs["sampling_per_token_logps"]`` when the
generation engine (vLLM) returned log-probs, else ``inputs["old_per_token_logps"]``: the
trainer's own log-probs computed once per generation batch, which is mu when the batch
is reused (``num_iterations > 1``, or ``steps_per_generation`` not dividing
``gradient_accumulation_steps``). Otherwise TRL computes no old log-probs, mu equals the
current policy, and the mask keeps every token (a warning says so once).

TRL's ``loss_type`` chooses the aggregation (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``,
with TRL's own normalisers); the objectives ``cispo``, ``sapo``, ``vespo`` and ``luspo``,
sequence-level importance sampling, the off-policy sequence mask, the entropy bonus and
Liger's GRPO loss are refused at construction. ``beta`` (KL to the reference model) and
``top_entropy_quantile`` work as in TRL. See ``docs/trl.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

try:
    from trl import GRPOConfig as _GRPOConfig
    from trl import GRPOTrainer as _GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "cppo_native.integrations.trl needs TRL (tested with trl==1.16.0): pip install 'trl>=1.16'. "
        f"Importing trl failed with: {exc}"
    ) from exc

from .._core.params import KNOBS, knob, make_params
from ..torch import aggregate_loss, cppo_policy_loss

# loss_type -> cppo_native.torch loss_agg_mode. The normalisers are TRL's (see
# CPPOGRPOTrainer._aggregation); dr_grpo is the paper's seq-mean-token-sum-norm.
LOSS_TYPES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
REFUSED_LOSS_TYPES = ("cispo", "sapo", "vespo", "luspo")

# Python type of a config field per knob kind (TRL's argument parser needs plain types).
_FIELD_TYPES = {"float": float, "bool": bool, "int": int, "horizon": str, "position_weight": str, "divergence": str}
_EXTRA_FIELDS = ("cppo_soft", "cppo_clip_ratio_c")


def _field(name: str) -> Any:
    """A config field for knob ``name``: default and help text from the knob table (the
    paper's value for the knobs the mask requires, delta and delta_b)."""
    k = knob(name)
    default = k.paper if k.required else k.default
    if k.kind == "position_weight":
        default = k.check(k.name, default)  # True -> "linear": a string the CLI parser can take
    elif k.kind == "divergence" and default is None:
        default = "binary_tv"
    return field(default=default, metadata={"help": f"CPPO: {k.doc}"})


@dataclass
class CPPOGRPOConfig(_GRPOConfig):
    """``trl.GRPOConfig`` plus the CPPO knobs (``cppo_<knob>`` for each entry of
    ``cppo_native._core.params.KNOBS``), ``cppo_soft`` and ``cppo_clip_ratio_c``.

    ``loss_type`` picks the aggregation (``dapo``: token mean over the accumulated batch,
    TRL's default; ``dr_grpo``: the paper's seq-mean-token-sum-norm; ``grpo``, ``bnpo``).
    TRL's ``epsilon``/``epsilon_high``/``delta`` are not used (CPPO replaces the clip).
    """

    cppo_delta: float = _field("delta")
    cppo_delta_b: float = _field("delta_b")
    cppo_w_min: float = _field("w_min")
    cppo_horizon: str = _field("horizon")
    cppo_adaptive_budget: bool = _field("adaptive_budget")
    cppo_budget_quantile: float = _field("budget_quantile")
    cppo_budget_scale: float = _field("budget_scale")
    cppo_budget_ceiling: float = _field("budget_ceiling")
    cppo_position_weight: str = _field("position_weight")
    cppo_shuffle_seed: int = _field("shuffle_seed")
    cppo_prefix_budget: bool = _field("prefix_budget")
    cppo_divergence: str = _field("divergence")
    cppo_soft: bool = field(default=False, metadata={"help": "CPPO: the soft gate (paper Appendix C) instead of the hard mask"})
    cppo_clip_ratio_c: float = field(
        default=20.0, metadata={"help": "CPPO: truncation cap C of the importance ratio pi/mu (paper: 20; inf: none)"}
    )

    def __post_init__(self):
        super().__post_init__()
        # The CLI passes a fixed horizon as text.
        if isinstance(self.cppo_horizon, str) and self.cppo_horizon.isdigit():
            self.cppo_horizon = int(self.cppo_horizon)
        if self.cppo_divergence not in ("binary_tv", "binary_kl"):
            raise ValueError(f'cppo_divergence must be "binary_tv" or "binary_kl", got {self.cppo_divergence!r}')
        params = make_params(**{k.name: getattr(self, "cppo_" + k.name) for k in KNOBS})  # raises on bad values
        self.cppo_position_weight = params.position_weight
        c = self.cppo_clip_ratio_c
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
            raise ValueError(f"cppo_clip_ratio_c must be a number > 0 (inf: no truncation), got {c!r}")

    def cppo_loss_kwargs(self) -> dict:
        """The knob keywords of :func:`cppo_native.torch.cppo_policy_loss` for this config."""
        out = {k.name: getattr(self, "cppo_" + k.name) for k in KNOBS}
        out.update(soft=bool(self.cppo_soft), clip_ratio_c=float(self.cppo_clip_ratio_c))
        return out


def check_supported(args: Any) -> None:
    """Refuse the GRPOConfig settings CPPO cannot honour (raises ``ValueError``)."""
    if not isinstance(args, CPPOGRPOConfig):
        raise TypeError(f"CPPOGRPOTrainer needs a CPPOGRPOConfig, got {type(args).__name__}")
    problems = []
    if getattr(args, "use_liger_loss", False):
        problems.append("use_liger_loss=True: Liger's fused GRPO loss bypasses _compute_loss, so CPPO would not run")
    if (getattr(args, "liger_kernel_config", None) or {}).get("fused_linear_cross_entropy"):
        problems.append("liger_kernel_config fused_linear_cross_entropy=True: it replaces the model's forward "
                        "and with it the log-probs the CPPO loss reads")
    if args.loss_type in REFUSED_LOSS_TYPES:
        problems.append(f"loss_type={args.loss_type!r} is a different objective; CPPO replaces the policy objective "
                        f"and takes TRL's aggregation only from loss_type in {sorted(LOSS_TYPES)}")
    elif args.loss_type not in LOSS_TYPES:
        problems.append(f"unknown loss_type={args.loss_type!r}; expected one of {sorted(LOSS_TYPES)}")
    if args.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level={args.importance_sampling_level!r}: CPPO is token-level")
    if args.off_policy_mask_threshold is not None:
        problems.append("off_policy_mask_threshold: a second trust-region mask; CPPO's mask is the trust region")
    if args.delta is not None:
        problems.append("delta (TRL's two-sided clip): use cppo_clip_ratio_c, the truncation cap of pi/mu")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        problems.append("entropy_coef / use_adaptive_entropy: the entropy bonus is not supported with CPPO")
    if problems:
        raise ValueError("CPPOGRPOTrainer cannot run with: " + "; ".join(problems))


def mu_is_current_policy(args: Any) -> bool:
    """True when TRL computes neither sampling nor old log-probs: mu == pi, nothing masked."""
    generate_every = args.steps_per_generation * args.num_iterations
    uses_sampling_logps = args.use_vllm and args.vllm_importance_sampling_correction
    return args.gradient_accumulation_steps % generate_every == 0 and not uses_sampling_logps


class CPPOGRPOTrainer(_GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is CPPO's (:func:`cppo_native.torch.cppo_policy_loss`).

    Same constructor as ``GRPOTrainer``; ``args`` must be a :class:`CPPOGRPOConfig`.
    Logs ``cppo/<metric>`` for every metric of ``cppo_policy_loss`` (``cppo/masked_frac``,
    ``cppo/masked_prefix_budget_frac``, ``cppo/row_budget_mean``, ...), averaged over
    processes, plus ``cppo/mu_from_old_frac`` (valid tokens whose sampling log-prob was
    missing, where mu falls back to ``old_per_token_logps``).
    """

    _name = "CPPO-GRPO"

    def __init__(self, model, reward_funcs=None, args: Optional[CPPOGRPOConfig] = None, *rest, **kwargs):
        check_supported(args)
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._warned_mu_is_pi = False
        if mu_is_current_policy(args):
            self._warn_mu_is_pi()

    def _warn_mu_is_pi(self) -> None:
        if not self._warned_mu_is_pi:
            self._warned_mu_is_pi = True
            warnings.warn(
                "CPPO: TRL computes no rollout log-probs in this configuration (num_iterations=1, "
                "gradient_accumulation_steps a multiple of steps_per_generation, no vLLM importance sampling), "
                "so mu equals the current policy and the CPPO mask keeps every token. Set num_iterations > 1 "
                "or generate with vLLM (vllm_importance_sampling_correction=True) for CPPO to act.",
                stacklevel=3,
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Always CPPO's loss, whatever another TRL version routes here (e.g. a Liger path).
        if return_outputs:
            raise ValueError("CPPOGRPOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    def _rollout_log_probs(self, inputs: dict, per_token_logps: torch.Tensor, mask: torch.Tensor):
        """mu and the share of valid tokens where mu came from old_per_token_logps because
        the sampler gave no log-prob (vLLM marks those NaN)."""
        old = inputs.get("old_per_token_logps")
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is None:
            if old is None:
                self._warn_mu_is_pi()
                return per_token_logps.detach(), 0.0
            return old, 0.0
        missing = torch.isnan(sampling) & (mask != 0)
        if not bool(missing.any()):
            return sampling, 0.0
        if old is None:
            raise ValueError("CPPO: the sampler returned no log-prob (NaN) for some completion tokens and TRL "
                             "computed no old_per_token_logps to stand in for mu")
        return torch.where(missing, old, sampling), float(missing.sum()) / float((mask != 0).sum())

    def _aggregation(self, mask: torch.Tensor, inputs: dict) -> dict:
        """``loss_agg_mode`` and normaliser keywords that reproduce TRL's aggregation for
        ``self.loss_type``, gradient-accumulation scaling included."""
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        rows = mask.shape[0]
        if self.loss_type == "grpo":  # mean over all rows of per-row token means
            return dict(loss_agg_mode="seq-mean-token-mean", global_batch_size=rows * accum)
        if self.loss_type == "bnpo":  # token mean over the local batch
            return dict(loss_agg_mode="token-mean",
                        batch_num_tokens=(mask != 0).sum().clamp(min=1).to(torch.float32) * accum)
        if self.loss_type == "dr_grpo":  # sum / (rows * max_completion_length)
            return dict(loss_agg_mode="seq-mean-token-sum-norm", global_batch_size=rows * accum,
                        loss_scale_factor=self.max_completion_length)
        if self.loss_type == "dapo":  # token sum / valid tokens of the accumulated global batch, per process
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return dict(loss_agg_mode="token-mean", batch_num_tokens=normaliser)
        raise ValueError(f"unsupported loss_type {self.loss_type!r}")  # check_supported refused it already

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # As GRPOTrainer._compute_loss (trl 1.16.0).
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep,
            compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"), pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"), num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"), token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"), image_position_ids=inputs.get("image_position_ids"),
        )
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

        mu, mu_from_old_frac = self._rollout_log_probs(inputs, per_token_logps, mask)
        aggregation = self._aggregation(mask, inputs)
        # mu is the sampling policy itself, so pi/mu already includes vLLM's importance
        # correction: TRL's importance_sampling_ratio is not applied again.
        loss, metrics = cppo_policy_loss(
            per_token_logps, mu, inputs["advantages"], mask,
            token_weights=entropy_mask, **self.args.cppo_loss_kwargs(), **aggregation,
        )
        metrics["mu_from_old_frac"] = mu_from_old_frac

        mode = "train" if self.model.training else "eval"
        per_token_kl = None
        if self.beta != 0.0:  # KL to the reference model, as TRL adds it (k3, not entropy-masked)
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
            if self.args.use_bias_correction_kl:
                old = inputs.get("old_per_token_logps")
                old = per_token_logps.detach() if old is None else old
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old)
            loss = loss + self.beta * aggregate_loss(per_token_kl, mask, **aggregation)

        if self.aux_loss_enabled:
            normaliser = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normaliser
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_cppo_metrics(mode, metrics, mask, entropies, per_token_kl)
        return loss

    def _log_cppo_metrics(self, mode: str, metrics: dict, mask: torch.Tensor, entropies, per_token_kl) -> None:
        """TRL's ``entropy`` and ``kl`` plus ``cppo/<name>``, each a mean over the valid
        tokens (rows, for ``row_budget_mean``) of all processes."""
        valid = mask != 0
        n_tokens = float(valid.sum())
        n_rows = float(valid.any(-1).sum())
        names, sums, counts = [], [], []
        for name, value in metrics.items():
            if name == "num_valid_tokens":
                continue
            weight = n_rows if name == "row_budget_mean" else n_tokens
            names.append(name)
            sums.append(value * weight)
            counts.append(weight)
        fm = valid.to(entropies.dtype)
        extra = [("entropy", (entropies.detach() * fm).sum())]
        if per_token_kl is not None:
            extra.append(("kl", (per_token_kl.detach() * fm).sum()))
        local = torch.tensor(sums + counts, dtype=torch.float64, device=mask.device)
        local = torch.cat([local, torch.stack([v.to(torch.float64) for _, v in extra]),
                           torch.tensor([n_tokens], dtype=torch.float64, device=mask.device)])
        total = self.accelerator.reduce(local, reduction="sum").tolist()  # one all-reduce, one host read
        k = len(names)
        for i, name in enumerate(names):
            self._metrics[mode][f"cppo/{name}"].append(total[i] / max(total[k + i], 1.0))
        self._metrics[mode]["cppo/num_valid_tokens"].append(total[-1])
        for j, (name, _) in enumerate(extra):
            self._metrics[mode][name].append(total[2 * k + j] / max(total[-1], 1.0))
