"""Main job on built-in sample data: CPPO masks for a generated rollout batch, with a
per-reason summary.

    python -m cppo_native.demo [--batch 256] [--length 8192] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from . import REASON_NAMES, cppo_mask
from .sample import make_rollout_batch


def summary_table(info, title: str) -> str:
    counts = np.asarray(info.reason_counts)
    valid = int(counts[1:].sum())
    lines = [title, f"  {'outcome':<28}{'tokens':>12}{'share of valid':>16}"]
    for code in range(1, 5):
        share = counts[code] / valid if valid else 0.0
        lines.append(f"  {code} {REASON_NAMES[code]:<26}{int(counts[code]):>12,}{share:>15.2%}")
    kept = int(counts[1] + counts[2])
    lines.append(f"  {'kept (1 + 2)':<28}{kept:>12,}{(kept / valid if valid else 0):>15.2%}")
    budget = np.asarray(info.row_budget)
    lines.append(f"  per-row budget delta_b_row: mean {budget.mean():.4f}, min {budget.min():.4f}, max {budget.max():.4f}")
    return "\n".join(lines)


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
        ms = (time.perf_counter() - t0) * 1e3
        title = f"{'adaptive' if adaptive else 'fixed'} budget ({ms:.1f} ms with return_info, Rust CPU backend):"
        print(summary_table(info, title))
        print()
    # The uniform (DPPO-style) trust region for comparison: no position weight, no budget.
    mask_uniform = cppo_mask(*args, **knobs, position_weight=False, prefix_budget=False)
    print(f"for comparison, a uniform threshold (position_weight=False, prefix_budget=False) keeps "
          f"{mask_uniform.sum() / batch.response_mask.sum():.2%} of tokens; CPPO with a fixed budget keeps "
          f"{cppo_mask(*args, **knobs).sum() / batch.response_mask.sum():.2%}.")


if __name__ == "__main__":
    main()
