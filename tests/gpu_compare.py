"""The spec's cross-backend rule, for the CUDA path (real or emulated) against the NumPy
reference: arithmetic is float64 everywhere, but the prefix sums S and W are summed in
another order (a parallel scan), so masks and reasons may differ only where
|Z_t - c_t| <= 1e-9; thresholds may differ by that much, gates by a relative 1e-9.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

TOL = 1e-9


def _host(x: Any) -> np.ndarray:
    if x is None:
        return None
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assert_within_tolerance(mask, info: Optional[dict], ref, *, budget_rtol: float = 0.0) -> None:
    """mask / info (reason, threshold, gate, row_budget, reason_counts) against a
    ReferenceResult under the spec's tolerance rule (Z_t from the reference)."""
    z = ref.weighted_divergence
    mask = _host(mask)
    assert mask.dtype == np.bool_, mask.dtype
    assert mask.shape == ref.mask.shape, (mask.shape, ref.mask.shape)
    valid = ref.reason != 0
    near = valid & (np.abs(z - ref.threshold) <= TOL)
    far = ~near
    np.testing.assert_array_equal(mask[far], ref.mask[far])
    if info is None:
        return
    reason = _host(info["reason"])
    threshold = _host(info["threshold"])
    gate = _host(info["gate"])
    row_budget = _host(info["row_budget"])
    counts = _host(info["reason_counts"])
    assert reason.dtype == np.int8 and threshold.dtype == np.float64 and gate.dtype == np.float64
    np.testing.assert_array_equal(reason[far], ref.reason[far])
    # Near the boundary only the threshold clause may flip; toward-mu never does.
    assert np.all(np.isin(reason[near], [1, 2, 3, 4]))
    np.testing.assert_array_equal(reason[near] == 1, ref.reason[near] == 1)
    np.testing.assert_array_equal(mask, (reason == 1) | (reason == 2))
    np.testing.assert_allclose(threshold, ref.threshold, rtol=0, atol=TOL)
    np.testing.assert_allclose(gate, ref.gate, rtol=TOL, atol=1e-12)
    if budget_rtol:
        np.testing.assert_allclose(row_budget, ref.row_budget, rtol=budget_rtol, atol=0)
    else:
        np.testing.assert_array_equal(row_budget, ref.row_budget)
    assert counts.dtype == np.int64 and counts.shape == (5,)
    np.testing.assert_array_equal(counts, np.bincount(reason.reshape(-1), minlength=5))
