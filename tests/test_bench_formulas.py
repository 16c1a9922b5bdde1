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


def test_benchmark_helpers_do_their_work():
    """The floor copies exactly the mask's bytes and reads every input byte; the compute
    control does the same arithmetic whatever the thread count (its checksum is the
    largest chain value, 1 - 0.999^steps of a full task)."""
    from cppo_native._core.native import native_module

    nm = native_module()
    rng = np.random.default_rng(0)
    src = (rng.random(100_003) < 0.5).astype(np.uint8)
    read = [np.zeros(10_001, np.uint8), np.full(7, 0x40, np.uint8)]
    for threads in (1, 2):
        out = np.zeros_like(src)
        assert nm.memory_floor(read, src, out, num_threads=threads) == 0x40
        assert np.array_equal(out, src)
    full = nm.fp_control(100_000, num_threads=1)
    assert full == nm.fp_control(100_000, num_threads=2)
    assert abs(full - (1 - 0.999 ** (4096 * 6 // 8))) < 1e-9
    assert nm.fp_control(0, num_threads=2) == 0.0
    assert 0 < nm.fp_control(100, num_threads=1) < full  # a shorter task: fewer steps
