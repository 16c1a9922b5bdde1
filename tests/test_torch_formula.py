"""The benchmarks' vectorised formulas (bench/baselines.py: torch_cppo_mask, the
baseline of bench/cpu.py and bench/gpu.py, and numpy_cppo_mask) on random batches
against the reference, under the spec's tolerance rule, within the scope the formulas
cover: padded layout, horizon "sequence", linear position weight, prefix budget on,
Binary TV from log-probs, fixed or adaptive budget (any q, k, delta, delta_b, w_min).
Padding holds garbage (NaN, inf) as the spec allows. Runs on CPU."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cppo_native import cppo_mask_reference
from gpu_compare import assert_within_tolerance
from strategies import Case, cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baselines import numpy_cppo_mask, torch_cppo_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

FORMULA_KNOBS = ("delta", "delta_b", "w_min", "adaptive_budget", "budget_quantile", "budget_scale")


@st.composite
def formula_cases(draw):
    case = draw(cases(max_rows=5, max_len=300, packed=False))
    knobs = {k: case.knobs[k] for k in FORMULA_KNOBS}
    valid = np.ones(case.log_probs.shape, bool) if case.response_mask is None else case.response_mask
    if case.log_probs.size == 0:  # outside the formulas' domain (torch's nanquantile needs data)
        return None
    return Case(case.log_probs, case.old_log_probs, case.advantages, valid, None, None, knobs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formula_cases(), st.booleans())
def test_formulas_match_reference(case, float32_inputs):
    if case is None:
        return
    if float32_inputs:  # fp32 inputs, widened to float64 inside, as trainers pass them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lp32, lq32 = case.log_probs.astype(np.float32), case.old_log_probs.astype(np.float32)
        case = Case(lp32.astype(np.float64), lq32.astype(np.float64), case.advantages, case.response_mask,
                    None, None, case.knobs)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    got_torch = torch_cppo_mask(*(torch.from_numpy(np.ascontiguousarray(a)) for a in case.args()), **case.knobs)
    assert_within_tolerance(got_torch.numpy(), None, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got_numpy = numpy_cppo_mask(*case.args(), **case.knobs)
    assert_within_tolerance(np.asarray(got_numpy), None, ref)


def test_formula_worked_example_and_garbage_padding():
    # The spec's example needs a given D; here the same row through log-probs:
    # exp(lp) - exp(lq) = D with lp = 0 and lq = log(1 - D), every token moving away
    # from mu for A > 0 (lp > lq).
    d = np.array([0.10, 0.12, 0.30, 0.05, 0.14])
    lp = np.zeros((1, 5))
    lq = np.log(1 - d)[None, :]
    valid = np.ones((1, 5), bool)
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=False)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    assert torch_cppo_mask(t(lp), t(lq), torch.ones(1), t(valid), **kw).tolist() == [[True, False, False, False, False]]
    # A < 0: every token moves back toward mu, everything kept.
    assert torch_cppo_mask(t(lp), t(lq), -torch.ones(1), t(valid), **kw).all()
    # NaN / inf in padding never reaches the prefix sums.
    lp_g = np.concatenate([lp, [[np.nan, np.inf]]], axis=1)
    lq_g = np.concatenate([lq, [[np.nan, -np.inf]]], axis=1)
    valid_g = np.concatenate([valid, [[False, False]]], axis=1)
    lp_g[0, [1, 3]] = lp_g[0, [3, 1]]  # interleave: padding between valid tokens
    lq_g[0, [1, 3]] = lq_g[0, [3, 1]]
    lp_g[0, [1, 5]] = lp_g[0, [5, 1]]
    lq_g[0, [1, 5]] = lq_g[0, [5, 1]]
    valid_g[0, [1, 5]] = valid_g[0, [5, 1]]
    ref = cppo_mask_reference(lp_g, lq_g, np.ones(1), valid_g, **kw)
    np.testing.assert_array_equal(torch_cppo_mask(t(lp_g), t(lq_g), torch.ones(1), t(valid_g), **kw).numpy(), ref.mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(numpy_cppo_mask(lp_g, lq_g, np.ones(1), valid_g, **kw), ref.mask)
