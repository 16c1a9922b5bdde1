"""Fused Top-K divergence from logits (CuPy kernel) against a float64 reference.

GPU-marked: skipped without CUDA or CuPy. UNVERIFIED: these tests were written without
access to a GPU and have not run yet.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cppo_native import divergence as dv

HAVE_CUDA = torch.cuda.is_available()
try:
    import cupy  # noqa: F401

    HAVE_CUPY = True
except ImportError:
    HAVE_CUPY = False

requires_gpu = pytest.mark.skipif(not (HAVE_CUDA and HAVE_CUPY), reason="needs a CUDA device and CuPy")


def test_cpu_tensors_are_refused_with_a_clear_error():
    with pytest.raises(TypeError, match="logits must be a CUDA torch tensor"):
        dv.topk_divergence_from_logits(torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3),
                                       torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_kernel_compiles_with_nvrtc():
    """Compile check without a GPU: NVRTC (shipped with CUDA torch wheels) builds every
    instantiation the launcher uses for sm_90."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")
    from pathlib import Path

    from cppo_native._backends.cuda import topk as _topk_cuda

    src = (Path(_topk_cuda.__file__).parent / "kernels" / "topk_logits.cu").read_bytes()
    try:
        err, prog = nvrtc.nvrtcCreateProgram(src, b"topk_logits.cu", 0, [], [])
    except RuntimeError as exc:  # libnvrtc missing
        pytest.skip(f"NVRTC unavailable: {exc}")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    for name in _topk_cuda._NAMES:
        assert nvrtc.nvrtcAddNameExpression(prog, name.encode())[0] == nvrtc.nvrtcResult.NVRTC_SUCCESS
    opts = [b"--gpu-architecture=sm_90", b"--std=c++17"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    for name in _topk_cuda._NAMES:
        err, lowered = nvrtc.nvrtcGetLoweredName(prog, name.encode())
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS and lowered


def make(seed, n, vocab, k, dtype, *, temperature=1.0, pad=False, neg_inf=False, sampled_in=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    y = torch.randint(0, vocab, (n,), generator=g)
    if neg_inf:  # masked vocabulary entries; the sampled token keeps a finite logit
        logits[torch.rand(n, vocab, generator=g) < 0.05] = -float("inf")
        logits[torch.arange(n), y] = torch.randn(n, generator=g)
    logits = logits.to(dtype)
    # mu: a perturbation of pi (what a slightly stale rollout engine would produce)
    mu_logits = logits.double() + 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    lmu = torch.log_softmax(mu_logits / temperature, -1)
    ids = torch.topk(lmu, k, dim=-1).indices
    if k:
        y = torch.where(torch.rand(n, generator=g) < sampled_in, ids[:, 0], y)
    tlq = lmu.gather(-1, ids)
    lq = lmu.gather(-1, y[:, None])[:, 0]
    if pad and k:
        ids = torch.where(torch.rand(n, k, generator=g) < 0.2, -1, ids)
    return logits, ids, tlq, y, lq


def reference(logits, ids, tlq, y, lq, valid, kind, temperature):
    lpi = torch.log_softmax(logits.double() / temperature, -1)
    k = ids.shape[-1]
    safe = ids.clamp(min=0)
    tlp = lpi.gather(-1, safe) if k else torch.zeros(ids.shape, dtype=torch.float64)
    lp = lpi.gather(-1, y[:, None])[:, 0]
    d = dv.topk_divergence_reference(lp.numpy(), lq.numpy(), tlp.numpy(), tlq.numpy(), ids.numpy(), y.numpy(),
                                     None if valid is None else valid.numpy(), kind=kind)
    return d, lp.numpy(), tlp.numpy()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tv", "kl"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab,k", [(1000, 20), (1003, 5), (64, 0), (7, 7)])
def test_matches_float64_reference(dtype, kind, temperature, vocab, k):
    logits, ids, tlq, y, lq = make(0, 37, vocab, k, dtype, temperature=temperature, pad=True, neg_inf=True)
    valid = torch.rand(37, generator=torch.Generator().manual_seed(1)) < 0.85
    want, want_lp, want_tlp = reference(logits, ids, tlq, y, lq, valid, kind, temperature)
    d, lp, tlp = dv.topk_divergence_from_logits(
        logits.cuda(), ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda(), valid.cuda(), kind=kind,
        temperature=temperature, return_log_probs=True)
    assert d.device.type == "cuda" and d.dtype == torch.float64
    v = valid.numpy()
    np.testing.assert_allclose(lp.cpu().numpy()[v], want_lp[v], rtol=0, atol=2e-6)
    listed = (ids >= 0).numpy() & v[:, None]
    np.testing.assert_allclose(tlp.cpu().numpy()[listed], want_tlp[listed], rtol=0, atol=2e-6)
    np.testing.assert_allclose(d.cpu().numpy(), want, rtol=1e-5, atol=5e-6)
    assert np.all(d.cpu().numpy()[~v] == 0)


@pytest.mark.gpu
@requires_gpu
def test_unaligned_rows_and_leading_dims():
    logits, ids, tlq, y, lq = make(2, 24, 1001, 8, torch.bfloat16)
    big = torch.zeros(24, 1002, dtype=torch.bfloat16)
    big[:, 1:] = logits  # rows start 2 bytes past a 16-byte boundary: the scalar path
    got = dv.topk_divergence_from_logits(big[:, 1:].cuda(), ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda())
    want, _, _ = reference(logits, ids, tlq, y, lq, None, "tv", 1.0)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=5e-6)
    got3 = dv.topk_divergence_from_logits(logits.cuda().view(4, 6, 1001), ids.cuda().view(4, 6, 8),
                                          tlq.cuda().view(4, 6, 8), y.cuda().view(4, 6), lq.cuda().view(4, 6))
    assert got3.shape == (4, 6)
    np.testing.assert_allclose(got3.cpu().numpy().reshape(-1), want, rtol=1e-5, atol=5e-6)


@pytest.mark.gpu
@requires_gpu
def test_bad_inputs_name_position():
    logits, ids, tlq, y, lq = make(3, 10, 300, 4, torch.float32)
    args = [logits.cuda(), ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda()]
    bad = [a.clone() for a in args]
    bad[0][6, 17] = float("nan")
    with pytest.raises(ValueError, match=r"logits must be .* at \(index 6\)"):
        dv.topk_divergence_from_logits(*bad)
    bad = [a.clone() for a in args]
    bad[1][4, 2] = 300
    with pytest.raises(ValueError, match=r"topk_ids must be < the vocabulary size .* at \(index 4\), top-K slot 2"):
        dv.topk_divergence_from_logits(*bad)
    bad = [a.clone() for a in args]
    bad[1][5, 3] = bad[1][5, 0]
    with pytest.raises(ValueError, match=r"topk_ids must be distinct .*duplicate id .* \(index 5\), top-K slot 3"):
        dv.topk_divergence_from_logits(*bad)
    bad = [a.clone() for a in args]
    bad[2][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"topk_old_log_probs .* \(index 2\), top-K slot 1"):
        dv.topk_divergence_from_logits(*bad)
    valid = torch.ones(10, dtype=torch.bool, device="cuda")
    valid[2] = False
    dv.topk_divergence_from_logits(*bad, valid)  # invalid rows are not read


@pytest.mark.gpu
@pytest.mark.slow
@requires_gpu
def test_extra_memory_stays_small_at_training_size():
    n, vocab, k = 8192, 151936, 20
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, vocab - k, (n, 1), device="cuda") + torch.arange(k, device="cuda")  # distinct
    tlq = torch.log_softmax(torch.randn(n, k, device="cuda"), -1) - 1.0
    y = ids[:, 0].clone()
    lq = tlq[:, 0].clone()
    dv.topk_divergence_from_logits(logits, ids, tlq, y, lq)  # compile + warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    d = dv.topk_divergence_from_logits(logits, ids, tlq, y, lq)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2**20, extra
    assert torch.isfinite(d).all()
