"""torch.compile: the custom ops of cppo_native.ops and the loss traced whole.

``torch.compile(f, fullgraph=True)`` raises on any graph break, and dynamo's
``graph_break`` counter must stay empty; compiled results equal eager ones exactly (the
ops run the same backend inside; the rest is the same float64/float32 arithmetic).
Inputs are tiny to keep this fast. Most tests compile with the ``aot_eager`` backend
(dynamo + AOT autograd + the fake implementations, no code generation); one uses the
default Inductor backend, as trainers do.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cppo_native.ops  # noqa: F401  (registers torch.ops.cppo_native.*)
from cppo_native.ops import topk_divergence
from cppo_native.torch import cppo_policy_loss

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True)


def _batch(seed=0, b=3, length=8):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, length, generator=g, dtype=torch.float64) * 2
    lq = (lp + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)).clamp(max=0)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    valid = torch.rand(b, length, generator=g) < 0.8
    return lp, lq, adv, valid


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _mask_args(lp, lq, adv, valid, backend, cu=None, position_weight="linear"):
    return (lp, lq, adv, valid, None, cu, -1, 0.15, 0.02, 0.8, 0, True, 0.9, 1.0, 2.0, position_weight, -5, True,
            "binary_tv", True, 0, backend)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_opcheck_mask(backend):
    lp, lq, adv, valid = _batch()
    for position_weight in ("linear", "shuffled"):
        torch.library.opcheck(torch.ops.cppo_native.mask.default,
                              _mask_args(lp, lq, adv, valid, backend, position_weight=position_weight))
    cu = torch.tensor([0, 5, 5, 24])
    torch.library.opcheck(torch.ops.cppo_native.mask.default,
                          _mask_args(lp.reshape(-1), lq.reshape(-1), adv, valid.reshape(-1), backend, cu=cu))
    torch.library.opcheck(torch.ops.cppo_native.binary_divergence.default, (lp, lq, valid, "kl", True, 0, backend))


def _topk_inputs(lp, lq, k=4, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = lp.shape
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(lp.numel())]).reshape(*shape, k)
    mu = torch.log_softmax(torch.randn(*shape, k, generator=g, dtype=torch.float64), -1) - 1.0
    pi = (mu + 0.1 * torch.randn(*shape, k, generator=g, dtype=torch.float64)).clamp(max=0)
    return pi, mu, ids, ids[..., 0].clone()


def test_opcheck_topk():
    lp, lq, _, valid = _batch()
    pi, mu, ids, y = _topk_inputs(lp, lq)
    for kind in ("tv", "kl"):
        torch.library.opcheck(torch.ops.cppo_native.topk_divergence.default, (lp, lq, pi, mu, ids, y, valid, kind,
                                                                               True, 0))


def _loss_and_grad(fn, lp0, *rest):
    lp = lp0.clone().requires_grad_(True)
    loss, metrics = fn(lp, *rest)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("soft", [False, True])
def test_loss_fullgraph_equals_eager(backend, soft):
    lp, lq, adv, valid = _batch()

    def f(lp, lq, adv, valid):
        return cppo_policy_loss(lp, lq, adv, valid, soft=soft, backend=backend, metrics_as_tensors=True,
                                loss_agg_mode="seq-mean-token-mean", **KNOBS)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, grad_c, metrics_c = _loss_and_grad(compiled, lp, lq, adv, valid)
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_e, grad_e, metrics_e = _loss_and_grad(f, lp, lq, adv, valid)
    assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)
    assert metrics_c.keys() == metrics_e.keys()
    for k, v in metrics_e.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and torch.equal(metrics_c[k], v), k
    # The float metrics (default) are the same numbers.
    _, floats = cppo_policy_loss(lp, lq, adv, valid, soft=soft, backend=backend,
                                 loss_agg_mode="seq-mean-token-mean", **KNOBS)
    assert floats == {k: v.item() for k, v in metrics_e.items()}


def test_loss_with_topk_divergence_fullgraph():
    lp, lq, adv, valid = _batch(seed=2)
    pi, mu, ids, y = _topk_inputs(lp, lq)

    def f(lp, lq, adv, valid, pi, mu, ids, y):
        d = topk_divergence(lp.detach(), lq, pi, mu, ids, y, valid, kind="kl")
        return cppo_policy_loss(lp, lq, adv, valid, divergence=d, metrics_as_tensors=True, **KNOBS)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, grad_c, metrics_c = _loss_and_grad(compiled, lp, lq, adv, valid, pi, mu, ids, y)
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_e, grad_e, metrics_e = _loss_and_grad(f, lp, lq, adv, valid, pi, mu, ids, y)
    assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)
    assert torch.equal(metrics_c["divergence_mean"], metrics_e["divergence_mean"])


def test_loss_fullgraph_inductor():
    lp, lq, adv, valid = _batch(seed=3)
    lp, lq = lp.float(), lq.float()

    def f(lp, lq, adv, valid):
        return cppo_policy_loss(lp, lq, adv, valid, metrics_as_tensors=True, **KNOBS)

    compiled = torch.compile(f, fullgraph=True)
    loss_c, grad_c, metrics_c = _loss_and_grad(compiled, lp, lq, adv, valid)
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_e, grad_e, metrics_e = _loss_and_grad(f, lp, lq, adv, valid)
    # Inductor may fuse the float32 reduction differently: equal up to rounding.
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)
    assert torch.equal(metrics_c["masked_frac"], metrics_e["masked_frac"])


def test_bad_input_raises_under_compile():
    lp, lq, adv, valid = _batch()
    lp[0, 0], valid[0, 0] = 0.5, True

    def f(lp, lq, adv, valid):
        return cppo_policy_loss(lp, lq, adv, valid, metrics_as_tensors=True, backend="torch", **KNOBS)

    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .* \(row 0, column 0\)"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(lp, lq, adv, valid)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_loss_fullgraph_on_cuda(backend):
    """The same compile test on CUDA tensors (native = the CUDA kernels through CuPy;
    run by tools/gpu_check.sh's `pytest -m gpu`)."""
    if backend == "native":
        pytest.importorskip("cupy")
    lp, lq, adv, valid = (x.cuda() for x in _batch(seed=4))

    def f(lp, lq, adv, valid):
        return cppo_policy_loss(lp, lq, adv, valid, backend=backend, metrics_as_tensors=True, validate=False,
                                **KNOBS)

    compiled = torch.compile(f, fullgraph=True)
    loss_c, grad_c, metrics_c = _loss_and_grad(compiled, lp, lq, adv, valid)
    assert not counters["graph_break"], dict(counters["graph_break"])
    loss_e, grad_e, metrics_e = _loss_and_grad(f, lp, lq, adv, valid)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-12, atol=1e-12)
    assert torch.equal(metrics_c["masked_frac"], metrics_e["masked_frac"])
    # and the CPU result agrees (the mask is the same contract on both devices)
    loss_cpu, grad_cpu, _ = _loss_and_grad(f, *(x.cpu() for x in (lp, lq, adv, valid)))
    torch.testing.assert_close(loss_c.cpu(), loss_cpu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_c.cpu(), grad_cpu, rtol=1e-9, atol=1e-12)
