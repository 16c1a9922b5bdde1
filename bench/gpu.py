"""GPU benchmark for the lent H100: cppo_native.cppo_mask (CUDA) against the vectorised
PyTorch formula (eager and torch.compile) and against the bandwidth floor, in one run.

Cases: 16 x 16384, 64 x 8192, 256 x 8192, 512 x 16384; adaptive budget (q = 0.9),
Binary TV from log-probs, horizon "sequence"; float32 log-probs and token-level
advantages, bool response mask, right-padded rows of length U[L/4, L] (the statistics
of cppo_native.sample). Per case it measures

- api:        the public call cppo_mask(..., validate=False), end to end: N back-to-back
              calls then one synchronize, per call (host overhead included; the calls
              are asynchronous, so this is max(host, device) per call in steady state);
- api_validate: the same with validate=True (one device-to-host read per call);
- api_latency: median of single synchronised calls (validate=False);
- kernels:    the GPU time of the cppo_* kernels per call (torch.profiler / CUPTI);
- eager / compiled: bench/baselines.py torch_cppo_mask eager and under torch.compile (end to end,
              like api);
- floor:      a device-to-device copy moving as many bytes as the mask must read
              (log-probs, old log-probs, advantages, mask) plus write (the bool mask):
              (read + write) / 2 bytes copied, CUDA events, median.

It also counts mask disagreements with the formula (allowed only where |Z_t - c_t| <=
1e-9) and writes everything to bench/results/gpu-h100.json (or --out).

    python bench/gpu.py [--out PATH] [--iters 50] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from baselines import torch_cppo_mask  # noqa: E402  (the shared formula, also used by bench/cpu.py)

import cppo_native  # noqa: E402
from cppo_native import cppo_mask  # noqa: E402

CASES = [(16, 16384), (64, 8192), (256, 8192), (512, 16384)]
KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True, budget_quantile=0.9)
TARGETS = {"vs_eager": 20.0, "vs_compiled": 5.0, "kernel_vs_floor_512x16384": 2.0}


def make_batch(batch: int, length: int, seed: int = 0, device: str = "cuda"):
    """Synthetic GRPO-like batch generated on the GPU (same recipe as cppo_native.sample)."""
    g = torch.Generator(device=device).manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=g, device=device)
    cols = torch.arange(length, device=device)
    mask = cols[None, :] < lengths[:, None]
    old = -torch.empty(batch, length, device=device).exponential_(1 / 0.35, generator=g)
    row_drift = 0.08 * torch.empty(batch, 1, device=device).log_normal_(0.0, 0.6, generator=g)
    ramp = 0.5 + cols[None, :] / length
    new = (old + torch.randn(batch, length, device=device, generator=g) * row_drift * ramp).clamp(max=0.0)
    adv_row = torch.randn(batch, 1, device=device, generator=g)
    adv = adv_row.expand(batch, length).contiguous()  # token-level advantages, as trainers pass them
    return new.float(), old.float(), adv.float(), mask


def per_call_pipelined(fn, iters: int) -> float:
    """Seconds per call for `iters` back-to-back calls and one synchronize."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def per_call_latency(fn, iters: int) -> float:
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def event_time(fn, iters: int) -> float:
    """Median GPU time of fn (CUDA events), seconds."""
    fn()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def kernel_time(fn, iters: int, prefix: str = "cppo_") -> dict:
    """GPU time per call of the kernels whose name starts with `prefix` (CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for evt in prof.key_averages():
        if evt.key.startswith(prefix):
            total_us = getattr(evt, "device_time_total", None)
            if total_us is None:
                total_us = evt.cuda_time_total
            per_kernel[evt.key] = total_us / iters / 1e6
    return per_kernel


def bench_case(batch: int, length: int, iters: int, compiled_fn) -> dict:
    lp, lq, adv, mask = make_batch(batch, length)
    tokens = batch * length
    read_bytes = lp.nbytes + lq.nbytes + adv.nbytes + mask.nbytes
    write_bytes = tokens  # bool mask
    floor_src = torch.empty((read_bytes + write_bytes) // 2, dtype=torch.uint8, device="cuda")
    floor_dst = torch.empty_like(floor_src)

    api = lambda: cppo_mask(lp, lq, adv, mask, validate=False, **KNOBS)  # noqa: E731
    api_validate = lambda: cppo_mask(lp, lq, adv, mask, validate=True, **KNOBS)  # noqa: E731
    eager = lambda: torch_cppo_mask(lp, lq, adv, mask, **KNOBS)  # noqa: E731
    compiled = lambda: compiled_fn(lp, lq, adv, mask, **KNOBS)  # noqa: E731

    t0 = time.perf_counter()
    compiled()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0

    # Agreement with the formula (differences are allowed only at |Z - c| <= 1e-9).
    ours, theirs = api(), eager()
    mismatches = int((ours != theirs).sum())

    result = {
        "batch": batch,
        "length": length,
        "tokens": tokens,
        "valid_tokens": int(mask.sum()),
        "bytes_read": read_bytes,
        "bytes_written": write_bytes,
        "mask_mismatches_vs_formula": mismatches,
        "compile_seconds": compile_s,
        "ms": {
            "api": per_call_pipelined(api, iters) * 1e3,
            "api_validate": per_call_pipelined(api_validate, iters) * 1e3,
            "api_latency": per_call_latency(api, iters) * 1e3,
            "eager": per_call_pipelined(eager, max(5, iters // 5)) * 1e3,
            "compiled": per_call_pipelined(compiled, iters) * 1e3,
            "floor_copy": event_time(lambda: floor_dst.copy_(floor_src), iters) * 1e3,
        },
    }
    kernels = kernel_time(api, iters)
    result["kernel_ms"] = {k: v * 1e3 for k, v in kernels.items()}
    ms = result["ms"]
    ms["kernels"] = sum(kernels.values()) * 1e3
    result["floor_bandwidth_GBps"] = (read_bytes + write_bytes) / (ms["floor_copy"] / 1e3) / 1e9
    result["speedup"] = {
        "vs_eager": ms["eager"] / ms["api"],
        "vs_compiled": ms["compiled"] / ms["api"],
        "kernels_over_floor": ms["kernels"] / ms["floor_copy"],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results" / "gpu-h100.json"))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="first two cases, few iterations (smoke run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA device")
    import cupy

    cases = CASES[:2] if args.quick else CASES
    iters = 5 if args.quick else args.iters
    compiled_fn = torch.compile(torch_cppo_mask, dynamic=False)
    results = []
    for batch, length in cases:
        r = bench_case(batch, length, iters, compiled_fn)
        results.append(r)
        ms = r["ms"]
        print(
            f"{batch:4d} x {length:6d}: api {ms['api']:.4f} ms (kernels {ms['kernels']:.4f}, "
            f"validate {ms['api_validate']:.4f}, latency {ms['api_latency']:.4f}) | eager {ms['eager']:.3f} "
            f"| compiled {ms['compiled']:.3f} | floor {ms['floor_copy']:.4f} ms "
            f"| x{r['speedup']['vs_eager']:.1f} eager, x{r['speedup']['vs_compiled']:.1f} compiled, "
            f"kernels/floor {r['speedup']['kernels_over_floor']:.2f} | mismatches {r['mask_mismatches_vs_formula']}",
            flush=True,
        )
    big = next((r for r in results if (r["batch"], r["length"]) == (512, 16384)), None)
    met = {
        "vs_eager": all(r["speedup"]["vs_eager"] >= TARGETS["vs_eager"] for r in results),
        "vs_compiled": all(r["speedup"]["vs_compiled"] >= TARGETS["vs_compiled"] for r in results),
        "kernel_vs_floor_512x16384": None if big is None
        else big["speedup"]["kernels_over_floor"] <= TARGETS["kernel_vs_floor_512x16384"],
    }
    out = {
        "benchmark": "bench/gpu.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "cppo_native": cppo_native.__version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cupy": cupy.__version__,
            "python": platform.python_version(),
        },
        "settings": dict(KNOBS, divergence="binary_tv", horizon="sequence", dtypes="float32 inputs, bool mask",
                         iters=iters, quick=args.quick),
        "targets": TARGETS,
        "targets_met": met,
        "cases": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}; targets met: {met}")


if __name__ == "__main__":
    main()
