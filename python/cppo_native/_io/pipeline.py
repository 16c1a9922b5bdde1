"""``cppo-mask``'s pipeline: read rollouts (Parquet, JSON Lines or the built-in sample),
mask them batch by batch, write ``--out`` atomically, count the summary.

Three stages overlap: batches are read ahead and written behind (in Arrow's and
cppo-native's native code, outside the GIL) while the calling thread computes the mask;
a few batches in flight each way absorb the stages' jitter. The parser lives in
:mod:`cppo_native.cli`, which passes in the Arrow functions (:class:`ArrowFunctions`):
this private layer does not import the public faces.

Not checked: the append writer (the default for Parquet input) copies the input's column
chunks byte for byte without decoding them, so a corrupted page in a column the mask
does not read reaches ``--out`` unnoticed; ``--parquet-writer arrow`` decodes and
re-encodes every column and fails on such a page instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np

from . import output as _out
from .output import CliError, one_line
from .summary import Summary

# Batches read ahead, and writes queued behind, at most.
IN_FLIGHT = 3
_END = object()
ROW_GROUP_END = object()  # in a row-group batch stream: a row group is complete
# Errors of pyarrow or of a damaged file while reading (a fuzzed footer can make pyarrow
# raise UnicodeDecodeError, a ValueError).
_READ_ERRORS: tuple = (OSError, ValueError, EOFError)
# Errors of cppo-native's footer parser and append writer on a footer it cannot handle.
_APPEND_ERRORS: tuple = (ValueError, KeyError, IndexError, AttributeError, TypeError)


@dataclass(frozen=True)
class ArrowFunctions:
    """What the pipeline uses from :mod:`cppo_native.arrow` (passed in by the CLI)."""

    compute_batch: Callable
    output_schema: Callable
    sample_batches: Callable


class _Source:
    def __init__(self, schema, total_rows: Optional[int], pf=None, footer=None, batches=None) -> None:
        self.schema = schema
        self.total_rows = total_rows
        self.pf = pf  # pyarrow.parquet.ParquetFile for Parquet input
        self.footer = footer  # parsed by cppo-native's Thrift code, or None
        self.batches = batches  # JSON Lines and --sample: the batches


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    for ext in (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"):
        if lower.endswith(ext):
            return "jsonl"
    return "parquet"


def _float_lists_for_json(table, names):
    """JSON numbers without a fractional part infer as int64: read those lists as double."""
    import pyarrow as pa

    for name in names:
        i = table.schema.get_field_index(name)
        if i < 0:
            continue
        t = table.schema.field(i).type
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)
        ):
            table = table.set_column(i, name, table.column(i).cast(pa.list_(pa.float64())))
    return table


def _open_source(args, columns, fns: ArrowFunctions) -> _Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if args.sample is not None:
        if args.input is not None:
            raise CliError("give either an INPUT file or --sample N, not both")
        if not (args.sample_drift >= 0 and np.isfinite(args.sample_drift)):
            raise CliError(f"--sample-drift must be a finite number >= 0, got {args.sample_drift}")
        batches = fns.sample_batches(args.sample, args.sample_length, seed=args.sample_seed, drift=args.sample_drift)
        first = next(iter(fns.sample_batches(1, 1)))
        return _Source(first.schema, args.sample, batches=batches)
    if args.input is None:
        raise CliError("no input: give a Parquet/JSONL file, or --sample N for built-in sample rollouts")
    path = args.input
    if not os.path.exists(path):
        raise CliError(f"input file {path!r} does not exist")
    if os.path.isdir(path):
        raise CliError(f"input {path!r} is a directory; give one Parquet or JSONL file")
    if detect_format(path, args.format) == "parquet":
        try:
            # Memory-mapped: pages are decoded straight from the page cache (no copy
            # into read buffers; ~20% less CPU than pread for a file in cache).
            pf = pq.ParquetFile(path, memory_map=True)
            schema = pf.schema_arrow
            total = pf.metadata.num_rows
        except (pa.ArrowException, *_READ_ERRORS) as exc:
            raise CliError(f"cannot read {path!r} as Parquet: {one_line(exc)}") from None
        dupes = sorted({n for n in schema.names if schema.names.count(n) > 1})
        if dupes:
            raise CliError(f"cannot read {path!r}: duplicate column name(s) {', '.join(map(repr, dupes))}")
        return _Source(schema, total, pf=pf, footer=_parquet_footer(path))
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(path)
    except (pa.ArrowException, *_READ_ERRORS) as exc:
        raise CliError(f"cannot read {path!r} as JSON Lines: {one_line(exc)}") from None
    names = [columns.log_probs, columns.old_log_probs, columns.advantages]
    if columns.divergence:
        names.append(columns.divergence)
    table = _float_lists_for_json(table, names)
    return _Source(table.schema, table.num_rows, batches=iter(table.to_batches(max_chunksize=args.batch_rows)))


def _batches(src: _Source, args, columns, row_groups: bool) -> Iterator:
    """The input's batches: for Parquet with ``row_groups``, only the mask's columns,
    row group by row group, each followed by ROW_GROUP_END; else every column."""
    if src.batches is not None:
        return src.batches
    if row_groups:
        return _guard_read(_row_group_batches(src.pf, src.schema, columns, args, src.footer), args.input)
    return _guard_read(src.pf.iter_batches(batch_size=args.batch_rows, use_threads=True), args.input)


def _mask_input_columns(schema, columns) -> list:
    """The input columns the mask reads (those present; missing ones are reported earlier)."""
    names = [columns.log_probs, columns.old_log_probs, columns.advantages,
             columns.resolved_response_mask(schema.names), columns.divergence]
    return [n for n in dict.fromkeys(names) if n is not None and n in schema.names]


def _parquet_footer(path: str):
    """The file's footer as cppo-native's Parquet code reads it, or None (then the page
    decoder is not used and the append writer is not either)."""
    from .parquet import append as _parquet

    try:
        with open(path, "rb") as fh:
            return _parquet.read_footer(fh)
    except (_parquet.Unsupported, OSError, *_APPEND_ERRORS):  # ThriftError is a ValueError
        return None


def _row_group_batches(pf, schema, columns, args, footer):
    from .parquet import read as _parquet_read

    wanted = _mask_input_columns(schema, columns)
    fast = _parquet_read.FastReader.open(args.input, schema, wanted, footer) if footer is not None else None
    try:
        for i in range(pf.metadata.num_row_groups):
            # cppo-native's page decoder where it can (see _parquet_read), else pyarrow's.
            batch = fast.read(i) if fast is not None else None
            if batch is not None:
                yield batch
            else:
                # One decoding thread: reading overlaps the mask and the write already,
                # and Arrow's column threads would only add CPU.
                yield from pf.iter_batches(batch_size=args.batch_rows, row_groups=[i], columns=wanted,
                                           use_threads=False)
            yield ROW_GROUP_END
    finally:
        if fast is not None:
            fast.close()


def _guard_read(batches, path):
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, *_READ_ERRORS) as exc:
        raise CliError(f"cannot read {path!r} as Parquet: {one_line(exc)}") from None


def check_columns(schema, columns, args) -> None:
    names = set(schema.names)
    required = [("--log-probs-column", columns.log_probs), ("--old-log-probs-column", columns.old_log_probs),
                ("--advantages-column", columns.advantages)]
    if args.response_mask_column not in (None, "none"):
        required.append(("--response-mask-column", args.response_mask_column))
    if columns.divergence is not None:
        required.append(("--divergence-column", columns.divergence))
    for flag, name in required:
        if name not in names:
            have = ", ".join(repr(n) for n in schema.names) or "none"
            raise CliError(f"column {name!r} ({flag}) not found in the input (columns: {have})")


def _copy_columns(spec: str, schema) -> Optional[list]:
    """Indices of the input columns copied to the output (None: all)."""
    if spec == "all":
        return None
    if spec == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    missing = [n for n in names if n not in schema.names]
    if missing:
        have = ", ".join(repr(n) for n in schema.names)
        raise CliError(f"--copy-columns: column(s) {', '.join(map(repr, missing))} not in the input (columns: {have})")
    return [schema.get_field_index(n) for n in names]


# ---------------------------------------------------------------------------------------
# Writers.


def _wants_append(args) -> bool:
    if args.out is None or args.parquet_writer == "arrow":
        return False
    parquet_input = args.sample is None and args.input is not None and \
        detect_format(args.input, args.format) == "parquet"
    if args.parquet_writer == "append" and not parquet_input:
        raise CliError("--parquet-writer append needs a Parquet input (JSON Lines and --sample use 'arrow')")
    return parquet_input


def _append_writer(args, src: _Source, tmp_path, out_schema, copy_idx, columns):
    """The append writer, or None where it cannot handle the input and ``--parquet-writer``
    is ``auto`` (then pyarrow's writer is used: the same table). An explicit
    ``--parquet-writer append`` fails with one line instead."""
    from .parquet import append as _parquet

    added = [(columns.mask, "mask"), (columns.reason, "reason"), (columns.threshold, "threshold"),
             (columns.row_budget, "row_budget")]
    if args.gate:
        added.append((columns.gate, "gate"))
    why = "its footer could not be parsed" if src.footer is None else None
    if why is None:
        try:
            return _parquet.AppendWriter(args.input, tmp_path, out_schema, copy_idx, added, args.compression,
                                         meta=src.footer)
        except (_parquet.Unsupported, *_APPEND_ERRORS) as exc:  # e.g. an encrypted file
            why = one_line(exc)
    if args.parquet_writer == "append":
        raise CliError(f"cannot append to {args.input!r} ({why}); use --parquet-writer arrow")
    return None


def _writer_options(args, schema, columns) -> dict:
    """Parquet writer settings. Per-token float lists are near-random bytes: dictionary
    encoding them is wasted work, and min/max statistics of list columns are rarely
    used; both stay on for everything else (and the few-valued reason/mask columns)."""
    import pyarrow as pa

    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    float_lists = [f.name for f in schema if f.name in lists and pa.types.is_floating(f.type.value_type)
                   and f.name != columns.threshold]
    return dict(
        compression=None if args.compression == "none" else args.compression,
        use_dictionary=[f.name for f in schema if f.name not in float_lists],
        write_statistics=[f.name for f in schema if f.name not in lists],
    )


def _output_batch(batch, res, schema, copy_idx):
    import pyarrow as pa

    arrays = list(batch.columns) if copy_idx is None else [batch.column(i) for i in copy_idx]
    arrays += [res.mask, res.reason, res.threshold, res.row_budget]
    if res.gate is not None:
        arrays.append(res.gate)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _prefetch(batches, pool, depth: int = 1):
    """Yield from ``batches``, reading up to ``depth`` batches ahead in ``pool``'s (one)
    thread, which takes them in order."""
    from collections import deque

    it = iter(batches)
    ahead = deque(pool.submit(next, it, _END) for _ in range(depth))
    while True:
        batch = ahead.popleft().result()
        if batch is _END:
            return
        ahead.append(pool.submit(next, it, _END))
        yield batch


class _Pending:
    """Calls queued on a one-thread pool, at most ``depth`` unfinished; an error in
    one is raised by the next submit or wait."""

    def __init__(self, pool, depth: int):
        from collections import deque

        self.pool = pool
        self.depth = depth
        self.futures = deque()

    def submit(self, fn, *args) -> None:
        while self.futures and (self.futures[0].done() or len(self.futures) >= self.depth):
            self.futures.popleft().result()
        self.futures.append(self.pool.submit(fn, *args))

    def wait_all(self, quiet: bool = False) -> None:
        while self.futures:
            fut = self.futures.popleft()
            if quiet:
                fut.exception()
            else:
                fut.result()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(args, total):
    if args.progress is False or (args.progress is None and not sys.stderr.isatty()):
        return _NoBar()  # (tqdm would be disabled: skip importing it)
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                disable=(not args.progress) if args.progress is not None else None,
                delay=0.0 if args.progress else 1.0, desc="cppo-mask")


# ---------------------------------------------------------------------------------------
# The run.


def check_outputs(args) -> None:
    """Every output path, before any work (so no run fails after writing ``--out``)."""
    if args.out is not None:
        _out.check_out(args.out, args.force, args.input)
    if args.summary_json is not None:
        _out.check_summary_json(args.summary_json)
    if args.plot is not None:
        _out.check_plot_dir(args.plot)


def run(args, knobs: dict, columns, fns: ArrowFunctions, observers: tuple = ()) -> dict:
    """Masks the input of parsed ``args`` with checked ``knobs``; returns the summary
    dict. ``observers`` get ``update(result, row_offset)`` per batch and
    ``finish(summary_dict)`` before ``--out`` is committed. Raises CliError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_outputs(args)
    want_append = _wants_append(args)
    src = _open_source(args, columns, fns)
    check_columns(src.schema, columns, args)
    if args.plot_row is not None and args.plot is not None and src.total_rows is not None \
            and args.plot_row >= src.total_rows:
        raise CliError(f"--plot-row {args.plot_row} is out of range (the input has {src.total_rows} rows)")
    try:
        out_schema = fns.output_schema(src.schema, columns=columns, include_gate=args.gate)
    except (KeyError, ValueError) as exc:
        raise CliError(one_line(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    copy_idx = _copy_columns(args.copy_columns, src.schema)
    if copy_idx is not None:
        added = out_schema.names[len(src.schema):]
        out_schema = pa.schema([src.schema.field(i) for i in copy_idx] + [out_schema.field(n) for n in added],
                               metadata=src.schema.metadata)

    summary = Summary(knobs)
    tmp_path = writer = None
    append = False
    t0 = time.perf_counter()
    bar = _progress_bar(args, src.total_rows)
    read_pool = ThreadPoolExecutor(1, thread_name_prefix="cppo-read")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="cppo-write")
    pending = _Pending(write_pool, IN_FLIGHT)
    try:
        with _out.SignalGuard():
            if args.out is not None:
                for path in _out.remove_stale_parts(args.out):
                    _out.note(f"removed {path!r}, left by an earlier run that was killed")
                tmp_path = _out.create_part(args.out)
                writer = _append_writer(args, src, tmp_path, out_schema, copy_idx, columns) if want_append else None
                append = writer is not None
                if writer is None:
                    writer = pq.ParquetWriter(tmp_path, out_schema, **_writer_options(args, out_schema, columns))
            # Without --out, Parquet input is read row group by row group too (only the
            # mask's columns are decoded).
            by_row_group = src.pf is not None and (append or args.out is None)
            row_offset = 0
            for batch in _prefetch(_batches(src, args, columns, by_row_group), read_pool, IN_FLIGHT):
                if batch is ROW_GROUP_END:
                    if append:
                        pending.submit(writer.end_row_group)
                    continue
                try:
                    res = fns.compute_batch(batch, columns=columns, null_rows=args.null_rows,
                                            include_gate=args.gate, row_offset=row_offset, **knobs)
                except (KeyError, TypeError, ValueError) as exc:
                    raise CliError(one_line(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
                if append:
                    values = {"reason": res.reason_values, "threshold": res.threshold_values,
                              "row_budget": res.row_budget_values, "gate": res.gate_values}
                    pending.submit(writer.add, res.offsets, res.nulls, values)
                elif writer is not None:
                    pending.submit(writer.write_batch, _output_batch(batch, res, out_schema, copy_idx))
                summary.update(res)
                for obs in observers:
                    obs.update(res, row_offset)
                row_offset += batch.num_rows
                bar.update(batch.num_rows)
            pending.wait_all()
            if writer is not None:
                w, writer = writer, None
                w.close()
            seconds = time.perf_counter() - t0
            result = summary.as_dict(seconds)
            # Plots and the JSON summary before --out is committed: a failure there
            # leaves no --out.
            for obs in observers:
                try:
                    obs.finish(summary)
                except (ValueError, OSError) as exc:
                    raise CliError(one_line(exc)) from None
            if args.summary_json is not None:
                try:
                    with open(args.summary_json, "w") as fh:
                        json.dump(result, fh, indent=2)
                except OSError as exc:
                    raise CliError(f"cannot write --summary-json {args.summary_json!r}: {one_line(exc)}") from None
            if tmp_path is not None:
                _out.commit_part(tmp_path, args.out)
                tmp_path = None
    finally:
        bar.close()
        pending.wait_all(quiet=True)  # after an error, the original error matters
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        if writer is not None:
            try:
                writer.abort() if append else writer.close()
            except Exception:  # noqa: BLE001
                pass
        if tmp_path is not None and os.path.lexists(tmp_path):
            os.unlink(tmp_path)
    if not args.quiet:
        print(summary.table(seconds))
        if args.out is not None:
            print(f"\n  wrote {args.out}")
        if args.plot is not None:
            print(f"  plots: {os.path.join(args.plot, 'positions.png')}, {os.path.join(args.plot, 'response.png')}")
    return result


def knob_values(args, names: tuple) -> dict[str, Any]:
    """The knobs' values from parsed ``args`` (``divergence`` left out when not given)."""
    knobs = {name: getattr(args, name) for name in names}
    if knobs.get("divergence") is None:
        knobs.pop("divergence", None)
    knobs["num_threads"] = args.threads
    return knobs
