"""The benchmarks' PyTorch baseline (bench/torch_formula.py) computes the spec's mask:
checked against the reference on CPU under the spec's tolerance rule."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cppo_native import cppo_mask_reference
from gpu_compare import assert_within_tolerance, weighted_divergence
from strategies import Case, cases

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from torch_formula import cppo_mask_torch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@st.composite
def formula_cases(draw):
    """Padded batches with the knobs the formula covers (any budget, horizon, D)."""
    case = draw(cases(max_rows=5, max_len=300, packed=False))
    knobs = dict(case.knobs, position_weight=True, prefix_budget=True)
    div = case.divergence
    if isinstance(div, str) and div == "binary_kl":
        div = None
    valid = np.ones(case.log_probs.shape, bool) if case.response_mask is None else case.response_mask
    return Case(case.log_probs, case.old_log_probs, case.advantages, valid, div, None, knobs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(formula_cases(), st.booleans())
def test_formula_matches_reference(case: Case, float32_inputs):
    if float32_inputs:  # fp32 inputs, widened to float64 inside, as trainers pass them
        lp32, lq32 = case.log_probs.astype(np.float32), case.old_log_probs.astype(np.float32)
        case = Case(lp32.astype(np.float64), lq32.astype(np.float64), case.advantages, case.response_mask,
                    case.divergence, None, case.knobs)
    t = lambda a: None if a is None or isinstance(a, str) else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    k = case.knobs
    mask, threshold = cppo_mask_torch(
        t(case.log_probs), t(case.old_log_probs), t(case.advantages), t(case.response_mask),
        delta=k["delta"], delta_b=k["delta_b"], w_min=k["w_min"], horizon=k["horizon"],
        adaptive_budget=k["adaptive_budget"], budget_quantile=k["budget_quantile"],
        budget_scale=k["budget_scale"], divergence=t(case.divergence) if isinstance(case.divergence, np.ndarray) else None,
        return_threshold=True,
    )
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert_within_tolerance(mask.numpy(), None, ref, weighted_divergence(*case.args(), **case.kwargs()))
    np.testing.assert_allclose(threshold.expand(ref.threshold.shape).numpy(), ref.threshold, rtol=0, atol=1e-9)


def test_formula_worked_example():
    d = torch.tensor([[0.10, 0.12, 0.30, 0.05, 0.14]], dtype=torch.float64)
    lp, lq = torch.full((1, 5), -1.0), torch.full((1, 5), -1.1)
    valid = torch.ones(1, 5, dtype=torch.bool)
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8, divergence=d)
    assert cppo_mask_torch(lp, lq, torch.ones(1), valid, **kw).tolist() == [[True, False, False, False, False]]
    assert cppo_mask_torch(lp, lq, -torch.ones(1), valid, **kw).all()


def test_formula_long_row_float64_prefix():
    # 20k tokens: the float64 prefix keeps |c_GPU-style - c_ref| tiny where float32 would not.
    rng = np.random.default_rng(0)
    n = 20_000
    lp = -rng.exponential(0.3, (1, n))
    lq = np.minimum(lp + rng.normal(0, 0.05, (1, n)), 0.0)
    valid = np.ones((1, n), bool)
    knobs = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True)
    mask = cppo_mask_torch(torch.from_numpy(lp), torch.from_numpy(lq), torch.ones(1), torch.from_numpy(valid), **knobs)
    case = Case(lp, lq, np.ones(1), valid, None, None, knobs)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert_within_tolerance(mask.numpy(), None, ref, weighted_divergence(*case.args(), **case.kwargs()))
