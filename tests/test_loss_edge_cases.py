"""cppo_native.torch at the edges: empty batches, bad tensor-valued batch scalars, huge
finite advantages (issue 14, section 6). Expected values are computed by hand here."""

from __future__ import annotations

import math

import pytest
import torch

import cppo_native.torch as ct

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batch_gives_zero_in_every_mode(mode, shape):
    lp = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    lq = torch.zeros(shape, dtype=torch.float64)
    adv = torch.zeros(shape[0], dtype=torch.float64)
    mask = torch.ones(shape, dtype=torch.bool)
    loss, _ = ct.cppo_policy_loss(lp, lq, adv, mask, delta=0.15, delta_b=0.02, loss_agg_mode=mode)
    assert loss.item() == 0.0
    loss.backward()
    assert lp.grad.shape == shape
    direct = ct.aggregate_loss(torch.zeros(shape), mask, mode)
    assert direct.item() == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_all_padding_batch_gives_zero_in_every_mode(mode):
    lp = torch.full((2, 4), float("nan"), requires_grad=True)
    loss, m = ct.cppo_policy_loss(lp, torch.zeros(2, 4), torch.ones(2), torch.zeros(2, 4, dtype=torch.bool),
                                  delta=0.15, delta_b=0.02, loss_agg_mode=mode)
    assert loss.item() == 0.0 and m["num_valid_tokens"] == 0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 4))


def _simple():
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.4]], dtype=torch.float64)).requires_grad_()
    lq = torch.log(torch.tensor([[0.5, 0.25, 0.4]], dtype=torch.float64))
    return lp, lq, torch.ones(1, dtype=torch.float64), torch.ones(1, 3, dtype=torch.bool)


@pytest.mark.parametrize("name,mode", [("batch_num_tokens", "token-mean"), ("global_batch_size", "seq-mean-token-sum"),
                                       ("loss_scale_factor", "seq-mean-token-sum-norm")])
@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), 0])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")])])
def test_tensor_batch_scalars_must_be_positive(name, mode, value, device):
    lp, lq, adv, mask = _simple()
    bad = torch.tensor(value, device=device)
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        ct.aggregate_loss(torch.ones(1, 3, device=device), mask.to(device), mode, **{name: bad})
    if device == "cpu":
        with pytest.raises(ValueError, match=f"{name} must be > 0"):
            ct.masked_policy_loss(lp, lq, adv, mask, torch.ones(1, 3, dtype=torch.bool), loss_agg_mode=mode,
                                  **{name: bad})
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        ct.cppo_policy_loss(lp.detach().to(device), lq.to(device), adv.to(device), mask.to(device), delta=0.15,
                            delta_b=0.02, loss_agg_mode=mode, **{name: bad})
    # and positive tensors keep working, with the value they hold
    good = torch.tensor(6.0, device=device)
    got = ct.aggregate_loss(torch.ones(1, 3, device=device), mask.to(device), mode, **{name: good})
    assert got.item() == pytest.approx(3.0 / 6.0)


def test_tensor_batch_scalars_shape_checked():
    with pytest.raises(ValueError, match="one-element tensor"):
        ct.aggregate_loss(torch.ones(1, 3), None, "token-mean", batch_num_tokens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="real number"):
        ct.aggregate_loss(torch.ones(1, 3), None, "token-mean", batch_num_tokens=torch.tensor(True))


def _huge_case(dtype, adv_dtype, huge):
    # Row 0: token 0 kept (A > 0, D small), token 1 masked (A > 0, moving away, D > delta).
    # Row 1: one token, masked, carrying the huge advantage.
    p = torch.tensor([[0.50, 0.30], [0.30, 0.30]], dtype=torch.float64)
    q = torch.tensor([[0.50, 0.05], [0.05, 0.05]], dtype=torch.float64)
    lp = p.log().to(dtype).requires_grad_()
    lq = q.log().to(dtype)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, huge], dtype=adv_dtype)
    return lp, lq, adv, mask


@pytest.mark.parametrize("dtype,adv_dtype,huge", [
    (torch.float64, torch.float64, 1e308),   # A * rho (rho = 6) overflows float64
    (torch.float32, torch.float64, 1e39),    # A becomes inf in the float32 computation
    (torch.float32, torch.float32, 3e38),    # A * rho (rho = 6) overflows float32
])
@pytest.mark.parametrize("mode", MODES)
def test_huge_advantage_at_masked_tokens_gives_finite_loss_and_exact_gradient(dtype, adv_dtype, huge, mode):
    lp, lq, adv, mask = _huge_case(dtype, adv_dtype, huge)
    loss, m = ct.cppo_policy_loss(lp, lq, adv, mask, delta=0.15, delta_b=0.02, loss_agg_mode=mode)
    assert m["masked_frac"] == pytest.approx(2 / 3)
    assert math.isfinite(loss.item())
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    # Only token (0, 0) is kept: rho = 1, A = 1, term -lp. Its gradient is -1 / denominator.
    denom = {"token-mean": 3, "token-sum": 1, "seq-mean-token-sum": 2, "seq-mean-token-mean": 4,
             "seq-mean-token-sum-norm": 4}[mode]
    want = torch.zeros(2, 2, dtype=dtype)
    want[0, 0] = -1.0 / denom
    torch.testing.assert_close(lp.grad, want)
    assert loss.item() == pytest.approx(-math.log(0.5) / denom, rel=1e-6)


def test_huge_finite_advantage_at_a_kept_token_is_not_hidden():
    # float64 throughout: A = 1e300 at a kept token gives a finite, huge loss and gradient.
    lp = torch.log(torch.tensor([[0.5]], dtype=torch.float64)).requires_grad_()
    loss, _ = ct.cppo_policy_loss(lp, lp.detach().clone(), torch.tensor([1e300], dtype=torch.float64), None,
                                  delta=0.15, delta_b=0.02)
    loss.backward()
    assert loss.item() == pytest.approx(1e300 * math.log(2.0))
    assert lp.grad.item() == pytest.approx(-1e300)


def test_soft_gate_with_huge_advantage_keeps_gated_terms():
    # soft gate: a masked token gets gate 1/x > 0, so its term stays (finite in float64).
    lp, lq, adv, mask = _huge_case(torch.float64, torch.float64, 1e10)
    loss, m = ct.cppo_policy_loss(lp, lq, adv, mask, delta=0.15, delta_b=0.02, soft=True)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(lp.grad).all()
    assert lp.grad[1, 0].item() < -1e8  # the gated huge-advantage term contributes
