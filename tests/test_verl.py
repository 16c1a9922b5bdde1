"""The verl integration against the real verl package from PyPI (not mocked).

Needs verl importable (the Makefile's test venv installs it; see docs/verl.md for the
exact lines). Set CPPO_NATIVE_SKIP_VERL=1 to skip these tests deliberately.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if os.environ.get("CPPO_NATIVE_SKIP_VERL") == "1":
    pytest.skip("CPPO_NATIVE_SKIP_VERL=1", allow_module_level=True)
try:
    import verl  # noqa: F401
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # fail loudly: the test set-up is expected to install verl
    raise ImportError(
        "tests/test_verl.py needs verl: pip install --no-deps verl==0.9.1 && pip install -e '.[verl-test]' "
        f"(or set CPPO_NATIVE_SKIP_VERL=1). Import failed with: {exc}"
    ) from exc

from omegaconf import OmegaConf  # noqa: E402

import cppo_native.integrations.verl as cv  # noqa: E402
import cppo_native.torch as ct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(actor=None, **policy_loss):
    """verl's own actor config, built from verl's generated trainer YAML the way a
    worker builds it (``omega_conf_to_dataclass``), with user overrides applied."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    overrides = {
        "actor_rollout_ref.rollout.n": 4,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 2,
        "actor_rollout_ref.actor.clip_ratio": 0.15,
        "actor_rollout_ref.actor.clip_ratio_c": 20.0,
        "actor_rollout_ref.actor.policy_loss._target_": "cppo_native.integrations.verl.CPPOPolicyLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode": "cppo",
    }
    overrides.update({f"actor_rollout_ref.actor.{k}": v for k, v in (actor or {}).items()})
    overrides.update({f"actor_rollout_ref.actor.policy_loss.{k}": v for k, v in policy_loss.items()})
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)  # hydra's "+key=value"
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def random_batch(seed, rows=6, cols=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lq = torch.log(torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.98 + 0.02)
    lp = (lq + 0.4 * torch.randn(rows, cols, generator=g, dtype=torch.float64)).clamp(max=0.0)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).clone()
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).to(torch.float32)
    return lp.to(dtype), lq.to(dtype), adv.to(dtype), mask


def test_modes_are_found_through_verls_registry():
    assert core_algos.get_policy_loss_fn("cppo") is cv.compute_policy_loss_cppo
    assert core_algos.get_policy_loss_fn("cppo_soft") is cv.compute_policy_loss_cppo_soft


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_mode,soft", [("cppo", False), ("cppo_soft", True)])
def test_registered_loss_equals_cppo_native(mode, loss_mode, soft):
    config = actor_config(cppo_w_min=0.7, cppo_delta_b=0.015, cppo_delta_b_q=0.8, cppo_delta_b_k=1.5)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    for seed in range(4):
        lp, lq, adv, mask = random_batch(seed)
        x = lp.clone().requires_grad_()
        loss, metrics = fn(old_log_prob=lq, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                           config=config, rollout_is_weights=None)
        loss.backward()
        y = lp.clone().requires_grad_()
        want, m = ct.cppo_policy_loss(y, lq, adv, mask, delta=0.15, delta_b=0.015, w_min=0.7, adaptive_budget=True,
                                      budget_quantile=0.8, budget_scale=1.5, soft=soft, clip_ratio_c=20.0,
                                      loss_agg_mode=mode)
        want.backward()
        assert torch.equal(loss.detach(), want.detach())
        assert torch.equal(x.grad, y.grad)
        assert metrics["actor/pg_clipfrac"] == m["masked_frac"]
        assert metrics["actor/ppo_kl"] == m["approx_kl_k1"]
        assert metrics["actor/cppo/row_budget_mean"] == m["row_budget_mean"]
        assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("mode", MODES)
def test_degenerate_cppo_equals_verls_own_dppo_tv(mode):
    """With w_min = 1 and delta_b = 1 the prefix budget never binds (D <= 1), so CPPO is
    DPPO-Binary-TV; verl's own dppo_tv loss is an independent oracle for loss and grad."""
    # verl's dppo_tv reads clip_ratio_low/high (default 0.2); cppo reads clip_ratio only
    config = actor_config({"clip_ratio_low": 0.15, "clip_ratio_high": 0.15}, cppo_w_min=1.0, cppo_delta_b=1.0,
                          cppo_adaptive_budget=False)
    ours = core_algos.get_policy_loss_fn("cppo")
    theirs = core_algos.get_policy_loss_fn("dppo_tv")
    compared = 0
    for seed in range(6):
        lp, lq, adv, mask = random_batch(seed, rows=8, cols=40)
        gap = ((lp.exp() - lq.exp()).abs() - 0.15).abs()
        lp = torch.where(gap < 1e-4, lq, lp)  # keep float32 rounding away from the threshold
        grads = []
        losses = []
        for fn in (ours, theirs):
            x = lp.clone().requires_grad_()
            loss, _ = fn(old_log_prob=lq, log_prob=x, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                         config=config, rollout_is_weights=None)
            loss.backward()
            losses.append(loss.detach())
            grads.append(x.grad)
        torch.testing.assert_close(losses[0], losses[1], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(grads[0], grads[1], rtol=2e-6, atol=1e-8)
        compared += int((grads[0] != 0).sum())
    assert compared > 100


def test_rollout_is_weights_and_global_batch_info_are_honoured():
    config = actor_config()
    lp, lq, adv, mask = random_batch(3)
    w = torch.rand(lp.shape)
    config.global_batch_info.update(dp_size=4, batch_num_tokens=int(mask.sum()) * 4, global_batch_size=24,
                                    loss_scale_factor=None)
    fn = core_algos.get_policy_loss_fn("cppo")
    loss, _ = fn(old_log_prob=lq, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean",
                 config=config, rollout_is_weights=w)
    want, _ = ct.cppo_policy_loss(lp, lq, adv, mask, delta=0.15, delta_b=0.02, adaptive_budget=True,
                                  token_weights=w, dp_size=4, batch_num_tokens=int(mask.sum()) * 4)
    assert torch.equal(loss, want)
    base, _ = ct.cppo_policy_loss(lp, lq, adv, mask, delta=0.15, delta_b=0.02, adaptive_budget=True, token_weights=w)
    torch.testing.assert_close(loss, base)  # dp_size * local / global = local here


def test_end_to_end_through_verls_worker_loss():
    """verl's own worker-side ppo_loss (remove-padding layout, global batch info in the
    TensorDict) dispatches to the registered mode by config.policy_loss.loss_mode."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    config = actor_config(cppo_horizon="padded")
    g = torch.Generator().manual_seed(0)
    rows, prompt, resp = 3, 4, 7
    plen = torch.tensor([2, 4, 3])
    rlen = torch.tensor([7, 3, 5])
    att = torch.zeros(rows, prompt + resp, dtype=torch.int64)
    for b in range(rows):
        att[b, prompt - plen[b]:prompt] = 1
        att[b, prompt:prompt + rlen[b]] = 1
    response_mask = att[:, prompt:].clone()
    nnz = int((plen + rlen).sum())
    packed = torch.log(torch.rand(nnz, generator=g) * 0.9 + 0.05).requires_grad_()
    old = torch.log(torch.rand(rows, resp, generator=g) * 0.9 + 0.05)
    adv = torch.randn(rows, 1, generator=g).expand(rows, resp).clone()
    data = TensorDict({"prompts": torch.zeros(rows, prompt, dtype=torch.long),
                       "responses": torch.zeros(rows, resp, dtype=torch.long), "attention_mask": att,
                       "response_mask": response_mask, "old_log_probs": old, "advantages": adv}, batch_size=[rows])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(response_mask.sum()), global_batch_size=rows)
    loss, metrics = ppo_loss(config, {"log_probs": packed}, data)
    loss.backward()
    assert "actor/cppo/masked_frac" in metrics

    # the same log-probs, unpacked by hand: response token j of row b sits at
    # offset_b + plen_b - 1 + j in the packed (left-shifted) model output
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), (plen + rlen).cumsum(0)])
    leaf = packed.detach().clone().requires_grad_()
    lp = torch.zeros(rows, resp)
    for b in range(rows):
        start = int(offsets[b] + plen[b] - 1)
        lp[b, : rlen[b]] = leaf[start:start + int(rlen[b])]
    want, _ = ct.cppo_policy_loss(lp, old, adv, response_mask, delta=0.15, delta_b=0.02, adaptive_budget=True,
                                  horizon=resp, clip_ratio_c=20.0, batch_num_tokens=int(response_mask.sum()))
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(packed.grad, leaf.grad, rtol=1e-6, atol=1e-9)


def test_config_forms_and_defaults():
    lp, lq, adv, mask = random_batch(5)
    flat = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_c": 10.0, "global_batch_info": {},
                             "policy_loss": {"loss_mode": "cppo", "cppo_w_min": 0.9, "cppo_delta_b": 0.01}})
    nested = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_c": 10.0, "global_batch_info": {},
                               "policy_loss": {"loss_mode": "cppo", "cppo": {"cppo_w_min": 0.9, "cppo_delta_b": 0.01}}})
    s1 = cv.cppo_settings(flat, 24)
    assert s1 == cv.cppo_settings(nested, 24)
    assert s1 == dict(delta=0.2, delta_b=0.01, w_min=0.9, budget_quantile=0.9, budget_scale=1.0, adaptive_budget=True,
                      horizon="sequence", divergence="binary_tv", clip_ratio_c=10.0, budget_ceiling=2.0,
                      position_weight=True, shuffle_seed=0, prefix_budget=True)
    s5 = cv.cppo_settings({"clip_ratio": 0.2, "policy_loss": {"cppo_delta_b_max_mult": 5}}, 24)
    assert s5["budget_ceiling"] == 5
    with pytest.raises(ValueError, match=r"budget_ceiling must be >= 1.*cppo_delta_b_max_mult"):
        cv.cppo_settings({"clip_ratio": 0.2, "policy_loss": {"cppo_delta_b_max_mult": 0.5}}, 24)
    plain = {"clip_ratio": 0.2, "policy_loss": {"cppo_horizon": "padded", "cppo_divergence": "binary_kl"}}
    s2 = cv.cppo_settings(plain, 24)
    assert s2["horizon"] == 24 and s2["divergence"] == "binary_kl" and s2["clip_ratio_c"] == 20.0
    with pytest.raises(ValueError, match="cppo_horizon"):
        cv.cppo_settings({"clip_ratio": 0.2, "policy_loss": {"cppo_horizon": "full"}}, 24)
    with pytest.raises(ValueError, match="cppo_divergence"):
        cv.cppo_settings({"clip_ratio": 0.2, "policy_loss": {"cppo_divergence": "topk_tv"}}, 24)
    with pytest.raises(ValueError, match="actor.clip_ratio"):
        cv.cppo_settings({"policy_loss": {}}, 24)
    with pytest.raises(ValueError, match="needs verl's actor config"):
        cv.compute_policy_loss_cppo(lq, lp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match=r"w_min must be in \(0, 1\]"):
        cv.compute_policy_loss_cppo(lq, lp, adv, mask, "token-mean",
                                    {"clip_ratio": 0.2, "policy_loss": {"cppo_w_min": 0.0}})


def test_verls_stock_policy_loss_config_rejects_the_keys():
    """Why CPPOPolicyLossConfig exists: verl 0.9.1's dataclass refuses unknown keys."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer/config/_generated_ppo_trainer.yaml")
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.n", 4)
    OmegaConf.update(cfg, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", 2)
    OmegaConf.update(cfg, "actor_rollout_ref.actor.policy_loss.cppo_w_min", 0.8, force_add=True)
    with pytest.raises(Exception, match="cppo_w_min"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_verl_plugin_entry_point_registers_the_modes_on_import(tmp_path):
    """verl imports every 'verl.plugins' entry point when it is imported; cppo-native
    declares one (pyproject.toml). A dist-info carrying the same entry point stands in
    for the installed wheel's metadata."""
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."verl.plugins"]' in pyproject
    assert 'cppo_native = "cppo_native.integrations.verl"' in pyproject
    dist = tmp_path / "cppo_native_probe-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: cppo-native-probe\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[verl.plugins]\ncppo_native = cppo_native.integrations.verl\n")
    code = textwrap.dedent("""
        import sys
        import verl
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        fn = get_policy_loss_fn("cppo")
        assert fn.__module__ == "cppo_native.integrations.verl", fn.__module__
        assert "cppo_native.integrations.verl" in sys.modules
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "python")]),
               VERL_USE_EXTERNAL_PLUGINS="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
