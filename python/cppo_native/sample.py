"""Deterministic synthetic rollout batches (the built-in sample data).

Shapes and statistics resemble a GRPO batch: right-padded responses of random length,
rollout log-probs of a confident sampler, a current policy that has drifted a little
(more on some rows than others), and one normalised advantage per response.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RolloutBatch:
    log_probs: np.ndarray  # float32 [B, L], current policy
    old_log_probs: np.ndarray  # float32 [B, L], rollout policy
    advantages: np.ndarray  # float32 [B], one per response
    response_mask: np.ndarray  # bool [B, L]
    lengths: np.ndarray  # int64 [B]


def make_rollout_batch(batch: int = 64, length: int = 1024, *, min_length: int | None = None,
                       seed: int = 0, drift: float = 0.03) -> RolloutBatch:
    """A right-padded batch; lengths are uniform in [min_length, length] (default L/4)."""
    rng = np.random.default_rng(seed)
    lo = max(1, length // 4) if min_length is None else min_length
    lengths = rng.integers(lo, length + 1, size=batch) if length > 0 else np.zeros(batch, dtype=np.int64)
    cols = np.arange(length)
    response_mask = cols[None, :] < lengths[:, None]
    # Rollout log-probs: mostly confident tokens with a heavy tail of unlikely ones.
    old = -rng.exponential(0.35, size=(batch, length))
    # The current policy drifts by a row-specific amount, more later in the response.
    row_drift = drift * rng.lognormal(0.0, 0.6, size=(batch, 1))
    ramp = 0.5 + cols[None, :] / max(length, 1)
    new = old + rng.normal(0.0, 1.0, size=(batch, length)) * row_drift * ramp
    new = np.minimum(new, 0.0)
    advantages = rng.normal(0.0, 1.0, size=batch)
    return RolloutBatch(
        log_probs=new.astype(np.float32),
        old_log_probs=old.astype(np.float32),
        advantages=advantages.astype(np.float32),
        response_mask=response_mask,
        lengths=lengths.astype(np.int64),
    )
