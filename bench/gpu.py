"""GPU benchmark (the lent H200): cppo_native.cppo_mask on CUDA against the vectorised
PyTorch formula (eager and torch.compile), the torch backend and the copy floor, in one
run.

Cases 16 x 16384, 64 x 8192, 256 x 8192, 512 x 16384; float32 and bfloat16 inputs
(log-probs, old log-probs, token-level advantages) and a bool response mask; adaptive
budget (q = 0.9), Binary TV from log-probs, horizon "sequence"; right-padded rows of
length U[L/4, L]. Per case and dtype:

- api:        the public call cppo_mask(..., validate=False) end to end: back-to-back
              calls then one synchronize, per call (max(host, device) in steady state);
- api_validate: the same with validate=True (one 16-byte read per call);
- host:       median host time to issue one api call on an idle GPU (host_overhead_us);
- kernels:    GPU time per call of the call captured in a CUDA graph and replayed back
              to back (kernels only; "kernel_method" says so). If the capture fails the
              row records the error and CUDA events around back-to-back api calls
              instead ("kernel_method": "events"), never silently;
- eager / compiled: bench/baselines.py torch_cppo_mask, eager and under torch.compile
              (dynamic shapes: one compile per dtype), end to end like api;
- torch_backend: cppo_mask(..., backend="torch"), end to end;
- floor:      a device-to-device copy of exactly the bytes the mask reads and writes
              (log-probs, old log-probs, advantages, response mask read; the bool mask
              written): a copy of (read + write) / 2 bytes moves read + write bytes.

Writes bench/results/gpu-h200.json (or --out) with a ``rows`` list: B, L, dtype,
speedup_vs_eager, speedup_vs_compile, kernel_over_floor, host_overhead_us, the times
and the mask disagreements with the formula (allowed only where |Z_t - c_t| <= 1e-9).

UNVERIFIED: written without a GPU; it has not run yet (its non-GPU parts are tested by
tests/test_bench_gpu.py). tools/gpu_check.sh runs it.

    python bench/gpu.py [--out PATH] [--iters 30] [--quick] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_common as gc  # noqa: E402

CASES = [(16, 16384), (64, 8192), (256, 8192), (512, 16384)]
DTYPES = ("float32", "bfloat16")
KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True, budget_quantile=0.9)
TARGETS = {"speedup_vs_eager": 20.0, "speedup_vs_compile": 5.0, "kernel_over_floor_512x16384": 2.0,
           "host_overhead_us": 20.0}
ROW_KEYS = ("B", "L", "dtype", "speedup_vs_eager", "speedup_vs_compile", "kernel_over_floor", "host_overhead_us")
DEFAULT_OUT = HERE / "results" / "gpu-h200.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="first two cases, few iterations (smoke run)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    args = p.parse_args(argv)
    args.dtypes = tuple(d for d in args.dtypes.split(",") if d)
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    if args.iters < 1:
        p.error("--iters must be >= 1")
    return args


def summarize(B: int, L: int, dtype: str, ms: dict, kernel_method: str, extra: dict) -> dict:
    """One JSON row from the measured times (milliseconds)."""
    row = {
        "B": B, "L": L, "dtype": dtype,
        "speedup_vs_eager": ms["eager"] / ms["api"],
        "speedup_vs_compile": ms["compiled"] / ms["api"],
        "speedup_vs_torch_backend": ms["torch_backend"] / ms["api"],
        "kernel_over_floor": ms["kernels"] / ms["floor_copy"],
        "host_overhead_us": ms["host"] * 1e3,
        "kernel_method": kernel_method,
        "ms": ms,
    }
    row.update(extra)
    return row


def targets_met(rows: list) -> dict:
    big = [r for r in rows if (r["B"], r["L"]) == (512, 16384)]
    return {
        "speedup_vs_eager": all(r["speedup_vs_eager"] >= TARGETS["speedup_vs_eager"] for r in rows),
        "speedup_vs_compile": all(r["speedup_vs_compile"] >= TARGETS["speedup_vs_compile"] for r in rows),
        "kernel_over_floor_512x16384": (all(r["kernel_over_floor"] <= TARGETS["kernel_over_floor_512x16384"]
                                            for r in big) if big else None),
        "host_overhead_us": all(r["host_overhead_us"] <= TARGETS["host_overhead_us"] for r in rows),
    }


def make_batch(torch, batch: int, length: int, dtype, seed: int = 0):
    """Synthetic GRPO-like batch generated on the GPU (same recipe as cppo_native.sample)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=g, device="cuda")
    cols = torch.arange(length, device="cuda")
    mask = cols[None, :] < lengths[:, None]
    old = -torch.empty(batch, length, device="cuda").exponential_(1 / 0.35, generator=g)
    row_drift = 0.08 * torch.empty(batch, 1, device="cuda").log_normal_(0.0, 0.6, generator=g)
    ramp = 0.5 + cols[None, :] / length
    new = (old + torch.randn(batch, length, device="cuda", generator=g) * row_drift * ramp).clamp(max=0.0)
    adv = torch.randn(batch, 1, device="cuda", generator=g).expand(batch, length).contiguous()
    return new.to(dtype), old.to(dtype), adv.to(dtype), mask


def bench_case(torch, B: int, L: int, dtype_name: str, iters: int, compiled_fn) -> dict:
    from baselines import torch_cppo_mask

    from cppo_native import cppo_mask

    dtype = getattr(torch, dtype_name)
    lp, lq, adv, mask = make_batch(torch, B, L, dtype)
    read_bytes = lp.nbytes + lq.nbytes + adv.nbytes + mask.nbytes
    write_bytes = B * L  # the bool mask
    floor_src = torch.empty((read_bytes + write_bytes + 1) // 2, dtype=torch.uint8, device="cuda")
    floor_dst = torch.empty_like(floor_src)

    def api():
        return cppo_mask(lp, lq, adv, mask, validate=False, **KNOBS)

    def api_validate():
        return cppo_mask(lp, lq, adv, mask, validate=True, **KNOBS)

    def torch_backend():
        return cppo_mask(lp, lq, adv, mask, validate=False, backend="torch", **KNOBS)

    def eager():
        return torch_cppo_mask(lp, lq, adv, mask, **KNOBS)

    def compiled():
        return compiled_fn(lp, lq, adv, mask, **KNOBS)

    t0 = time.perf_counter()
    compiled()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    ours, theirs = api(), eager()
    mismatches = int((ours != theirs).sum())

    ms = {
        "api": gc.per_call_pipelined(torch, api, iters) * 1e3,
        "api_validate": gc.per_call_pipelined(torch, api_validate, iters) * 1e3,
        "host": gc.host_time(torch, api, iters) * 1e3,
        "eager": gc.per_call_pipelined(torch, eager, max(3, iters // 5)) * 1e3,
        "compiled": gc.per_call_pipelined(torch, compiled, iters) * 1e3,
        "torch_backend": gc.per_call_pipelined(torch, torch_backend, max(3, iters // 5)) * 1e3,
        "floor_copy": gc.events_per_call(torch, lambda: floor_dst.copy_(floor_src), iters) * 1e3,
    }
    extra = {"bytes_read": read_bytes, "bytes_written": write_bytes, "valid_tokens": int(mask.sum()),
             "mask_mismatches_vs_formula": mismatches, "compile_seconds": compile_s}
    try:
        ms["kernels"] = gc.graph_replay_per_call(torch, api, iters) * 1e3
        method = "cuda_graph_replay"
    except Exception as exc:  # recorded in the row, and the events time used instead
        extra["graph_capture_error"] = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        ms["kernels"] = gc.events_per_call(torch, api, iters) * 1e3
        method = "events"
    extra["floor_bandwidth_GBps"] = (read_bytes + write_bytes) / (ms["floor_copy"] / 1e3) / 1e9
    return summarize(B, L, dtype_name, ms, method, extra)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch = gc.require_cuda("bench/gpu.py")
    from baselines import torch_cppo_mask

    cases = CASES[:2] if args.quick else CASES
    iters = 5 if args.quick else args.iters
    rows = []
    for dtype_name in args.dtypes:
        compiled_fn = torch.compile(torch_cppo_mask, dynamic=True)
        for B, L in cases:
            r = bench_case(torch, B, L, dtype_name, iters, compiled_fn)
            rows.append(r)
            ms = r["ms"]
            print(f"{B:4d} x {L:6d} {dtype_name:8s}: api {ms['api']:.4f} ms (kernels {ms['kernels']:.4f}, host "
                  f"{r['host_overhead_us']:.1f} us, validate {ms['api_validate']:.4f}) | eager {ms['eager']:.3f} | "
                  f"compiled {ms['compiled']:.3f} | torch backend {ms['torch_backend']:.3f} | floor "
                  f"{ms['floor_copy']:.4f} | x{r['speedup_vs_eager']:.1f} eager, x{r['speedup_vs_compile']:.1f} "
                  f"compiled, kernels/floor {r['kernel_over_floor']:.2f} | mismatches "
                  f"{r['mask_mismatches_vs_formula']}", flush=True)
    met = targets_met(rows)
    report = {
        "benchmark": "bench/gpu.py",
        "date": gc.utc_now(),
        "gpu": gc.describe_gpu(torch),
        "versions": gc.versions(torch),
        "settings": dict(KNOBS, divergence="binary_tv", horizon="sequence", advantages="per token",
                         response_mask="bool", iters=iters, quick=args.quick, dtypes=list(args.dtypes)),
        "targets": TARGETS,
        "targets_met": met,
        "rows": rows,
    }
    path = gc.write_report(args.out, report, ROW_KEYS, ("gpu", "rows"))
    print(f"wrote {path}; targets met: {met}")


if __name__ == "__main__":
    main()
