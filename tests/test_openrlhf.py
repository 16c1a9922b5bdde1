"""cppo_native.integrations.openrlhf against the real OpenRLHF package (0.11.2).

How the real loss module is imported on a CPU machine (docs/openrlhf.md):
``openrlhf/models/__init__.py`` imports the actor (peft, transformers' DeepSpeed
integration, flash-attn paths) and ``openrlhf/models/utils.py`` does ``import deepspeed``
at the top, for ZeRO-3 helpers the loss never calls. The test therefore registers two
stand-ins in ``sys.modules`` before importing: an empty ``deepspeed`` module (only when
deepspeed is not installed), and a package object ``openrlhf.models`` whose ``__path__``
is the installed package's real ``models`` directory, so that the package's
``__init__`` is skipped. ``openrlhf/models/loss.py`` and ``openrlhf/models/utils.py``
are the installed, unmodified files, and the test asserts so.

openrlhf 0.11.2 ships wheels for CPython 3.10-3.12 only: on other versions, where the
Makefile cannot install it, this module is skipped with that reason. Elsewhere a missing
openrlhf fails loudly (set CPPO_NATIVE_SKIP_OPENRLHF=1 to skip deliberately).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

OPENRLHF_VERSION = "0.11.2"

if os.environ.get("CPPO_NATIVE_SKIP_OPENRLHF") == "1":
    pytest.skip("CPPO_NATIVE_SKIP_OPENRLHF=1", allow_module_level=True)
_spec = importlib.util.find_spec("openrlhf")
if _spec is None:
    if not (3, 10) <= sys.version_info[:2] <= (3, 12):
        pytest.skip(f"openrlhf {OPENRLHF_VERSION} has wheels for CPython 3.10-3.12 only (this is "
                    f"{sys.version_info[0]}.{sys.version_info[1]})", allow_module_level=True)
    raise ImportError(f"tests/test_openrlhf.py needs openrlhf: pip install --no-deps openrlhf=={OPENRLHF_VERSION} "
                      "(the Makefile's venv target does; or set CPPO_NATIVE_SKIP_OPENRLHF=1)")


def _import_real_loss_module():
    """Import the real loss.py (and utils.py) with the two stand-ins, then take every
    name this added out of sys.modules again, so that later tests (and libraries asking
    importlib whether deepspeed exists) never see a stand-in."""
    models_dir = Path(_spec.origin).parent / "models"
    names = ("deepspeed", "openrlhf", "openrlhf.models", "openrlhf.models.loss", "openrlhf.models.utils")
    before = {n: sys.modules.get(n) for n in names}
    try:
        if importlib.util.find_spec("deepspeed") is None:
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")  # utils.py imports it; the loss never uses it
        importlib.import_module("openrlhf")  # the real (empty) top-level __init__
        pkg = types.ModuleType("openrlhf.models")
        pkg.__path__ = [str(models_dir)]  # the real files; the package __init__ (actor, peft, ...) is skipped
        sys.modules["openrlhf.models"] = pkg
        sys.modules.pop("openrlhf.models.loss", None)
        sys.modules.pop("openrlhf.models.utils", None)
        loss = importlib.import_module("openrlhf.models.loss")
        return loss, sys.modules["openrlhf.models.utils"]
    finally:
        for n, m in before.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


orl_loss, orl_utils = _import_real_loss_module()

import cppo_native.torch as ct  # noqa: E402
from cppo_native.integrations import openrlhf as co  # noqa: E402

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True)


def test_real_module_is_the_installed_unmodified_file():
    from importlib.metadata import distribution, version

    assert version("openrlhf") == OPENRLHF_VERSION
    files = {str(f): f for f in distribution("openrlhf").files}
    for name, module in (("openrlhf/models/loss.py", orl_loss), ("openrlhf/models/utils.py", orl_utils)):
        f = files[name]
        assert Path(f.locate()).resolve() == Path(module.__file__).resolve()
        import base64
        import hashlib

        digest = base64.urlsafe_b64encode(hashlib.sha256(Path(f.locate()).read_bytes()).digest()).rstrip(b"=")
        assert f.hash.value == digest.decode(), f"{name} differs from the wheel's RECORD"


def test_signatures_match_the_real_policy_loss():
    real_init = list(inspect.signature(orl_loss.PolicyLoss.__init__).parameters.values())
    ours_init = list(inspect.signature(co.PolicyLoss.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours_init[: len(real_init)]] == [
        (p.name, p.kind, p.default) for p in real_init]
    assert [p.kind for p in ours_init[len(real_init):]] == [inspect.Parameter.VAR_KEYWORD]
    real_fwd = inspect.signature(orl_loss.PolicyLoss.forward).parameters.values()
    ours_fwd = inspect.signature(co.PolicyLoss.forward).parameters.values()
    assert [(p.name, p.kind, p.default) for p in ours_fwd] == [(p.name, p.kind, p.default) for p in real_fwd]
    bound = co.policy_loss_class(**KNOBS)
    assert list(inspect.signature(bound).parameters) == list(inspect.signature(co.PolicyLoss).parameters)


def batch(seed, rows=6, cols=30, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mu = torch.log(torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.95 + 0.03)
    old = torch.clamp(mu + 0.05 * torch.randn(rows, cols, generator=g, dtype=torch.float64), max=-1e-4)
    lp = torch.clamp(old + 0.4 * torch.randn(rows, cols, generator=g, dtype=torch.float64), max=-1e-4)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, cols).contiguous()
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    return lp.to(dtype), old.to(dtype), adv.to(dtype), mask


def call(fn, lp, old, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    out = fn(x, old, adv, action_mask=mask, rollout_log_probs=kw.pop("rollout", None), **kw)
    out[0].backward()
    return out, x.grad


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("level", ["token", "seq"])
def test_loss_equals_cppo_native_torch(token_level_loss, level):
    low, high = (0.8, 1.25) if level == "token" else (0.98, 1.02)
    ours = co.PolicyLoss(token_level_loss=token_level_loss, is_correction_level=level,
                         is_correction_threshold=(low, high), **KNOBS)
    for seed in range(3):
        lp, old, adv, mask = batch(seed)
        mu = (old.double() + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))).clamp(
            max=-1e-4).to(old.dtype)
        (loss, clip_ratio, ppo_kl, vllm_kl, filt), grad = call(ours, lp, old, adv, mask, rollout=mu)
        # the same tensors through cppo_native.torch, the filter as OpenRLHF defines it
        stat = (old - mu).double()
        if level == "seq":
            stat = ((stat * mask).sum(-1) / mask.sum(-1)).unsqueeze(-1)
        keep = ((stat.exp() >= low) & (stat.exp() <= high)).expand_as(old)
        x = lp.clone().requires_grad_()
        want, m = ct.cppo_policy_loss(x, mu, adv, mask, token_weights=keep.to(lp.dtype),
                                      loss_agg_mode="token-mean" if token_level_loss else "seq-mean-token-mean",
                                      **KNOBS)
        want.backward()
        assert loss.item() == want.item()
        assert torch.equal(grad, x.grad)
        assert clip_ratio.item() == pytest.approx(m["masked_frac"], rel=1e-6)
        assert ours.last_metrics == m
        assert 0 < m["masked_frac"] < 1 and 0 < filt.item() < 1


def vanilla_real(token_level_loss=True, threshold=(0.0, math.inf), level="token", gating="ratio"):
    # PPO with clipping disabled (eps = 1e9) and OpenRLHF's IS correction as a pure
    # weight pi_old/mu: per token -A * pi/mu, whose gradient is -A * rho.
    return orl_loss.PolicyLoss(clip_eps_low=1e9, clip_eps_high=1e9, token_level_loss=token_level_loss,
                               is_correction_level=level, is_correction_mode="mask", is_correction_gating=gating,
                               is_correction_threshold=threshold)


KEEP_ALL = dict(delta=1e3, delta_b=1.0, prefix_budget=False, clip_ratio_c=math.inf)


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_everything_matches_openrlhfs_own_vanilla_loss(token_level_loss, dtype):
    """CPPO knobs that keep every token (huge delta, no prefix budget, no cap) make the
    gradient that of OpenRLHF's own unclipped PPO loss with its IS correction (pi/mu):
    both are -A * pi/mu per token. Loss values differ by design (CPPO's value is
    -A * sg(rho) * log pi), so gradients and the returned statistics are compared."""
    for seed in range(3):
        lp, old, adv, mask = batch(seed, dtype=dtype)
        mu = (old + 0.05).clamp(max=-1e-4)
        theirs, g_theirs = call(vanilla_real(token_level_loss), lp, old, adv, mask, rollout=mu)
        ours, g_ours = call(co.PolicyLoss(token_level_loss=token_level_loss, is_correction_level="token",
                                          is_correction_threshold=(0.0, math.inf), **KEEP_ALL),
                            lp, old, adv, mask, rollout=mu)
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_ours, g_theirs, **tol)
        assert ours[1].item() == theirs[1].item() == 0.0  # nothing clipped / masked
        torch.testing.assert_close(ours[2], theirs[2])  # ppo_kl
        torch.testing.assert_close(ours[3], theirs[3])  # vllm_kl
        torch.testing.assert_close(ours[4], theirs[4])  # is_filter_ratio


@pytest.mark.parametrize("level,gating,threshold", [("token", "ratio", (0.9, 1.1)), ("seq", "ratio", (0.97, 1.03)),
                                                    ("token", "binary_kl", (0.0, 2e-3)), ("seq", "tv", (0.0, 0.035))])
def test_correction_filter_matches_openrlhfs(level, gating, threshold):
    """OpenRLHF's mask-mode filter, kept as an extra keep factor: the same tokens are
    dropped (same is_filter_ratio, and the same gradient with CPPO keeping the rest)."""
    lp, old, adv, mask = batch(7, dtype=torch.float64)
    mu = (old + 0.1 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1),
                                  dtype=torch.float64)).clamp(max=-1e-4)
    theirs, g_theirs = call(vanilla_real(True, threshold, level, gating), lp, old, adv, mask, rollout=mu)
    ours, g_ours = call(co.PolicyLoss(is_correction_level=level, is_correction_gating=gating,
                                      is_correction_threshold=threshold, **KEEP_ALL), lp, old, adv, mask, rollout=mu)
    assert 0 < theirs[4].item() < 1
    torch.testing.assert_close(ours[4], theirs[4])
    torch.testing.assert_close(ours[3], theirs[3])
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-12)


def test_dp_and_global_batch_info_as_openrlhf_passes_them():
    # OpenRLHF's get_loss_batch_info passes float32 tensors.
    lp, old, adv, mask = batch(3, dtype=torch.float64)
    mu = (old + 0.02).clamp(max=-1e-4)
    for tl, extra in ((True, dict(batch_num_tokens=torch.tensor(4.0 * mask.sum().item()))),
                      (False, dict(global_batch_size=torch.tensor(24.0)))):
        theirs, g_theirs = call(vanilla_real(tl), lp, old, adv, mask, rollout=mu, dp_size=4, **extra)
        ours, g_ours = call(co.PolicyLoss(token_level_loss=tl, is_correction_level="token",
                                          is_correction_threshold=(0.0, math.inf), **KEEP_ALL),
                            lp, old, adv, mask, rollout=mu, dp_size=4, **extra)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="batch_num_tokens must be > 0"):
        co.PolicyLoss(is_correction_level="token", **KNOBS)(lp, old, adv, mask, mu, 1, torch.tensor(0.0))


def test_refusals_and_errors():
    lp, old, adv, mask = batch(0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        co.PolicyLoss(**KNOBS)(lp, old, adv, action_mask=mask)
    with pytest.raises(ValueError, match="dual_clip"):
        co.PolicyLoss(dual_clip=3.0)
    with pytest.raises(ValueError, match="policy_loss_type"):
        co.PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="is_correction_mode"):
        co.PolicyLoss(is_correction_level="token", is_correction_mode="clip")
    with pytest.raises(TypeError, match="unknown CPPO option"):
        co.PolicyLoss(deltaa=0.1)
    with pytest.raises(ValueError, match="w_min"):
        co.policy_loss_class(w_min=0.0)
    # paper values for the required knobs; other knobs at the table's defaults
    assert co.PolicyLoss().cppo_knobs["delta"] == 0.15 and co.PolicyLoss().cppo_knobs["delta_b"] == 0.02


def test_policy_loss_class_and_install_into_a_ppo_actor_namespace(monkeypatch):
    """install() replaces the name ppo_actor.py calls. The real ppo_actor module needs
    deepspeed, ray and vLLM; a stand-in module object with that name receives it here
    (what is tested is the binding, not OpenRLHF's actor)."""
    cls = co.policy_loss_class(delta=0.2, delta_b=0.01, adaptive_budget=True, soft=True)
    loss_fn = cls(clip_eps_low=0.2, clip_eps_high=0.28, token_level_loss=False, is_correction_level="token")
    assert loss_fn.cppo_knobs["delta"] == 0.2 and loss_fn.loss_options["soft"] is True
    assert not loss_fn.token_level_loss
    stand_in = types.ModuleType("openrlhf.trainer.ray.ppo_actor")
    for name in ("openrlhf", "openrlhf.trainer", "openrlhf.trainer.ray"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    monkeypatch.setattr(sys.modules["openrlhf"], "trainer", sys.modules["openrlhf.trainer"], raising=False)
    monkeypatch.setattr(sys.modules["openrlhf.trainer"], "ray", sys.modules["openrlhf.trainer.ray"], raising=False)
    monkeypatch.setitem(sys.modules, "openrlhf.trainer.ray.ppo_actor", stand_in)
    monkeypatch.setattr(sys.modules["openrlhf.trainer.ray"], "ppo_actor", stand_in, raising=False)
    installed = co.install(delta=0.1, delta_b=0.02)
    assert stand_in.PolicyLoss is installed and installed().cppo_knobs["delta"] == 0.1
