"""Baseline masks (PPO/GRPO clip, DPPO, TRM-Max, TRM-Avg) against plain loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cppo_native.torch as ct
from cppo_native import baselines as bl
from cppo_native.reference import binary_kl, binary_tv

CUDA = torch.cuda.is_available()


def data(seed, rows, cols, per_row):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.uniform(0.01, 1.0, (rows, cols)))
    lp = np.minimum(lq + rng.normal(0, 0.5, (rows, cols)), 0.0)
    # exact ties with the clip bounds and equal log-probs
    if rows and cols:
        lp[0, 0] = lq[0, 0]
    adv = rng.normal(size=(rows,)) if per_row else rng.normal(size=(rows, cols))
    if per_row and rows:
        adv[-1] = 0.0
    lengths = rng.integers(0, cols + 1, rows)
    valid = np.arange(cols)[None, :] < lengths[:, None]
    return lp, lq, adv, valid


def adv_at(adv, r, c):
    return adv[r] if adv.ndim == 1 else adv[r, c]


def loop_ppo(lp, lq, adv, valid, eps_low, eps_high):
    out = np.zeros(lp.shape, bool)
    for r in range(lp.shape[0]):
        for c in range(lp.shape[1]):
            if not valid[r, c]:
                continue
            rho = math.exp(lp[r, c] - lq[r, c])
            a = adv_at(adv, r, c)
            masked = (a > 0 and rho > 1 + eps_high) or (a < 0 and rho < 1 - eps_low)
            out[r, c] = not masked
    return out


def loop_dppo(lp, lq, adv, valid, delta, div):
    out = np.zeros(lp.shape, bool)
    for r in range(lp.shape[0]):
        for c in range(lp.shape[1]):
            if valid[r, c]:
                away = adv_at(adv, r, c) * (lp[r, c] - lq[r, c]) > 0
                out[r, c] = not (away and div(r, c) > delta)
    return out


def loop_trm(lp, lq, valid, div, delta_max=None, delta_avg=None):
    out = np.zeros(lp.shape, bool)
    for r in range(lp.shape[0]):
        ds = [div(r, c) for c in range(lp.shape[1]) if valid[r, c]]
        if not ds:
            continue
        drop = (delta_max is not None and max(ds) > delta_max) or (delta_avg is not None and sum(ds) / len(ds) > delta_avg)
        for c in range(lp.shape[1]):
            out[r, c] = valid[r, c] and not drop
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 5), cols=st.integers(0, 10), per_row=st.booleans(),
       eps=st.sampled_from([(0.2, None), (0.2, 0.28), (0.1, 0.5)]), torch_in=st.booleans())
def test_ppo_clip_mask_equals_loop(seed, rows, cols, per_row, eps, torch_in):
    lp, lq, adv, valid = data(seed, rows, cols, per_row)
    eps_low, eps_high = eps
    args = (lp, lq, adv, valid)
    if torch_in:
        args = tuple(torch.tensor(a) for a in args)
    got = bl.ppo_clip_mask(*args, eps_low=eps_low, eps_high=eps_high)
    assert isinstance(got, torch.Tensor) == torch_in
    want = loop_ppo(lp, lq, adv, valid, eps_low, eps_low if eps_high is None else eps_high)
    np.testing.assert_array_equal(np.asarray(got), want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), cols=st.integers(0, 10), per_row=st.booleans(),
       kind=st.sampled_from(["binary_tv", "binary_kl", "given"]), delta=st.sampled_from([0.02, 0.1, 0.3]))
def test_dppo_mask_equals_loop(seed, rows, cols, per_row, kind, delta):
    lp, lq, adv, valid = data(seed, rows, cols, per_row)
    given_d = np.random.default_rng(seed).uniform(0, 0.4, lp.shape)
    div = {"binary_tv": lambda r, c: binary_tv(lp[r, c], lq[r, c]),
           "binary_kl": lambda r, c: binary_kl(lp[r, c], lq[r, c]),
           "given": lambda r, c: given_d[r, c]}[kind]
    got = bl.dppo_mask(lp, lq, adv, valid, delta=delta, divergence=given_d if kind == "given" else kind)
    np.testing.assert_array_equal(got, loop_dppo(lp, lq, adv, valid, delta, div))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 5), cols=st.integers(0, 10),
       kind=st.sampled_from(["binary_tv", "binary_kl", "given"]),
       which=st.sampled_from(["max", "avg", "both"]), torch_in=st.booleans())
def test_trm_masks_equal_loop(seed, rows, cols, kind, which, torch_in):
    lp, lq, adv, valid = data(seed, rows, cols, True)
    given_d = np.random.default_rng(seed).uniform(0, 0.4, lp.shape)
    div = {"binary_tv": lambda r, c: binary_tv(lp[r, c], lq[r, c]),
           "binary_kl": lambda r, c: binary_kl(lp[r, c], lq[r, c]),
           "given": lambda r, c: given_d[r, c]}[kind]
    d_max = 0.25 if which in ("max", "both") else None
    d_avg = 0.08 if which in ("avg", "both") else None
    conv = (lambda a: torch.tensor(a)) if torch_in else (lambda a: a)
    d_arg = conv(given_d) if kind == "given" else kind
    if which == "max":
        got = bl.trm_max_mask(conv(lp), conv(lq), conv(adv), conv(valid), delta=d_max, divergence=d_arg)
    elif which == "avg":
        got = bl.trm_avg_mask(conv(lp), conv(lq), None, conv(valid), delta_avg=d_avg, divergence=d_arg)
    else:
        got = bl.trm_mask(conv(lp), conv(lq), conv(adv), conv(valid), delta_max=d_max, delta_avg=d_avg, divergence=d_arg)
    np.testing.assert_array_equal(np.asarray(got), loop_trm(lp, lq, valid, div, d_max, d_avg))


def test_trm_default_estimator_is_binary_kl():
    lp, lq, adv, valid = data(3, 6, 12, True)
    a = bl.trm_max_mask(lp, lq, adv, valid, delta=0.05)
    b = bl.trm_max_mask(lp, lq, adv, valid, delta=0.05, divergence="binary_kl")
    np.testing.assert_array_equal(a, b)


def test_ppo_mask_in_the_shared_loss_reproduces_the_ppo_clip_gradient():
    """With no truncation (C = inf), -A * sg(rho) * lp * keep_ppo has the gradient of
    PPO's clipped surrogate max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))."""
    lp, lq, adv, valid = data(5, 6, 15, False)
    lp_t, lq_t, adv_t, valid_t = (torch.tensor(x) for x in (lp, lq, adv, valid))
    keep = bl.ppo_clip_mask(lp_t, lq_t, adv_t, valid_t, eps_low=0.2, eps_high=0.28)
    x = lp_t.clone().requires_grad_()
    loss, _ = ct.masked_policy_loss(x, lq_t, adv_t, valid_t, keep, clip_ratio_c=math.inf)
    loss.backward()
    y = lp_t.clone().requires_grad_()
    rho = torch.exp(y - lq_t)
    ppo = torch.maximum(-adv_t * rho, -adv_t * torch.clamp(rho, 1 - 0.2, 1 + 0.28))
    (torch.where(valid_t, ppo, 0.0).sum() / valid_t.sum()).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-15)


def test_bad_inputs_name_row_and_column():
    lp, lq, adv, valid = data(7, 3, 5, False)
    valid[:] = True
    snapshot = [a.copy() for a in (lp, lq, adv, valid)]
    lp2 = lp.copy()
    lp2[2, 1] = np.nan
    adv2 = adv.copy()
    adv2[1, 4] = np.inf
    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .*\(row 2, column 1\)"):
        bl.ppo_clip_mask(lp2, lq, adv, valid)
    with pytest.raises(ValueError, match=r"advantages must be finite .*\(row 1, column 4\)"):
        bl.ppo_clip_mask(lp2, lq, adv2, valid)  # (1, 4) precedes (2, 1) in row-major order
    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .*\(row 2, column 1\)"):
        bl.trm_max_mask(lp2, lq, None, valid, delta=0.1)
    d = np.full(lp.shape, 0.1)
    d[0, 3] = -1.0
    with pytest.raises(ValueError, match=r"divergence must be finite and >= 0 .*\(row 0, column 3\)"):
        bl.trm_avg_mask(lp, lq, None, valid, delta_avg=0.1, divergence=d)
    valid[2, 1] = False
    bl.trm_max_mask(lp2, lq, None, valid, delta=0.1)  # invalid positions are not read
    with pytest.raises(ValueError, match="eps_low must be a finite number >= 0"):
        bl.ppo_clip_mask(lp, lq, adv, valid, eps_low=-0.1)
    with pytest.raises(ValueError, match="needs delta_max and/or delta_avg"):
        bl.trm_mask(lp, lq, adv, valid)
    with pytest.raises(ValueError, match="must be 2-D"):
        bl.trm_max_mask(lp[0], lq[0], None, None, delta=0.1)
    with pytest.raises(ValueError, match=r"advantages must have shape \(3, 5\) \(per token\) or \(3,\) \(per row\)"):
        bl.ppo_clip_mask(lp, lq, adv[:, :2], valid)
    with pytest.raises(TypeError, match="expected a numpy array or torch tensor"):
        bl.ppo_clip_mask(lp, lq.tolist(), adv, valid)
    for a, b in zip(snapshot[:3], (lp, lq, adv)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_baselines_on_cuda_match_cpu():
    lp, lq, adv, valid = data(9, 8, 40, True)
    cpu = [torch.tensor(a) for a in (lp, lq, adv, valid)]
    gpu = [a.cuda() for a in cpu]
    for fn, kw in ((bl.ppo_clip_mask, dict(eps_low=0.2, eps_high=0.28)), (bl.trm_max_mask, dict(delta=0.1)),
                   (bl.trm_avg_mask, dict(delta_avg=0.03)), (bl.dppo_mask, dict(delta=0.1))):
        a = fn(*cpu, **kw)
        b = fn(*gpu, **kw)
        assert b.device.type == "cuda"
        assert torch.equal(a, b.cpu()), fn.__name__
