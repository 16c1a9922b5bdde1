"""The GPU benchmarks' parts that need no GPU: argument parsing, the refusal without
CUDA, and the JSON rows the issues ask for (bench/gpu.py, bench/gpu_topk.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import gpu as bench_gpu  # noqa: E402
import gpu_common  # noqa: E402
import gpu_topk as bench_topk  # noqa: E402


def test_arguments():
    args = bench_gpu.parse_args([])
    assert args.dtypes == ("float32", "bfloat16") and args.out.endswith("bench/results/gpu-h200.json")
    assert bench_gpu.parse_args(["--dtypes", "bfloat16", "--quick"]).dtypes == ("bfloat16",)
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--dtypes", "float64"])
    targs = bench_topk.parse_args([])
    assert (targs.n, targs.vocab, targs.k, targs.dtype, targs.reps) == (8192, 151936, 20, "bfloat16", 20)
    assert targs.out.endswith("bench/results/gpu_topk-h200.json")
    with pytest.raises(SystemExit):
        bench_topk.parse_args(["--reps", "5"])  # >= 20 back-to-back calls


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the benchmark")
@pytest.mark.parametrize("module", [bench_gpu, bench_topk])
def test_refuses_clearly_without_cuda(module, tmp_path, capsys):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as err:
        module.main(["--out", str(out)])
    assert err.value.code == 2 and "needs a CUDA GPU" in str(err.value) and "nothing was measured" in str(err.value)
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_mask_rows_schema(tmp_path):
    ms = dict(api=0.05, api_validate=0.07, host=0.015, eager=2.0, compiled=0.4, torch_backend=1.0, floor_copy=0.02,
              kernels=0.035)
    rows = [bench_gpu.summarize(B, L, dt, dict(ms), "cuda_graph_replay", {"mask_mismatches_vs_formula": 0})
            for B, L in bench_gpu.CASES for dt in bench_gpu.DTYPES]
    row = rows[0]
    assert row["speedup_vs_eager"] == pytest.approx(40.0) and row["speedup_vs_compile"] == pytest.approx(8.0)
    assert row["kernel_over_floor"] == pytest.approx(1.75) and row["host_overhead_us"] == pytest.approx(15.0)
    assert bench_gpu.targets_met(rows) == {"speedup_vs_eager": True, "speedup_vs_compile": True,
                                           "kernel_over_floor_512x16384": True, "host_overhead_us": True}
    report = {"gpu": {"name": "x"}, "rows": rows}
    path = gpu_common.write_report(str(tmp_path / "g.json"), report, bench_gpu.ROW_KEYS, ("gpu", "rows"))
    back = json.loads(path.read_text())
    assert len(back["rows"]) == 8 and {(r["B"], r["L"], r["dtype"]) for r in back["rows"]} == {
        (B, L, dt) for B, L in bench_gpu.CASES for dt in bench_gpu.DTYPES}
    for r in back["rows"]:
        assert set(bench_gpu.ROW_KEYS) <= set(r)
    del rows[0]["host_overhead_us"]
    with pytest.raises(ValueError, match=r"rows\[0\]\.host_overhead_us"):
        gpu_common.write_report(str(tmp_path / "h.json"), report, bench_gpu.ROW_KEYS, ("gpu", "rows"))


def test_topk_report_schema(tmp_path):
    args = bench_topk.parse_args([])
    ms = dict(fused=1.0, eager=4.0, compiled=2.0, read_once=0.9)
    report = bench_topk.summarize(args, ms, {"fused": 3.0, "eager": 5000.0, "compiled": 2500.0}, 1e-7, {})
    report["gpu"] = {"name": "x"}
    path = gpu_common.write_report(str(tmp_path / "t.json"), report, (), bench_topk.REPORT_KEYS)
    back = json.loads(path.read_text())
    assert back["V"] == 151936 and back["speedup_vs_compile"] == 2.0 and back["extra_mb"] == 3.0
    assert back["ratio_to_read_once"] == pytest.approx(1.0 / 0.9)
    assert back["targets_met"] == {"speedup_vs_compile": True, "ratio_to_read_once": True, "extra_mb": True}
