"""Fused Top-K divergence from logits (CuPy kernel) against a float64 reference.

GPU-marked: skipped without CUDA or CuPy. UNVERIFIED: these tests were written without
access to a GPU and have not run yet (the NVRTC compile check runs everywhere).
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


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_compiles_with_cupys_options(arch):
    """Compile check without a GPU: NVRTC (shipped with CUDA torch wheels) builds every
    instantiation the launcher uses, with exactly the options CuPy 14.2 passes for
    RawModule(code, options=topk.OPTIONS, name_expressions=topk._NAMES); no spills."""
    from nvrtc import compile_program, cupy_options, find_nvrtc, spills

    from cppo_native._backends.cuda import topk as _topk_cuda

    lib = find_nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (set CPPO_NVRTC_LIB)")
    out = compile_program(lib, _topk_cuda.KERNEL_PATH.read_text(), cupy_options(_topk_cuda.OPTIONS, arch),
                          _topk_cuda._NAMES, filename="topk_logits.cu")
    assert out.cubin and set(out.lowered) == set(_topk_cuda._NAMES), out.log
    assert not any(spills(out.log).values()), out.log
    assert _topk_cuda.shared_bytes(_topk_cuda.MAX_K) + 2048 <= 48 * 1024  # + the static shared arrays


def test_chunking_keeps_temporaries_small():
    from cppo_native._backends.cuda import topk as _topk_cuda

    assert _topk_cuda.chunk_rows(10**7, 20, 0) == 10**7  # nothing converted: one launch
    per_row = 8 * 20 * 2 + 8 + 8 + 1
    step = _topk_cuda.chunk_rows(10**7, 20, per_row)
    assert step * per_row <= _topk_cuda.CHUNK_BYTES < (step + 1) * per_row
    assert _topk_cuda.chunk_rows(5, 20, per_row) == 5


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
    big = torch.zeros(24, 1002, dtype=torch.bfloat16, device="cuda")
    big[:, 1:] = logits.cuda()
    view = big[:, 1:]  # a real view: storage offset 1 (2 bytes past 16), row stride 1002
    assert view.storage_offset() == 1 and not view.is_contiguous() and view.data_ptr() % 16 == 2
    got = dv.topk_divergence_from_logits(view, ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda())
    want, _, _ = reference(logits, ids, tlq, y, lq, None, "tv", 1.0)
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=5e-6)
    got3 = dv.topk_divergence_from_logits(logits.cuda().view(4, 6, 1001), ids.cuda().view(4, 6, 8),
                                          tlq.cuda().view(4, 6, 8), y.cuda().view(4, 6), lq.cuda().view(4, 6))
    assert got3.shape == (4, 6)
    np.testing.assert_allclose(got3.cpu().numpy().reshape(-1), want, rtol=1e-5, atol=5e-6)


QWEN_V = 151936  # n_vec = V / 8 = 18992 >= 256: the two-loads main loop


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind,temperature,k", [("tv", 1.0, 20), ("kl", 1.0, 20), ("tv", 0.6, 20), ("tv", 1.0, 1),
                                                ("kl", 1.3, 2048)])
def test_matches_reference_at_qwen_vocabulary(dtype, kind, temperature, k):
    """The production shape's numerics: V = 151936 (vectorised two-loads loop), every
    logits dtype, K = 1, K = 20 and K = MAX_K, temperature; against
    cppo_native.divergence.topk_divergence on float64 log_softmax of the same logits."""
    from cppo_native._backends.cuda import topk as _topk_cuda

    assert k <= _topk_cuda.MAX_K
    n = 12
    logits, ids, tlq, y, lq = make(7, n, QWEN_V, k, dtype, temperature=temperature, pad=True, neg_inf=True)
    valid = torch.ones(n, dtype=torch.bool)
    valid[3] = False
    want, want_lp, want_tlp = reference(logits, ids, tlq, y, lq, valid, kind, temperature)
    d, lp, tlp = dv.topk_divergence_from_logits(
        logits.cuda(), ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda(), valid.cuda(), kind=kind,
        temperature=temperature, return_log_probs=True)
    v = valid.numpy()
    np.testing.assert_allclose(lp.cpu().numpy()[v], want_lp[v], rtol=0, atol=2e-6)
    listed = (ids >= 0).numpy() & v[:, None]
    np.testing.assert_allclose(tlp.cpu().numpy()[listed], want_tlp[listed], rtol=0, atol=2e-6)
    np.testing.assert_allclose(d.cpu().numpy(), want, rtol=1e-5, atol=5e-6)
    assert d.cpu().numpy()[3] == 0


@pytest.mark.gpu
@requires_gpu
def test_runs_on_the_callers_stream_without_sync():
    logits, ids, tlq, y, lq = make(4, 64, 4096, 20, torch.bfloat16)
    args = [t.cuda() for t in (logits, ids, tlq, y, lq)]
    want = dv.topk_divergence_from_logits(*args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    late = torch.zeros_like(args[0])
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        late.copy_(args[0])
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = dv.topk_divergence_from_logits(late, *args[1:], validate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    side.synchronize()
    assert torch.equal(got, want)


@pytest.mark.gpu
@requires_gpu
def test_paper_setting_end_to_end_policy_loss():
    """cppo_policy_loss with the Top-K TV (K = 20) computed from the policy's logits, all
    on CUDA: the loss equals the one computed from the CPU reference divergence."""
    from cppo_native.torch import cppo_policy_loss

    b, t, vocab, k = 4, 96, 5000, 20
    logits, ids, tlq, y, lq = make(9, b * t, vocab, k, torch.bfloat16, sampled_in=0.5)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, y[:, None])[:, 0].view(b, t)
    mask = torch.rand(b, t, generator=torch.Generator().manual_seed(3)) < 0.9
    adv = torch.randn(b, generator=torch.Generator().manual_seed(4))
    d_gpu = dv.topk_divergence_from_logits(logits.cuda().view(b, t, vocab), ids.cuda().view(b, t, k),
                                           tlq.cuda().view(b, t, k), y.cuda().view(b, t), lq.cuda().view(b, t),
                                           mask.cuda())
    want_d, _, _ = reference(logits, ids, tlq, y, lq, mask.reshape(-1), "tv", 1.0)
    np.testing.assert_allclose(d_gpu.cpu().numpy().reshape(-1), want_d, rtol=1e-5, atol=5e-6)
    knobs = dict(delta=0.15, delta_b=0.02)
    lp_cuda = lp.cuda().requires_grad_(True)
    loss_gpu, _ = cppo_policy_loss(lp_cuda, lq.view(b, t).float().cuda(), adv.cuda(), mask.cuda(),
                                   divergence=d_gpu.float(), **knobs)
    loss_gpu.backward()
    assert loss_gpu.device.type == "cuda"
    assert torch.isfinite(loss_gpu) and lp_cuda.grad is not None and torch.isfinite(lp_cuda.grad).all()
    loss_cpu, _ = cppo_policy_loss(lp.clone().requires_grad_(True), lq.view(b, t).float(), adv, mask,
                                   divergence=d_gpu.float().cpu(), **knobs)  # same D: only the mask backend differs
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5, atol=1e-6)


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
