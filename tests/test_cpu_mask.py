"""The Rust CPU backend against the NumPy reference (docs/semantics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cppo_native
from cppo_native import cppo_mask, cppo_mask_reference
from strategies import Case, assert_same_as_reference, cases, cpu_rule, reference_with_params, run_backend_with_params, run_both

# Garbage at invalid positions (1e300) overflows when cast to float16/32: intended.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


# ---------------------------------------------------------------------------------------
# Random batches: every knob, both layouts, against the float64 reference. Each check
# names its rule (strategies.cpu_rule): bit-exact for a given divergence and Binary KL;
# the spec's agreement rule (tie band 1e-9, outputs to 1e-12) for Binary TV, whose exp
# is the vectorised `vexp` (1 ulp) rather than libm's.


@SETTINGS
@given(cases())
def test_matches_reference_float64(case: Case):
    mask, info, ref = run_both(case)
    assert_same_as_reference(mask, ref, info=info, rule=cpu_rule(case.divergence))
    counts = np.bincount(np.asarray(info.reason).reshape(-1), minlength=5)
    np.testing.assert_array_equal(np.asarray(info.reason_counts), counts)


@SETTINGS
@given(cases(), st.booleans())
def test_budget_ceiling_matches_reference(case: Case, adaptive: bool):
    # budget_ceiling m (spec, "Per-row budget"): clamp(k Q, delta_b, m delta_b), drawn
    # from {1, 1.5, 2, 3.7, 5}; the Rust backend below the public API against the reference.
    mask, info = run_backend_with_params(case, adaptive_budget=adaptive or case.knobs["adaptive_budget"])
    ref = reference_with_params(case, adaptive_budget=adaptive or case.knobs["adaptive_budget"])
    assert_same_as_reference(mask, ref, info=info, rule=cpu_rule(case.divergence))
    counts = np.bincount(np.asarray(info.reason).reshape(-1), minlength=5)
    np.testing.assert_array_equal(info.reason_counts, counts)
    if case.budget_ceiling == 2.0:  # the default: what the public API computes
        np.testing.assert_array_equal(mask, cppo_mask(*case.args(), **dict(case.kwargs(), adaptive_budget=adaptive or case.knobs["adaptive_budget"])))


@pytest.mark.parametrize("ceiling", [1.0, 2.0, 5.0])
def test_budget_ceiling_bounds_row_budgets(ceiling):
    # Rows whose divergences are all large reach the ceiling m * delta_b; m = 1 pins every
    # row at delta_b; Rust and the reference agree on every output.
    rng = np.random.default_rng(3)
    lp = -rng.exponential(1.0, size=(6, 40))
    lq = np.minimum(lp + rng.normal(0, 1.0, size=lp.shape), 0.0)
    div = rng.exponential([[0.001], [0.01], [0.03], [0.06], [0.2], [1.0]], size=lp.shape)
    case = Case(lp, lq, rng.normal(size=6), None, div, None, dict(KNOBS, adaptive_budget=True), True, ceiling)
    mask, info = run_backend_with_params(case)
    ref = reference_with_params(case)
    assert_same_as_reference(mask, ref, info=info, rule="exact")  # given divergence
    assert np.all(info.row_budget >= 0.02) and np.all(info.row_budget <= ceiling * 0.02)
    assert info.row_budget[-1] == ceiling * 0.02
    if ceiling == 1.0:
        assert np.all(info.row_budget == 0.02)
    if ceiling == 5.0:
        assert np.any((info.row_budget > 2 * 0.02) & (info.row_budget < 5 * 0.02))


def test_budget_ceiling_is_checked():
    from cppo_native._core.params import make_params

    assert make_params(delta=0.15, delta_b=0.02).budget_ceiling == 2.0
    assert make_params(delta=0.15, delta_b=0.02, budget_ceiling=1).budget_ceiling == 1.0
    for bad, error in [(0.99, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("2", TypeError), (True, TypeError)]:
        with pytest.raises(error, match="budget_ceiling"):
            make_params(delta=0.15, delta_b=0.02, budget_ceiling=bad)


@SETTINGS
@given(cases(), st.sampled_from([np.float32, np.float16]))
def test_matches_reference_low_precision_numpy(case: Case, dtype):
    # The backend widens each element exactly, so the reference on the widened values
    # is the oracle and equality stays exact.
    lp = case.log_probs.astype(dtype)
    lq = case.old_log_probs.astype(dtype)
    adv = case.advantages.astype(np.float32)
    div = case.divergence
    if isinstance(div, np.ndarray):
        div = div.astype(dtype)
    low = Case(lp, lq, adv, case.response_mask, div, case.cu_seqlens, case.knobs, case.per_row)
    mask, info = cppo_mask(*low.args(), **low.kwargs(), return_info=True)
    np.testing.assert_array_equal(cppo_mask(*low.args(), **low.kwargs()), mask)
    wide = Case(
        lp.astype(np.float64), lq.astype(np.float64), adv.astype(np.float64), case.response_mask,
        div.astype(np.float64) if isinstance(div, np.ndarray) else div, case.cu_seqlens, case.knobs, case.per_row,
    )
    assert_same_as_reference(mask, cppo_mask_reference(*wide.args(), **wide.kwargs()), info=info, rule=cpu_rule(div))


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_torch_cpu_tensors(case: Case, dtype):
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    lp, lq = t(case.log_probs), t(case.old_log_probs)
    adv = torch.from_numpy(case.advantages).to(torch.float32)
    valid = None if case.response_mask is None else torch.from_numpy(case.response_mask).to(torch.int64)
    div = case.divergence
    if isinstance(div, np.ndarray):
        div = t(div)
    cu = None if case.cu_seqlens is None else torch.from_numpy(case.cu_seqlens).to(torch.int32)
    kw = dict(case.knobs, divergence=div, cu_seqlens=cu, per_row_advantages=case.per_row)
    mask, info = cppo_mask(lp, lq, adv, valid, **kw, return_info=True)
    assert torch.equal(cppo_mask(lp, lq, adv, valid, **kw), mask)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.device.type == "cpu"
    assert isinstance(info.reason, torch.Tensor) and info.reason.dtype == torch.int8
    wide = lambda x: x.to(torch.float64).numpy()  # noqa: E731
    ref = cppo_mask_reference(
        wide(lp), wide(lq), wide(adv), case.response_mask,
        **dict(case.knobs, divergence=wide(div) if isinstance(div, torch.Tensor) else div, cu_seqlens=case.cu_seqlens,
               per_row_advantages=case.per_row),
    )
    assert_same_as_reference(mask.numpy(), ref, info=type(info)(*(x.numpy() for x in (info.reason, info.threshold, info.gate, info.row_budget, info.reason_counts))),
                             rule=cpu_rule(div))


@settings(max_examples=150, deadline=None)
@given(cases(packed=False))
def test_padded_and_packed_agree(case: Case):
    """The same rows give the same answer in both layouts."""
    b, l = case.log_probs.shape
    valid = np.ones((b, l), bool) if case.response_mask is None else case.response_mask
    # Pack the whole padded row (padding included: it is just invalid positions).
    cu = np.arange(b + 1, dtype=np.int64) * l
    flat = lambda a: None if a is None or isinstance(a, str) else a.reshape(-1)  # noqa: E731
    adv = case.advantages if case.advantages.shape == (b,) else case.advantages.reshape(-1)
    div = case.divergence if not isinstance(case.divergence, np.ndarray) else flat(case.divergence)
    padded, pinfo = cppo_mask(*case.args(), **case.kwargs(), return_info=True)
    packed, kinfo = cppo_mask(flat(case.log_probs), flat(case.old_log_probs), adv, flat(valid),
                              **dict(case.knobs, divergence=div, cu_seqlens=cu), return_info=True,
                              per_row_advantages=case.per_row)
    np.testing.assert_array_equal(packed.reshape(b, l), padded)
    for name in ("reason", "threshold", "gate"):
        np.testing.assert_array_equal(getattr(kinfo, name).reshape(b, l), getattr(pinfo, name))
    np.testing.assert_array_equal(kinfo.row_budget, pinfo.row_budget)


@settings(max_examples=100, deadline=None)
@given(cases(packed=False, max_rows=3, max_len=12))
def test_packed_segments_are_independent_rows(case: Case):
    """Packing only the valid spans (as verl's remove-padding does) keeps each row's
    answer when horizon is fixed (with horizon="sequence", T is the same too, since a
    row's last valid index is unchanged by dropping trailing padding)."""
    b, l = case.log_probs.shape
    valid = np.ones((b, l), bool) if case.response_mask is None else case.response_mask
    ends = np.array([(np.flatnonzero(valid[r]).max() + 1) if valid[r].any() else 0 for r in range(b)], dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(ends)]).astype(np.int64)
    cat = lambda a: np.concatenate([a[r, : ends[r]] for r in range(b)]) if b else a.reshape(-1)[:0]  # noqa: E731
    adv = case.advantages if case.advantages.shape == (b,) else cat(case.advantages)
    div = case.divergence if not isinstance(case.divergence, np.ndarray) else cat(case.divergence)
    padded = cppo_mask(*case.args(), **case.kwargs())
    packed = cppo_mask(cat(case.log_probs), cat(case.old_log_probs), adv, cat(valid),
                       **dict(case.knobs, divergence=div, cu_seqlens=cu),
                       per_row_advantages=case.advantages.shape == (b,))
    np.testing.assert_array_equal(packed, cat(padded))


# ---------------------------------------------------------------------------------------
# The spec's worked example, literally.

WORKED_D = np.array([[0.10, 0.12, 0.30, 0.05, 0.14]])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_worked_example(layout):
    lp = np.full((1, 5), -1.0)
    lq = np.full((1, 5), -1.2)  # lp > lq: with A > 0 every token moves away from mu
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8, horizon="sequence", divergence=WORKED_D, return_info=True)
    args = (lp, lq, np.ones(1), np.ones((1, 5), bool))
    if layout == "packed":
        args = (lp[0], lq[0], np.ones(1), np.ones(5, bool))
        kw.update(divergence=WORKED_D[0], cu_seqlens=np.array([0, 5]))
    mask, info = cppo_mask(*args, **kw)
    assert mask.reshape(-1).tolist() == [True, False, False, False, False]
    assert info.reason.reshape(-1).tolist() == [2, 4, 3, 4, 4]
    np.testing.assert_allclose(info.threshold.reshape(-1), [0.15, 0.070, -0.025, -0.277, -0.3025], rtol=0, atol=1e-12)
    # Z = w * D with w = [1, .95, .9, .85, .8]
    z = np.array([1.0, 0.95, 0.90, 0.85, 0.80]) * WORKED_D[0]
    np.testing.assert_allclose(z, [0.100, 0.114, 0.270, 0.0425, 0.112], atol=1e-15)
    assert info.row_budget.tolist() == [0.02]
    assert info.fractions["kept_within_threshold"] == pytest.approx(0.2)
    assert info.fractions["masked_prefix_budget"] == pytest.approx(0.6)
    assert info.fractions["masked_token_threshold"] == pytest.approx(0.2)

    flipped = (args[0], args[1], -args[2], args[3])
    mask, info = cppo_mask(*flipped, **kw)
    assert mask.reshape(-1).tolist() == [True] * 5
    assert info.reason.reshape(-1).tolist() == [1] * 5


def test_worked_example_reference():
    ref = cppo_mask_reference(np.full((1, 5), -1.0), np.full((1, 5), -1.2), np.ones(1), None,
                              delta=0.15, delta_b=0.02, w_min=0.8, divergence=WORKED_D)
    assert ref.mask.tolist() == [[True, False, False, False, False]]
    assert ref.reason.tolist() == [[2, 4, 3, 4, 4]]


# ---------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("shape", [(0, 0), (0, 7), (3, 0), (1, 1), (4, 1)])
def test_degenerate_shapes(shape):
    rng = np.random.default_rng(0)
    lp = -rng.random(shape)
    lq = -rng.random(shape)
    mask, info = cppo_mask(lp, lq, np.ones(shape[0]), None, **KNOBS, return_info=True)
    ref = cppo_mask_reference(lp, lq, np.ones(shape[0]), None, **KNOBS)
    assert mask.shape == shape and info.row_budget.shape == (shape[0],)
    assert_same_as_reference(mask, ref, info=info, rule="spec")  # Binary TV


def test_empty_packed_batch_and_empty_segments():
    cu = np.array([0, 0, 3, 3, 5])
    rng = np.random.default_rng(1)
    lp, lq = -rng.random(5), -rng.random(5)
    mask, info = cppo_mask(lp, lq, np.array([1.0, -1.0, 1.0, 2.0]), None, **KNOBS, cu_seqlens=cu, return_info=True)
    ref = cppo_mask_reference(lp, lq, np.array([1.0, -1.0, 1.0, 2.0]), None, **KNOBS, cu_seqlens=cu)
    assert_same_as_reference(mask, ref, info=info, rule="spec")  # Binary TV
    empty = cppo_mask(np.zeros(0), np.zeros(0), np.zeros(0), None, **KNOBS, cu_seqlens=np.array([0]))
    assert empty.shape == (0,)


def test_all_padding_rows():
    lp = np.full((3, 6), np.nan)  # garbage everywhere, but nothing is valid
    mask, info = cppo_mask(lp, lp, np.full(3, np.nan), np.zeros((3, 6)), **KNOBS, adaptive_budget=True, return_info=True)
    assert not mask.any()
    assert (info.reason == 0).all() and (info.gate == 0).all()
    assert (info.threshold == 0.15).all()
    assert info.row_budget.tolist() == [0.02] * 3  # no valid token: delta_b
    assert info.fractions["num_valid"] == 0


def test_verl_packed_shape_with_leading_one():
    rng = np.random.default_rng(2)
    lp, lq = -rng.random((1, 10)), -rng.random((1, 10))
    cu = np.array([0, 4, 10])
    mask = cppo_mask(lp, lq, np.array([1.0, -1.0]), None, **KNOBS, cu_seqlens=cu)
    assert mask.shape == (1, 10)
    np.testing.assert_array_equal(mask[0], cppo_mask(lp[0], lq[0], np.array([1.0, -1.0]), None, **KNOBS, cu_seqlens=cu))


def test_huge_row():
    """One row of 200k tokens: identical to the reference (float64 sums over a long
    prefix, where delta_b * W - S is a difference of two large numbers)."""
    rng = np.random.default_rng(3)
    n = 200_000
    lq = -rng.exponential(0.3, size=(1, n))
    lp = np.minimum(lq + rng.normal(0, 0.02, size=(1, n)), 0.0)
    valid = rng.random((1, n)) < 0.97
    adv = np.array([1.0])
    kw = dict(delta=0.15, delta_b=0.02, adaptive_budget=True)
    mask, info = cppo_mask(lp, lq, adv, valid, **kw, return_info=True)
    ref = cppo_mask_reference(lp, lq, adv, valid, **kw)
    assert_same_as_reference(mask, ref, info=info, rule="spec")  # Binary TV
    np.testing.assert_array_equal(cppo_mask(lp, lq, adv, valid, **kw), ref.mask)
    packed = cppo_mask(lp[0], lq[0], adv, valid[0], **kw, cu_seqlens=np.array([0, n]))
    np.testing.assert_array_equal(packed, mask[0])


def test_float32_accumulation_would_be_wrong():
    """Guard for the numerics rule: on a long row a float32 prefix sum flips masks that
    the float64 scan gets right (so the float64 equality above is a real check)."""
    n = 100_000
    d = np.full((1, n), 0.0201)
    kw = dict(delta=0.15, delta_b=0.02, position_weight=False, divergence=d)
    lp, lq = np.full((1, n), -1.0), np.full((1, n), -1.1)
    mask, info = cppo_mask(lp, lq, np.ones(1), None, **kw, return_info=True)
    ref = cppo_mask_reference(lp, lq, np.ones(1), None, **kw)
    np.testing.assert_array_equal(mask, ref.mask)
    s32 = np.cumsum(d[0].astype(np.float32), dtype=np.float32)
    w32 = np.arange(1, n + 1, dtype=np.float32)
    c32 = np.minimum(np.float32(0.15), np.float32(0.15) + np.float32(0.02) * np.concatenate([[0], w32[:-1]]) - np.concatenate([[0], s32[:-1]]))
    assert (((d[0] <= c32)) != ref.mask[0]).any()


# ---------------------------------------------------------------------------------------
# Non-contiguous inputs and untouched inputs.


@settings(max_examples=60, deadline=None)
@given(cases(packed=False))
def test_non_contiguous_inputs(case: Case):
    b, l = case.log_probs.shape

    def spread(a):
        if a is None or isinstance(a, str):
            return a
        big = np.zeros((a.shape[0] * 2,) + a.shape[1:] if a.ndim == 1 else (a.shape[0], a.shape[1] * 3), dtype=a.dtype)
        if a.ndim == 1:
            big[::2] = a
            return big[::2]
        big[:, ::3] = a
        return big[:, ::3]

    fortran = lambda a: a if a is None or isinstance(a, str) else np.asfortranarray(a)  # noqa: E731
    for transform in (spread, fortran):
        nc = Case(*(transform(x) for x in (case.log_probs, case.old_log_probs, case.advantages, case.response_mask, case.divergence)), None, case.knobs)
        mask, info, ref = run_both(nc)
        assert_same_as_reference(mask, ref, info=info, rule=cpu_rule(nc.divergence))


def test_torch_non_contiguous_and_grad():
    rng = np.random.default_rng(5)
    base = torch.from_numpy(-rng.exponential(0.3, size=(6, 40))).float().requires_grad_(True)
    lp = base.t()  # [40, 6], non-contiguous, requires grad
    lq = (base.detach() * 1.01).t()
    adv = torch.randn(40, generator=torch.Generator().manual_seed(0))
    mask, info = cppo_mask(lp, lq, adv, None, **KNOBS, return_info=True)
    ref = cppo_mask_reference(lp.detach().double().numpy(), lq.double().numpy(), adv.double().numpy(), None, **KNOBS)
    np.testing.assert_array_equal(mask.numpy(), ref.mask)
    assert not mask.requires_grad


@settings(max_examples=50, deadline=None)
@given(cases())
def test_inputs_untouched(case: Case):
    before = [None if x is None or isinstance(x, str) else x.copy() for x in (*case.args(), case.divergence, case.cu_seqlens)]
    run_both(case)
    after = [case.log_probs, case.old_log_probs, case.advantages, case.response_mask, case.divergence, case.cu_seqlens]
    for b, a in zip(before, after):
        if b is not None:
            np.testing.assert_array_equal(a, b)


def test_mask_dtypes_accepted():
    rng = np.random.default_rng(6)
    lp, lq = -rng.random((3, 9)), -rng.random((3, 9))
    valid = rng.random((3, 9)) < 0.7
    want = cppo_mask(lp, lq, np.ones(3), valid, **KNOBS)
    for dt in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64, np.uint32):
        np.testing.assert_array_equal(cppo_mask(lp, lq, np.ones(3), valid.astype(dt), **KNOBS), want)
    for tdt in (torch.bool, torch.int64, torch.float32, torch.bfloat16, torch.uint8):
        got = cppo_mask(torch.from_numpy(lp), torch.from_numpy(lq), torch.ones(3), torch.from_numpy(valid).to(tdt), **KNOBS)
        np.testing.assert_array_equal(got.numpy(), want)


def test_lists_and_per_row_column_advantages():
    lp = [[-0.1, -0.2], [-0.3, -0.4]]
    lq = [[-0.2, -0.1], [-0.3, -0.5]]
    a = cppo_mask(lp, lq, [1.0, -1.0], None, **KNOBS)
    b = cppo_mask(np.array(lp), np.array(lq), np.array([[1.0], [-1.0]]), None, **KNOBS)
    np.testing.assert_array_equal(a, b)


def test_num_threads_do_not_change_results():
    rng = np.random.default_rng(7)
    lp, lq = -rng.exponential(0.3, (64, 300)), -rng.exponential(0.3, (64, 300))
    adv = rng.normal(size=64)
    ref = cppo_mask(lp, lq, adv, None, **KNOBS, adaptive_budget=True, num_threads=1)
    for n in (2, 3, 8):
        np.testing.assert_array_equal(cppo_mask(lp, lq, adv, None, **KNOBS, adaptive_budget=True, num_threads=n), ref)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_split_long_rows_do_not_depend_on_threads(dtype, per_token_adv):
    """Few long rows: the Binary TV pass of each row is split into fixed 4096-token
    chunks over the pool. Every output is bit-identical at 1, 2, 3 and 8 threads (exact
    equality between thread counts), and agrees with the reference under the spec's rule
    (Binary TV)."""
    rng = np.random.default_rng(11)
    b, l = 3, 20000
    lq = -rng.exponential(0.35, (b, l))
    lp = np.minimum(lq + rng.normal(0, 0.05, (b, l)), 0.0)
    lp[0, 7] = -720.0  # an exp below vexp.TINY inside a split row
    valid = np.arange(l)[None, :] < np.array([[l], [9000], [17]])
    valid[0, 5000:5100] = False
    adv = rng.normal(size=(b, l)) if per_token_adv else rng.normal(size=b)
    lp, lq = lp.astype(dtype), lq.astype(dtype)
    kw = dict(KNOBS, adaptive_budget=True, budget_ceiling=5.0)
    first_mask, first_info = cppo_mask(lp, lq, adv, valid, **kw, num_threads=1, return_info=True)
    for n in (2, 3, 8):
        mask, info = cppo_mask(lp, lq, adv, valid, **kw, num_threads=n, return_info=True)
        np.testing.assert_array_equal(mask, first_mask)
        for name in ("reason", "threshold", "gate", "row_budget", "reason_counts"):
            np.testing.assert_array_equal(getattr(info, name), getattr(first_info, name))
        np.testing.assert_array_equal(cppo_mask(lp, lq, adv, valid, **kw, num_threads=n), first_mask)
    ref = cppo_mask_reference(lp.astype(np.float64), lq.astype(np.float64), adv, valid, **kw)
    assert_same_as_reference(first_mask, ref, info=first_info, rule="spec")  # Binary TV


def test_version_and_public_api():
    assert cppo_native.__version__
    assert callable(cppo_native.cppo_mask)
    assert cppo_native.REASON_NAMES[4] == "masked_prefix_budget"


# ---------------------------------------------------------------------------------------
# Boundaries: the spec's comparisons are <= (kept at equality).


def _one_row(d, adv=1.0, **kw):
    d = np.asarray([d], dtype=np.float64)
    lp, lq = np.full_like(d, -1.0), np.full_like(d, -1.2)
    args = dict(delta=0.15, delta_b=0.02, position_weight=False, divergence=d, return_info=True)
    args.update(kw)
    mask, info = cppo_mask(lp, lq, np.array([adv]), None, **args)
    args.pop("return_info")
    np.testing.assert_array_equal(cppo_mask(lp, lq, np.array([adv]), None, **args), mask)  # mask-only path
    return mask, info


def test_token_threshold_tie_is_kept():
    mask, info = _one_row([0.15])
    assert info.reason.tolist() == [[2]] and info.gate.tolist() == [[1.0]]
    mask, info = _one_row([np.nextafter(0.15, 1)])
    assert info.reason.tolist() == [[3]] and info.gate[0, 0] < 1.0


def test_prefix_budget_tie_is_kept():
    c2 = 0.15 + 0.02 * 1.0 - 0.1  # c_2 exactly as the spec's arithmetic computes it
    mask, info = _one_row([0.1, c2])
    assert info.threshold[0, 1] == c2
    assert info.reason.tolist() == [[2, 2]] and mask.tolist() == [[True, True]]
    assert info.gate[0, 1] == 1.0
    mask, info = _one_row([0.1, np.nextafter(c2, 1)])
    assert info.reason.tolist() == [[2, 4]]
    ref = cppo_mask_reference(np.full((1, 2), -1.0), np.full((1, 2), -1.2), np.ones(1), None, delta=0.15,
                              delta_b=0.02, position_weight=False, divergence=np.array([[0.1, np.nextafter(c2, 1)]]))
    assert ref.reason.tolist() == [[2, 4]]


def test_zero_advantage_and_equal_log_probs_count_as_toward_mu():
    mask, info = _one_row([0.9], adv=0.0)
    assert info.reason.tolist() == [[1]]
    lp = np.array([[-0.5, -0.5]])
    mask, info = cppo_mask(lp, lp.copy(), np.array([3.0]), None, delta=0.15, delta_b=0.02,
                           divergence=np.array([[0.9, 0.9]]), return_info=True)
    assert info.reason.tolist() == [[1, 1]]


def test_bf16_negative_zero_mask_is_invalid():
    lp = torch.full((1, 3), -0.5)
    valid = torch.tensor([[1.0, -0.0, 0.0]], dtype=torch.bfloat16)
    mask = cppo_mask(lp, lp - 0.1, torch.ones(1), valid, **KNOBS)
    assert mask.tolist() == [[True, False, False]]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.02, 0.015, 1e-300, 0.0]), st.sampled_from([1.0, 0.5, 3.0, 0.0]),
       st.sampled_from([0.9, 0.0, 1.0, 0.5, 0.37]), st.integers(1, 40))
def test_adaptive_budget_near_the_clamp_edges(seed, delta_b, scale, q, n):
    """Quantiles sitting on (or a few ulps off) the clamp window's edges delta_b / k and
    2 delta_b / k: the backend's shortcut around the exact quantile must not change it."""
    rng = np.random.default_rng(seed)
    edges = [delta_b / scale if scale else 0.0, 2 * delta_b / scale if scale else 0.0]
    base = rng.choice(edges + [0.0, 0.05], size=(3, n))
    ulps = rng.integers(-3, 4, size=(3, n))
    d = np.abs(base + ulps * np.spacing(np.maximum(base, 1e-300)))
    lp, lq = np.full((3, n), -1.0), np.full((3, n), -1.2)
    kw = dict(delta=0.15, delta_b=delta_b, adaptive_budget=True, budget_scale=scale, budget_quantile=q, divergence=d)
    valid = rng.random((3, n)) < 0.8
    _, info = cppo_mask(lp, lq, np.ones(3), valid, **kw, return_info=True)
    ref = cppo_mask_reference(lp, lq, np.ones(3), valid, **kw)
    np.testing.assert_array_equal(info.row_budget, ref.row_budget)
    np.testing.assert_array_equal(info.reason, ref.reason)


class _Producer:
    """A minimal third-party DLPack producer (no .dtype, no .shape)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_any_cpu_dlpack_producer():
    rng = np.random.default_rng(11)
    lp, lq = -rng.exponential(0.3, (3, 7)), -rng.exponential(0.3, (3, 7))
    adv, valid = rng.normal(size=3), rng.random((3, 7)) < 0.8
    want = cppo_mask(lp, lq, adv, valid, **KNOBS, adaptive_budget=True)
    got = cppo_mask(_Producer(lp), _Producer(lq), _Producer(adv), _Producer(valid), **KNOBS, adaptive_budget=True)
    assert isinstance(got, np.ndarray)  # other producers get NumPy back (itself a DLPack producer)
    np.testing.assert_array_equal(got, want)
    # bfloat16, which NumPy cannot hold, is read through torch.
    t = torch.from_numpy(lp).bfloat16()
    got = cppo_mask(_Producer(t), _Producer(t), _Producer(torch.from_numpy(adv)), None, **KNOBS)
    np.testing.assert_array_equal(got, cppo_mask(t, t, torch.from_numpy(adv), None, **KNOBS).numpy())
    cu = _Producer(np.array([0, 4, 7]))
    packed = cppo_mask(_Producer(lp[0]), _Producer(lq[0]), _Producer(adv[:2]), None, **KNOBS, cu_seqlens=cu)
    np.testing.assert_array_equal(packed, cppo_mask(lp[0], lq[0], adv[:2], None, **KNOBS, cu_seqlens=np.array([0, 4, 7])))


# ---------------------------------------------------------------------------------------
# The fast path (`_backends.cpu.fast_mask`): the commonest call (NumPy, C order,
# float32/float64, bool mask) skips the general path's conversions; it must give the
# general path's bits and errors, and decline everything else.


def _general_path(lp, lq, adv, valid, **knobs):
    from cppo_native._backends import dispatch
    from cppo_native._core.params import make_params

    params = make_params(**knobs)
    prep = dispatch.prepare_mask_inputs(lp, lq, adv, valid, None, None, None)
    return dispatch.run_mask(prep, params, return_info=False, validate=True, num_threads=None)[0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(packed=False), st.sampled_from([np.float32, np.float64]), st.booleans(), st.booleans())
def test_fast_path_equals_general_path(case: Case, dtype, per_token_adv, no_mask):
    from cppo_native._backends.cpu import fast_mask
    from cppo_native._core.params import make_params

    if case.divergence is not None and not isinstance(case.divergence, str):
        return  # a given divergence takes the general path
    knobs = dict(case.knobs, divergence=case.divergence)
    lp, lq = case.log_probs.astype(dtype), case.old_log_probs.astype(dtype)
    adv = case.advantages.astype(dtype)
    if per_token_adv and adv.ndim == 1:
        adv = np.repeat(adv[:, None], lp.shape[1], axis=1)
    valid = None if no_mask or case.response_mask is None else case.response_mask != 0
    if valid is None:  # every position valid: garbage at padding would be a bad value
        lp, lq = np.where(np.isfinite(lp), np.minimum(lp, 0), -1.0), np.where(np.isfinite(lq), np.minimum(lq, 0), -1.0)
        lp, lq, adv = lp.astype(dtype), lq.astype(dtype), np.nan_to_num(adv, posinf=1.0, neginf=-1.0).astype(dtype)
    fast = fast_mask(lp, lq, adv, valid, make_params(**knobs), 0)
    assert fast is not None, "these inputs are the fast path's"
    np.testing.assert_array_equal(fast, _general_path(lp, lq, adv, valid, **knobs))
    np.testing.assert_array_equal(cppo_mask(lp, lq, adv, valid, **knobs), fast)


def test_fast_path_declines_other_inputs():
    from cppo_native._backends.cpu import fast_mask
    from cppo_native._core.params import make_params

    rng = np.random.default_rng(5)
    lp = -rng.exponential(0.5, size=(3, 17))
    lq = np.minimum(lp + rng.normal(0, 0.1, size=lp.shape), 0.0)
    adv, valid = rng.normal(size=3), rng.random(lp.shape) < 0.8
    params = make_params(**KNOBS)
    want = cppo_mask_reference(lp, lq, adv, valid, **KNOBS).mask
    variants = {
        "float16": (lp.astype(np.float16), lq.astype(np.float16), adv, valid),
        "mixed dtypes": (lp.astype(np.float32), lq, adv, valid),
        "big-endian": (lp.astype(">f8"), lq.astype(">f8"), adv, valid),
        "not C order": (np.asfortranarray(lp), np.asfortranarray(lq), adv, valid),
        "advantages [B, 1]": (lp, lq, adv[:, None], valid),
        "int advantages": (lp, lq, np.array([1, -1, 2]), valid),
        "float16 mask": (lp, lq, adv, valid.astype(np.float16)),
        "uint16 mask": (lp, lq, adv, valid.astype(np.uint16)),
        "big-endian mask": (lp, lq, adv, valid.astype(">i4")),
        "mask of another shape": (lp, lq, adv, np.ones((3, 16), dtype=bool)),
        "lists": (lp.tolist(), lq.tolist(), adv.tolist(), valid.tolist()),
        "a subclass": (lp.view(np.matrix), lq, adv, valid),
        "torch bfloat16": (torch.from_numpy(lp).bfloat16(), torch.from_numpy(lq).bfloat16(),
                           torch.from_numpy(adv), torch.from_numpy(valid)),
        "torch not C order": (torch.from_numpy(np.asfortranarray(lp)), torch.from_numpy(np.asfortranarray(lq)),
                              torch.from_numpy(adv), torch.from_numpy(valid)),
        "torch and numpy": (torch.from_numpy(lp), lq, adv, valid),
        "numpy and torch": (lp, torch.from_numpy(lq), adv, valid),
        "a torch subclass": (torch.nn.Parameter(torch.from_numpy(lp), requires_grad=False), torch.from_numpy(lq),
                             torch.from_numpy(adv), torch.from_numpy(valid)),
        "torch meta": tuple(torch.from_numpy(x).to("meta") for x in (lp, lq, adv, valid)),
    }
    for name, args in variants.items():
        assert fast_mask(*args, params, 0) is None, name
        if name in ("mask of another shape", "torch meta"):
            with pytest.raises(ValueError, match="must have the shape of log_probs|device meta is not supported"):
                cppo_mask(*args, **KNOBS)
            continue
        got = cppo_mask(*args, **KNOBS)
        got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        if name in ("float16", "torch bfloat16"):  # the reference on the rounded inputs
            rounded = [a.double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64) for a in args[:2]]
            ref = cppo_mask_reference(*rounded, adv, valid, **KNOBS).mask
            np.testing.assert_array_equal(got, ref, err_msg=name)
        elif name != "a subclass":
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_bad_value_error_is_the_general_paths(dtype):
    lp = np.full((2, 5), -0.5, dtype=dtype)
    lq = lp.copy()
    lq[1, 3] = 0.25  # a log-prob above 0 at a valid position
    adv, valid = np.ones(2, dtype=dtype), np.ones((2, 5), dtype=bool)
    before = [x.copy() for x in (lp, lq, adv, valid)]
    with pytest.raises(ValueError) as fast:
        cppo_mask(lp, lq, adv, valid, **KNOBS)
    with pytest.raises(ValueError) as general:
        _general_path(lp, lq, adv, valid, **KNOBS)
    assert str(fast.value) == str(general.value)
    assert "row 1, column 3" in str(fast.value) and "old_log_probs" in str(fast.value)
    for x, b in zip((lp, lq, adv, valid), before):
        np.testing.assert_array_equal(x, b)
    np.testing.assert_array_equal(cppo_mask(lp, lp, adv, valid, **KNOBS), np.ones((2, 5), dtype=bool))


def test_fast_path_reads_non_writeable_and_strided_inputs_it_accepts():
    from cppo_native._backends.cpu import fast_mask
    from cppo_native._core.params import make_params

    rng = np.random.default_rng(11)
    lp = -rng.exponential(0.5, size=(4, 33))
    lq = np.minimum(lp + rng.normal(0, 0.1, size=lp.shape), 0.0)
    adv = rng.normal(size=8)[::2]  # strided advantages are accepted
    valid = (rng.random((4, 66)) < 0.8)[:, ::2]  # so is a strided mask
    want = cppo_mask_reference(lp, lq, adv, valid, **KNOBS).mask
    for x in (lp, lq, adv, valid):
        x.flags.writeable = False
    got = fast_mask(lp, lq, adv, valid, make_params(**KNOBS), 0)
    assert got is not None and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


# `cppo_mask` keeps the checked knobs of recent calls by the ids of the values given
# (`mask._CHECKED`): the same objects again skip the checks, anything else is checked.


def test_checked_knobs_are_reused_only_for_the_same_objects():
    from cppo_native import mask as mask_module

    lp = np.full((2, 4), -0.5)
    adv = np.ones(2)
    args = (lp, lp, adv, None)
    # An int is a valid flag; the float 1.0 is not, and equal values must not share an entry.
    cppo_mask(*args, delta=0.15, delta_b=0.02, adaptive_budget=1)
    for _ in range(2):
        with pytest.raises(TypeError, match="adaptive_budget must be a bool"):
            cppo_mask(*args, delta=0.15, delta_b=0.02, adaptive_budget=1.0)
    # -0.0 and 0.0 are equal but stay apart: delta_b reaches the row budget with its sign.
    for delta_b in (0.0, -0.0, 0.0, -0.0):
        _, info = cppo_mask(*args, delta=0.15, delta_b=delta_b, return_info=True)
        assert np.signbit(info.row_budget).tolist() == [np.signbit(delta_b)] * 2
    # Bad values raise every time (a failed check is never kept).
    for _ in range(2):
        with pytest.raises(ValueError, match="delta must be > 0"):
            cppo_mask(*args, delta=-1.0, delta_b=0.02)
        with pytest.raises(ValueError, match="num_threads"):
            cppo_mask(*args, delta=0.15, delta_b=0.02, num_threads=0)
    assert len(mask_module._CHECKED) <= mask_module._CHECKED_SIZE


def test_checked_knobs_never_keep_an_array_and_stay_bounded():
    import gc
    import weakref

    from cppo_native import mask as mask_module

    lp = np.full((2, 4), -0.5)
    div = np.full((2, 4), 0.01)
    ref = weakref.ref(div)
    cppo_mask(lp, lp, np.ones(2), None, delta=0.15, delta_b=0.02, divergence=div)
    del div
    gc.collect()
    assert ref() is None, "an array given as divergence was kept"
    for i in range(3 * mask_module._CHECKED_SIZE):
        cppo_mask(lp, lp, np.ones(2), None, delta=0.15 + i * 1e-3, delta_b=0.02)
        assert len(mask_module._CHECKED) <= mask_module._CHECKED_SIZE


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("mask_dtype", ["bool", "uint8", "int8", "int32", "int64", "float32", "float64", None])
def test_fast_path_takes_every_mask_dtype_and_cpu_tensors(framework, mask_dtype):
    """The fast path reads masks of the dtypes the kernel reads as they are (nonzero is
    valid, NaN included, as on the general path) and CPU torch tensors, and gives the
    general path's bits in the caller's framework."""
    from cppo_native._backends.cpu import fast_mask
    from cppo_native._core.params import make_params

    rng = np.random.default_rng(7)
    lp = -rng.exponential(0.5, size=(5, 29)).astype(np.float32)
    lq = np.minimum(lp + rng.normal(0, 0.1, size=lp.shape), 0.0).astype(np.float32)
    adv = rng.normal(size=5).astype(np.float32)
    valid = None
    if mask_dtype is not None:
        flags = rng.random(lp.shape) < 0.8
        flags[1] = False  # an empty row
        valid = flags.astype(mask_dtype)
        if mask_dtype.startswith("float"):
            valid[flags] = rng.choice([1.0, 0.5, -2.0, np.nan], size=int(flags.sum()))
            valid[~flags] = rng.choice([0.0, -0.0], size=int((~flags).sum()))
        elif mask_dtype != "bool":
            valid[flags] = rng.choice([1, 3, -1] if mask_dtype.startswith("int") else [1, 7, 255], size=int(flags.sum()))
    knobs = dict(KNOBS, adaptive_budget=True)
    want = _general_path(lp, lq, adv, valid, **knobs)
    # The reference on the flags (nonzero valid, NaN included); fixed data, no near-ties.
    flags_ref = None if valid is None else valid != 0
    np.testing.assert_array_equal(want, cppo_mask_reference(lp, lq, adv, flags_ref, **knobs).mask)
    args = (lp, lq, adv, valid)
    if framework == "torch":
        args = tuple(None if x is None else torch.from_numpy(x) for x in args)
        args = (args[0].clone().requires_grad_(),) + args[1:]  # a policy's log-probs carry grad
    before = [None if x is None else (x.detach().numpy() if isinstance(x, torch.Tensor) else x).copy() for x in args]
    got = fast_mask(*args, make_params(**knobs), 0)
    assert got is not None, "these inputs are the fast path's"
    if framework == "torch":
        assert isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.device.type == "cpu"
        got = got.numpy()
    else:
        assert isinstance(got, np.ndarray) and got.dtype == np.bool_
    np.testing.assert_array_equal(got, want)
    public = cppo_mask(*args, **knobs)
    np.testing.assert_array_equal(public.numpy() if framework == "torch" else public, want)
    for x, b in zip(args, before):
        if x is not None:
            np.testing.assert_array_equal(x.detach().numpy() if isinstance(x, torch.Tensor) else x, b)


def test_fast_path_bad_value_error_for_tensors_is_the_general_paths():
    lp = np.full((2, 5), -0.5, dtype=np.float32)
    lq = lp.copy()
    lq[1, 3] = np.inf
    adv, valid = np.ones(2, dtype=np.float32), np.ones((2, 5), dtype=np.int64)
    targs = tuple(torch.from_numpy(x) for x in (lp, lq, adv, valid))
    with pytest.raises(ValueError) as fast:
        cppo_mask(*targs, **KNOBS)
    with pytest.raises(ValueError) as general:
        _general_path(lp, lq, adv, valid, **KNOBS)
    assert str(fast.value) == str(general.value)
    assert "row 1, column 3" in str(fast.value)
    assert torch.equal(cppo_mask(targs[0], targs[0], targs[2], targs[3], **KNOBS), torch.ones((2, 5), dtype=torch.bool))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from(["uint8", "int8", "int32", "int64", "float32", "float64"]),
       st.sampled_from([1, 2]), st.booleans())
def test_every_mask_dtype_gives_the_bool_masks_results(case: Case, mask_dtype, threads, info):
    """A mask of any dtype the kernel reads (its rows' windows found in that dtype, only
    the window's flags converted) gives the results of the same mask as bool, on every
    path: padded and packed, one and two threads, with and without info."""
    if case.response_mask is None:
        return
    valid = case.response_mask != 0
    other = valid.astype(mask_dtype)
    if mask_dtype.startswith("float"):
        other[valid] = np.where(np.arange(int(valid.sum())) % 3 == 0, np.nan, -2.0)  # NaN counts as valid
        other[~valid] = -0.0
    kw = dict(case.kwargs(), num_threads=threads)
    args = (case.log_probs, case.old_log_probs, case.advantages)
    try:
        want = cppo_mask(*args, valid, **kw, return_info=info)
    except ValueError as e:
        with pytest.raises(ValueError) as got_err:
            cppo_mask(*args, other, **kw, return_info=info)
        assert str(got_err.value) == str(e)
        return
    got = cppo_mask(*args, other, **kw, return_info=info)
    if info:
        np.testing.assert_array_equal(got[0], want[0])
        for name in ("reason", "threshold", "gate", "row_budget", "reason_counts"):
            np.testing.assert_array_equal(getattr(got[1], name), getattr(want[1], name), err_msg=name)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rows, length", [(48, 1000), (3, 20000)])  # the two-thread queue; long rows split
@pytest.mark.parametrize("mask_dtype", ["int8", "int64", "float32"])
def test_every_mask_dtype_on_the_two_thread_paths(rows, length, mask_dtype):
    """Batches above the inline size run on the two-thread queue (many rows) or split
    their long rows' Binary TV pass (few rows): a non-bool mask's windows and flags
    give the bool mask's results there too, with garbage at padding."""
    rng = np.random.default_rng(rows)
    lp = -rng.exponential(0.4, size=(rows, length))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=lp.shape), 0.0)
    lens = rng.integers(0, length + 1, size=rows)
    lens[0] = length
    starts = rng.integers(0, 50, size=rows)
    cols = np.arange(length)[None, :]
    valid = (cols < lens[:, None]) & (cols >= starts[:, None])
    valid[:, 700:705] = False  # holes
    lp = np.where(valid, lp, np.nan)  # garbage where not valid
    lq = np.where(valid, lq, 3.0)
    adv = rng.normal(size=rows)
    other = valid.astype(mask_dtype)
    if mask_dtype == "float32":
        other[valid] = np.nan
    knobs = dict(KNOBS, adaptive_budget=True)
    for threads in (1, 2):
        want = cppo_mask(lp, lq, adv, valid, **knobs, num_threads=threads, return_info=True)
        got = cppo_mask(lp, lq, adv, other, **knobs, num_threads=threads, return_info=True)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1].threshold, want[1].threshold)
        np.testing.assert_array_equal(cppo_mask(lp, lq, adv, other, **knobs, num_threads=threads), want[0])
