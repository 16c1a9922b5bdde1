"""Benchmark: Top-K reduced TV on CPU, cppo-native's Rust kernel against the strongest
alternative available in the same process (the same math as vectorised float64 torch
ops, i.e. cppo-native's own torch path, which is what a PyTorch user would write).

    python bench/cpu_topk.py [--n 262144] [--k 20] [--threads 0]

Writes bench/results/cpu_topk.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cppo_native import divergence as dv


def best_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=262144)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_topk.json"))
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n, k = a.n, a.k
    ids = (rng.integers(0, 150000, (n, 1)) + np.arange(k)).astype(np.int64)
    tlq = np.log(rng.dirichlet(np.ones(k + 1), n)[:, :k])
    tlp = np.minimum(tlq + rng.normal(0, 0.1, (n, k)), 0.0)
    y = np.where(rng.random(n) < 0.7, ids[:, 0], rng.integers(0, 150000, n)).astype(np.int64)
    lq = np.where(y == ids[:, 0], tlq[:, 0], -12.0)
    lp = np.where(y == ids[:, 0], tlp[:, 0], -11.5)
    threads = a.threads or None
    if threads:
        torch.set_num_threads(threads)
    t = {key: torch.from_numpy(v) for key, v in dict(lp=lp, lq=lq, tlp=tlp, tlq=tlq, ids=ids, y=y).items()}
    rust = best_ms(lambda: dv.topk_tv(lp, lq, tlp, tlq, ids, y, num_threads=threads), a.reps)
    torch_path = best_ms(lambda: dv._topk_torch("tv", t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"], None),
                         a.reps)
    np.testing.assert_allclose(dv.topk_tv(lp, lq, tlp, tlq, ids, y),
                               dv._topk_torch("tv", t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"], None).numpy(),
                               rtol=1e-10, atol=1e-13)
    report = {
        "benchmark": "topk_tv_cpu",
        "n": n, "k": k, "threads": threads or os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "median_ms": {"cppo_native_rust": rust[0], "torch_vectorised_float64": torch_path[0]},
        "min_ms": {"cppo_native_rust": rust[1], "torch_vectorised_float64": torch_path[1]},
        "speedup": torch_path[0] / rust[0],
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
