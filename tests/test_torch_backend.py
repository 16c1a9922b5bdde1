"""The torch backend (``backend="torch"``) against the NumPy reference.

Rule applied: the spec's tolerance rule (shared/spec/CPPO.md, "Numerics"), not exact
equality. The torch backend calls torch's ``exp``/``log``/``expm1`` rather than the C
library's, and on CUDA its ``cumsum`` sums in another order, so: masks and reason codes
agree with the reference except where |Z_t - c_t| <= 1e-9 (Z_t and c_t from the
reference); thresholds, gates and row budgets agree to 1e-12 absolute; reason counts are
the histogram of the returned reasons. Tests marked ``gpu`` run the same checks on CUDA
(skipped without a CUDA device).
"""

from __future__ import annotations

import cppo_native
import numpy as np
import pytest
import torch
from cppo_native import cppo_mask
from cppo_native.reference import cppo_mask_reference, shuffle_permutation
from cppo_native.torch import cppo_policy_loss
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import Case, cases

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

TIE = 1e-9  # mask/reason may differ where |Z_t - c_t| <= TIE
ATOL = 1e-12  # thresholds, gates, row budgets
HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


def host(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_within_tolerance(mask, info, ref) -> None:
    """The spec's tolerance rule (module docstring)."""
    mask = host(mask)
    assert mask.dtype == np.bool_ and mask.shape == ref.mask.shape
    near = (ref.reason != 0) & (np.abs(ref.weighted_divergence - ref.threshold) <= TIE)
    far = ~near
    np.testing.assert_array_equal(mask[far], ref.mask[far])
    if info is None:
        return
    reason, threshold, gate = host(info.reason), host(info.threshold), host(info.gate)
    row_budget, counts = host(info.row_budget), host(info.reason_counts)
    assert reason.dtype == np.int8 and threshold.dtype == np.float64 and gate.dtype == np.float64
    assert row_budget.dtype == np.float64 and counts.dtype == np.int64 and counts.shape == (5,)
    np.testing.assert_array_equal(reason[far], ref.reason[far])
    np.testing.assert_array_equal(reason[near] == 1, ref.reason[near] == 1)  # toward-mu never flips
    np.testing.assert_array_equal(mask, (reason == 1) | (reason == 2))
    np.testing.assert_allclose(threshold, ref.threshold, rtol=0, atol=ATOL)
    np.testing.assert_allclose(gate, ref.gate, rtol=0, atol=ATOL)
    np.testing.assert_allclose(row_budget, ref.row_budget, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(counts, np.bincount(reason.reshape(-1), minlength=5))


def run_torch(case: Case, dtype=torch.float64, device="cpu", **extra):
    """(mask, info) of the torch backend on tensors of ``dtype`` and the reference on the
    same values widened to float64; the mask-only call must give the same mask."""
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    lp, lq = t(case.log_probs).to(dtype), t(case.old_log_probs).to(dtype)
    div = case.divergence
    if isinstance(div, np.ndarray):
        div = t(div).to(dtype)
    mask_arg = None if case.response_mask is None else t(case.response_mask)
    kw = dict(case.kwargs(), divergence=div)
    if case.cu_seqlens is not None:
        kw["cu_seqlens"] = t(case.cu_seqlens)
    args = (lp, lq, t(case.advantages), mask_arg)
    mask, info = cppo_mask(*args, **kw, **extra, return_info=True, backend="torch")
    assert mask.device.type == torch.device(device).type
    mask_only = cppo_mask(*args, **kw, **extra, backend="torch")
    assert torch.equal(mask_only, mask)
    wide = lambda x: x.to(torch.float64).cpu().numpy()  # noqa: E731  (exact widening)
    ref_kw = dict(case.kwargs(), divergence=wide(div) if isinstance(div, torch.Tensor) else div, **extra)
    ref = cppo_mask_reference(wide(lp), wide(lq), case.advantages, case.response_mask, **ref_kw)
    return mask, info, ref


# ---------------------------------------------------------------------------------------
# Random batches: both layouts, every knob, every float dtype.


@SETTINGS
@given(cases(), st.sampled_from(FLOAT_DTYPES), st.sampled_from([1.0, 2.0, 5.0]))
def test_matches_reference(case: Case, dtype, budget_ceiling):
    mask, info, ref = run_torch(case, dtype, budget_ceiling=budget_ceiling)
    assert_within_tolerance(mask, info, ref)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_rows=3, max_len=40), st.integers(0, 2**64 - 1))
def test_shuffled_ablation(case: Case, seed):
    case.knobs.update(position_weight="shuffled", shuffle_seed=seed)
    mask, info, ref = run_torch(case)
    assert_within_tolerance(mask, info, ref)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([1.0, 2.0, 5.0]), st.sampled_from([0.9, 0.0, 1.0, 0.37]))
def test_adaptive_budget(case: Case, budget_ceiling, q):
    case.knobs.update(adaptive_budget=True, budget_quantile=q)
    mask, info, ref = run_torch(case, budget_ceiling=budget_ceiling)
    assert_within_tolerance(mask, info, ref)


def test_shuffle_permutation_matches_reference():
    from cppo_native._backends.torch_ops import shuffle_permutations

    seeds = [0, 1, 12345, 2**63 - 1, 2**63, 2**63 + 7, 2**64 - 1]
    counts = torch.tensor([0, 1, 2, 3, 7, 31, 64])
    for seed in seeds:
        rows = torch.tensor([0, 1, 2, 5, 9, 1000, 2**40])
        perm = shuffle_permutations(counts, seed, 70, rows)
        for r in range(len(counts)):
            n = int(counts[r])
            assert perm[r, :n].tolist() == shuffle_permutation(n, seed, int(rows[r])), (seed, r)
            assert perm[r, n:].tolist() == list(range(n, 70))


# ---------------------------------------------------------------------------------------
# The worked example of docs/semantics.md and edge cases.


def test_worked_example():
    d = torch.tensor([[0.10, 0.12, 0.30, 0.05, 0.14]], dtype=torch.float64)
    lp = torch.full((1, 5), -0.1, dtype=torch.float64)
    lq = torch.full((1, 5), -0.2, dtype=torch.float64)
    for adv, keep, reason in ((1.0, [1, 0, 0, 0, 0], [2, 4, 3, 4, 4]), (-1.0, [1] * 5, [1] * 5)):
        mask, info = cppo_mask(lp, lq, torch.full((1,), adv), divergence=d, return_info=True, backend="torch",
                               delta=0.15, delta_b=0.02, w_min=0.8)
        assert mask.int().tolist() == [keep] and info.reason.tolist() == [reason]
        np.testing.assert_allclose(info.threshold[0].numpy(), [0.15, 0.07, -0.025, -0.277, -0.3025], atol=1e-12)
        assert info.row_budget.tolist() == [0.02]
    np.testing.assert_allclose(
        cppo_mask(lp, lq, torch.ones(1), divergence=d, return_info=True, backend="torch", **KNOBS)[1].gate[0, :2],
        [1.0, 1 / max(0.114 / 0.15, 0.214 / 0.17)], atol=1e-12)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (3, 0), (2, 1), (1, 1)])
def test_empty_and_tiny_padded(shape):
    rng = np.random.default_rng(0)
    lp = -rng.exponential(0.5, size=shape)
    lq = -rng.exponential(0.5, size=shape)
    adv = rng.normal(size=shape[0])
    case = Case(lp, lq, adv, None, None, None, dict(KNOBS, adaptive_budget=True))
    mask, info, ref = run_torch(case)
    assert_within_tolerance(mask, info, ref)
    assert tuple(mask.shape) == shape and tuple(info.row_budget.shape) == (shape[0],)


@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 3], [1], [1, 0, 1], [5, 0, 2, 1]])
def test_empty_and_tiny_packed(lengths):
    rng = np.random.default_rng(1)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(cu[-1])
    lp, lq = -rng.exponential(0.5, size=n), -rng.exponential(0.5, size=n)
    case = Case(lp, lq, rng.normal(size=len(lengths)), None, None, cu, dict(KNOBS, adaptive_budget=True), True)
    mask, info, ref = run_torch(case)
    assert_within_tolerance(mask, info, ref)


def test_all_padding_holes_and_nan_padding():
    rng = np.random.default_rng(2)
    lp = -rng.exponential(0.3, size=(3, 9))
    lq = np.minimum(lp + rng.normal(0, 0.2, size=lp.shape), 0.0)
    valid = np.ones(lp.shape, dtype=bool)
    valid[0] = False  # an all-padding row
    valid[1, [0, 3, 4, 8]] = False  # holes, padding first and last
    lp[~valid], lq[~valid] = np.nan, np.inf
    adv = rng.normal(size=lp.shape)
    adv[~valid] = np.nan
    d = rng.exponential(0.1, size=lp.shape)
    d[~valid] = -np.inf
    for div in (None, "binary_kl", d):
        case = Case(lp, lq, adv, valid, div, None, dict(KNOBS, adaptive_budget=True))
        mask, info, ref = run_torch(case)
        assert_within_tolerance(mask, info, ref)
        assert np.all(info.threshold[0].numpy() == 0.15) and info.row_budget[0].item() == 0.02


def test_numpy_inputs_give_numpy_outputs():
    lp = np.full((2, 4), -0.5, dtype=np.float32)
    mask, info = cppo_mask(lp, lp - 0.1, np.ones(2), return_info=True, backend="torch", **KNOBS)
    assert isinstance(mask, np.ndarray) and isinstance(info.reason, np.ndarray)
    assert isinstance(info.reason_counts, np.ndarray) and info.reason_counts.dtype == np.int64
    native = cppo_mask(lp, lp - 0.1, np.ones(2), **KNOBS)
    np.testing.assert_array_equal(mask, native)


def test_bad_backend_name():
    lp = torch.zeros(1, 1)
    with pytest.raises(ValueError, match='backend must be "native" or "torch"'):
        cppo_mask(lp, lp, torch.ones(1), backend="cuda", **KNOBS)


def test_missing_cupy_message_names_both_remedies(monkeypatch):
    import sys

    from cppo_native._backends.cuda import mask as cuda_mask

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ImportError) as err:
        cuda_mask.require_cupy()
    assert "pip install cupy-cuda12x" in str(err.value) and 'backend="torch"' in str(err.value)


# ---------------------------------------------------------------------------------------
# Bad input: the same messages as the native backend, first offending position.


def _bad_cases():
    lp = np.full((3, 4), -0.5)
    lq = np.full((3, 4), -0.4)
    adv = np.ones((3, 4))
    valid = np.ones((3, 4), dtype=bool)
    valid[0, 1] = False
    out = []
    for name, row, col, value in (("lp", 1, 2, 0.5), ("lq", 2, 0, np.nan), ("adv", 1, 3, np.inf),
                                  ("d", 0, 2, -1.0), ("lp", 0, 1, np.nan)):
        arrays = dict(lp=lp.copy(), lq=lq.copy(), adv=adv.copy(), d=np.full((3, 4), 0.01))
        arrays[name][row, col] = value
        arrays["lq"][2, 3] = 0.7  # a later offence: the first one must be reported
        out.append(arrays)
    return valid, out


@pytest.mark.parametrize("packed", [False, True])
def test_bad_input_same_message_as_native(packed):
    valid, all_arrays = _bad_cases()
    for arrays in all_arrays:
        kw = dict(KNOBS, divergence=torch.from_numpy(arrays["d"]))
        args = [torch.from_numpy(arrays[k]) for k in ("lp", "lq", "adv")] + [torch.from_numpy(valid)]
        if packed:
            args = [a.reshape(-1) for a in args]
            kw.update(cu_seqlens=torch.tensor([0, 4, 8, 12]), per_row_advantages=False,
                      divergence=kw["divergence"].reshape(-1))
        with pytest.raises(ValueError) as native:
            cppo_mask(*args, **kw)
        with pytest.raises(ValueError) as ours:
            cppo_mask(*args, **kw, backend="torch")
        assert str(ours.value) == str(native.value)
        cppo_mask(*args, **kw, backend="torch", validate=False)  # unchecked: no error


def test_bad_per_row_advantage_is_reported_at_the_rows_first_valid_token():
    lp = torch.full((2, 3), -0.5)
    valid = torch.tensor([[1, 1, 1], [0, 1, 1]])
    adv = torch.tensor([1.0, float("nan")])
    for backend in ("native", "torch"):
        with pytest.raises(ValueError, match=r"advantages must be finite .* at \(row 1, column 1\)"):
            cppo_mask(lp, lp, adv, valid, backend=backend, **KNOBS)


# ---------------------------------------------------------------------------------------
# The loss.


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_equals_native(soft, mode):
    rng = np.random.default_rng(3)
    lp0 = -rng.exponential(0.3, size=(4, 12))
    lq = torch.from_numpy(np.minimum(lp0 + rng.normal(0, 0.3, size=lp0.shape), 0.0))
    adv = torch.from_numpy(rng.normal(size=4))
    valid = torch.from_numpy(rng.random(lp0.shape) < 0.8)
    out = {}
    for backend in ("native", "torch"):
        lp = torch.from_numpy(lp0.copy()).requires_grad_(True)
        loss, metrics = cppo_policy_loss(lp, lq, adv, valid, soft=soft, loss_agg_mode=mode, adaptive_budget=True,
                                         backend=backend, **KNOBS)
        loss.backward()
        out[backend] = (loss.detach(), lp.grad, metrics)
    torch.testing.assert_close(out["torch"][0], out["native"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["torch"][1], out["native"][1], rtol=1e-12, atol=1e-12)
    assert out["torch"][2].keys() == out["native"][2].keys()
    for k, v in out["native"][2].items():
        assert out["torch"][2][k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a device): the same rule on the GPU.


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(FLOAT_DTYPES), st.sampled_from([1.0, 2.0, 5.0]))
def test_cuda_matches_reference(case: Case, dtype, budget_ceiling):
    mask, info, ref = run_torch(case, dtype, device="cuda", budget_ceiling=budget_ceiling)
    assert mask.is_cuda and info.reason.is_cuda and info.reason_counts.is_cuda
    assert_within_tolerance(mask, info, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_bad_input_and_loss():
    valid, all_arrays = _bad_cases()
    for arrays in all_arrays:
        args = [torch.from_numpy(arrays[k]) for k in ("lp", "lq", "adv")] + [torch.from_numpy(valid)]
        kw = dict(KNOBS, divergence=torch.from_numpy(arrays["d"]))
        with pytest.raises(ValueError) as native:
            cppo_mask(*args, **kw)
        with pytest.raises(ValueError) as ours:
            cppo_mask(*[a.cuda() for a in args], **dict(kw, divergence=kw["divergence"].cuda()), backend="torch")
        assert str(ours.value) == str(native.value)
    lp = -torch.rand(3, 7, dtype=torch.float64)
    lq = -torch.rand(3, 7, dtype=torch.float64)
    adv = torch.randn(3, dtype=torch.float64)
    cpu_loss, _ = cppo_policy_loss(lp, lq, adv, backend="native", **KNOBS)
    gpu_loss, _ = cppo_policy_loss(lp.cuda(), lq.cuda(), adv.cuda(), backend="torch", **KNOBS)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-12, atol=1e-12)
    assert cppo_native.__version__
