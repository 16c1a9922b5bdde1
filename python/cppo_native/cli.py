"""``cppo-mask``: CPPO masks for rollout files (Parquet or JSONL) -> Parquet.

    cppo-mask rollouts.parquet --out masked.parquet --plot plots/
    cppo-mask --sample 2000 --out sample.parquet --plot plots/     # built-in sample data
    python -m cppo_native.cli --help

Reads one response per row (per-token columns are lists), appends the CPPO mask,
reason codes, effective thresholds and row budgets (see :mod:`cppo_native.arrow`),
prints a per-reason summary and optionally writes diagnostic plots. The output is
written to a temporary file next to ``--out`` and renamed when complete, so a failed
run leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Optional

import numpy as np

EXIT_ERROR = 2

_DESCRIPTION = """\
CPPO (Cumulative Prefix-divergence Policy Optimization, arXiv 2606.10968) token masks
for rollout files. Each row is one response; per-token columns are lists
(list<float>/large_list<float>). Appends the columns
  cppo_mask (list<bool>: the loss keeps the token), cppo_reason (list<int8>: 0 invalid,
  1 kept toward mu, 2 kept within threshold, 3 masked by the token threshold,
  4 masked by the prefix budget), cppo_threshold (list<double>: c_t),
  cppo_row_budget (double: delta_b of the row)
and prints the share of valid tokens per reason."""

_EPILOG = """\
examples:
  cppo-mask rollouts.parquet --out masked.parquet
  cppo-mask rollouts.jsonl --out masked.parquet --delta 0.2 --adaptive-budget --plot plots/
  cppo-mask --sample 2000 --out sample_masked.parquet --plot plots/

Errors (unreadable file, missing column, lists of different lengths in one row, bad
values at valid tokens) print one line 'cppo-mask: error: ...' and exit with status 2;
the output file is then not created (an existing one is left as it was)."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _int_at_least(minimum: int, also: tuple = ()):
    """An argparse type: an integer >= ``minimum`` (or one of the words in ``also``)."""
    words = "".join(f"{w!r} or " for w in also)

    def parse(value: str) -> Any:
        if value in also:
            return value
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is None or n < minimum:
            raise argparse.ArgumentTypeError(f"must be {words}an integer >= {minimum}, got {value!r}")
        return n

    return parse


_horizon = _int_at_least(1, also=("sequence",))
_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cppo-mask",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    io.add_argument("input", nargs="?", help="rollouts: a Parquet file or JSON Lines (.jsonl/.json/.ndjson)")
    io.add_argument("--sample", type=_nonneg_int, metavar="N",
                    help="instead of INPUT, generate N deterministic built-in sample rollouts "
                         "(GRPO-like synthetic responses; see cppo_native.sample)")
    io.add_argument("--sample-length", type=_positive_int, default=512, metavar="L",
                    help="maximum response length of the sample (lengths uniform in [L/4, L]; default 512)")
    io.add_argument("--sample-seed", type=_nonneg_int, default=0, metavar="S", help="sample seed (default 0)")
    io.add_argument("--sample-drift", type=float, default=0.03, metavar="X",
                    help="how far the sample's current policy drifts from the rollout policy "
                         "(default 0.03: a few percent of tokens masked at the default knobs)")
    io.add_argument("-o", "--out", metavar="PATH",
                    help="output Parquet file (the input columns plus the CPPO columns); "
                         "without it, nothing is written but the summary (and plots)")
    io.add_argument("--format", choices=("auto", "parquet", "jsonl"), default="auto",
                    help="input format (default: from the file name; .jsonl/.json/.ndjson is JSON Lines)")
    io.add_argument("--force", action="store_true", help="replace --out if it exists")
    io.add_argument("--copy-columns", default="all", metavar="{all,none,A,B,..}",
                    help="input columns copied into --out before the CPPO columns: 'all' (default), 'none', "
                         "or a comma-separated list such as 'uid' (a small side file keyed by uid; "
                         "rows stay in input order)")
    io.add_argument("--batch-rows", type=_positive_int, default=2048, metavar="N",
                    help="rows per batch where pyarrow decodes the input (default 2048; memory grows "
                         "with it); cppo-native's Parquet page decoder takes a row group at a time "
                         "(at most 2^24 values per column, larger ones go to pyarrow)")
    io.add_argument("--compression", default="snappy",
                    choices=("snappy", "zstd", "lz4", "gzip", "brotli", "none"),
                    help="Parquet compression of the added columns (default snappy); with "
                         "--parquet-writer arrow, of every column")
    io.add_argument("--parquet-writer", choices=("auto", "append", "arrow"), default="auto",
                    help="how a Parquet input's columns reach --out: 'append' copies the input's column "
                         "chunks byte for byte (same encoding and compression, row groups kept) and "
                         "appends the CPPO columns, encoded by cppo-native; 'arrow' re-encodes every "
                         "column with pyarrow's writer; 'auto' (default) is 'append' for Parquet input "
                         "and 'arrow' for JSON Lines and --sample. Both give the same table")
    io.add_argument("--summary-json", metavar="PATH", help="also write the summary as JSON")
    io.add_argument("--progress", dest="progress", action="store_const", const=True, default=None,
                    help="always show the progress bar (default: on a terminal, after 1 s)")
    io.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                    help="never show the progress bar")
    io.add_argument("-q", "--quiet", action="store_true", help="no summary table on stdout")

    cols = p.add_argument_group("column names (input defaults follow verl's batch keys)")
    cols.add_argument("--log-probs-column", default="log_probs", metavar="NAME",
                      help="log pi(y_t|s_t) of the current policy, list<float> (default log_probs)")
    cols.add_argument("--old-log-probs-column", default="old_log_probs", metavar="NAME",
                      help="log mu(y_t|s_t) of the rollout policy, list<float> (default old_log_probs)")
    cols.add_argument("--advantages-column", default="advantages", metavar="NAME",
                      help="advantage: list<float> per token or a number per row (default advantages)")
    cols.add_argument("--response-mask-column", default=None, metavar="NAME",
                      help="valid-token flags, list<bool/int> (nonzero = a generated token); default: "
                           "'response_mask' if the input has it, else every listed token is valid; "
                           "'none' ignores it")
    cols.add_argument("--divergence-column", default=None, metavar="NAME",
                      help="precomputed token divergence D_t, list<float> (any estimator, e.g. top-K TV); "
                           "default: computed with --divergence")
    cols.add_argument("--mask-column", default="cppo_mask", metavar="NAME", help="output mask (default cppo_mask)")
    cols.add_argument("--reason-column", default="cppo_reason", metavar="NAME",
                      help="output reason codes (default cppo_reason)")
    cols.add_argument("--threshold-column", default="cppo_threshold", metavar="NAME",
                      help="output effective threshold c_t (default cppo_threshold)")
    cols.add_argument("--row-budget-column", default="cppo_row_budget", metavar="NAME",
                      help="output per-row budget delta_b_row (default cppo_row_budget)")
    cols.add_argument("--gate", action="store_true",
                      help="also write the soft gate (paper App. C) as list<double> column --gate-column")
    cols.add_argument("--gate-column", default="cppo_gate", metavar="NAME", help="(default cppo_gate)")
    cols.add_argument("--null-rows", choices=("error", "empty"), default="error",
                      help="a null list in a per-token column: 'error' (default) or 'empty' (read as a "
                           "response with no tokens; its output lists are null)")

    k = p.add_argument_group("CPPO knobs (shared/spec/CPPO.md; defaults: the paper's dense-model setting)")
    k.add_argument("--delta", type=float, default=0.15,
                   help="token threshold scale delta > 0 (paper: 0.15 dense, 0.20 MoE; default 0.15)")
    k.add_argument("--delta-b", type=float, default=0.02,
                   help="prefix-average budget delta_b >= 0 (paper: 0.015-0.02; default 0.02)")
    k.add_argument("--w-min", type=float, default=0.8,
                   help="position-weight floor w_min in (0, 1] (Eq. 9; default 0.8)")
    k.add_argument("--horizon", type=_horizon, default="sequence", metavar="{sequence,T}",
                   help="horizon T of the position weight: 'sequence' (1 + last valid index of each "
                        "response; default) or a fixed integer T (e.g. the max response length)")
    k.add_argument("--adaptive-budget", action="store_true",
                   help="per-row budget clamp(k * Q_q(D), delta_b, 2 delta_b) (Eq. 22, for base models)")
    k.add_argument("--budget-quantile", type=float, default=0.9, metavar="Q",
                   help="q of the adaptive budget (default 0.9)")
    k.add_argument("--budget-scale", type=float, default=1.0, metavar="K",
                   help="k of the adaptive budget (default 1.0)")
    k.add_argument("--position-weight", choices=("linear", "none", "shuffled"), default="linear",
                   help="'linear' (Eq. 9; default), 'none' (w_t = 1) or 'shuffled' (ablation: weights "
                        "permuted within each response, seeded by --shuffle-seed and the row's index "
                        "within its batch)")
    k.add_argument("--shuffle-seed", type=_nonneg_int, default=0, metavar="S", help="(default 0)")
    k.add_argument("--no-prefix-budget", dest="prefix_budget", action="store_false",
                   help="c_t = delta (position weight only; ablation)")
    k.add_argument("--divergence", choices=("binary_tv", "binary_kl"), default=None,
                   help="estimator of D_t from the two log-probs: 'binary_tv' |exp(lp)-exp(lq)| (default) "
                        "or 'binary_kl'; not with --divergence-column")
    k.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for the mask (default: all cores)")

    pl = p.add_argument_group("plots")
    pl.add_argument("--plot", metavar="DIR",
                    help="write PNG diagnostics into DIR: positions.png (mask rate by reason and the "
                         "effective threshold by position) and response.png (one response as in the "
                         "paper's Figure 3)")
    pl.add_argument("--plot-row", type=_nonneg_int, default=None, metavar="ROW",
                    help="row drawn in response.png (default: a row that shows every outcome)")
    return p


# ---------------------------------------------------------------------------------------
# Inputs.


class _Input:
    def __init__(self, schema, total_rows: Optional[int], batches: Iterator, total_bytes: Optional[int],
                 footer=None):
        self.schema = schema
        self.total_rows = total_rows
        self.batches = batches
        self.total_bytes = total_bytes
        # Parquet read row group by row group (append writer, or no output): its parsed
        # footer, shared with the append writer (None if unparsed: each parses its own).
        self.footer = footer


def _detect_format(path: str, fmt: str) -> str:
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


def _open_input(args, columns, append: bool = False) -> _Input:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from . import arrow

    if args.sample is not None:
        if args.input is not None:
            raise CliError("give either an INPUT file or --sample N, not both")
        if not (args.sample_drift >= 0 and np.isfinite(args.sample_drift)):
            raise CliError(f"--sample-drift must be a finite number >= 0, got {args.sample_drift}")
        batches = arrow.sample_batches(args.sample, args.sample_length, seed=args.sample_seed,
                                       drift=args.sample_drift)
        first = next(iter(arrow.sample_batches(1, 1)))
        return _Input(first.schema, args.sample, batches, None)
    if args.input is None:
        raise CliError("no input: give a Parquet/JSONL file, or --sample N for built-in sample rollouts")
    path = args.input
    if not os.path.exists(path):
        raise CliError(f"input file {path!r} does not exist")
    if os.path.isdir(path):
        raise CliError(f"input {path!r} is a directory; give one Parquet or JSONL file")
    fmt = _detect_format(path, args.format)
    size = os.path.getsize(path)
    if fmt == "parquet":
        try:
            # Memory-mapped: pages are decoded straight from the page cache (no copy
            # into read buffers; ~20% less CPU than pread for a file in cache).
            pf = pq.ParquetFile(path, memory_map=True)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise CliError(f"cannot read {path!r} as Parquet: {_one_line(exc)}") from None
        if append or args.out is None:
            # Only the mask's inputs are decoded (the append writer copies the rest); each
            # row group's batches end with _ROW_GROUP_END.
            footer = _parquet_footer(path)
            batches = _row_group_batches(pf, schema, columns, args, footer)
            return _Input(schema, pf.metadata.num_rows, _guard_read(batches, path, "Parquet"), size, footer)
        batches = pf.iter_batches(batch_size=args.batch_rows, use_threads=True)
        return _Input(schema, pf.metadata.num_rows, _guard_read(batches, path, "Parquet"), size)
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(path)
    except (pa.ArrowException, OSError) as exc:
        raise CliError(f"cannot read {path!r} as JSON Lines: {_one_line(exc)}") from None
    names = [columns.log_probs, columns.old_log_probs, columns.advantages]
    if columns.divergence:
        names.append(columns.divergence)
    table = _float_lists_for_json(table, names)
    return _Input(table.schema, table.num_rows, iter(table.to_batches(max_chunksize=args.batch_rows)), size)


def _mask_input_columns(schema, columns) -> list:
    """The input columns the mask reads (those present; missing ones are reported later)."""
    names = [columns.log_probs, columns.old_log_probs, columns.advantages,
             columns.resolved_response_mask(schema.names), columns.divergence]
    return [n for n in dict.fromkeys(names) if n is not None and n in schema.names]


def _parquet_footer(path: str):
    """The file's footer as cppo-native's Parquet code reads it, or None (then the page
    decoder is not used and the append writer reports why)."""
    from ._io.parquet import append as _parquet, thrift as _thrift

    try:
        with open(path, "rb") as fh:
            return _parquet.read_footer(fh)
    except (_parquet.Unsupported, _thrift.ThriftError, OSError):
        return None


def _row_group_batches(pf, schema, columns, args, footer):
    """Batches of each row group in turn, each row group followed by _ROW_GROUP_END;
    only the columns the mask reads are decoded (the append writer copies the rest)."""
    from ._io.parquet import read as _parquet_read

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
            yield _ROW_GROUP_END
    finally:
        if fast is not None:
            fast.close()


def _guard_read(batches, path, kind):
    import pyarrow as pa

    try:
        yield from batches
    except (pa.ArrowException, OSError) as exc:
        raise CliError(f"cannot read {path!r} as {kind}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def _check_columns(schema, columns, args) -> None:
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


# ---------------------------------------------------------------------------------------
# Summary.


class _Summary:
    def __init__(self, knobs: dict):
        self.counts = np.zeros(5, np.int64)
        self.rows = 0
        self.tokens = 0
        self.rows_masked = 0
        self.rows_with_valid = 0
        self.budget_sum = 0.0
        self.budget_rows = 0
        self.knobs = knobs

    def update(self, res) -> None:
        self.counts += res.reason_counts
        off = res.offsets
        self.rows += off.shape[0] - 1
        self.tokens += int(off[-1])
        r = res.reason_values
        nonempty = off[1:] > off[:-1]
        if not nonempty.any():
            return
        starts = off[:-1][nonempty]
        # Per row, from the largest code (one reduceat over non-empty rows): any masked
        # token (3 or 4), any valid token (not 0).
        top = np.maximum.reduceat(r, starts)
        any_masked = top >= 3
        any_valid = top != 0
        self.rows_masked += int(any_masked.sum())
        self.rows_with_valid += int(any_valid.sum())
        self.budget_sum += float(res.row_budget_values[nonempty][any_valid].sum())
        self.budget_rows += int(any_valid.sum())

    def as_dict(self, seconds: float) -> dict:
        from ._core.codes import REASON_NAMES

        valid = int(self.counts[1:].sum())
        share = {name: (float(self.counts[i]) / valid if valid else 0.0)
                 for i, name in enumerate(REASON_NAMES) if i}
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "valid_tokens": valid,
            "reason_counts": {name: int(self.counts[i]) for i, name in enumerate(REASON_NAMES)},
            "share_of_valid": share,
            "kept_share": share["kept_toward_mu"] + share["kept_within_threshold"],
            "masked_share": share["masked_token_threshold"] + share["masked_prefix_budget"],
            "rows_with_masked_token": self.rows_masked,
            "mean_row_budget": self.budget_sum / self.budget_rows if self.budget_rows else None,
            "seconds": seconds,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else None,
            "knobs": {k: v for k, v in self.knobs.items() if k != "num_threads"},
        }

    def table(self, seconds: float) -> str:
        d = self.as_dict(seconds)
        valid = d["valid_tokens"]
        labels = [
            ("1", "kept: moves toward mu", "kept_toward_mu"),
            ("2", "kept: within threshold c_t", "kept_within_threshold"),
            ("3", "masked: token threshold (Z_t > delta)", "masked_token_threshold"),
            ("4", "masked: prefix budget (Z_t > c_t)", "masked_prefix_budget"),
        ]
        w = max(12, len(f"{self.tokens:,}"))
        lines = [
            f"cppo-mask: {d['rows']:,} responses, {d['tokens']:,} tokens ({valid:,} valid) in {seconds:.2f} s",
            "",
            f"  {'code':<5}{'outcome':<40}{'tokens':>{w}}  {'of valid':>8}",
            f"  {'-' * 5}{'-' * 40}{'-' * w}  {'-' * 8}",
        ]
        for code, label, key in labels:
            lines.append(f"  {code:<5}{label:<40}{d['reason_counts'][key]:>{w},}  {100 * d['share_of_valid'][key]:>7.2f}%")
        lines.append(f"  {'-' * 5}{'-' * 40}{'-' * w}  {'-' * 8}")
        kept = d["reason_counts"]["kept_toward_mu"] + d["reason_counts"]["kept_within_threshold"]
        masked = d["reason_counts"]["masked_token_threshold"] + d["reason_counts"]["masked_prefix_budget"]
        lines.append(f"  {'1+2':<5}{'kept':<40}{kept:>{w},}  {100 * d['kept_share']:>7.2f}%")
        lines.append(f"  {'3+4':<5}{'masked':<40}{masked:>{w},}  {100 * d['masked_share']:>7.2f}%")
        lines.append(f"  {'0':<5}{'invalid (padding/prompt; not counted)':<40}{d['reason_counts']['invalid']:>{w},}")
        lines.append("")
        frac = d["rows_with_masked_token"] / d["rows"] if d["rows"] else 0.0
        lines.append(f"  responses with a masked token: {d['rows_with_masked_token']:,} ({100 * frac:.1f}%)")
        if d["mean_row_budget"] is not None and self.knobs.get("adaptive_budget"):
            lines.append(f"  mean adaptive row budget delta_b_row: {d['mean_row_budget']:.4g}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Main loop.


def _knobs_from(args) -> dict:
    return dict(
        delta=args.delta,
        delta_b=args.delta_b,
        w_min=args.w_min,
        horizon=args.horizon,
        adaptive_budget=args.adaptive_budget,
        budget_quantile=args.budget_quantile,
        budget_scale=args.budget_scale,
        position_weight=args.position_weight,
        shuffle_seed=args.shuffle_seed,
        prefix_budget=args.prefix_budget,
        divergence=args.divergence,
        num_threads=args.threads,
    )


def _columns_from(args):
    from .arrow import AUTO, Columns

    if args.response_mask_column is None:
        mask_col = AUTO
    elif args.response_mask_column == "none":
        mask_col = None
    else:
        mask_col = args.response_mask_column
    return Columns(
        log_probs=args.log_probs_column,
        old_log_probs=args.old_log_probs_column,
        advantages=args.advantages_column,
        response_mask=mask_col,
        divergence=args.divergence_column,
        mask=args.mask_column,
        reason=args.reason_column,
        threshold=args.threshold_column,
        row_budget=args.row_budget_column,
        gate=args.gate_column,
    )


def run(args) -> dict:
    """Run the CLI for parsed ``args``; returns the summary dict. Raises CliError."""
    import pyarrow as pa

    from . import arrow
    from ._io.parquet import append as _parquet

    knobs = _knobs_from(args)
    if args.divergence is not None and args.divergence_column is not None:
        raise CliError("--divergence and --divergence-column are exclusive: a given column is used as D_t")
    try:
        arrow.validate_knobs(**knobs)
    except (TypeError, ValueError) as exc:
        raise CliError(_one_line(exc)) from None
    if args.divergence is None:
        knobs.pop("divergence")
    columns = _columns_from(args)

    if args.out is not None:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise CliError(f"output directory {out_dir!r} does not exist")
        if os.path.exists(args.out) and not args.force:
            raise CliError(f"output {args.out!r} exists; pass --force to replace it")
        if (args.input is not None and os.path.exists(args.input) and os.path.exists(args.out)
                and os.path.samefile(args.input, args.out)):
            raise CliError("--out must differ from the input file")

    append = _use_append_writer(args)
    src = _open_input(args, columns, append)
    _check_columns(src.schema, columns, args)
    if args.plot_row is not None and args.plot is not None and src.total_rows is not None \
            and args.plot_row >= src.total_rows:
        raise CliError(f"--plot-row {args.plot_row} is out of range (the input has {src.total_rows} rows)")
    try:
        out_schema = arrow.output_schema(src.schema, columns=columns, include_gate=args.gate)
    except (KeyError, ValueError) as exc:
        raise CliError(_one_line(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
    copy_idx = _copy_columns(args.copy_columns, src.schema)
    if copy_idx is not None:
        added = out_schema.names[len(src.schema):]
        out_schema = pa.schema([src.schema.field(i) for i in copy_idx] + [out_schema.field(n) for n in added],
                               metadata=src.schema.metadata)

    plot_stats = capture = None
    best_score = -1.0
    if args.plot is not None:
        from . import plots

        plot_stats = plots.PositionStats(delta=args.delta)

    summary = _Summary(knobs)
    tmp_path = writer = None
    t0 = time.perf_counter()
    from concurrent.futures import ThreadPoolExecutor

    if args.progress is False or (args.progress is None and not sys.stderr.isatty()):
        bar = _NoBar()  # (tqdm would be disabled: skip importing it)
    else:
        from tqdm import tqdm

        bar = tqdm(total=src.total_rows, unit="rows", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                   disable=(not args.progress) if args.progress is not None else None,
                   delay=0.0 if args.progress else 1.0, desc="cppo-mask")
    # Three stages overlap: batches are read ahead and written behind (in Arrow's and
    # cppo-native's native code, outside the GIL) while this thread computes the mask;
    # a few batches in flight each way absorb the stages' jitter.
    read_pool = ThreadPoolExecutor(1, thread_name_prefix="cppo-read")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="cppo-write")
    pending = _Pending(write_pool, _IN_FLIGHT)
    try:
        if args.out is not None:
            fd, tmp_path = tempfile.mkstemp(dir=out_dir, prefix=f".{os.path.basename(args.out)}.", suffix=".part")
            os.close(fd)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp's 0600 is not what a user expects
            writer = _open_writer(args, append, src, tmp_path, out_schema, copy_idx, columns)
        row_offset = 0
        for batch in _prefetch(src.batches, read_pool, _IN_FLIGHT):
            if batch is _ROW_GROUP_END:
                if writer is not None:
                    pending.submit(writer.end_row_group)
                continue
            try:
                res = arrow.compute_batch(batch, columns=columns, null_rows=args.null_rows,
                                          include_gate=args.gate, row_offset=row_offset, **knobs)
            except (KeyError, TypeError, ValueError) as exc:
                raise CliError(_one_line(exc.args[0] if isinstance(exc, KeyError) else exc)) from None
            if writer is not None:
                if isinstance(writer, _parquet.AppendWriter):
                    values = {"reason": res.reason_values, "threshold": res.threshold_values,
                              "row_budget": res.row_budget_values, "gate": res.gate_values}
                    pending.submit(writer.add, res.offsets, res.nulls, values)
                else:
                    pending.submit(writer.write_batch, _output_batch(batch, res, out_schema, copy_idx))
            summary.update(res)
            if plot_stats is not None:
                plot_stats.update(res.offsets, res.reason_values, res.threshold_values)
                capture, best_score = _maybe_capture(args, res, row_offset, capture, best_score)
            row_offset += batch.num_rows
            bar.update(batch.num_rows)
        pending.wait_all()
        if writer is not None:
            writer.close()
            writer = None
            if os.path.lexists(args.out):
                # Unlink first: on ext4, renaming over an existing file forces the new
                # file's data to disk first (auto_da_alloc), ~1 s per GB.
                os.unlink(args.out)
            os.replace(tmp_path, args.out)
            tmp_path = None
    finally:
        bar.close()
        pending.wait_all(quiet=True)  # after an error, the original error matters
        read_pool.shutdown(wait=True, cancel_futures=True)
        write_pool.shutdown(wait=True)
        if writer is not None:
            try:
                writer.abort() if isinstance(writer, _parquet.AppendWriter) else writer.close()
            except Exception:  # noqa: BLE001
                pass
        if tmp_path is not None and os.path.exists(tmp_path):
            os.unlink(tmp_path)
    seconds = time.perf_counter() - t0

    if args.plot is not None:
        _write_plots(args, knobs, plot_stats, capture, summary)
    result = summary.as_dict(seconds)
    if not args.quiet:
        print(summary.table(seconds))
        if args.out is not None:
            print(f"\n  wrote {args.out}")
        if args.plot is not None:
            print(f"  plots: {os.path.join(args.plot, 'positions.png')}, {os.path.join(args.plot, 'response.png')}")
    if args.summary_json is not None:
        with open(args.summary_json, "w") as fh:
            json.dump(result, fh, indent=2)
    del pa
    return result


_END = object()
_ROW_GROUP_END = object()  # in a row-group batch stream: a row group is complete


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _use_append_writer(args) -> bool:
    if args.out is None or args.parquet_writer == "arrow":
        return False
    parquet_input = args.sample is None and args.input is not None and \
        _detect_format(args.input, args.format) == "parquet"
    if args.parquet_writer == "append" and not parquet_input:
        raise CliError("--parquet-writer append needs a Parquet input (JSON Lines and --sample use 'arrow')")
    return parquet_input


def _open_writer(args, append: bool, src, tmp_path, out_schema, copy_idx, columns):
    """The append writer for Parquet input (see cppo_native._parquet), else pyarrow's."""
    import pyarrow.parquet as pq

    from ._io.parquet import append as _parquet

    if append:
        added = [(columns.mask, "mask"), (columns.reason, "reason"), (columns.threshold, "threshold"),
                 (columns.row_budget, "row_budget")]
        if args.gate:
            added.append((columns.gate, "gate"))
        try:
            return _parquet.AppendWriter(args.input, tmp_path, out_schema, copy_idx, added, args.compression,
                                         meta=src.footer)
        except _parquet.Unsupported as exc:  # e.g. an encrypted file: pyarrow could not read it either
            raise CliError(f"cannot append to {args.input!r} ({exc}); use --parquet-writer arrow") from None
    return pq.ParquetWriter(tmp_path, out_schema, **_writer_options(args, out_schema, columns))


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


def _output_batch(batch, res, schema, copy_idx):
    import pyarrow as pa

    arrays = list(batch.columns) if copy_idx is None else [batch.column(i) for i in copy_idx]
    arrays += [res.mask, res.reason, res.threshold, res.row_budget]
    if res.gate is not None:
        arrays.append(res.gate)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# Batches read ahead, and writes queued behind, at most.
_IN_FLIGHT = 3


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


def _maybe_capture(args, res, row_offset: int, capture, best_score: float):
    from . import plots

    off = res.offsets
    n_rows = off.shape[0] - 1
    if n_rows == 0:
        return capture, best_score
    inp = res.inputs
    if args.plot_row is not None:
        local = args.plot_row - row_offset
        if not 0 <= local < n_rows:
            return capture, best_score
    else:
        r = res.reason_values
        counts = np.empty((n_rows, 5), np.int64)
        for code in range(5):
            cs = np.concatenate(([0], np.cumsum(r == code, dtype=np.int64)))
            counts[:, code] = cs[off[1:]] - cs[off[:-1]]
        lengths = np.diff(off)
        min_thr = np.zeros(n_rows)
        nonempty = lengths > 0
        if nonempty.any():
            min_thr[nonempty] = np.minimum.reduceat(res.threshold_values, off[:-1][nonempty])
        score = plots.pick_score(counts, lengths.astype(np.float64), min_thr, args.delta)
        local = int(np.argmax(score))
        if score[local] <= best_score:
            return capture, best_score
        best_score = float(score[local])
    cap = plots.capture_row(
        row_offset + local, local, off, inp["log_probs"], inp["old_log_probs"], inp["advantages"],
        inp["advantage_per_row"], inp["valid"], inp["divergence"], res.reason_values, res.threshold_values,
        res.row_budget_values[local],
    )
    return cap, best_score


def _write_plots(args, knobs, stats, capture, summary) -> None:
    from . import plots

    os.makedirs(args.plot, exist_ok=True)
    d = summary.as_dict(1.0)
    title = (f"CPPO masks over {d['rows']:,} responses, {d['valid_tokens']:,} valid tokens "
             f"(delta={args.delta:g}, delta_b={args.delta_b:g}, w_min={args.w_min:g}): "
             f"{100 * d['masked_share']:.1f}% masked")
    plots.plot_positions(stats, os.path.join(args.plot, "positions.png"), title=title)
    if capture is None:
        if args.plot_row is not None:
            raise CliError(f"--plot-row {args.plot_row} is out of range (the input has {summary.rows} rows)")
        return
    plots.plot_response(capture, {**knobs, "delta": args.delta}, os.path.join(args.plot, "response.png"))


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except CliError as exc:
        print(f"cppo-mask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cppo-mask: interrupted; no output written", file=sys.stderr)
        return 130
    except MemoryError:
        print("cppo-mask: error: out of memory; try a smaller --batch-rows", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. the disk filled up while writing --out
        print(f"cppo-mask: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
