"""Bad input: clear errors naming what and where, inputs never written."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cppo_native import cppo_mask, cppo_mask_reference

KNOBS = dict(delta=0.15, delta_b=0.02)


def batch(b=3, l=8, seed=0):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(0.3, (b, l))
    lq = -rng.exponential(0.3, (b, l))
    valid = np.ones((b, l), bool)
    valid[:, -2:] = False
    return lp, lq, rng.normal(size=b), valid


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("log_probs", np.nan, "log_probs must be finite and <= 0 at valid positions; got nan at (row 1, column 4)"),
        ("log_probs", np.inf, "got inf at (row 1, column 4)"),
        ("log_probs", 0.5, "log_probs must be finite and <= 0 at valid positions; got 0.5 at (row 1, column 4)"),
        ("old_log_probs", -np.inf, "old_log_probs must be finite and <= 0 at valid positions; got -inf at (row 1, column 4)"),
        ("old_log_probs", 1e-3, "old_log_probs must be finite and <= 0"),
        ("advantages", np.nan, "advantages must be finite at valid positions; got nan at (row 1, column 4)"),
        ("divergence", -0.5, "divergence must be finite and >= 0 at valid positions; got -0.5 at (row 1, column 4)"),
        ("divergence", np.nan, "divergence must be finite and >= 0"),
    ],
)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_bad_value_named_with_position(field, value, message, backend):
    lp, lq, _, valid = batch()
    adv = np.ones((3, 8))
    div = np.full((3, 8), 0.01)
    arrays = dict(log_probs=lp, old_log_probs=lq, advantages=adv, divergence=div)
    arrays[field] = arrays[field].copy()
    arrays[field][1, 4] = value
    arrays[field][2, 0] = value  # a later offender: the first one is reported
    copies = {k: v.copy() for k, v in arrays.items()}
    fn = cppo_mask if backend == "native" else cppo_mask_reference
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(arrays["log_probs"], arrays["old_log_probs"], arrays["advantages"], valid, **KNOBS,
           divergence=arrays["divergence"])
    for k in arrays:
        np.testing.assert_array_equal(arrays[k], copies[k])


def test_tolerance_on_positive_log_probs():
    lp, lq, adv, valid = batch()
    lp[0, 0] = 1e-6  # within the 1e-6 tolerance
    cppo_mask(lp, lq, adv, valid, **KNOBS)
    lp[0, 0] = 2e-6
    with pytest.raises(ValueError, match=r"got 2e-06 at \(row 0, column 0\)"):
        cppo_mask(lp, lq, adv, valid, **KNOBS)


def test_invalid_positions_may_hold_garbage():
    lp, lq, adv, valid = batch()
    lp[:, -2:] = np.nan
    lq[:, -2:] = 7.0
    mask = cppo_mask(lp, lq, adv, valid, **KNOBS, divergence=np.where(valid, 0.01, -np.inf))
    assert not mask[:, -2:].any()


def test_per_row_advantage_nan_only_matters_with_valid_tokens():
    lp, lq, _, valid = batch()
    valid[2] = False
    adv = np.array([1.0, -1.0, np.nan])
    cppo_mask(lp, lq, adv, valid, **KNOBS)  # row 2 has no valid token
    adv[1] = np.nan
    with pytest.raises(ValueError, match=r"advantages must be finite .*\(row 1, column 0\)"):
        cppo_mask(lp, lq, adv, valid, **KNOBS)


def test_packed_error_reports_segment_and_flat_index():
    lp = -np.ones(10) * 0.1
    lp[7] = np.nan
    with pytest.raises(ValueError, match=re.escape("(row 1, column 3; flat index 7)")):
        cppo_mask(lp, lp, np.ones(2), None, **KNOBS, cu_seqlens=np.array([0, 4, 10]))


def test_bf16_torch_bad_value():
    lp = torch.full((2, 4), -0.5, dtype=torch.bfloat16)
    lp[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\(row 1, column 2\)"):
        cppo_mask(lp, lp.clone(), torch.ones(2), None, **KNOBS)


# ---------------------------------------------------------------------------------------
# Shapes, dtypes, devices, parameters.


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: a.update(old_log_probs=a["old_log_probs"][:, :-1]), ValueError, r"old_log_probs must have the shape of log_probs \(3, 8\), got \(3, 7\)"),
        (lambda a: a.update(response_mask=a["response_mask"][:2]), ValueError, r"response_mask must have the shape of log_probs \(3, 8\), got \(2, 8\)"),
        (lambda a: a.update(advantages=np.ones(4)), ValueError, r"advantages must have shape \(3, 8\) \(per token\) or \(3,\) \(per row\), got \(4,\)"),
        (lambda a: a.update(log_probs=a["log_probs"][0]), ValueError, r"log_probs must be 2-D \[batch, length\].*got shape \(8,\)"),
        (lambda a: a.update(log_probs=a["log_probs"][None]), ValueError, r"log_probs must be 2-D"),
        (lambda a: a.update(log_probs=a["log_probs"].astype(np.int64)), TypeError, r"log_probs: dtype int64 is not supported"),
        (lambda a: a.update(old_log_probs=a["old_log_probs"].astype(np.complex128)), TypeError, r"old_log_probs: dtype complex128"),
        (lambda a: a.update(response_mask=a["response_mask"].astype(np.complex64)), TypeError, r"response_mask: dtype complex64"),
        (lambda a: a.update(advantages="x"), TypeError, r"advantages"),
        (lambda a: a.update(log_probs={"a": 1}), TypeError, r"log_probs: expected a numpy array, torch tensor"),
        (lambda a: a.update(divergence=np.ones((3, 9))), ValueError, r"divergence must have the shape of log_probs"),
    ],
)
def test_shape_and_dtype_errors(mutate, exc, pattern):
    lp, lq, adv, valid = batch()
    a = dict(log_probs=lp, old_log_probs=lq, advantages=adv, response_mask=valid, divergence=None)
    mutate(a)
    with pytest.raises(exc, match=pattern):
        cppo_mask(a["log_probs"], a["old_log_probs"], a["advantages"], a["response_mask"], **KNOBS, divergence=a["divergence"])


@pytest.mark.parametrize(
    "cu,pattern",
    [
        (np.array([1, 4, 10]), r"cu_seqlens must start at 0, got 1"),
        (np.array([0, 6, 4, 10]), r"non-decreasing; cu_seqlens\[2\]=4 < cu_seqlens\[1\]=6"),
        (np.array([0, 4, 9]), r"must end at the number of tokens 10, got 9"),
        (np.array([[0, 10]]), r"cu_seqlens must be 1-D"),
        (np.array([0.0, 10.0]), r"cu_seqlens: dtype float64 is not supported"),
    ],
)
def test_bad_cu_seqlens(cu, pattern):
    lp = -np.ones(10) * 0.1
    with pytest.raises((ValueError, TypeError), match=pattern):
        cppo_mask(lp, lp, np.ones(max(len(cu) - 1, 1)), None, **KNOBS, cu_seqlens=cu)


def test_packed_shape_errors():
    lp = -np.ones((2, 5)) * 0.1
    with pytest.raises(ValueError, match=r"with cu_seqlens, log_probs must be 1-D"):
        cppo_mask(lp, lp, np.ones(1), None, **KNOBS, cu_seqlens=np.array([0, 10]))


@pytest.mark.parametrize(
    "knob,value,exc,pattern",
    [
        ("delta", 0.0, ValueError, r"delta must be > 0, got 0.0"),
        ("delta", float("nan"), ValueError, r"delta must be finite"),
        ("delta", "0.1", TypeError, r"delta must be a real number, got '0.1'"),
        ("delta_b", -0.1, ValueError, r"delta_b must be >= 0"),
        ("w_min", 0.0, ValueError, r"w_min must be in \(0, 1\]"),
        ("w_min", 1.5, ValueError, r"w_min must be in \(0, 1\]"),
        ("horizon", 0, ValueError, r'horizon must be "sequence" or an int >= 1, got 0'),
        ("horizon", "full", ValueError, r"horizon must be"),
        ("horizon", 2.5, TypeError, r"horizon must be"),
        ("horizon", True, TypeError, r"horizon must be"),
        ("budget_quantile", 1.5, ValueError, r"budget_quantile must be in \[0, 1\]"),
        ("budget_scale", -1.0, ValueError, r"budget_scale must be >= 0"),
        ("position_weight", "cosine", ValueError, r"position_weight must be True, False"),
        ("shuffle_seed", -1, ValueError, r"shuffle_seed must be in \[0, 2\*\*64\)"),
        ("divergence", "tv", ValueError, r'divergence must be None, "binary_tv", "binary_kl" or an array'),
        ("num_threads", 0, ValueError, r"num_threads must be None or an int >= 1"),
    ],
)
def test_parameter_errors(knob, value, exc, pattern):
    lp, lq, adv, valid = batch()
    kw = dict(KNOBS)
    kw[knob] = value
    with pytest.raises(exc, match=pattern):
        cppo_mask(lp, lq, adv, valid, **kw)


def test_mixed_devices_rejected():
    class FakeCuda:
        """A DLPack producer claiming to live on cuda:0."""

        shape = (3, 8)
        dtype = np.dtype("float32")

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kw):
            raise AssertionError("must not be read")

    lp, lq, adv, valid = batch()
    with pytest.raises(ValueError, match=r"all arrays must be on one device: log_probs is on cpu, old_log_probs is on cuda:0"):
        cppo_mask(lp, FakeCuda(), adv, valid, **KNOBS)


def test_unsupported_torch_device():
    t = torch.zeros((2, 3), device="meta")
    with pytest.raises(ValueError, match=r"torch device meta is not supported"):
        cppo_mask(t, t, torch.zeros(2), None, **KNOBS)


def test_ambiguous_packed_advantages_need_a_flag():
    lp = -np.array([0.1, 0.2, 0.3])
    cu = np.array([0, 2, 2, 3])  # three rows, three tokens
    adv = np.array([1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match=r"ambiguous.*pass per_row_advantages=True or False"):
        cppo_mask(lp, lp, adv, None, **KNOBS, cu_seqlens=cu)
    per_row = cppo_mask(lp, lp - 0.5, adv, None, **KNOBS, cu_seqlens=cu, per_row_advantages=True)
    per_token = cppo_mask(lp, lp - 0.5, np.array([1.0, 1.0, 2.0]), None, **KNOBS, cu_seqlens=cu, per_row_advantages=False)
    np.testing.assert_array_equal(per_row, per_token)  # row 1 is empty, row 0's tokens get +1
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\) \(per row\), got \(3,\)"):
        cppo_mask(lp, lp, adv, None, **KNOBS, cu_seqlens=np.array([0, 2, 3]), per_row_advantages=True)
