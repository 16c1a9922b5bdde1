"""tools/gpu_check.sh without a GPU: its plan (--dry-run), its usage errors, and a clean
stop when no CUDA device is usable (a stand-in python reports none)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def run(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_dry_run_plan(tmp_path):
    wheel = tmp_path / "cppo_native-0-cp39-abi3-linux_x86_64.whl"
    wheel.write_bytes(b"")
    out = tmp_path / "out"
    r = run("--dry-run", str(out), str(wheel))
    assert r.returncode == 0, r.stderr
    steps = re.findall(r"^=== (\w+) \(timeout (\d+)s\): (.*)$", r.stdout, re.M)
    names = [s[0] for s in steps]
    assert names == ["install", "env", "smoke", "pytest", "bench_mask", "bench_topk", "memcheck", "racecheck"]
    cmds = {name: cmd for name, _, cmd in steps}
    assert f"pip install --no-deps --force-reinstall {wheel}" in cmds["install"]
    assert "-m gpu" in cmds["pytest"] and "tests/test_gpu.py" in cmds["pytest"]
    assert f"--out {out}/gpu-h200.json" in cmds["bench_mask"]
    assert f"--out {out}/gpu_topk-h200.json" in cmds["bench_topk"]
    assert "--tool memcheck" in cmds["memcheck"] and "--tool racecheck" in cmds["racecheck"]
    assert "dry run, nothing was run" in r.stdout
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and not any(f.endswith(".json") for f in files)  # nothing measured
    # the budget: 470 s by default, each step's kill grace (10 s) on top: <= 8 minutes
    assert "GPU_CHECK_BUDGET_S:-470" in SCRIPT.read_text()


def test_usage_and_missing_wheel(tmp_path):
    assert run().returncode == 2
    assert run("-x").returncode == 2
    r = run(str(tmp_path / "o"), str(tmp_path / "absent.whl"))
    assert r.returncode == 2 and "no wheel" in r.stderr


def test_stops_cleanly_without_a_gpu(tmp_path):
    """A stand-in python: pip succeeds, torch sees no CUDA device. The script reports the
    environment and exits 3 after the install and env steps, measuring nothing."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then echo pip-ok; exit 0; fi\n"
                    "if [ \"$1\" = - ]; then cat >/dev/null; echo 'torch 0 cuda None available False'; exit 0; fi\n"
                    "if [ \"$1\" = -c ]; then exit 1; fi\n"
                    "echo unexpected \"$@\" >&2; exit 9\n")
    fake.chmod(0o755)
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"")
    out = tmp_path / "out"
    r = run(str(out), str(wheel), env={"PYTHON": str(fake), "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "no usable CUDA device" in r.stderr
    env_log = (out / "env.log").read_text()
    assert "available False" in env_log and "no usable CUDA device" in env_log
    assert sorted(p.name for p in out.iterdir()) == ["env.log", "install.log"]
    assert "unexpected" not in r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_shellcheck_clean():
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
