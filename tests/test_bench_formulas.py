"""The benchmark's baseline formulas (bench/baselines.py) compute the same mask as the
reference, up to the spec's cross-backend tolerance (|Z_t - c_t| <= 1e-9): otherwise
the benchmark would time the wrong thing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from baselines import numpy_cppo_mask, torch_cppo_mask  # noqa: E402

from cppo_native import cppo_mask_reference
from cppo_native.sample import make_rollout_batch


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_baselines_match_reference(adaptive, seed):
    b = make_rollout_batch(12, 300, seed=seed, drift=0.3)
    b.response_mask[3] = False  # a row with no valid token
    kw = dict(delta=0.15, delta_b=0.02, adaptive_budget=adaptive)
    ref = cppo_mask_reference(b.log_probs, b.old_log_probs, b.advantages, b.response_mask, **kw)
    near = np.abs(ref.weighted_divergence - ref.threshold) <= 1e-9
    tmask = torch_cppo_mask(*(torch.from_numpy(x) for x in (b.log_probs, b.old_log_probs, b.advantages, b.response_mask)), **kw)
    nmask = numpy_cppo_mask(b.log_probs, b.old_log_probs, b.advantages, b.response_mask, **kw)
    for got in (tmask.numpy(), nmask):
        assert ((got != ref.mask) & ~near).sum() == 0
    # The batch exercises every reason, so agreement is not vacuous.
    assert set(np.unique(ref.reason)) == {0, 1, 2, 3, 4}
