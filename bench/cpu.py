"""CPU benchmark: cppo_native.cppo_mask (Rust, rayon) against the vectorised PyTorch
formula (eager and torch.compile), a vectorised NumPy version and a one-pass memory
floor, at the same thread count (1 and 2), in one run.

Cases (issues #2 and #13): right-padded batches with lengths uniform in [L/4, L],
Binary TV from log-probs, adaptive budget: 256 x 8192, 64 x 8192, 16 x 16384, each with
float32 and float64 log-probs (advantages float32 per row, bool response mask). The
PyTorch formula is `bench/baselines.py` (float64 inside, whatever the input dtype, as
the spec requires). The memory floor (`_native.memory_floor`) reads every byte the mask
reads (log-probs, old log-probs, advantages, response mask) once and writes one byte
per token (the bool mask), on the same number of threads. The compute control
(`_native.fp_control`, not a target) is the opposite kind of work: independent fused
multiply-adds in registers, ~1 ns a token at one thread, split over the same threads;
its 1 -> 2 thread scaling (`control_scaling_1_to_2`) is what two threads of arithmetic
could gain on this machine during the case. On a shared VM whose second vCPU can share
a physical core, or its FP pipes, with another guest, it falls below 2x and the mask's
scaling with it (docs/cpu.md, fourth session).

All methods of a case, at both thread counts, are timed in interleaved rounds
(`time_interleaved`): this shared VM's speed drifts by up to ~30% over seconds, and a
method timed on its own would see another drift than the one it is compared with.

Per case and thread count: speedup_vs_eager, speedup_vs_compile (their time / ours),
over_floor (our time / the floor's) and scaling_1_to_2 (our 1-thread time / 2-thread
time); `targets` says whether issue #13's targets hold (>= 10x eager and compile at 1
and 2 threads, <= 5x the floor on 256 x 8192, >= 1.8x from 1 to 2 threads). Throughput
counts the padded B * L tokens (valid tokens are reported too). Peak extra memory is
each method's rise in the process's resident high-water mark during one call, measured
in a fresh subprocess (outputs included; float32 cases only).

    python bench/cpu.py [--quick | --tiny] [--no-compile] [--torch-backend] [--out bench/results/cpu.json]

``--torch-backend`` adds cppo-native's own torch backend (``backend="torch"``, eager,
and its padded pass under torch.compile) as columns. ``--tiny`` (one 8 x 256 case,
short timings, no memory subprocesses) only checks that the script runs; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from baselines import numpy_cppo_mask, torch_cppo_mask  # noqa: E402

import cppo_native  # noqa: E402
from cppo_native.sample import make_rollout_batch  # noqa: E402

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_budget=True)
CASES = [(256, 8192), (64, 8192), (16, 16384)]
DTYPES = {"fp32": np.float32, "fp64": np.float64}
TARGETS = dict(speedup_vs_eager=10.0, speedup_vs_compile=10.0, over_floor_256x8192=5.0, scaling_1_to_2=1.8)


def batch(b, l, dtype="fp32"):
    data = make_rollout_batch(b, l, seed=1234)
    if dtype == "fp32":
        return data
    return dataclasses.replace(data, log_probs=data.log_probs.astype(DTYPES[dtype]),
                               old_log_probs=data.old_log_probs.astype(DTYPES[dtype]))


def _allow_recompiles():
    """Each case, dtype and thread count compiles anew (shapes, dtypes and the thread
    count are guards); past dynamo's default limit of 8 it would silently fall back to
    eager, so the limit is raised."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def runner(method, data, threads):
    """A zero-argument callable computing the mask with `method`."""
    if method == "cppo_native":
        args = (data.log_probs, data.old_log_probs, data.advantages, data.response_mask)
        return lambda: cppo_native.cppo_mask(*args, **KNOBS, num_threads=threads)
    if method == "cppo_native_torch":  # backend="torch", eager, with validation like the native one
        targs = tuple(torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        return lambda: cppo_native.cppo_mask(*targs, **KNOBS, backend="torch")
    if method == "cppo_native_torch_compile":  # the torch backend's padded pass, compiled (no checks)
        from cppo_native._backends.torch_ops import mask_padded
        from cppo_native._core.params import make_params

        lp, lq, adv, valid = (torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        adv, valid, params = adv[:, None], valid != 0, make_params(**KNOBS)
        _allow_recompiles()
        fn = torch.compile(mask_padded, dynamic=False)
        return lambda: fn(lp, lq, adv, valid, None, params)[0]
    if method == "torch":
        targs = tuple(torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        return lambda: torch_cppo_mask(*targs, **KNOBS)
    if method == "torch_compile":
        _allow_recompiles()
        targs = tuple(torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        fn = torch.compile(torch_cppo_mask, dynamic=False)
        return lambda: fn(*targs, **KNOBS)
    if method == "numpy":
        args = (data.log_probs, data.old_log_probs, data.advantages, data.response_mask)
        return lambda: numpy_cppo_mask(*args, **KNOBS)
    if method == "floor":  # one pass over the bytes the mask reads and writes
        from cppo_native._core.native import native_module

        floor = native_module().memory_floor
        read = [np.ascontiguousarray(x).reshape(-1).view(np.uint8)
                for x in (data.log_probs, data.old_log_probs, data.advantages)]
        valid = np.ascontiguousarray(data.response_mask).reshape(-1).view(np.uint8)
        out = np.empty_like(valid)  # the mask's bytes (allocated once: the floor writes, never allocates)
        return lambda: floor(read, valid, out, num_threads=threads or 0)
    if method == "fp_control":  # arithmetic only: how well two threads of FMAs scale now
        from cppo_native._core.native import native_module

        control, tokens = native_module().fp_control, data.log_probs.size
        return lambda: control(tokens, num_threads=threads or 0)
    raise ValueError(method)


ROUNDS = 10  # interleaved rounds per case
SLOT_TIME = 0.05  # seconds a fast method runs in each round (slow ones: one call)
SETTLE_S = 0.02  # pause before each slot
# Untimed calls of a fast method before its slot is timed (slow ones: one call, which
# lasts longer). After the pause this 2-vCPU VM's idle second core came back slowly: the
# first 2-thread calls of a slot ran at one thread's speed (9.7 ms, then ~5.0 ms, on
# 256 x 8192), which fell on whichever fast method a round timed first at two threads.
WARM_S = 0.03


def time_interleaved(fns, fast, rounds, slot_time, warm_time=WARM_S):
    """Times every (method, threads) callable of a case in interleaved rounds: each round
    runs each of them in turn (fast ones for `slot_time`, slow ones once), so that the
    machine's drift during the case (this shared VM's speed was seen to move by 30% over
    seconds) falls on every method alike and the ratios compare like with like. Each
    slot starts with a pause, so that no method is timed while the previous one's
    threads still spin on the other core, then untimed calls (`warm_time` seconds of a
    fast method, one call of a slow one), so that none is timed while the idle core
    comes back to speed. Returns
    {slot: (median, best, reps)} over all of a slot's calls."""
    times = {slot: [] for slot in fns}
    for slot, fn in fns.items():  # warm-up (thread pools, per-thread buffers, compilation)
        torch.set_num_threads(slot[1])
        fn()
        fn()
    for _ in range(rounds):
        for slot, fn in fns.items():
            torch.set_num_threads(slot[1])
            # Let the previous method's threads go idle (OpenMP workers spin for a while
            # after a parallel region; ours linger 0.5 ms), then one untimed call.
            time.sleep(SETTLE_S)
            warm = time.perf_counter()
            fn()
            while fast(slot) and time.perf_counter() - warm < warm_time:
                fn()
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                times[slot].append(t1 - t0)
                if not fast(slot) or t1 - start >= slot_time or len(times[slot]) >= 400 * rounds:
                    break
    return {slot: (statistics.median(t), min(t), len(t)) for slot, t in times.items()}


def peak_extra_memory(method, data, threads):
    """Resident high-water rise (bytes) of one call (outputs included), in a fresh
    process that loads the batch from disk; the kernel's peak-RSS counter is reset
    (/proc/self/clear_refs) just before the call."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batch.npz")
        np.savez(path, **{k: getattr(data, k) for k in ("log_probs", "old_log_probs", "advantages", "response_mask", "lengths")})
        code = (
            "import sys, resource, numpy as np; sys.path.insert(0, %r); import cpu, torch; torch.set_num_threads(%d);"
            "from cppo_native.sample import RolloutBatch; z = np.load(%r);"
            "d = RolloutBatch(**{k: z[k] for k in z.files}); f = cpu.runner(%r, d, %d);"
            "hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]);"
            "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]);"
            "open('/proc/self/clear_refs', 'w').write('5'); r0 = rss(); out = f();"
            "print(hwm() - r0)"
        ) % (str(HERE), threads, path, method, threads)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux


SIMD_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
              "avx512_bf16", "avx512_fp16", "asimd", "sve", "sve2")


def machine():
    cpu = platform.processor()
    flags = []
    ident = {}  # x86 family / model / stepping: tells a VM's "AMD EPYC" generations apart
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "Model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            if key in ("cpu family", "model", "stepping") and key not in ident:
                ident[key] = line.split(":", 1)[1].strip()
            if key in ("flags", "Features") and not flags:
                present = set(line.split(":", 1)[1].split())
                flags = [f for f in SIMD_FLAGS if f in present]
    except OSError:
        pass
    from cppo_native._core.native import native_module

    return {
        "cpu": cpu,
        "cpu_family_model_stepping": [ident.get(k) for k in ("cpu family", "model", "stepping")],
        "simd_flags": flags,
        "cppo_native_simd_variant": native_module().simd_variant(),
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cppo_native": cppo_native.__version__,
        "loadavg_at_start": os.getloadavg()[0],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small cases, for a smoke run")
    ap.add_argument("--tiny", action="store_true", help="one tiny case, short timings: checks that the script runs")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--torch-backend", action="store_true", help="also time cppo_mask(backend='torch') (and compiled)")
    ap.add_argument("--dtypes", default="fp32,fp64", help="comma-separated: fp32, fp64")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu.json"))
    opts = ap.parse_args()
    cases = [(8, 256)] if opts.tiny else [(64, 2048), (4, 8192)] if opts.quick else CASES
    dtypes = opts.dtypes.split(",")
    methods = ["cppo_native", "floor", "fp_control", "torch", "numpy"]
    if not opts.no_compile:
        methods.append("torch_compile")
    if opts.torch_backend:
        methods.append("cppo_native_torch")
        if not opts.no_compile:
            methods.append("cppo_native_torch_compile")
    results = {"machine": machine(), "knobs": KNOBS, "targets": TARGETS, "cases": []}
    started = time.perf_counter()
    for b, l in cases:
        for dtype in dtypes:
            results["cases"].append(run_case(b, l, dtype, methods, opts))
    results["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    results["runtime_s"] = time.perf_counter() - started
    checks = [c["targets_met"] for c in results["cases"]]
    results["all_targets_met"] = all(all(c.values()) for c in checks)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"all targets met: {results['all_targets_met']}; {results['runtime_s']:.0f} s; wrote {opts.out}")


def run_case(b, l, dtype, methods, opts):
    data = batch(b, l, dtype)
    valid_tokens = int(data.response_mask.sum())
    case = {"batch": b, "length": l, "dtype": dtype, "valid_tokens": valid_tokens, "methods": {}}
    # Sanity: the native mask and the baselines agree before anything is timed.
    ours = runner("cppo_native", data, None)()
    theirs = runner("torch", data, None)().numpy()
    case["mismatches_vs_torch"] = int((ours != theirs).sum())
    if opts.torch_backend:
        # The torch backend obeys the spec's tie rule; count any difference from native.
        case["mismatches_torch_backend_vs_native"] = int((ours != runner("cppo_native_torch", data, None)().numpy()).sum())
    fast = ("cppo_native", "floor", "fp_control")
    slots = [(method, threads) for threads in (1, 2) for method in methods
             if not (method == "numpy" and threads == 2)]  # NumPy's elementwise ops are single-threaded
    timed = time_interleaved(
        {slot: runner(slot[0], data, slot[1]) for slot in slots},
        fast=lambda slot: slot[0] in fast,
        rounds=3 if opts.tiny else ROUNDS,
        slot_time=0.01 if opts.tiny else SLOT_TIME,
        warm_time=0.0 if opts.tiny else WARM_S,
    )
    for (method, threads), (med, best, reps) in timed.items():
        entry = case["methods"].setdefault(method, {})
        entry[f"threads_{threads}"] = {
            "median_s": med,
            "best_s": best,
            "reps": reps,
            "tokens_per_s": b * l / med,
            "valid_tokens_per_s": valid_tokens / med,
        }
        print(f"{b:4d} x {l:5d} {dtype}  {method:26s} threads={threads}  {med * 1e3:9.3f} ms  "
              f"{b * l / med / 1e6:8.1f} M tok/s", flush=True)
    m = case["methods"]
    ours = m["cppo_native"]
    for threads in (1, 2):
        key = f"threads_{threads}"
        t = ours[key]["median_s"]
        case[f"speedup_vs_eager_{key}"] = m["torch"][key]["median_s"] / t
        if "torch_compile" in m:
            case[f"speedup_vs_compile_{key}"] = m["torch_compile"][key]["median_s"] / t
        case[f"over_floor_{key}"] = t / m["floor"][key]["median_s"]
        for other in ("cppo_native_torch", "cppo_native_torch_compile"):
            if other in m:
                case[f"speedup_vs_{other}_{key}"] = m[other][key]["median_s"] / t
    case["speedup_vs_numpy_threads_1"] = m["numpy"]["threads_1"]["median_s"] / ours["threads_1"]["median_s"]
    case["scaling_1_to_2"] = ours["threads_1"]["median_s"] / ours["threads_2"]["median_s"]
    case["floor_scaling_1_to_2"] = m["floor"]["threads_1"]["median_s"] / m["floor"]["threads_2"]["median_s"]
    case["control_scaling_1_to_2"] = m["fp_control"]["threads_1"]["median_s"] / m["fp_control"]["threads_2"]["median_s"]
    case["output_bytes"] = b * l  # the bool mask
    met = {}
    for threads in (1, 2):
        key = f"threads_{threads}"
        met[f"speedup_vs_eager_{key}"] = case[f"speedup_vs_eager_{key}"] >= TARGETS["speedup_vs_eager"]
        if f"speedup_vs_compile_{key}" in case:
            met[f"speedup_vs_compile_{key}"] = case[f"speedup_vs_compile_{key}"] >= TARGETS["speedup_vs_compile"]
        if (b, l) == (256, 8192):
            met[f"over_floor_{key}"] = case[f"over_floor_{key}"] <= TARGETS["over_floor_256x8192"]
    met["scaling_1_to_2"] = case["scaling_1_to_2"] >= TARGETS["scaling_1_to_2"]
    case["targets_met"] = met
    if not opts.tiny and dtype == "fp32":
        case["peak_extra_memory_bytes"] = {
            meth: peak_extra_memory(meth, data, 2) for meth in ("cppo_native", "torch", "numpy")
        }
    print(f"    {dtype}: vs eager {case['speedup_vs_eager_threads_1']:.1f}x / {case['speedup_vs_eager_threads_2']:.1f}x"
          + (f", vs compile {case['speedup_vs_compile_threads_1']:.1f}x / {case['speedup_vs_compile_threads_2']:.1f}x"
             if "speedup_vs_compile_threads_1" in case else "")
          + f" (1 / 2 threads); over floor {case['over_floor_threads_1']:.1f}x / {case['over_floor_threads_2']:.1f}x; "
          f"1->2 threads {case['scaling_1_to_2']:.2f}x (floor {case['floor_scaling_1_to_2']:.2f}x, "
          f"compute control {case['control_scaling_1_to_2']:.2f}x); "
          f"targets {'met' if all(met.values()) else 'MISSED: ' + ', '.join(k for k, v in met.items() if not v)}",
          flush=True)
    return case


if __name__ == "__main__":
    main()
