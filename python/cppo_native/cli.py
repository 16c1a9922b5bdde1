"""``cppo-mask``: CPPO masks for rollout files (Parquet or JSONL) -> Parquet.

    cppo-mask rollouts.parquet --out masked.parquet --plot plots/
    cppo-mask --sample 2000 --out sample.parquet --plot plots/     # built-in sample data
    python -m cppo_native.cli --help

This module is the parser and ``main``; the pipeline (reading, the read-ahead and
write-behind queues, the writers, the atomic output) is ``cppo_native._io.pipeline``.
The CPPO knob flags are derived from the knob table (``cppo_native._core.params.KNOBS``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from ._core.codes import DIVERGENCE_MODES, POSITION_WEIGHT_MODES
from ._core.params import KNOBS
from ._core.version import __version__
from ._io.output import CliError, Terminated, one_line

EXIT_ERROR = 2
__all__ = ["CliError", "EXIT_ERROR", "build_parser", "main", "run"]

_DESCRIPTION = """\
CPPO (Cumulative Prefix-divergence Policy Optimization, arXiv 2606.10968) token masks
for rollout files. Each row is one response; per-token columns are lists
(list<float>/large_list<float>). Appends the columns
  cppo_mask (list<bool>: the loss keeps the token), cppo_reason (list<int8>: 0 invalid,
  1 kept toward mu, 2 kept within threshold, 3 masked by the token threshold,
  4 masked by the prefix budget), cppo_threshold (list<double>: c_t),
  cppo_row_budget (double: delta_b of the row)
and prints the share of valid tokens per reason. Semantics: docs/semantics.md."""

_EPILOG = """\
examples:
  cppo-mask rollouts.parquet --out masked.parquet
  cppo-mask rollouts.jsonl --out masked.parquet --delta 0.2 --adaptive-budget --plot plots/
  cppo-mask --sample 2000 --out sample_masked.parquet --plot plots/

Errors (unreadable file, missing column, lists of different lengths in one row, bad
values at valid tokens, an output path that cannot be written) print one line
'cppo-mask: error: ...' and exit with status 2; the output file is then not created (an
existing one is left as it was). --out is written to '.NAME.cppo-PID.part' beside it and
renamed when complete; SIGTERM, SIGHUP and Ctrl-C remove that file, and the next run on
the same --out removes one left by a killed (SIGKILL) run. --force replaces a regular
file only (not a symbolic link, directory, FIFO or device).

Not checked: with the append writer (the default for Parquet input), columns the mask
does not read are copied byte for byte without being decoded, so a corrupted page in
them is copied as is; --parquet-writer arrow decodes every column and fails on it."""

# Extra CLI wording for some knobs (the table's doc comes first).
_CLI_NOTES = {
    "delta": "the library API requires it; the CLI defaults to the paper's value",
    "delta_b": "the library API requires it; the CLI defaults to the paper's value",
    "position_weight": "'shuffled' is seeded by --shuffle-seed and the row's index in the input",
    "divergence": "not with --divergence-column",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the full usage is in --help), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _add_knob_flags(group) -> None:
    """One flag per row of the knob table: name ``knob.flag``, help from ``knob.doc``,
    type and choices from ``knob.kind``, default the table's (the paper's value for the
    knobs the library requires)."""
    for k in KNOBS:
        default = k.paper if k.required else k.default
        note = _CLI_NOTES.get(k.name)
        doc = f"{k.doc}{'; ' + note if note else ''}"
        opts: dict = dict(dest=k.name)
        if k.kind == "bool":
            opts.update(action=argparse.BooleanOptionalAction, default=default, help=f"{doc} (default: {default})")
        elif k.kind == "float":
            opts.update(type=float, default=default, metavar="X",
                        help=f"{doc}; {k.rule} (default {default:g}{' = paper' if k.required else ''})")
        elif k.kind == "int":
            opts.update(type=_nonneg_int, default=default, metavar="N", help=f"{doc} (default {default})")
        elif k.kind == "horizon":
            opts.update(type=_int_at_least(1, also=("sequence",)), default=default, metavar="{sequence,T}",
                        help=f"{doc} (default {default})")
        elif k.kind == "position_weight":
            default = k.check(k.name, default)  # True -> "linear"
            opts.update(choices=tuple(POSITION_WEIGHT_MODES), default=default,
                        help=f"{doc}; here 'linear' (Eq. 9), 'none' or 'shuffled' (default {default})")
        elif k.kind == "divergence":
            opts.update(choices=tuple(m for m in DIVERGENCE_MODES if m != "given"), default=None,
                        help=f"{doc}; here estimated from the two log-probs (default binary_tv)")
        else:  # pragma: no cover - a new kind needs a branch here
            raise AssertionError(f"knob {k.name}: no CLI flag for kind {k.kind!r}")
        group.add_argument(k.flag, **opts)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cppo-mask", description=_DESCRIPTION, epilog=_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cppo-mask (cppo-native) {__version__}")
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
    io.add_argument("--force", action="store_true",
                    help="replace --out if it is an existing regular file (symbolic links, directories, "
                         "FIFOs and devices are refused)")
    io.add_argument("--copy-columns", default="all", metavar="{all,none,A,B,..}",
                    help="input columns copied into --out before the CPPO columns: 'all' (default), 'none', "
                         "or a comma-separated list such as 'uid' (a small side file keyed by uid; "
                         "rows stay in input order)")
    io.add_argument("--batch-rows", type=_positive_int, default=2048, metavar="N",
                    help="rows per batch where pyarrow decodes the input (default 2048; memory grows "
                         "with it); cppo-native's Parquet page decoder takes a row group at a time "
                         "(at most 2^24 values per column, larger ones go to pyarrow). Results do not "
                         "depend on it")
    io.add_argument("--compression", default="snappy",
                    choices=("snappy", "zstd", "lz4", "gzip", "brotli", "none"),
                    help="Parquet compression of the added columns (default snappy); with "
                         "--parquet-writer arrow, of every column")
    io.add_argument("--parquet-writer", choices=("auto", "append", "arrow"), default="auto",
                    help="how a Parquet input's columns reach --out: 'append' copies the input's column "
                         "chunks byte for byte (same encoding and compression, row groups kept; not "
                         "decoded, so not checked) and appends the CPPO columns, encoded by cppo-native; "
                         "'arrow' re-encodes every column with pyarrow's writer; 'auto' (default) is "
                         "'append' for Parquet input whose footer cppo-native can edit, else 'arrow' "
                         "(JSON Lines, --sample). Both give the same table")
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

    k = p.add_argument_group(
        "CPPO knobs (docs/semantics.md; defaults: the table's, and for --delta and --delta-b, which the "
        "library requires, the paper's dense-model values)")
    _add_knob_flags(k)
    k.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for the mask (default: all cores; at most max(64, 4 x cores))")

    pl = p.add_argument_group("plots")
    pl.add_argument("--plot", metavar="DIR",
                    help="write PNG diagnostics into DIR: positions.png (mask rate by reason and the "
                         "effective threshold by position) and response.png (one response as in the "
                         "paper's Figure 3)")
    pl.add_argument("--plot-row", type=_nonneg_int, default=None, metavar="ROW",
                    help="row drawn in response.png (default: the row that best shows the prefix budget "
                         "at work: prefix-budget masks and kept-within tokens, c_t in view, a readable "
                         "length)")
    return p


def _columns_from(args, arrow):
    if args.response_mask_column is None:
        mask_col = arrow.AUTO
    elif args.response_mask_column == "none":
        mask_col = None
    else:
        mask_col = args.response_mask_column
    return arrow.Columns(
        log_probs=args.log_probs_column, old_log_probs=args.old_log_probs_column,
        advantages=args.advantages_column, response_mask=mask_col, divergence=args.divergence_column,
        mask=args.mask_column, reason=args.reason_column, threshold=args.threshold_column,
        row_budget=args.row_budget_column, gate=args.gate_column,
    )


def _require(module: str, what: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise CliError(f"{what} needs {module.split('.')[0]}, which is not installed ({one_line(exc)}); "
                       "install it, or from a cppo-native checkout: pip install '.[cli]'") from None


def run(args) -> dict:
    """Run the CLI for parsed ``args``; returns the summary dict. Raises CliError."""
    _require("pyarrow", "cppo-mask")
    _require("pyarrow.parquet", "cppo-mask")
    if args.progress or (args.progress is None and sys.stderr.isatty()):
        _require("tqdm", "the progress bar (--no-progress turns it off)")
    if args.plot is not None:
        _require("matplotlib", "--plot")
    from . import arrow
    from ._core.params import KNOB_NAMES
    from ._io import pipeline

    knobs = pipeline.knob_values(args, KNOB_NAMES)
    if args.divergence is not None and args.divergence_column is not None:
        raise CliError("--divergence and --divergence-column are exclusive: a given column is used as D_t")
    try:
        arrow.validate_knobs(**knobs)
    except (TypeError, ValueError) as exc:
        raise CliError(one_line(exc)) from None
    observers: tuple = ()
    if args.plot is not None:
        from . import plots

        observers = (plots.Collector(args.plot, knobs, args.plot_row),)
    fns = pipeline.ArrowFunctions(arrow.compute_batch, arrow.output_schema, arrow.sample_batches)
    return pipeline.run(args, knobs, _columns_from(args, arrow), fns, observers)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CliError as exc:
        print(f"cppo-mask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("cppo-mask: interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"cppo-mask: terminated by signal {exc.signum}; no output written", file=sys.stderr)
        return 128 + exc.signum
    except MemoryError:
        print("cppo-mask: error: out of memory; try a smaller --batch-rows", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. the disk filled up while writing --out
        print(f"cppo-mask: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
