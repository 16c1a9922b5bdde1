"""Benchmark: Top-K divergence straight from the policy's logits on one GPU.

Compares, in one run on the same device and data:
- eager PyTorch (the public way): float32 log_softmax of [N, V] logits / T, gather at the
  top-K ids and the sampled token, then the bucketed divergence;
- the same gather step under torch.compile;
- a read-once bound: torch.amax over the logits (one pass over the same bytes);
- cppo-native's fused CuPy kernel (online log-sum-exp + gather, no [N, V] float32).
Reports median times (CUDA events), extra peak memory over the inputs, the kernel's
maximum deviation from a float64 reference on a slice, and writes
bench/results/gpu_topk.json.

UNVERIFIED: written without access to a GPU; it has not run yet.

    python bench/gpu_topk.py [--n 8192] [--vocab 151936] [--k 20] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cppo_native import divergence as dv


def timed(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over reps runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kind", default="tv", choices=["tv", "kl"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_topk.json"))
    args = p.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    n, vocab, k, temp = args.n, args.vocab, args.k, args.temperature

    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, vocab, device=dev, generator=g) * 3.0).to(dtype)
    ids = torch.randint(0, vocab - k, (n, 1), device=dev, generator=g) + torch.arange(k, device=dev)
    tlq = torch.log_softmax(torch.randn(n, k + 1, device=dev, generator=g, dtype=torch.float64), -1)[:, :k]
    y = torch.where(torch.rand(n, device=dev, generator=g) < 0.5, ids[:, 0],
                    torch.randint(0, vocab, (n,), device=dev, generator=g))
    listed = ids == y[:, None]
    lq = torch.where(listed.any(-1), (tlq * listed).sum(-1), torch.full((n,), -12.0, device=dev, dtype=torch.float64))

    def gather_eager(x):
        lsm = torch.log_softmax(x.float() / temp, dim=-1)
        return lsm.gather(-1, ids), lsm.gather(-1, y[:, None])[:, 0]

    gather_compiled = torch.compile(gather_eager, dynamic=False)

    def eager():
        tlp, lp = gather_eager(logits)
        return dv.topk_divergence(lp, lq, tlp, tlq, ids, y, kind=args.kind, validate=False)

    def compiled():
        tlp, lp = gather_compiled(logits)
        return dv.topk_divergence(lp, lq, tlp, tlq, ids, y, kind=args.kind, validate=False)

    def read_once():
        return torch.amax(logits, dim=-1)

    def fused():
        return dv.topk_divergence_from_logits(logits, ids, tlq, y, lq, kind=args.kind, temperature=temp,
                                              validate=False)

    t0 = time.time()
    fused()  # NVRTC compile
    compile_s = time.time() - t0
    results = {
        "eager_ms": timed(eager, args.reps),
        "torch_compile_ms": timed(compiled, args.reps),
        "read_once_ms": timed(read_once, args.reps),
        "cppo_native_ms": timed(fused, args.reps),
        "cppo_native_validate_ms": timed(lambda: dv.topk_divergence_from_logits(
            logits, ids, tlq, y, lq, kind=args.kind, temperature=temp), args.reps),
    }
    memory = {
        "eager_extra_mb": extra_peak_mb(eager),
        "torch_compile_extra_mb": extra_peak_mb(compiled),
        "cppo_native_extra_mb": extra_peak_mb(fused),
    }
    # accuracy on a slice against float64
    rows = slice(0, min(n, 256))
    lsm64 = torch.log_softmax(logits[rows].double() / temp, -1)
    want = dv.topk_divergence(lsm64.gather(-1, y[rows, None])[:, 0], lq[rows], lsm64.gather(-1, ids[rows]),
                              tlq[rows], ids[rows], y[rows], kind=args.kind)
    got = fused()[rows]
    report = {
        "benchmark": "topk_divergence_from_logits",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": {"n": n, "vocab": vocab, "k": k, "dtype": args.dtype, "temperature": temp, "kind": args.kind},
        "reps": args.reps,
        "times_ms": results,
        "speedup_vs_torch_compile": results["torch_compile_ms"] / results["cppo_native_ms"],
        "ratio_to_read_once": results["cppo_native_ms"] / results["read_once_ms"],
        "extra_memory_mb": memory,
        "max_abs_err_vs_float64": float((got - want).abs().max()),
        "nvrtc_compile_s": compile_s,
        "targets": {"speedup_vs_torch_compile": ">= 1.3", "ratio_to_read_once": "<= 1.25", "extra_memory_mb": "< 64"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
