"""The spec's cross-backend rule, for the CUDA path (real or emulated) against the NumPy
reference: arithmetic is float64 everywhere, but the prefix sums S and W are summed in
another order (a parallel scan), so masks and reasons may differ only where
|Z_t - c_t| <= 1e-9; thresholds may differ by that much, gates by a relative 1e-9.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from cppo_native import reference as ref_mod
from cppo_native._params import make_params

TOL = 1e-9


def _host(x: Any) -> np.ndarray:
    if x is None:
        return None
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return np.asarray(x)


def weighted_divergence(log_probs, old_log_probs, advantages, response_mask=None, *, divergence=None,
                        cu_seqlens=None, **knobs) -> np.ndarray:
    """Z_t = v_t w_t D_t of the reference (0 at invalid positions), same shape as log_probs."""
    if divergence is None or isinstance(divergence, str):
        mode, div = divergence or "binary_tv", None
    else:
        mode, div = "given", np.asarray(divergence, dtype=np.float64).reshape(-1)
    p = make_params(divergence=mode, **knobs)
    lp = np.asarray(log_probs, dtype=np.float64)
    shape = lp.shape
    lp = lp.reshape(-1)
    lq = np.asarray(old_log_probs, dtype=np.float64).reshape(-1)
    valid = np.ones(lp.shape, bool) if response_mask is None else (np.asarray(response_mask) != 0).reshape(-1)
    if cu_seqlens is None:
        b, l = shape
        rows = [(r * l, l) for r in range(b)]
    else:
        cu = np.asarray(cu_seqlens, dtype=np.int64)
        rows = [(int(cu[r]), int(cu[r + 1] - cu[r])) for r in range(len(cu) - 1)]
    z = np.zeros(lp.shape, dtype=np.float64)
    for r, (start, length) in enumerate(rows):
        cols = [c for c in range(length) if valid[start + c]]
        horizon = p.horizon if p.horizon > 0 else (cols[-1] + 1 if cols else 0)
        if p.position_weight == "none":
            weight = [1.0] * length
        else:
            weight = [ref_mod.position_weight(c, horizon, p.w_min) for c in range(length)]
            if p.position_weight == "shuffled":
                perm = ref_mod.shuffle_permutation(len(cols), p.shuffle_seed, r)
                base = [weight[c] for c in cols]
                for k, c in enumerate(cols):
                    weight[c] = base[perm[k]]
        for c in cols:
            i = start + c
            if mode == "binary_tv":
                d = ref_mod.binary_tv(lp[i], lq[i])
            elif mode == "binary_kl":
                d = ref_mod.binary_kl(lp[i], lq[i])
            else:
                d = float(div[i])
            z[i] = weight[c] * d
    return z.reshape(shape)


def assert_within_tolerance(mask, info: Optional[dict], ref, z: np.ndarray, *, budget_rtol: float = 0.0) -> None:
    """mask / info (reason, threshold, gate, row_budget, reason_counts) against a
    ReferenceResult under the spec's tolerance rule."""
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
