"""cppo_native.torch: the CPPO loss against autograd of a plain PyTorch formula.

The plain formula takes the keep-mask (or gate) from the NumPy reference mask and
aggregates with explicit Python loops over rows, so nothing is shared with the module
under test but PyTorch itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cppo_native.torch as ct
from cppo_native import divergence as dv
from cppo_native.reference import binary_tv, cppo_mask_reference

CUDA = torch.cuda.is_available()
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def batch(seed, rows=4, cols=12, per_row=True, dtype=torch.float64, garbage=False):
    rng = np.random.default_rng(seed)
    lq = np.log(rng.uniform(0.02, 1.0, (rows, cols)))
    lp = np.minimum(lq + rng.normal(0.0, 0.6, (rows, cols)), 0.0)
    lengths = rng.integers(0, cols + 1, rows)
    valid = np.arange(cols)[None, :] < lengths[:, None]
    adv = rng.normal(size=(rows,)) if per_row else rng.normal(size=(rows, cols))
    if garbage:
        lp = np.where(valid, lp, np.nan)
        lq = np.where(valid, lq, 3.0)
        if not per_row:
            adv = np.where(valid, adv, np.inf)
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    return t(lp), t(lq), t(adv), torch.tensor(valid)


def plain_aggregate(term, valid, mode, scale=None):
    """verl's aggregation modes, with explicit loops over rows and tokens."""
    rows, cols = term.shape
    tokens = [[term[r, c] for c in range(cols) if valid[r, c]] for r in range(rows)]
    used = [x for x in tokens if x]
    zero = term.sum() * 0
    if not used:
        return zero
    if mode == "token-mean":
        return sum(sum(x) for x in used) / sum(len(x) for x in used)
    if mode == "token-sum":
        return sum(sum(x) for x in used)
    per = [sum(x) / len(x) for x in used] if mode == "seq-mean-token-mean" else [sum(x) for x in used]
    out = sum(per) / len(used)
    if mode == "seq-mean-token-sum-norm":
        out = out / (cols if scale is None else scale)
    return out


def plain_loss(lp, lq, adv, valid, weight, *, C, mode, scale=None):
    """-A * sg(min(rho, C)) * lp * weight, aggregated with explicit loops."""
    rows, cols = lp.shape
    if adv.dim() == 1:
        adv = adv[:, None].expand(rows, cols)
    rho = torch.exp(torch.clamp(lp.detach() - lq, -20.0, 20.0))
    term = -adv * torch.clamp(rho, max=C) * lp * weight
    return plain_aggregate(term, valid, mode, scale)


def reference_weight(lp, lq, adv, valid, soft, **mask_kw):
    res = cppo_mask_reference(lp.detach().double().numpy(), lq.double().numpy(), adv.double().numpy(),
                              valid.numpy(), **mask_kw)
    w = res.gate if soft else res.mask.astype(np.float64)
    return torch.tensor(w, dtype=lp.dtype), res


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 5),
    cols=st.integers(1, 14),
    per_row=st.booleans(),
    mode=st.sampled_from(MODES),
    soft=st.booleans(),
    C=st.sampled_from([20.0, 1.3, math.inf]),
    adaptive=st.booleans(),
    horizon=st.sampled_from(["sequence", 16]),
)
def test_loss_and_gradient_equal_plain_autograd(seed, rows, cols, per_row, mode, soft, C, adaptive, horizon):
    lp, lq, adv, valid = batch(seed, rows, cols, per_row)
    knobs = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=adaptive, horizon=horizon)
    weight, _ = reference_weight(lp, lq, adv, valid, soft, **knobs)

    x = lp.clone().requires_grad_()
    loss, metrics = ct.cppo_policy_loss(x, lq, adv, valid, soft=soft, clip_ratio_c=C, loss_agg_mode=mode, **knobs)
    loss.backward()
    y = lp.clone().requires_grad_()
    want = plain_loss(y, lq, adv, valid, weight, C=C, mode=mode)
    want.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-14)
    assert metrics["num_valid_tokens"] == int(valid.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_inputs(dtype, mode):
    lp, lq, adv, valid = batch(7, rows=6, cols=20, per_row=False, dtype=dtype)
    lp = lp.clamp(max=-1e-3)
    lq = lq.clamp(max=-1e-3)
    knobs = dict(delta=0.15, delta_b=0.02)
    weight, _ = reference_weight(lp, lq, adv, valid, False, **knobs)
    x = lp.clone().requires_grad_()
    loss, _ = ct.cppo_policy_loss(x, lq, adv, valid, loss_agg_mode=mode, **knobs)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    y = lp.float().clone().requires_grad_()
    want = plain_loss(y, lq.float(), adv.float(), valid, weight.float(), C=20.0, mode=mode)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.float(), y.grad.to(dtype).float(), rtol=1e-2, atol=1e-5)


def test_gradient_flows_only_through_log_probs():
    lp, lq, adv, valid = batch(3, per_row=False)
    x = lp.clone().requires_grad_()
    q = lq.clone().requires_grad_()
    a = adv.clone().requires_grad_()
    d = dv.binary_tv(lp, lq, valid).requires_grad_()
    loss, _ = ct.cppo_policy_loss(x, q, a, valid, delta=0.15, delta_b=0.02, divergence=d)
    loss.backward()
    assert x.grad is not None and q.grad is None and a.grad is None and d.grad is None
    keep, _ = reference_weight(lp, lq, adv, valid, False, delta=0.15, delta_b=0.02)
    rho = torch.exp(torch.clamp(lp - lq, -20, 20))
    want = -adv * torch.clamp(rho, max=20.0) * keep / valid.sum()
    torch.testing.assert_close(x.grad, torch.where(valid, want, torch.zeros(())), rtol=1e-12, atol=1e-15)
    assert torch.all(x.grad[keep == 0] == 0)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_garbage_at_invalid_positions_never_reaches_loss_or_gradient(per_row, mode):
    clean = batch(11, rows=5, cols=9, per_row=per_row)
    dirty = batch(11, rows=5, cols=9, per_row=per_row, garbage=True)
    results = []
    for lp, lq, adv, valid in (clean, dirty):
        x = lp.clone().requires_grad_()
        loss, metrics = ct.cppo_policy_loss(x, lq, adv, valid, delta=0.15, delta_b=0.02, loss_agg_mode=mode)
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    assert torch.isfinite(results[1][0])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][2] == results[1][2]
    assert torch.all(results[1][1][~clean[3]] == 0)


def test_metrics_match_reference_counts_and_plain_formulas():
    lp, lq, adv, valid = batch(5, rows=7, cols=25, per_row=True)
    knobs = dict(delta=0.1, delta_b=0.01, adaptive_budget=True)
    loss, m = ct.cppo_policy_loss(lp, lq, adv, valid, soft=True, clip_ratio_c=1.5, **knobs)
    res = cppo_mask_reference(lp.numpy(), lq.numpy(), adv.numpy(), valid.numpy(), **knobs)
    v = valid.numpy()
    n = v.sum()
    reason = res.reason[v]
    for code, name in [(1, "kept_toward_mu_frac"), (2, "kept_within_threshold_frac"),
                       (3, "masked_token_threshold_frac"), (4, "masked_prefix_budget_frac")]:
        assert m[name] == pytest.approx(np.sum(reason == code) / n, abs=1e-15)
    assert m["masked_frac"] == pytest.approx(np.sum(reason >= 3) / n, abs=1e-15)
    rows = v.any(1)
    assert m["row_budget_mean"] == pytest.approx(res.row_budget[rows].mean(), rel=1e-12)
    lpn, lqn = lp.numpy(), lq.numpy()
    d = np.array([binary_tv(a, b) for a, b in zip(lpn[v], lqn[v])])
    assert m["divergence_mean"] == pytest.approx(d.mean(), rel=1e-12)
    r = np.clip(lpn[v] - lqn[v], -20, 20)
    assert m["approx_kl_k1"] == pytest.approx(np.mean(-r), rel=1e-12)
    assert m["approx_kl_k3"] == pytest.approx(np.mean(np.exp(r) - 1 - r), rel=1e-9)
    assert m["truncated_frac"] == pytest.approx(np.mean((np.exp(r) > 1.5) & (res.gate[v] > 0)), abs=1e-15)
    assert m["gate_mean"] == pytest.approx(res.gate[v].mean(), rel=1e-12)
    assert m["num_valid_tokens"] == n
    assert all(isinstance(x, float) for x in m.values())


def test_worked_example_from_the_spec():
    # D = [0.10, 0.12, 0.30, 0.05, 0.14], all moving away from mu: keep = [1, 0, 0, 0, 0].
    d = torch.tensor([[0.10, 0.12, 0.30, 0.05, 0.14]], dtype=torch.float64)
    lq = torch.full((1, 5), -1.0, dtype=torch.float64)
    lp = torch.full((1, 5), -0.9, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0], dtype=torch.float64)
    loss, m = ct.cppo_policy_loss(lp, lq, adv, None, delta=0.15, delta_b=0.02, divergence=d)
    loss.backward()
    rho = math.exp(0.1)
    assert loss.item() == pytest.approx(-2.0 * rho * -0.9 / 5, rel=1e-14)
    torch.testing.assert_close(lp.grad, torch.tensor([[-2.0 * rho / 5, 0, 0, 0, 0]], dtype=torch.float64))
    assert m["kept_within_threshold_frac"] == 0.2 and m["masked_token_threshold_frac"] == 0.2
    assert m["masked_prefix_budget_frac"] == 0.6 and m["divergence_mean"] == pytest.approx(0.142)
    loss, m = ct.cppo_policy_loss(lp, lq, -adv, None, delta=0.15, delta_b=0.02, divergence=d)
    assert m["kept_toward_mu_frac"] == 1.0 and m["masked_frac"] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_options_and_data_parallel_scaling(mode):
    lp, lq, adv, valid = batch(13, rows=6, cols=10, per_row=False)
    valid[2] = False  # an empty row is not counted in sequence modes
    loss_mat = torch.randn(6, 10, dtype=torch.float64)
    loss_mat[~valid] = float("nan")  # never read
    base = ct.aggregate_loss(loss_mat, valid, mode)
    assert base.item() == pytest.approx(plain_aggregate(loss_mat, valid, mode).item(), rel=1e-12)
    n_tok, n_seq = int(valid.sum()), int(valid.any(1).sum())
    if mode in ("token-mean",):
        got = ct.aggregate_loss(loss_mat, valid, mode, dp_size=4, batch_num_tokens=4 * n_tok)
        assert got.item() == pytest.approx(base.item(), rel=1e-12)
        with pytest.raises(ValueError, match="needs the global batch_num_tokens"):
            ct.aggregate_loss(loss_mat, valid, mode, dp_size=2)
    elif mode == "token-sum":
        assert ct.aggregate_loss(loss_mat, valid, mode, dp_size=3).item() == pytest.approx(3 * base.item())
    else:
        got = ct.aggregate_loss(loss_mat, valid, mode, dp_size=4, global_batch_size=4 * n_seq)
        assert got.item() == pytest.approx(base.item(), rel=1e-12)
        with pytest.raises(ValueError, match="needs the global global_batch_size"):
            ct.aggregate_loss(loss_mat, valid, mode, dp_size=2)
    if mode == "seq-mean-token-sum-norm":
        got = ct.aggregate_loss(loss_mat, valid, mode, loss_scale_factor=40)
        assert got.item() == pytest.approx(base.item() * 10 / 40, rel=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_no_valid_token_gives_zero_loss_and_zero_gradient(mode):
    lp, lq, adv, _ = batch(17, rows=3, cols=4)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    x = lp.clone().requires_grad_()
    loss, m = ct.cppo_policy_loss(x, lq, adv, valid, delta=0.15, delta_b=0.02, loss_agg_mode=mode)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)
    assert m["num_valid_tokens"] == 0 and m["masked_frac"] == 0 and m["row_budget_mean"] == 0.02


def test_bad_inputs():
    lp, lq, adv, valid = batch(19, rows=3, cols=5, per_row=False)
    valid[:] = True
    bad = lp.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .*\(row 1, column 3\)"):
        ct.cppo_policy_loss(bad, lq, adv, valid, delta=0.15, delta_b=0.02)
    bad_adv = adv.clone()
    bad_adv[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"advantages must be finite .*\(row 2, column 0\)"):
        ct.cppo_policy_loss(lp, lq, bad_adv, valid, delta=0.15, delta_b=0.02)
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        ct.cppo_policy_loss(lp, lq, adv, valid, delta=0.15, delta_b=0.02, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="clip_ratio_c must be a number > 0"):
        ct.cppo_policy_loss(lp, lq, adv, valid, delta=0.15, delta_b=0.02, clip_ratio_c=0)
    with pytest.raises(TypeError, match="log_probs: expected a torch tensor"):
        ct.cppo_policy_loss(lp.numpy(), lq, adv, valid, delta=0.15, delta_b=0.02)
    with pytest.raises(ValueError, match=r"log_probs must be 2-D"):
        ct.cppo_policy_loss(lp[0], lq[0], adv[0], valid[0], delta=0.15, delta_b=0.02)
    with pytest.raises(ValueError, match=r"delta must be > 0"):
        ct.cppo_policy_loss(lp, lq, adv, valid, delta=0.0, delta_b=0.02)
    with pytest.raises(ValueError, match=r"advantages must have shape"):
        ct.masked_policy_loss(lp, lq, adv[:, :2], valid, valid)
    snapshot = [t.clone() for t in (lp, lq, adv, valid)]
    ct.cppo_policy_loss(lp, lq, adv, valid, delta=0.15, delta_b=0.02)
    for a, b in zip(snapshot, (lp, lq, adv, valid)):
        assert torch.equal(a, b)


def test_token_weights_multiply_the_terms():
    lp, lq, adv, valid = batch(23, per_row=False)
    w = torch.rand(lp.shape, dtype=torch.float64)
    x = lp.clone().requires_grad_()
    loss, _ = ct.cppo_policy_loss(x, lq, adv, valid, delta=0.15, delta_b=0.02, token_weights=w,
                                  loss_agg_mode="seq-mean-token-mean")
    keep, _ = reference_weight(lp, lq, adv, valid, False, delta=0.15, delta_b=0.02)
    y = lp.clone().requires_grad_()
    want = plain_loss(y, lq, adv, valid, keep * w, C=20.0, mode="seq-mean-token-mean")
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_loss_matches_cpu(soft, mode):
    lp, lq, adv, valid = batch(29, rows=8, cols=64, per_row=False)
    outs = []
    for dev in ("cpu", "cuda"):
        x = lp.clone().to(dev).requires_grad_()
        loss, m = ct.cppo_policy_loss(x, lq.to(dev), adv.to(dev), valid.to(dev), delta=0.15, delta_b=0.02,
                                      adaptive_budget=True, soft=soft, loss_agg_mode=mode)
        loss.backward()
        assert loss.device.type == dev
        outs.append((loss.detach().cpu(), x.grad.cpu(), m))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-14)
    for k in outs[0][2]:
        assert outs[1][2][k] == pytest.approx(outs[0][2][k], rel=1e-9, abs=1e-12)


def test_module_named_torch_still_uses_pytorch():
    import sys

    assert ct.torch is sys.modules["torch"] and ct.torch.Tensor is torch.Tensor
    assert ct.__name__ == "cppo_native.torch"
