"""Shared parts of the GPU benchmarks (bench/gpu.py, bench/gpu_topk.py): refusing to run
without CUDA, describing the machine, timing helpers and the JSON writer. The parts that
need no GPU are tested on CPU by tests/test_bench_gpu.py."""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


class NoCudaError(SystemExit):
    """Exit status 2 with a message (printed to stderr by require_cuda: a SystemExit
    with an int code prints nothing)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def require_cuda(script: str):
    """torch with a usable CUDA device, or a clear refusal (exit status 2)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a test dependency
        err = NoCudaError(f"{script}: needs PyTorch with CUDA ({exc}); nothing was measured")
    else:
        if torch.cuda.is_available():
            return torch
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        err = NoCudaError(f"{script}: needs a CUDA GPU ({why}; torch {torch.__version__}); nothing was measured")
    print(err.message, file=sys.stderr)
    raise err


def driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe_gpu(torch) -> dict:
    """The GPU the numbers come from."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": driver_version(),
        "cuda_runtime": torch.version.cuda,
    }


def versions(torch) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import cupy

        out["cupy"] = cupy.__version__
    except ImportError:
        out["cupy"] = None
    try:
        import cppo_native

        out["cppo_native"] = cppo_native.__version__
    except ImportError:  # pragma: no cover
        out["cppo_native"] = None
    return out


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_report(path: str, report: dict, required_row_keys: tuple = (), required_keys: tuple = ()) -> Path:
    """Writes the JSON after checking it has the fields the issues ask for."""
    missing = [k for k in required_keys if k not in report]
    for i, row in enumerate(report.get("rows", [])):
        missing += [f"rows[{i}].{k}" for k in required_row_keys if k not in row]
    if missing:
        raise ValueError(f"benchmark report lacks {', '.join(missing)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return out


# ---------------------------------------------------------------------------------------
# Timing (GPU only).


def per_call_pipelined(torch, fn: Callable, iters: int, rounds: int = 3) -> float:
    """Seconds per call of `iters` back-to-back calls and one synchronize (best round):
    max(host, device) per call in steady state."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def host_time(torch, fn: Callable, iters: int) -> float:
    """Median host seconds to issue one call on an idle GPU (no sync inside the call:
    what the call costs the CPU)."""
    fn()
    samples = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(samples)


def events_per_call(torch, fn: Callable, iters: int) -> float:
    """GPU seconds per call of `iters` back-to-back calls between two CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def graph_replay_per_call(torch, fn: Callable, iters: int) -> float:
    """GPU seconds per call of `fn` captured once in a CUDA graph and replayed `iters`
    times back to back (kernels only: no host work between them)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return events_per_call(torch, graph.replay, iters)
