"""CPU benchmark: cppo_native.cppo_mask (Rust, rayon) against the vectorised PyTorch
formula and a vectorised NumPy version, at the same thread count, in one run; and
cppo-native's own torch backend (``backend="torch"``, eager, and its padded mask pass
under torch.compile).

Cases (issue #2): right-padded batches with lengths uniform in [L/4, L], Binary TV from
log-probs, adaptive budget: 256 x 8192, 64 x 8192, 16 x 16384. Throughput counts the
padded B * L tokens (valid tokens are reported too). Peak extra memory is each
method's rise in the process's resident high-water mark during one call, measured in a
fresh subprocess (outputs included).

    python bench/cpu.py [--quick | --tiny] [--no-compile] [--out bench/results/cpu.json]

``--tiny`` (one 8 x 256 case, short timings, no memory subprocesses) only checks that
the script runs; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
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


def batch(b, l):
    return make_rollout_batch(b, l, seed=1234)


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
        from cppo_native.mask import mask_params

        lp, lq, adv, valid = (torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        adv, valid, params = adv[:, None], valid != 0, mask_params(**KNOBS)
        fn = torch.compile(mask_padded, dynamic=False)
        return lambda: fn(lp, lq, adv, valid, None, params)[0]
    if method == "torch":
        targs = tuple(torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        return lambda: torch_cppo_mask(*targs, **KNOBS)
    if method == "torch_compile":
        targs = tuple(torch.from_numpy(x) for x in (data.log_probs, data.old_log_probs, data.advantages, data.response_mask))
        fn = torch.compile(torch_cppo_mask, dynamic=False)
        return lambda: fn(*targs, **KNOBS)
    if method == "numpy":
        args = (data.log_probs, data.old_log_probs, data.advantages, data.response_mask)
        return lambda: numpy_cppo_mask(*args, **KNOBS)
    raise ValueError(method)


def time_it(fn, min_time=1.0, min_reps=3, max_reps=50):
    fn()  # warm-up (thread pools, per-thread buffers, compilation)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), len(times)


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


def machine():
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
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
    ap.add_argument("--out", default=str(HERE / "results" / "cpu.json"))
    opts = ap.parse_args()
    cases = [(8, 256)] if opts.tiny else [(64, 2048), (4, 8192)] if opts.quick else CASES
    min_time = 0.05 if opts.tiny else 1.0
    methods = ["cppo_native", "cppo_native_torch", "torch", "numpy"]
    if not opts.no_compile:
        methods += ["torch_compile", "cppo_native_torch_compile"]
    results = {"machine": machine(), "knobs": KNOBS, "cases": []}
    for b, l in cases:
        data = batch(b, l)
        valid_tokens = int(data.response_mask.sum())
        case = {"batch": b, "length": l, "valid_tokens": valid_tokens, "methods": {}}
        # Sanity: the native mask and the baselines agree before anything is timed.
        ours = runner("cppo_native", data, None)()
        theirs = runner("torch", data, None)().numpy()
        case["mismatches_vs_torch"] = int((ours != theirs).sum())
        # The torch backend obeys the spec's tie rule; count any difference from native.
        case["mismatches_torch_backend_vs_native"] = int((ours != runner("cppo_native_torch", data, None)().numpy()).sum())
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for method in methods:
                if method == "numpy" and threads == 2:
                    continue  # NumPy's elementwise ops are single-threaded
                med, best, reps = time_it(runner(method, data, threads), min_time=min_time)
                entry = case["methods"].setdefault(method, {})
                entry[f"threads_{threads}"] = {
                    "median_s": med,
                    "best_s": best,
                    "reps": reps,
                    "tokens_per_s": b * l / med,
                    "valid_tokens_per_s": valid_tokens / med,
                }
                print(f"{b:4d} x {l:5d}  {method:14s} threads={threads}  {med * 1e3:9.2f} ms  "
                      f"{b * l / med / 1e6:8.1f} M tok/s", flush=True)
        ours = case["methods"]["cppo_native"]
        for threads in (1, 2):
            key = f"threads_{threads}"
            case[f"speedup_vs_torch_{key}"] = case["methods"]["torch"][key]["median_s"] / ours[key]["median_s"]
            for other in ("torch_compile", "cppo_native_torch", "cppo_native_torch_compile"):
                if other in case["methods"]:
                    case[f"speedup_vs_{other}_{key}"] = case["methods"][other][key]["median_s"] / ours[key]["median_s"]
        case["speedup_vs_numpy_threads_1"] = case["methods"]["numpy"]["threads_1"]["median_s"] / ours["threads_1"]["median_s"]
        case["thread_scaling_1_to_2"] = ours["threads_1"]["median_s"] / ours["threads_2"]["median_s"]
        case["output_bytes"] = b * l  # the bool mask
        if not opts.tiny:
            case["peak_extra_memory_bytes"] = {
                m: peak_extra_memory(m, data, 2) for m in ("cppo_native", "cppo_native_torch", "torch", "numpy")
            }
        print(f"    speed-up vs torch: 1 thread {case['speedup_vs_torch_threads_1']:.1f}x, "
              f"2 threads {case['speedup_vs_torch_threads_2']:.1f}x; vs cppo_native_torch: 1 thread "
              f"{case['speedup_vs_cppo_native_torch_threads_1']:.1f}x; 1->2 threads {case['thread_scaling_1_to_2']:.2f}x; "
              f"peak extra MB {({k: round(v / 2**20, 1) for k, v in case.get('peak_extra_memory_bytes', {}).items()})}",
              flush=True)
        results["cases"].append(case)
    results["machine"]["loadavg_at_end"] = os.getloadavg()[0]
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
