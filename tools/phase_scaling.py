"""Dev tool (docs/cpu.md): the row kernel's phase clock at one and two threads inside a
Python process, in slots like bench/cpu.py's (its pause, warm-up and slot time),
to see which phase grows when two threads scale badly. Needs an extension built with
the phase clock:

    cargo build --release -p cppo-py --features phase-timing
    cp target/release/libcppo_native.so python/cppo_native/_native.abi3.so
    python tools/phase_scaling.py 256 8192 10     # batch, length, rounds
    make build-inplace                             # the normal extension again

Prints, per thread count, the median call time, the phases (checks + divergence,
budget, weights, scan + outputs) in ns per padded token summed over threads, and the
wall time x threads per padded token (its excess over the phases' sum is time outside
the rows' phases: the queue, waiting for the other thread)."""

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import cpu  # noqa: E402

import cppo_native._native as nat  # noqa: E402


def main(b: int, l: int, rounds: int) -> None:
    if not hasattr(nat, "phase_ns"):
        sys.exit("phase_scaling: the extension was built without the phase clock (see the docstring)")
    data = cpu.batch(b, l, "fp32")
    ours = {th: cpu.runner("cppo_native", data, th) for th in (1, 2)}
    phases = {th: np.zeros(4) for th in (1, 2)}
    calls = {1: [], 2: []}
    for _ in range(rounds):
        for th in (1, 2):
            time.sleep(cpu.SETTLE_S)
            warm = time.perf_counter()
            while time.perf_counter() - warm < cpu.WARM_S:
                ours[th]()
            nat.phase_ns()  # reset
            start = time.perf_counter()
            while time.perf_counter() - start < cpu.SLOT_TIME:
                t0 = time.perf_counter()
                ours[th]()
                calls[th].append(time.perf_counter() - t0)
            phases[th] += np.array(nat.phase_ns(), float)
    tokens = b * l
    for th in (1, 2):
        med = statistics.median(calls[th])
        per = phases[th] / len(calls[th]) / tokens
        print(f"{th}T: median {med * 1e3:.3f} ms; phases {np.round(per, 3)} sum {per.sum():.2f}; "
              f"wall x threads {med * 1e9 * th / tokens:.2f} ns per padded token")
    print(f"1 -> 2 threads {statistics.median(calls[1]) / statistics.median(calls[2]):.2f}x")


if __name__ == "__main__":
    main(*(int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (256, 8192, 10))))
