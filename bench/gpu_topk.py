"""GPU benchmark (the lent H200): Top-K divergence straight from the policy's logits.

N = 8192 positions, V = 151936 (Qwen), K = 20, bfloat16 logits, Top-K TV. In one run on
the same data, every variant warm and timed over >= 20 back-to-back calls between two
CUDA events (averaged; no idle GPU between calls, so Python overhead overlaps):

- fused:     cppo_native.divergence.topk_divergence_from_logits(..., validate=False);
- eager:     the PyTorch way: float32 log_softmax of [N, V] logits / T, gathers at the
             top-K ids and the sampled token, then topk_divergence;
- compiled:  the same with the log-softmax + gathers under torch.compile;
- read_once: one reduction over the same logits (torch.amax over V): the time to read
             the logits once, the floor for any exact method.

Extra memory: torch.cuda.max_memory_allocated during one call minus what was allocated
before it. Also the fused result's largest deviation from a float64 reference on a
slice. Writes bench/results/gpu_topk-h200.json (or --out) with V, speedup_vs_compile,
ratio_to_read_once, extra_mb and the details.

UNVERIFIED: written without a GPU; it has not run yet (its non-GPU parts are tested by
tests/test_bench_gpu.py). tools/gpu_check.sh runs it.

    python bench/gpu_topk.py [--n 8192] [--vocab 151936] [--k 20] [--reps 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_common as gc  # noqa: E402

TARGETS = {"speedup_vs_compile": 1.3, "ratio_to_read_once": 1.25, "extra_mb": 64.0}
REPORT_KEYS = ("V", "speedup_vs_compile", "ratio_to_read_once", "extra_mb", "gpu")
DEFAULT_OUT = HERE / "results" / "gpu_topk-h200.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kind", default="tv", choices=["tv", "kl"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.reps < 20:
        p.error("--reps must be >= 20 (the issue's averaging rule)")
    if min(args.n, args.vocab) < 1 or not 0 <= args.k < args.vocab:
        p.error("need n >= 1, vocab >= 1 and 0 <= k < vocab")
    return args


def summarize(args, ms: dict, extra_mb: dict, max_err: float, compile_s: dict) -> dict:
    return {
        "benchmark": "bench/gpu_topk.py",
        "V": args.vocab,
        "N": args.n,
        "K": args.k,
        "dtype": args.dtype,
        "kind": args.kind,
        "temperature": args.temperature,
        "reps": args.reps,
        "speedup_vs_compile": ms["compiled"] / ms["fused"],
        "speedup_vs_eager": ms["eager"] / ms["fused"],
        "ratio_to_read_once": ms["fused"] / ms["read_once"],
        "extra_mb": extra_mb["fused"],
        "extra_mb_all": extra_mb,
        "ms": ms,
        "max_abs_err_vs_float64": max_err,
        "compile_seconds": compile_s,
        "targets": TARGETS,
        "targets_met": {
            "speedup_vs_compile": ms["compiled"] / ms["fused"] >= TARGETS["speedup_vs_compile"],
            "ratio_to_read_once": ms["fused"] / ms["read_once"] <= TARGETS["ratio_to_read_once"],
            "extra_mb": extra_mb["fused"] < TARGETS["extra_mb"],
        },
    }


def extra_peak_mb(torch, fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def main(argv=None) -> None:
    args = parse_args(argv)
    torch = gc.require_cuda("bench/gpu_topk.py")
    from cppo_native import divergence as dv

    dev = torch.device("cuda")
    n, vocab, k, temp = args.n, args.vocab, args.k, args.temperature
    g = torch.Generator(device=dev).manual_seed(0)
    logits = (torch.randn(n, vocab, device=dev, generator=g) * 3.0).to(getattr(torch, args.dtype))
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

    compile_s = {}
    for name, fn in (("fused_nvrtc", fused), ("torch_compile", compiled)):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        compile_s[name] = time.perf_counter() - t0
    ms = {name: gc.events_per_call(torch, fn, args.reps) * 1e3
          for name, fn in (("fused", fused), ("eager", eager), ("compiled", compiled), ("read_once", read_once))}
    ms["fused_validate"] = gc.events_per_call(torch, lambda: dv.topk_divergence_from_logits(
        logits, ids, tlq, y, lq, kind=args.kind, temperature=temp), args.reps) * 1e3
    ms["fused_host"] = gc.host_time(torch, fused, args.reps) * 1e3
    extra_mb = {name: extra_peak_mb(torch, fn) for name, fn in (("fused", fused), ("eager", eager),
                                                                 ("compiled", compiled))}
    rows = slice(0, min(n, 256))
    lsm64 = torch.log_softmax(logits[rows].double() / temp, -1)
    want = dv.topk_divergence(lsm64.gather(-1, y[rows, None])[:, 0], lq[rows], lsm64.gather(-1, ids[rows]),
                              tlq[rows], ids[rows], y[rows], kind=args.kind)
    max_err = float((fused()[rows] - want).abs().max())
    report = summarize(args, ms, extra_mb, max_err, compile_s)
    report.update(date=gc.utc_now(), gpu=gc.describe_gpu(torch), versions=gc.versions(torch))
    path = gc.write_report(args.out, report, (), REPORT_KEYS)
    print(f"fused {ms['fused']:.3f} ms | eager {ms['eager']:.3f} | compiled {ms['compiled']:.3f} | read once "
          f"{ms['read_once']:.3f} | x{report['speedup_vs_compile']:.2f} compiled, "
          f"{report['ratio_to_read_once']:.2f} x read-once, extra {report['extra_mb']:.1f} MB, "
          f"max err {max_err:.2e}")
    print(f"wrote {path}; targets met: {report['targets_met']}")


if __name__ == "__main__":
    main()
