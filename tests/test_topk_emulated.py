"""The Top-K-from-logits kernel (kernels/topk_logits.cu) run on the CPU emulator
(tests/cuda_emu) through the real launcher (cuda/topk.py `_compute`: argument tuple,
alignment choice, chunking, error record), against the float64 reference. The emulator
uses libm's exp2f/exp/log, not the GPU's, so the comparison uses the GPU tests'
tolerances; what it checks is the logic: the vectorised and scalar loops, the online
log-sum-exp and its NaN propagation, the parallel slot checks, the warp-0 bucket sums,
row chunking and the first-bad-row record."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cppo_native._backends.cuda import topk as _topk
from cuda_emulator import EmuTopkLauncher, compiler
from test_topk_logits_gpu import make, reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="the CUDA emulator needs a C++17 compiler (g++)")


def emulated(logits, ids, tlq, y, lq, valid=None, *, kind="tv", temperature=1.0, validate=True,
             return_log_probs=False, launcher=None):
    launcher = EmuTopkLauncher() if launcher is None else launcher
    return _topk._compute(logits, ids, tlq, y, lq, valid, kind=kind, temperature=temperature, validate=validate,
                          return_log_probs=return_log_probs, launcher=launcher)


def check(logits, ids, tlq, y, lq, valid, kind, temperature):
    want, want_lp, want_tlp = reference(logits.reshape(-1, logits.shape[-1]), ids, tlq, y, lq, valid, kind,
                                        temperature)
    d, lp, tlp = emulated(logits, ids, tlq, y, lq, valid, kind=kind, temperature=temperature, return_log_probs=True)
    v = np.ones(len(y), bool) if valid is None else valid.numpy()
    np.testing.assert_allclose(lp.numpy()[v], want_lp[v], rtol=0, atol=2e-6)
    listed = (ids >= 0).numpy() & v[:, None]
    np.testing.assert_allclose(tlp.numpy()[listed], want_tlp[listed], rtol=0, atol=2e-6)
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-5, atol=5e-6)
    assert np.all(d.numpy()[~v] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,temperature", [("tv", 1.0), ("kl", 0.7)])
@pytest.mark.parametrize("vocab,k", [(1000, 20), (4099, 5), (64, 0), (7, 7), (300, 1)])
def test_matches_reference(dtype, kind, temperature, vocab, k):
    logits, ids, tlq, y, lq = make(0, 9, vocab, k, dtype, temperature=temperature, pad=True, neg_inf=True)
    valid = torch.rand(9, generator=torch.Generator().manual_seed(1)) < 0.8
    check(logits, ids, tlq, y, lq, valid, kind, temperature)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qwen_vocabulary_two_loads_loop(dtype):
    """V = 151936: n_vec >= 256, the main loop with two 16-byte loads in flight."""
    logits, ids, tlq, y, lq = make(5, 3, 151936, 20, dtype, pad=True, neg_inf=True, sampled_in=0.5)
    launcher = EmuTopkLauncher()
    d = emulated(logits, ids, tlq, y, lq, launcher=launcher)
    assert launcher.launches[0][1] == (4 if dtype == torch.float32 else 8)  # the vectorised instantiation
    want, _, _ = reference(logits, ids, tlq, y, lq, None, "tv", 1.0)
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-5, atol=5e-6)


def test_max_k_and_misaligned_view():
    logits, ids, tlq, y, lq = make(6, 3, 5000, _topk.MAX_K, torch.bfloat16, pad=True, temperature=1.3)
    check(logits, ids, tlq, y, lq, None, "kl", 1.3)
    big = torch.zeros(3, 5001, dtype=torch.bfloat16)
    big[:, 1:] = logits
    view = big[:, 1:]
    assert view.storage_offset() == 1 and view.data_ptr() % 16 == 2
    launcher = EmuTopkLauncher()
    d = emulated(view, ids, tlq, y, lq, kind="kl", temperature=1.3, launcher=launcher)
    assert launcher.launches[0][1] == 1  # the scalar path
    want, _, _ = reference(logits, ids, tlq, y, lq, None, "kl", 1.3)
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-5, atol=5e-6)
    assert launcher.launches[0][4] == _topk.shared_bytes(_topk.MAX_K)


@pytest.mark.parametrize("where", ["vector", "tail", "all"])
def test_nan_logits_are_reported_without_a_separate_flag(where):
    """A NaN alone in its 16-byte chunk, in the scalar tail, or a whole row of NaN: the
    log-sum-exp carries it and the row is reported as bad logits."""
    logits, ids, tlq, y, lq = make(3, 6, 1003, 4, torch.float32)
    if where == "vector":
        logits[4, 8:12] = float("nan")  # one whole float4 chunk
    elif where == "tail":
        logits[4, 1001] = float("nan")  # past the last full chunk
    else:
        logits[4] = float("nan")
    with pytest.raises(ValueError, match=r"logits must be .* got a row with \d+ NaN, 0 \+inf at \(index 4\)"):
        emulated(logits, ids, tlq, y, lq)
    d = emulated(logits, ids, tlq, y, lq, validate=False)
    assert torch.isfinite(d[[0, 1, 2, 3, 5]]).all() and d[4] == 0


def test_bad_inputs_name_position_and_first_row_wins():
    logits, ids, tlq, y, lq = make(3, 10, 300, 4, torch.float32)
    args = [logits, ids, tlq, y, lq]
    bad = [a.clone() for a in args]
    bad[1][4, 2] = 300
    bad[1][7, 1] = 300
    with pytest.raises(ValueError, match=r"topk_ids must be < the vocabulary size .* at \(index 4\), top-K slot 2"):
        emulated(*bad)
    bad = [a.clone() for a in args]
    bad[1][5, 3] = bad[1][5, 0]
    bad[2][5, 1] = float("nan")  # an earlier slot's problem wins over the later duplicate
    with pytest.raises(ValueError, match=r"topk_old_log_probs .* \(index 5\), top-K slot 1"):
        emulated(*bad)
    bad = [a.clone() for a in args]
    bad[1][5, 3] = bad[1][5, 0]
    with pytest.raises(ValueError, match=r"topk_ids must be distinct .*duplicate id .* \(index 5\), top-K slot 3"):
        emulated(*bad)
    bad = [a.clone() for a in args]
    bad[3][6] = -1
    bad[4][2] = 0.5
    with pytest.raises(ValueError, match=r"old_log_probs must be .* \(index 2\)"):
        emulated(*bad)
    valid = torch.ones(10, dtype=torch.bool)
    valid[2] = valid[6] = False
    emulated(*bad, valid)  # invalid rows are not read


def test_chunked_launches_match_one_launch(monkeypatch):
    logits, ids, tlq, y, lq = make(8, 23, 500, 6, torch.bfloat16, pad=True)
    ids32, tlq32 = ids.to(torch.int32), tlq.float()  # converted per chunk
    whole = emulated(logits, ids32, tlq32, y, lq)
    monkeypatch.setattr(_topk, "CHUNK_BYTES", 5 * (6 * 8 * 2 + 16))  # 5 rows per launch
    launcher = EmuTopkLauncher()
    parts = emulated(logits, ids32, tlq32, y, lq, launcher=launcher)
    assert [g for _, _, g, _, _ in launcher.launches] == [5, 5, 5, 5, 3]
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    bad = ids32.clone()
    bad[17, 2] = 10**6
    bad[21, 0] = 10**6
    with pytest.raises(ValueError, match=r"\(index 17\), top-K slot 2"):  # global row, from the 4th launch
        emulated(logits, bad, tlq32, y, lq, launcher=EmuTopkLauncher())
