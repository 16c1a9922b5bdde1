"""Smoke case for tools/gpu_check.sh (also the small case compute-sanitizer runs):
cppo_mask and topk_divergence_from_logits on CUDA tensors against the float64
reference, under the spec's tolerance rule. Prints SMOKE OK or raises.

    python tools/gpu_smoke.py [--size small|smoke]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gpu_compare import assert_within_tolerance  # noqa: E402


def info_dict(info) -> dict:
    return {k: getattr(info, k) for k in ("reason", "threshold", "gate", "row_budget", "reason_counts")}


def mask_case(rows: int, length: int, dtype, seed: int, **knobs) -> None:
    import cppo_native
    from cppo_native import cppo_mask, cppo_mask_reference

    rng = np.random.default_rng(seed)
    lp = -rng.exponential(0.3, size=(rows, length))
    lq = np.minimum(lp + rng.normal(0, 0.1, size=lp.shape), 0.0)
    adv = rng.normal(size=rows)
    valid = rng.random(lp.shape) < 0.9
    lp_t = torch.from_numpy(lp).to(dtype)
    lq_t = torch.from_numpy(lq).to(dtype)
    mask, info = cppo_mask(lp_t.cuda(), lq_t.cuda(), torch.from_numpy(adv).cuda(), torch.from_numpy(valid).cuda(),
                           return_info=True, **knobs)
    assert mask.device.type == "cuda" and mask.dtype == torch.bool
    ref = cppo_mask_reference(lp_t.double().numpy(), lq_t.double().numpy(), adv, valid, **knobs)
    assert_within_tolerance(mask, info_dict(info), ref, budget_rtol=1e-12)
    bad = lp_t.clone()
    bad[1, 2] = float("nan")
    valid[1, 2] = True
    try:
        cppo_mask(bad.cuda(), lq_t.cuda(), torch.from_numpy(adv).cuda(), torch.from_numpy(valid).cuda(), **knobs)
    except ValueError as exc:
        assert "(row 1, column 2)" in str(exc), exc
    else:
        raise AssertionError("a NaN log-prob was not reported")
    print(f"mask {rows}x{length} {dtype} {knobs}: ok ({int(mask.sum())} kept), cppo_native {cppo_native.__version__}")


def topk_case(n: int, vocab: int, k: int, dtype) -> None:
    from cppo_native import divergence as dv

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    lmu = torch.log_softmax(logits.double() + 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    ids = torch.topk(lmu, k, -1).indices
    y = torch.where(torch.rand(n, generator=g) < 0.5, ids[:, 0], torch.randint(0, vocab, (n,), generator=g))
    tlq, lq = lmu.gather(-1, ids), lmu.gather(-1, y[:, None])[:, 0]
    got = dv.topk_divergence_from_logits(logits.cuda(), ids.cuda(), tlq.cuda(), y.cuda(), lq.cuda())
    lpi = torch.log_softmax(logits.double(), -1)
    want = dv.topk_divergence_reference(lpi.gather(-1, y[:, None])[:, 0].numpy(), lq.numpy(),
                                        lpi.gather(-1, ids).numpy(), tlq.numpy(), ids.numpy(), y.numpy())
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5, atol=5e-6)
    print(f"topk {n}x{vocab} K={k} {dtype}: ok")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["small", "smoke"], default="smoke")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tools/gpu_smoke.py: no CUDA device")
    knobs = dict(delta=0.15, delta_b=0.02)
    if args.size == "small":  # for compute-sanitizer: few, small launches
        mask_case(3, 1500, torch.float32, 0, adaptive_budget=True, **knobs)
        mask_case(2, 700, torch.bfloat16, 1, position_weight="shuffled", **knobs)
        topk_case(4, 3000, 20, torch.bfloat16)
    else:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            mask_case(6, 3000, dtype, 2, adaptive_budget=True, **knobs)
        mask_case(4, 20000, torch.float32, 3, adaptive_budget=True, budget_quantile=0.5, **knobs)
        mask_case(3, 900, torch.float32, 4, position_weight="shuffled", **knobs)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            topk_case(16, 151936, 20, dtype)
    print("SMOKE OK")


if __name__ == "__main__":
    main()
