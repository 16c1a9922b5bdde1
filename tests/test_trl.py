"""The TRL integration against the real trl package from PyPI (not mocked).

A real ``GRPOTrainer`` run (CPU, a tiny randomly initialised Llama and a word-level
tokenizer built here, no hub access) checks that the loss the trainer optimises is
``cppo_native.torch.cppo_policy_loss`` on the trainer's own tensors, and that the CPPO
metrics reach TRL's logs. Needs trl importable (the Makefile's test venv installs it via
the ``trl-test`` extra). Set CPPO_NATIVE_SKIP_TRL=1 to skip these tests deliberately.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if os.environ.get("CPPO_NATIVE_SKIP_TRL") == "1":
    pytest.skip("CPPO_NATIVE_SKIP_TRL=1", allow_module_level=True)
try:
    import trl  # noqa: F401
except ImportError as exc:  # fail loudly: the test set-up is expected to install trl
    raise ImportError(
        "tests/test_trl.py needs trl: pip install -e '.[test,trl-test]' (or set CPPO_NATIVE_SKIP_TRL=1). "
        f"Import failed with: {exc}"
    ) from exc

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import cppo_native.integrations.trl as ct  # noqa: E402
from cppo_native._core.params import KNOBS  # noqa: E402
from cppo_native.torch import cppo_policy_loss  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "yes", "no", "maybe", "the", "cat", "dog", "sat", "ran"]


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def reward_yes(completions, **kwargs):
    """Toy reward: the share of "yes" words in the completion."""
    return [c.split().count("yes") / max(len(c.split()), 1) for c in completions]


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, num_iterations=2,
        max_steps=3, learning_rate=0.05, seed=0, dataloader_num_workers=0, bf16=False,
        temperature=1.0, cppo_delta=0.05, cppo_delta_b=0.01,
    )
    values.update(overrides)
    return ct.CPPOGRPOConfig(**values)


class Recording(ct.CPPOGRPOTrainer):
    """Records each loss the trainer returns to backward, with the tensors it came from."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled():  # the loss's forward, not generation-time scoring
            self._last_logps = out[0]
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.records.append(dict(loss=loss, logps=self._last_logps, inputs=dict(inputs),
                                 accum=self.current_gradient_accumulation_steps))
        return loss


def make_trainer(tmp_path, cls=Recording, **overrides):
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"prompt": ["the cat", "the dog sat", "a b c", "yes no"]})
    return cls(model=tiny_model(tokenizer), reward_funcs=reward_yes, args=config(tmp_path, **overrides),
               train_dataset=dataset, processing_class=tokenizer)


KNOB_KWARGS = dict(delta=0.05, delta_b=0.01, w_min=0.8, horizon="sequence", adaptive_budget=False,
                   budget_quantile=0.9, budget_scale=1.0, budget_ceiling=2.0, position_weight="linear",
                   shuffle_seed=0, prefix_budget=True, divergence="binary_tv", soft=False, clip_ratio_c=20.0)


@pytest.mark.parametrize("loss_type, soft", [("dapo", False), ("dr_grpo", True)])
def test_trainer_optimises_cppo_policy_loss(tmp_path, loss_type, soft):
    trainer = make_trainer(tmp_path, loss_type=loss_type, cppo_soft=soft)
    trainer.train()
    assert trainer.state.global_step == 3
    assert len(trainer.records) == 3  # one micro-batch per optimizer step

    saw_drift = False
    for r in trainer.records:
        inputs = r["inputs"]
        assert "sampling_per_token_logps" not in inputs  # no vLLM: mu is old_per_token_logps
        mu = inputs["old_per_token_logps"]
        mask = inputs["completion_mask"]
        if loss_type == "dapo":  # TRL: token sum / (global valid tokens / processes * GA / steps_per_generation)
            num_processes, steps_per_generation = 1, 1
            agg = dict(loss_agg_mode="token-mean",
                       batch_num_tokens=inputs["num_items_in_batch"].clamp(min=1.0) / num_processes * r["accum"]
                       / steps_per_generation)
        else:  # TRL: token sum / (rows * max_completion_length), per GA step
            agg = dict(loss_agg_mode="seq-mean-token-sum-norm", global_batch_size=mask.shape[0] * r["accum"],
                       loss_scale_factor=8)
        expected, metrics = cppo_policy_loss(r["logps"].detach(), mu, inputs["advantages"], mask,
                                             **dict(KNOB_KWARGS, soft=soft), **agg)
        torch.testing.assert_close(r["loss"].detach(), expected, rtol=0, atol=0)
        assert r["loss"].requires_grad
        saw_drift |= metrics["masked_frac"] > 0 and not torch.equal(r["logps"].detach(), mu)

    # num_iterations=2: the second pass over a generation batch sees a moved policy,
    # and with delta=0.05 CPPO masks some of its tokens.
    assert saw_drift

    logged = [h for h in trainer.state.log_history if "cppo/masked_frac" in h]
    assert len(logged) == 3
    for name in ("masked_frac", "kept_toward_mu_frac", "kept_within_threshold_frac", "masked_token_threshold_frac",
                 "masked_prefix_budget_frac", "row_budget_mean", "divergence_mean", "approx_kl_k1", "approx_kl_k3",
                 "truncated_frac", "num_valid_tokens", "mu_from_old_frac"):
        assert all(math.isfinite(h[f"cppo/{name}"]) for h in logged), name
    assert all(("cppo/gate_mean" in h) == soft for h in logged)
    for h in logged:
        parts = (h["cppo/kept_toward_mu_frac"] + h["cppo/kept_within_threshold_frac"]
                 + h["cppo/masked_token_threshold_frac"] + h["cppo/masked_prefix_budget_frac"])
        assert parts == pytest.approx(1.0)
        assert h["cppo/masked_frac"] == pytest.approx(h["cppo/masked_token_threshold_frac"]
                                                      + h["cppo/masked_prefix_budget_frac"])
        assert h["cppo/row_budget_mean"] == pytest.approx(0.01)
    assert any(h["cppo/masked_frac"] > 0 for h in logged)


def test_mu_is_the_sampling_log_probs_when_present(tmp_path):
    """vLLM's sampling log-probs are mu; a token it could not score (NaN) takes the old
    log-prob and is counted. (No vLLM here: the recorded batch gets sampling log-probs.)"""
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    trainer.model.train()
    inputs = dict(trainer.records[0]["inputs"])
    old, mask = inputs["old_per_token_logps"], inputs["completion_mask"]
    sampling = (old - 0.3 * torch.rand(old.shape, generator=torch.Generator().manual_seed(1))).clamp(max=0)
    sampling[0, 0] = float("nan")  # completion tokens start at column 0: a valid token
    assert mask[0, 0] == 1
    inputs["sampling_per_token_logps"] = sampling
    loss = trainer._compute_loss(trainer.model, inputs)
    mu = sampling.clone()
    mu[0, 0] = old[0, 0]
    expected, _ = cppo_policy_loss(trainer._last_logps.detach(), mu, inputs["advantages"], mask, **KNOB_KWARGS,
                                   loss_agg_mode="token-mean",
                                   batch_num_tokens=inputs["num_items_in_batch"].clamp(min=1.0))
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)
    assert trainer._metrics["train"]["cppo/mu_from_old_frac"][-1] == pytest.approx(1 / float(mask.sum()))
    assert trainer._metrics["train"]["cppo/masked_frac"][-1] > 0

    del inputs["old_per_token_logps"]  # nothing to stand in for the missing log-prob
    with pytest.raises(ValueError, match="no log-prob"):
        trainer._compute_loss(trainer.model, inputs)


def parameter_grads(trainer, compute_loss, inputs):
    trainer.model.zero_grad(set_to_none=True)
    compute_loss(trainer, trainer.model, inputs).backward()
    return [p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", sorted(ct.LOSS_TYPES))
def test_inert_mask_gives_trls_gradient(tmp_path, loss_type):
    """With the mask inert (huge delta, no prefix budget, no truncation) CPPO's gradient
    is the unclipped ratio-advantage gradient, i.e. TRL's own loss with huge epsilon:
    checks mu, the aggregation/normaliser per loss_type, the KL term and the entropy mask
    against TRL's code, on a drifted batch (second pass with num_iterations=2), with
    gradient accumulation."""
    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)  # beta > 0: TRL loads the reference model from a path
    tokenizer.save_pretrained(model_dir)
    args = config(tmp_path / "out", loss_type=loss_type, max_steps=2, gradient_accumulation_steps=2,
                  beta=0.1, top_entropy_quantile=0.5,
                  epsilon=1e9, cppo_delta=1e9, cppo_prefix_budget=False, cppo_clip_ratio_c=math.inf)
    trainer = Recording(model=str(model_dir), reward_funcs=reward_yes, args=args,
                        train_dataset=Dataset.from_dict({"prompt": ["the cat", "the dog sat", "a b c", "yes no"]}),
                        processing_class=tokenizer)
    trainer.train()
    # steps_per_generation = GA = 2: step 1 takes the generation batch's two micro-batches,
    # step 2 (num_iterations=2) takes them again with the policy moved.
    assert len(trainer.records) == 4 and trainer.current_gradient_accumulation_steps == 2
    inputs = trainer.records[2]["inputs"]
    assert not torch.equal(trainer.records[2]["logps"].detach(), inputs["old_per_token_logps"])
    assert "ref_per_token_logps" in inputs
    trainer.model.train()
    ours = parameter_grads(trainer, ct.CPPOGRPOTrainer._compute_loss, inputs)
    theirs = parameter_grads(trainer, trl.GRPOTrainer._compute_loss, inputs)
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_config_fields_follow_the_knob_table():
    fields = {f.name: f for f in dataclasses.fields(ct.CPPOGRPOConfig) if f.name.startswith("cppo_")}
    assert set(fields) == {"cppo_" + k.name for k in KNOBS} | set(ct._EXTRA_FIELDS)
    for k in KNOBS:
        f = fields["cppo_" + k.name]
        want = k.paper if k.required else k.default
        assert want is not None or k.kind == "divergence", k.name
        # Same value once checked by the knob's own check (True == "linear", None == "binary_tv").
        assert k.check(k.name, f.default) == k.check(k.name, want), k.name
        assert f.metadata["help"] == f"CPPO: {k.doc}"
    assert fields["cppo_delta"].default == 0.15 and fields["cppo_delta_b"].default == 0.02
    assert fields["cppo_clip_ratio_c"].default == 20.0 and fields["cppo_soft"].default is False


def test_config_checks_knobs(tmp_path):
    with pytest.raises(ValueError, match="w_min"):
        config(tmp_path, cppo_w_min=1.5)
    with pytest.raises(ValueError, match="cppo_divergence"):
        config(tmp_path, cppo_divergence="topk")
    with pytest.raises(ValueError, match="cppo_clip_ratio_c"):
        config(tmp_path, cppo_clip_ratio_c=0)
    assert config(tmp_path, cppo_horizon="64").cppo_loss_kwargs()["horizon"] == 64


def test_config_parses_from_the_command_line(tmp_path):
    (args,) = trl.TrlParser((ct.CPPOGRPOConfig,)).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--cppo_delta", "0.2",
        "--cppo_horizon", "32", "--cppo_adaptive_budget", "true", "--cppo_position_weight", "shuffled",
        "--cppo_divergence", "binary_kl", "--cppo_soft", "true",
    ])
    kw = args.cppo_loss_kwargs()
    assert (kw["delta"], kw["horizon"], kw["adaptive_budget"], kw["position_weight"], kw["divergence"],
            kw["soft"]) == (0.2, 32, True, "shuffled", "binary_kl", True)


def test_liger_loss_is_refused(tmp_path):
    args = config(tmp_path)
    args.use_liger_loss = True  # the flag of TRL versions whose Liger GRPO loss bypasses _compute_loss
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="use_liger_loss=True"):
        ct.CPPOGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward_yes, args=args,
                           train_dataset=Dataset.from_dict({"prompt": ["a"]}), processing_class=tokenizer)
    args = config(tmp_path, use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})
    with pytest.raises(ValueError, match="fused_linear_cross_entropy"):
        ct.check_supported(args)


@pytest.mark.parametrize("overrides, match", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(delta=3.0), "cppo_clip_ratio_c"),
    (dict(entropy_coef=0.01), "entropy_coef"),
])
def test_unsupported_settings_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        ct.check_supported(config(tmp_path, **overrides))


def test_plain_grpo_config_is_refused(tmp_path):
    with pytest.raises(TypeError, match="CPPOGRPOConfig"):
        ct.check_supported(trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))


def test_warns_when_mu_is_the_current_policy(tmp_path):
    with pytest.warns(UserWarning, match="mu equals the current policy"):
        make_trainer(tmp_path, cls=ct.CPPOGRPOTrainer, num_iterations=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert not ct.mu_is_current_policy(config(tmp_path))  # num_iterations=2
