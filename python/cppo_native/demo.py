"""Main job on built-in sample data: CPPO masks for a generated rollout batch, with a
per-reason summary.

    python -m cppo_native.demo [--batch 256] [--length 8192] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np

from . import cppo_mask
from ._io.summary import Summary
from .sample import make_rollout_batch


def summary_table(info, knobs: dict, seconds: float) -> str:
    """The per-reason table ``cppo-mask`` prints, for a padded ``[B, L]`` result."""
    reason = np.asarray(info.reason)
    rows, length = reason.shape
    summary = Summary(knobs)
    summary.update(SimpleNamespace(
        reason_counts=np.asarray(info.reason_counts, dtype=np.int64), offsets=np.arange(rows + 1) * length,
        reason_values=reason.ravel(), row_budget_values=np.asarray(info.row_budget)))
    return summary.table(seconds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delta", type=float, default=0.15)
    ap.add_argument("--delta-b", type=float, default=0.02)
    ap.add_argument("--w-min", type=float, default=0.8)
    opts = ap.parse_args(argv)

    batch = make_rollout_batch(opts.batch, opts.length, seed=opts.seed)
    args = (batch.log_probs, batch.old_log_probs, batch.advantages, batch.response_mask)
    knobs = dict(delta=opts.delta, delta_b=opts.delta_b, w_min=opts.w_min)
    print(f"CPPO (Cumulative Prefix-divergence Policy Optimization) mask on a synthetic rollout batch: "
          f"{opts.batch} responses x {opts.length} positions, {int(batch.response_mask.sum()):,} generated tokens, "
          f"Binary TV divergence, delta={opts.delta}, delta_b={opts.delta_b}, w_min={opts.w_min}\n")
    for adaptive in (False, True):
        cppo_mask(*args, **knobs, adaptive_budget=adaptive)  # warm-up
        t0 = time.perf_counter()
        mask, info = cppo_mask(*args, **knobs, adaptive_budget=adaptive, return_info=True)
        seconds = time.perf_counter() - t0
        print(f"{'adaptive' if adaptive else 'fixed'} budget ({seconds * 1e3:.1f} ms with return_info, Rust CPU "
              "backend; the table cppo-mask prints, padding counted as invalid):")
        print(summary_table(info, dict(knobs, adaptive_budget=adaptive), seconds))
        print()
    # The uniform (DPPO-style) trust region for comparison: no position weight, no budget.
    mask_uniform = cppo_mask(*args, **knobs, position_weight=False, prefix_budget=False)
    print(f"for comparison, a uniform threshold (position_weight=False, prefix_budget=False) keeps "
          f"{mask_uniform.sum() / batch.response_mask.sum():.2%} of tokens; CPPO with a fixed budget keeps "
          f"{cppo_mask(*args, **knobs).sum() / batch.response_mask.sum():.2%}.")


if __name__ == "__main__":
    main()
