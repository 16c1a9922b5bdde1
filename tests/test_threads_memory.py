"""Threads, the GIL and memory: concurrent calls agree with serial ones, the GIL is
released while computing, repeated calls do not grow resident memory, thread pools stay
bounded, and a thread pool that cannot start is an ordinary error."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest

from cppo_native import cppo_mask
from cppo_native._core.params import max_threads
from cppo_native.sample import make_rollout_batch

KNOBS = dict(delta=0.15, delta_b=0.02, adaptive_budget=True)
PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
ENV = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))


def num_threads_now() -> int:
    return psutil.Process().num_threads()


def test_concurrent_calls_match_serial():
    batches = [make_rollout_batch(16, 512, seed=s) for s in range(8)]
    args = [(b.log_probs, b.old_log_probs, b.advantages, b.response_mask) for b in batches]
    serial = [cppo_mask(*a, **KNOBS, return_info=True) for a in args]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(5):
            futures = [pool.submit(cppo_mask, *a, **KNOBS, return_info=True) for a in args]
            for (mask, info), (smask, sinfo) in zip((f.result() for f in futures), serial):
                np.testing.assert_array_equal(mask, smask)
                np.testing.assert_array_equal(info.reason, sinfo.reason)
                np.testing.assert_array_equal(info.threshold, sinfo.threshold)
                np.testing.assert_array_equal(info.row_budget, sinfo.row_budget)


def test_gil_released_while_computing():
    b = make_rollout_batch(256, 4096, seed=1)
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(3):
            cppo_mask(b.log_probs, b.old_log_probs, b.advantages, b.response_mask, **KNOBS, num_threads=1)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    while not done.is_set():
        ticks += 1  # only advances while the worker does not hold the GIL
    t.join()
    # A held GIL would let this loop run only between calls (a handful of ticks).
    assert ticks > 10_000, ticks


def test_repeated_calls_keep_memory_flat():
    b = make_rollout_batch(8, 256, seed=2)
    args = (b.log_probs, b.old_log_probs, b.advantages, b.response_mask)
    proc = psutil.Process()

    def burst(n):
        for _ in range(n):
            mask, info = cppo_mask(*args, **KNOBS, return_info=True)
            del mask, info

    burst(1000)  # warm up allocators, thread pools and per-thread buffers
    gc.collect()
    start = proc.memory_info().rss
    burst(10_000)
    gc.collect()
    grown = proc.memory_info().rss - start
    # 10k calls each allocate ~40 KB of outputs: a leak of any of them would be > 400 MB.
    assert grown < 8 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 10k calls"


@pytest.mark.slow
def test_no_batch_sized_temporaries():
    """Peak extra memory of a call stays near the size of its outputs."""
    import tracemalloc

    b = make_rollout_batch(64, 8192, seed=3)
    args = (b.log_probs, b.old_log_probs, b.advantages, b.response_mask)
    cppo_mask(*args, **KNOBS)  # per-thread row buffers already grown
    proc = psutil.Process()
    tracemalloc.start()
    mask = cppo_mask(*args, **KNOBS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # NumPy allocations (the bool output) are traced; Rust's are not, so also check RSS.
    assert peak < mask.nbytes * 1.5 + 2**16
    before = proc.memory_info().rss
    for _ in range(20):
        cppo_mask(*args, **KNOBS)
    assert proc.memory_info().rss - before < 4 * 2**20


def test_thread_pools_stay_bounded():
    """Pools for explicit thread counts are cached with a bound (the core's
    pool::max_cached_threads, max(4 x cores, 16), over at most 4 pools); a larger pool
    lives only for its call, and evicted pools' threads are joined."""
    b = make_rollout_batch(8, 128, seed=4)
    args = (b.log_probs, b.old_log_probs, b.advantages, b.response_mask)
    want = cppo_mask(*args, **KNOBS)  # the default pool exists from here on
    cores = os.cpu_count() or 1
    cache_bound = max(4 * cores, 16)
    base = num_threads_now()
    biggest = max_threads()
    counts = [biggest, biggest - 1, 33, 17, 9, 5, 3, 2, 1, 4, 6, 7, 8, 3, biggest - 2]
    for n in counts:
        np.testing.assert_array_equal(cppo_mask(*args, **KNOBS, num_threads=n), want)
        assert num_threads_now() <= base + cache_bound, (n, num_threads_now(), base)
    if biggest > cache_bound:  # never cached: its threads are gone when the call returns
        before = num_threads_now()
        cppo_mask(*args, **KNOBS, num_threads=biggest)
        assert num_threads_now() == before


_LIMITED = textwrap.dedent("""
    import re, resource, sys
    import numpy as np
    import cppo_native
    from cppo_native.divergence import binary_tv
    from cppo_native.sample import make_rollout_batch

    b = make_rollout_batch(4, 64, seed=0)
    args = (b.log_probs, b.old_log_probs, b.advantages, b.response_mask)
    knobs = dict(delta=0.15, delta_b=0.02)
    threads = None if sys.argv[1] == "None" else int(sys.argv[1])
    want = cppo_native.cppo_mask_reference(*args, **knobs).mask

    def limit_address_space():
        # Room for ~30 thread stacks at most: 60 threads (or a pool per core, as rayon
        # also reserves an arena per thread) cannot all start.
        vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))

    limit_address_space()
    for fn in (lambda: cppo_native.cppo_mask(*args, **knobs, num_threads=threads),
               lambda: binary_tv(b.log_probs, b.old_log_probs, b.response_mask, num_threads=threads)):
        try:
            fn()
        except RuntimeError as e:
            print("ERROR", e)
        else:
            print("NO ERROR")
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for n in (threads, 1, 3):
        assert (cppo_native.cppo_mask(*args, **knobs, num_threads=n) == want).all()
    print("OK")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("threads", [60, None])
def test_thread_pool_that_cannot_start_is_an_error(threads):
    """Under an address-space limit no thread stack fits: the call raises RuntimeError
    naming num_threads (not a PanicException), and once the limit is lifted the same
    process computes with that and other thread counts (no poisoned lock)."""
    env = dict(ENV)
    if threads is None:
        env["RAYON_NUM_THREADS"] = "60"  # the default pool's size, whatever the machine
    res = subprocess.run([sys.executable, "-c", _LIMITED, str(threads)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    errors = [line for line in lines if line.startswith(("ERROR", "NO ERROR"))]
    assert len(errors) == 2, res.stdout
    name = "num_threads=None" if threads is None else f"num_threads={threads}"
    for line in errors:
        assert line.startswith("ERROR could not start"), line
        assert name in line, line
    assert lines[-1].startswith("OK")


_HUGE_ROW = textwrap.dedent("""
    import gc, sys
    import numpy as np, psutil
    from cppo_native import cppo_mask
    from cppo_native.sample import make_rollout_batch

    n, packed = int(sys.argv[1]), sys.argv[2] == "packed"
    knobs = dict(delta=0.15, delta_b=0.02, adaptive_budget=True, return_info=True, num_threads=2)
    proc = psutil.Process()
    small = make_rollout_batch(2, 64, seed=5)
    cppo_mask(small.log_probs, small.old_log_probs, small.advantages, small.response_mask, **knobs)
    gc.collect()
    start = proc.memory_info().rss
    rng = np.random.default_rng(5)
    lp = -rng.random(n)
    lq = lp - 0.001
    valid = np.ones(n, dtype=bool)
    if packed:
        extra, adv = dict(cu_seqlens=np.array([0, 100, n], dtype=np.int64)), np.ones(2)
    else:
        lp, lq, valid, adv, extra = lp[None], lq[None], valid[None], np.ones(1), {}
    mask, info = cppo_mask(lp, lq, adv, valid, **knobs, **extra)
    assert info.fractions["num_valid"] == n
    del mask, info, lp, lq, valid
    gc.collect()
    print((proc.memory_info().rss - start) / 2**20)
""")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_huge_row_does_not_keep_its_memory(layout):
    """Per-thread row buffers grow to the longest row; after a call with a row above
    the core's KEEP_ROW_BUFFERS_UP_TO (2**18 tokens) every thread frees them, so resident
    memory returns near its level before the call (they would keep ~165 MiB here; a
    2e7-token row kept ~650 MiB). In a fresh process: earlier calls' buffers would blur it."""
    n = 5_000_000
    res = subprocess.run([sys.executable, "-c", _HUGE_ROW, str(n), layout], capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    grown = float(res.stdout.split()[-1])
    assert grown < 40, f"resident memory stayed {grown:.1f} MiB higher after a {n}-token row"
