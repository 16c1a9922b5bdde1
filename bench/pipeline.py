"""Throughput of ``cppo-mask`` on a generated Parquet file of rollouts vs the I/O floor.

    python bench/pipeline.py                 # ~1 GB file (the reported run)
    python bench/pipeline.py --size-mb 200   # a quick run

Generates GRPO-like rollouts (``cppo_native.arrow.sample_batches``: list<float> log-probs
and old log-probs, one advantage per response, lengths uniform in [L/4, L]) into a
temporary Parquet file, then times, best of ``--repeats`` with the modes interleaved:

- ``floor``: reading the same file with pyarrow alone (the faster of
  ``ParquetFile.iter_batches``, the CLI's read path, and ``read_table``), in process;
- ``cli_full``: ``cppo-mask IN --out OUT`` (all input columns + the CPPO columns),
  a fresh process, end to end: interpreter start, read, mask, summary, write, rename;
  the default append writer (input column chunks copied, CPPO columns appended);
- ``cli_full_arrow_writer``: the same with ``--parquet-writer arrow`` (every column
  re-encoded by pyarrow's writer, the alternative a user has without cppo-native's);
- ``cli_sidecar``: the same with ``--copy-columns uid`` (only the key + CPPO columns);
- ``cli_summary``: the same without ``--out`` (read, mask, summary).

The CLI runs as ``python -m cppo_native.cli``, the console script's entry point.
Throughput is tokens/s and input-file MB/s; ``ratio_to_floor`` = CLI MB/s / floor
MB/s (target >= 0.5). Writes ``bench/results/pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import cppo_native  # noqa: E402
from cppo_native.arrow import sample_batches  # noqa: E402


WORDS = np.array("the of and to a in is that for it as with was on be by this are or at from but not have an "
                 "which they you one all were can there we has more if will its than so no when what do up "
                 "solve find let compute answer step total each number value equation".split())


def with_text_columns(batch: "pa.RecordBatch", seed: int) -> "pa.RecordBatch":
    """Adds what real rollout dumps carry besides the CPPO inputs: the prompt text and
    the response's token ids (list<int32>, the log-probs' row structure)."""
    rng = np.random.default_rng(seed)
    lp = batch.column(1)
    ids = pa.array(rng.integers(0, 151_936, len(lp.values), dtype=np.int32))
    response_ids = pa.ListArray.from_arrays(lp.offsets, ids)
    words = WORDS[rng.integers(0, len(WORDS), batch.num_rows * 96)].reshape(batch.num_rows, 96)
    lengths = rng.integers(24, 96, batch.num_rows)
    prompts = pa.array([" ".join(w[:k]) for w, k in zip(words, lengths)], pa.string())
    return pa.RecordBatch.from_arrays(list(batch.columns) + [prompts, response_ids],
                                      names=batch.schema.names + ["prompt", "response_ids"])


def generate(path: str, size_mb: float, length: int, seed: int, text: bool = False) -> dict:
    """Write sample rollouts until the file reaches ``size_mb`` (``text``: with the
    prompt and response-ids columns)."""
    t0 = time.perf_counter()
    target = size_mb * 1e6
    writer = None
    rows = tokens = 0
    chunk = 1024
    k = 0
    while True:
        # One chunk of rows per seed so the file does not depend on how far we go.
        batch = next(sample_batches(chunk, length, seed=seed * 1_000_003 + k, chunk_rows=chunk, drift=0.03))
        batch = batch.set_column(0, "uid", pa.array(np.arange(rows, rows + chunk, dtype=np.int64)))
        if text:
            batch = with_text_columns(batch, seed * 1_000_003 + k)
        if writer is None:
            writer = pq.ParquetWriter(path, batch.schema)
        writer.write_batch(batch)
        rows += chunk
        tokens += len(batch.column(1).values)
        k += 1
        if os.path.getsize(path) >= target:
            break
    writer.close()
    return {"rows": rows, "tokens": tokens, "bytes": os.path.getsize(path), "seconds": time.perf_counter() - t0,
            "columns": batch.schema.names}


def time_floor_iter(path: str, batch_rows: int) -> float:
    t0 = time.perf_counter()
    n = 0
    for b in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, use_threads=True):
        n += b.num_rows
    return time.perf_counter() - t0


def time_floor_table(path: str) -> float:
    t0 = time.perf_counter()
    t = pq.read_table(path)
    dt = time.perf_counter() - t0
    del t
    return dt


def time_components(src: str, out: str, batch_rows: int) -> dict:
    """Where the CLI's time goes, stage by stage in one process (no overlap), on the
    CLI's default path: read (each row group's mask inputs, with cppo-native's page
    decoder where it applies, else pyarrow), the mask (one packed call per batch, as
    the CLI makes: reasons and thresholds, no gate) and the append write
    (copy the input's column chunks, encode and compress the CPPO columns, footer)."""
    from cppo_native._io.parquet import append as _parquet
    from cppo_native.arrow import compute_batch, output_schema

    from cppo_native._io.parquet.read import FastReader

    pf = pq.ParquetFile(src, memory_map=True)
    wanted = ["log_probs", "old_log_probs", "advantages"]
    t0 = time.perf_counter()
    reader = FastReader.open(src, pf.schema_arrow, wanted)
    groups = []
    for i in range(pf.metadata.num_row_groups):
        batch = reader.read(i) if reader is not None else None
        groups.append([batch] if batch is not None else
                      list(pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=wanted, use_threads=False)))
    read = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = [[compute_batch(b, delta=0.15, delta_b=0.02) for b in g] for g in groups]
    mask = time.perf_counter() - t0
    schema = output_schema(pf.schema_arrow)
    added = [("cppo_mask", "mask"), ("cppo_reason", "reason"), ("cppo_threshold", "threshold"),
             ("cppo_row_budget", "row_budget")]
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.perf_counter()
    writer = _parquet.AppendWriter(src, out, schema, None, added, "snappy")
    for g in results:
        for r in g:
            writer.add(r.offsets, r.nulls, {"reason": r.reason_values, "threshold": r.threshold_values,
                                            "row_budget": r.row_budget_values})
        writer.end_row_group()
    writer.close()
    write = time.perf_counter() - t0
    return {"read_row_groups": read, "mask_compute_batch": mask, "write_append": write}


CPU_SECONDS: dict = {}  # CLI mode -> [user + sys CPU seconds of each run]


def run_cli(args: list, env: dict, mode: str = "") -> float:
    """Wall seconds of one CLI run in a fresh process. An earlier output is removed first
    (untimed): replacing a 1 GB file costs the filesystem's unlink (~0.1-0.2 s on ext4),
    which is not the CLI's work."""
    if "--out" in args:
        out = args[args.index("--out") + 1]
        if os.path.exists(out):
            os.unlink(out)
    r0 = os.times()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "cppo_native.cli", *args], env=env, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t0
    r1 = os.times()
    if mode:
        CPU_SECONDS.setdefault(mode, []).append((r1.children_user - r0.children_user)
                                                + (r1.children_system - r0.children_system))
    if res.returncode != 0:
        raise SystemExit(f"cppo-mask failed ({res.returncode}): {res.stderr.strip()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=1024.0, help="size of the generated file (default 1024)")
    ap.add_argument("--length", type=int, default=1024, help="max response length (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per mode, best taken (default 3)")
    ap.add_argument("--batch-rows", type=int, default=2048, help="cppo-mask --batch-rows (default 2048)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", choices=("minimal", "with-text"), default="minimal",
                    help="'minimal': uid, log_probs, old_log_probs, advantages (the CPPO inputs only: the "
                         "worst case for cppo-mask, which must decode nearly all of it); 'with-text': also "
                         "the prompt text and response token ids, as rollout dumps carry (default minimal)")
    ap.add_argument("--tmp", default=None, help="directory for the temporary files (default: system temp)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pipeline.json"))
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine quiet or not)")
    args = ap.parse_args()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(os.path.dirname(HERE), "python") + os.pathsep + env.get("PYTHONPATH", "")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="cppo-bench-") as tmp:
        src = os.path.join(tmp, "rollouts.parquet")
        out = os.path.join(tmp, "masked.parquet")
        summary = os.path.join(tmp, "summary.json")
        print(f"generating ~{args.size_mb:g} MB of rollouts ...", flush=True)
        gen = generate(src, args.size_mb, args.length, args.seed, text=args.dataset == "with-text")
        mb = gen["bytes"] / 1e6
        print(f"  {gen['rows']:,} rows, {gen['tokens']:,} tokens, {mb:.0f} MB in {gen['seconds']:.1f} s", flush=True)

        # Warm the page cache, then check the CLI's counts once.
        time_floor_iter(src, args.batch_rows)
        run_cli([src, "-q", "--no-progress", "--summary-json", summary], env)
        with open(summary) as fh:
            summ = json.load(fh)
        assert summ["tokens"] == gen["tokens"] and summ["rows"] == gen["rows"], (summ, gen)

        common = ["-q", "--no-progress", "--batch-rows", str(args.batch_rows)]
        modes = {
            "floor_iter_batches": lambda: time_floor_iter(src, args.batch_rows),
            "floor_read_table": lambda: time_floor_table(src),
            "cli_full": lambda: run_cli([src, "--out", out, *common], env, "cli_full"),
            "cli_full_arrow_writer": lambda: run_cli([src, "--out", out, "--parquet-writer", "arrow", *common], env,
                                                     "cli_full_arrow_writer"),
            "cli_sidecar": lambda: run_cli([src, "--out", out, "--copy-columns", "uid", *common], env,
                                           "cli_sidecar"),
            "cli_summary": lambda: run_cli([src, *common], env, "cli_summary"),
        }
        times = {name: [] for name in modes}
        for r in range(args.repeats):
            for name, fn in modes.items():
                times[name].append(fn())
                if name == "cli_full" and r == 0:
                    out_mb = os.path.getsize(out) / 1e6
            print(f"  repeat {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
        startup = min(run_cli(["--help"], env) for _ in range(3))
        # The timed output must be the table pyarrow's writer gives (same rows, types, values).
        out_arrow = os.path.join(tmp, "masked_arrow.parquet")
        run_cli([src, "--out", out, "--force", *common], env)
        run_cli([src, "--out", out_arrow, "--parquet-writer", "arrow", *common], env)
        outputs_equal = pq.read_table(out).equals(pq.read_table(out_arrow))
        os.unlink(out_arrow)
        assert outputs_equal, "append and arrow writers disagree"
        components = time_components(src, out, args.batch_rows)

    best = {name: min(ts) for name, ts in times.items()}
    floor_name = min(("floor_iter_batches", "floor_read_table"), key=lambda n: best[n])
    floor = best[floor_name]
    results = {}
    for name, t in best.items():
        results[name] = {
            "seconds_best": t,
            "seconds_all": times[name],
            "tokens_per_s": gen["tokens"] / t,
            "mb_per_s": mb / t,
            "ratio_to_floor": floor / t,
        }
        if name in CPU_SECONDS:
            results[name]["cpu_seconds_all"] = CPU_SECONDS[name]
    load_after = os.getloadavg()
    doc = {
        "benchmark": "cppo-mask end-to-end vs pyarrow read (I/O floor)",
        "file": {"dataset": args.dataset, "columns": gen["columns"],
                 "rows": gen["rows"], "tokens": gen["tokens"], "mb": mb, "max_length": args.length,
                 "generate_seconds": gen["seconds"]},
        "output_mb_cli_full": out_mb,
        "outputs_equal_append_vs_arrow_writer": outputs_equal,
        "floor": floor_name,
        "results": results,
        "cli_startup_seconds": startup,
        "components_seconds": components,
        "target": "cli_full ratio_to_floor >= 0.5",
        "target_met": results["cli_full"]["ratio_to_floor"] >= 0.5,
        "masked_share": summ["masked_share"],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pyarrow": pa.__version__,
            "cppo_native": cppo_native.__version__,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "quiet": max(load_before[0], load_after[0]) < 0.5,
        },
        "note": args.note,
        "repeats": args.repeats,
        "batch_rows": args.batch_rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=2)
    print(f"\nfile {mb:.0f} MB, {gen['tokens']:,} tokens; floor = {floor_name} {floor:.2f} s "
          f"({mb / floor:.0f} MB/s); CLI start-up {startup:.2f} s")
    for name, r in results.items():
        print(f"  {name:<20} {r['seconds_best']:7.2f} s  {r['tokens_per_s'] / 1e6:7.1f} M tokens/s  "
              f"{r['mb_per_s']:7.0f} MB/s  {100 * r['ratio_to_floor']:5.1f}% of floor")
    print("  stages alone, in process: " + ", ".join(f"{k} {v:.2f}s" for k, v in components.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
