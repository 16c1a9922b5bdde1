"""cppo-mask end to end: Parquet and JSONL in, Parquet out, summary, plots, errors."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from cppo_native import cli  # noqa: E402
from cppo_native.arrow import Columns, mask_table, sample_table  # noqa: E402
from cppo_native.plots import RowCapture, row_terms  # noqa: E402

KNOBS = dict(delta=0.15, delta_b=0.02)
ADDED = ["cppo_mask", "cppo_reason", "cppo_threshold", "cppo_row_budget"]
PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_same_added(got: "pa.Table", want: "pa.Table", names=ADDED):
    for name in names:
        assert got.column(name).combine_chunks().equals(want.column(name).combine_chunks()), name


def png_size(path):
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def no_partials(directory):
    return [f for f in os.listdir(directory) if f.endswith(".part")]


# ---------------------------------------------------------------------------------------
# Happy paths.


def test_sample_end_to_end_with_plots(tmp_path, capsys):
    out = tmp_path / "sample.parquet"
    plots = tmp_path / "plots"
    summary = tmp_path / "summary.json"
    code, stdout, err = run_cli(["--sample", 700, "--sample-length", 128, "--out", out, "--plot", plots,
                                 "--summary-json", summary], capsys)
    assert code == 0, err
    got = pq.read_table(out)
    want = mask_table(sample_table(700, 128, seed=0, drift=0.03), **KNOBS)
    assert got.schema.names == want.schema.names
    assert got.equals(want)

    s = json.loads(summary.read_text())
    reason = np.concatenate([c.flatten().to_numpy() for c in want.column("cppo_reason").chunks])
    assert s["rows"] == 700
    assert s["tokens"] == reason.size
    assert s["reason_counts"]["masked_prefix_budget"] == int((reason == 4).sum())
    assert s["reason_counts"]["kept_toward_mu"] == int((reason == 1).sum())
    assert 0.0 < s["masked_share"] < 0.5
    # The summary table on stdout carries the same counts.
    assert f"{int((reason == 4).sum()):,}" in stdout
    assert "masked: prefix budget" in stdout and "kept: moves toward mu" in stdout

    for name in ("positions.png", "response.png"):
        w, h = png_size(plots / name)
        assert w >= 800 and h >= 500
        assert (plots / name).stat().st_size > 20_000  # a drawn figure, not an empty canvas


def test_parquet_input_with_knobs(tmp_path, capsys):
    table = sample_table(300, 64, seed=7, drift=0.05)
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=50)
    out = tmp_path / "out.parquet"
    flags = ["--delta", 0.2, "--delta-b", 0.015, "--w-min", 0.7, "--horizon", 64, "--adaptive-budget",
             "--budget-quantile", 0.8, "--budget-scale", 1.5, "--position-weight", "none", "--divergence",
             "binary_kl", "--threads", 1, "--gate", "--batch-rows", 37]
    code, _, err = run_cli([src, "--out", out, "-q", *flags], capsys)
    assert code == 0, err
    want = mask_table(table, include_gate=True, delta=0.2, delta_b=0.015, w_min=0.7, horizon=64,
                      adaptive_budget=True, budget_quantile=0.8, budget_scale=1.5, position_weight=False,
                      divergence="binary_kl")
    got = pq.read_table(out)
    assert_same_added(got, want, ADDED + ["cppo_gate"])
    assert got.column("uid").to_pylist() == list(range(300))

    # --no-prefix-budget changes the thresholds to delta.
    out2 = tmp_path / "out2.parquet"
    code, _, err = run_cli([src, "--out", out2, "-q", "--no-prefix-budget"], capsys)
    assert code == 0, err
    thr = np.concatenate([c.flatten().to_numpy() for c in pq.read_table(out2).column("cppo_threshold").chunks])
    assert np.all(thr == 0.15)


def test_jsonl_input(tmp_path, capsys):
    table = sample_table(120, 24, seed=9, drift=0.05)
    rows = table.to_pylist()
    rows[0]["log_probs"] = [0] + rows[0]["log_probs"][1:]  # an integer in a list: still floats
    rows[0]["response_mask"] = None
    src = tmp_path / "in.jsonl"
    with open(src, "w") as fh:
        for r in rows:
            r = dict(r)
            r["response_mask"] = [1] * len(r["log_probs"])
            r["response_mask"][-1] = 0
            fh.write(json.dumps(r) + "\n")
    out = tmp_path / "out.parquet"
    code, _, err = run_cli([src, "--out", out, "-q"], capsys)
    assert code == 0, err
    expect_rows = []
    for r in rows:
        r = dict(r)
        r["response_mask"] = [1] * len(r["log_probs"])
        r["response_mask"][-1] = 0
        expect_rows.append(r)
    expected_in = pa.Table.from_pylist(expect_rows, schema=pa.schema([
        ("uid", pa.int64()), ("log_probs", pa.list_(pa.float64())), ("old_log_probs", pa.list_(pa.float64())),
        ("advantages", pa.float64()), ("response_mask", pa.list_(pa.int64()))]))
    want = mask_table(expected_in, **KNOBS)
    got = pq.read_table(out)
    assert_same_added(got, want)
    last = [r[-1] for r in got.column("cppo_reason").to_pylist()]
    assert set(last) == {0}  # the response mask was used


def test_no_out_prints_summary_only(tmp_path, capsys):
    code, stdout, _ = run_cli(["--sample", 50, "--sample-length", 32], capsys)
    assert code == 0
    assert "cppo-mask: 50 responses" in stdout
    assert os.listdir(tmp_path) == []


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    code, stdout, err = run_cli(["--sample", 600, "--sample-length", 16, "--progress", "-q"], capsys)
    assert code == 0
    assert "cppo-mask" in err and "600" in err and "rows" in err
    assert stdout == ""


def test_python_dash_m_and_help():
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "cppo_native.cli", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0
    for flag in ("--delta", "--delta-b", "--w-min", "--horizon", "--adaptive-budget", "--budget-quantile",
                 "--budget-scale", "--position-weight", "--shuffle-seed", "--no-prefix-budget", "--divergence",
                 "--divergence-column", "--response-mask-column", "--threads", "--plot", "--sample", "--null-rows",
                 "--gate"):
        assert flag in res.stdout, flag
    assert "Cumulative Prefix-divergence Policy Optimization" in res.stdout


def test_plot_row_and_row_terms(tmp_path, capsys):
    code, _, err = run_cli(["--sample", 64, "--sample-length", 96, "--plot", tmp_path, "--plot-row", 5], capsys)
    assert code == 0, err
    assert png_size(tmp_path / "response.png")[0] >= 800
    out = tmp_path / "o.parquet"
    _expect_error(["--sample", 64, "--sample-length", 96, "--plot", tmp_path / "x", "--plot-row", 64, "--out", out],
                  capsys, "--plot-row 64 is out of range", out)


def test_plots_of_empty_and_all_invalid_responses(tmp_path, capsys):
    t = pa.table({
        "log_probs": pa.array([[], [-0.1, -0.2]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[], [-0.3, -0.1]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0, 1.0]),
        "response_mask": pa.array([[], [False, False]]),
    })
    src = tmp_path / "in.parquet"
    pq.write_table(t, src)
    for row in ("0", "1"):
        code, _, err = run_cli([src, "-q", "--plot", tmp_path / row, "--plot-row", row], capsys)
        assert code == 0, err
        assert png_size(tmp_path / row / "response.png")[0] >= 800
        assert png_size(tmp_path / row / "positions.png")[0] >= 800


def test_row_terms_reproduce_the_reasons():
    """Z_t drawn in response.png is the Z_t the mask used: reason 3 iff Z > delta among
    masked tokens, and kept-within tokens have Z <= c_t."""
    table = sample_table(40, 64, seed=11, drift=0.08)
    for knobs in (dict(KNOBS), dict(KNOBS, divergence="binary_kl", horizon=80, w_min=0.5)):
        out = mask_table(table, **knobs)
        lp = out.column("log_probs").to_pylist()
        lq = out.column("old_log_probs").to_pylist()
        for row in range(out.num_rows):
            reason = np.array(out.column("cppo_reason")[row].as_py())
            thr = np.array(out.column("cppo_threshold")[row].as_py())
            cap = RowCapture(row, row, np.array(lp[row]), np.array(lq[row]), np.zeros(len(reason)),
                             np.ones(len(reason), bool), None, reason, thr, 0.02)
            _, _, z = row_terms(cap, knobs)
            masked = reason >= 3
            np.testing.assert_array_equal(z[masked] > knobs["delta"], reason[masked] == 3)
            assert np.all(z[reason == 2] <= thr[reason == 2])
            assert np.all(z[reason == 4] > thr[reason == 4])


# ---------------------------------------------------------------------------------------
# Errors: one line, exit status 2, no output file, no partial file.


def _expect_error(args, capsys, message, out_path):
    code, stdout, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cppo-mask: error: ")
    assert message in lines[0], lines[0]
    assert not os.path.exists(out_path)
    assert no_partials(os.path.dirname(out_path)) == []


def test_missing_input_file(tmp_path, capsys):
    out = tmp_path / "o.parquet"
    _expect_error([tmp_path / "nope.parquet", "--out", out], capsys, "does not exist", out)


def test_not_a_parquet_file(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all" * 10)
    out = tmp_path / "o.parquet"
    _expect_error([bad, "--out", out], capsys, f"cannot read {str(bad)!r} as Parquet", out)


def test_bad_jsonl(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"log_probs": [-0.1], "old_log_probs": [-0.1], "advantages": 1.0}\n{not json\n')
    out = tmp_path / "o.parquet"
    _expect_error([bad, "--out", out], capsys, "as JSON Lines", out)


def test_truncated_parquet(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(sample_table(200, 32), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2] + data[-8:])  # footer magic kept, body cut
    out = tmp_path / "o.parquet"
    _expect_error([src, "--out", out], capsys, "cannot read", out)


def test_missing_column(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(sample_table(10, 8).drop_columns(["old_log_probs"]), src)
    out = tmp_path / "o.parquet"
    _expect_error([src, "--out", out], capsys, "column 'old_log_probs' (--old-log-probs-column) not found", out)
    _expect_error([src, "--out", out, "--old-log-probs-column", "log_probs", "--response-mask-column", "valid"],
                  capsys, "column 'valid' (--response-mask-column) not found", out)


def test_ragged_mismatch_late_in_the_file(tmp_path, capsys):
    table = sample_table(500, 32, seed=2)
    lq = table.column("old_log_probs").combine_chunks().to_pylist()
    lq[431] = lq[431] + [-0.5]
    table = table.set_column(2, "old_log_probs", pa.array(lq, pa.list_(pa.float32())))
    src = tmp_path / "in.parquet"
    pq.write_table(table, src, row_group_size=100)
    out = tmp_path / "o.parquet"
    # Several batches are written before the bad row is reached: still no output.
    _expect_error([src, "--out", out, "--batch-rows", 64], capsys,
                  "column 'old_log_probs' has", out)
    code, _, err = run_cli([src, "--out", out, "--batch-rows", 64], capsys)
    assert "at row 431 but column 'log_probs'" in err


def test_bad_value_and_existing_output(tmp_path, capsys):
    table = sample_table(100, 16, seed=2)
    adv = table.column("advantages").to_numpy().copy()
    adv[77] = np.nan
    src = tmp_path / "in.parquet"
    pq.write_table(table.set_column(3, "advantages", pa.array(adv)), src)
    out = tmp_path / "o.parquet"
    _expect_error([src, "--out", out, "--batch-rows", 10], capsys,
                  "column 'advantages' must be finite at valid tokens; got nan", out)

    out.write_bytes(b"keep me")
    code, _, err = run_cli([src, "--out", out], capsys)
    assert code == 2 and "exists; pass --force" in err
    assert out.read_bytes() == b"keep me"
    # With --force a failing run still leaves the old file alone.
    code, _, err = run_cli([src, "--out", out, "--force"], capsys)
    assert code == 2 and out.read_bytes() == b"keep me"
    assert no_partials(tmp_path) == []


def test_bad_knobs_and_arguments(tmp_path, capsys):
    out = tmp_path / "o.parquet"
    _expect_error(["--sample", 10, "--out", out, "--delta", -1], capsys, "delta must be > 0", out)
    _expect_error(["--sample", 10, "--out", out, "--w-min", 0], capsys, "w_min must be in (0, 1]", out)
    _expect_error(["--out", out], capsys, "no input", out)
    _expect_error(["--sample", 10, "--out", out, "--divergence", "binary_kl", "--divergence-column", "d"], capsys,
                  "exclusive", out)
    _expect_error(["--sample", 10, "--out", out, "--mask-column", "uid"], capsys,
                  "output column 'uid' already exists", out)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--sample", "10", "--horizon", "zero"])
    assert exc.value.code == 2


def test_null_rows_flag(tmp_path, capsys):
    t = pa.table({
        "log_probs": pa.array([[-0.1, -0.2], None, [-0.3]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.2, -0.2], None, [-0.3]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0, 1.0, 1.0]),
    })
    src = tmp_path / "in.parquet"
    pq.write_table(t, src)
    out = tmp_path / "o.parquet"
    _expect_error([src, "--out", out], capsys, "column 'log_probs' is null at row 1", out)
    code, _, err = run_cli([src, "--out", out, "--null-rows", "empty", "-q"], capsys)
    assert code == 0, err
    assert pq.read_table(out).column("cppo_mask").to_pylist()[1] is None
    assert_same_added(pq.read_table(out), mask_table(t, null_rows="empty", **KNOBS))


def test_custom_columns(tmp_path, capsys):
    t = sample_table(30, 16).rename_columns(["id", "lp", "olp", "adv"])
    t = t.append_column("d", pa.array([[0.01] * len(r) for r in t.column("lp").to_pylist()],
                                      pa.list_(pa.float64())))
    src = tmp_path / "in.parquet"
    pq.write_table(t, src)
    out = tmp_path / "o.parquet"
    code, _, err = run_cli([src, "--out", out, "-q", "--log-probs-column", "lp", "--old-log-probs-column", "olp",
                            "--advantages-column", "adv", "--divergence-column", "d", "--mask-column", "keep"], capsys)
    assert code == 0, err
    want = mask_table(t, columns=Columns(log_probs="lp", old_log_probs="olp", advantages="adv", divergence="d",
                                         mask="keep"), **KNOBS)
    assert pq.read_table(out).equals(want)


def test_copy_columns(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    table = sample_table(50, 16)
    pq.write_table(table, src)
    out = tmp_path / "o.parquet"
    code, _, err = run_cli([src, "--out", out, "-q", "--copy-columns", "uid"], capsys)
    assert code == 0, err
    got = pq.read_table(out)
    assert got.schema.names == ["uid"] + ADDED
    assert_same_added(got, mask_table(table, **KNOBS))
    out2 = tmp_path / "o2.parquet"
    code, _, err = run_cli([src, "--out", out2, "-q", "--copy-columns", "none"], capsys)
    assert code == 0 and pq.read_table(out2).schema.names == ADDED
    _expect_error([src, "--out", tmp_path / "o3.parquet", "--copy-columns", "uid,nope"], capsys,
                  "--copy-columns: column(s) 'nope' not in the input", tmp_path / "o3.parquet")


def test_write_error_midway_leaves_nothing(tmp_path, capsys, monkeypatch):
    """An error in the write thread (here: a full disk on the third batch) stops the run
    with one line, and neither --out nor a partial file is left."""
    from cppo_native._io.parquet import append as _parquet

    src = tmp_path / "in.parquet"
    pq.write_table(sample_table(200, 16), src, row_group_size=40)
    calls = []
    real_add = _parquet.AppendWriter.add

    def add(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_add(self, *a)

    monkeypatch.setattr(_parquet.AppendWriter, "add", add)
    out = tmp_path / "o.parquet"
    _expect_error([src, "--out", out, "--batch-rows", 20], capsys, "No space left on device", out)
    assert len(calls) >= 3


def test_parquet_writer_choice(tmp_path, capsys):
    src = tmp_path / "in.parquet"
    table = sample_table(120, 24)
    pq.write_table(table, src, row_group_size=50, compression="zstd")
    outs = {}
    for w in ("append", "arrow"):
        outs[w] = tmp_path / f"{w}.parquet"
        code, _, err = run_cli([src, "--out", outs[w], "-q", "--parquet-writer", w], capsys)
        assert code == 0, err
    a, b = pq.read_table(outs["append"]), pq.read_table(outs["arrow"])
    assert a.equals(b) and a.equals(mask_table(table, **KNOBS))
    # append keeps the input's row groups and codec for copied columns; arrow re-encodes.
    ma, mb = pq.ParquetFile(outs["append"]).metadata, pq.ParquetFile(outs["arrow"]).metadata
    assert ma.num_row_groups == 3 and ma.row_group(0).column(1).compression == "ZSTD"
    assert mb.row_group(0).column(1).compression == "SNAPPY"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"log_probs": [-0.1], "old_log_probs": [-0.2], "advantages": 1.0}) + "\n")
    _expect_error([jsonl, "--out", tmp_path / "j.parquet", "--parquet-writer", "append"], capsys,
                  "--parquet-writer append needs a Parquet input", tmp_path / "j.parquet")


def test_summary_json_counts_rows(tmp_path, capsys):
    table = sample_table(150, 48, seed=9, drift=0.08)
    table = table.set_column(1, "log_probs", pa.array(
        [r if i % 7 else [] for i, r in enumerate(table.column("log_probs").to_pylist())], pa.list_(pa.float32())))
    table = table.set_column(2, "old_log_probs", pa.array(
        [r if i % 7 else [] for i, r in enumerate(table.column("old_log_probs").to_pylist())], pa.list_(pa.float32())))
    src, summ = tmp_path / "in.parquet", tmp_path / "s.json"
    pq.write_table(table, src, row_group_size=40)
    code, _, err = run_cli([src, "-q", "--summary-json", summ], capsys)
    assert code == 0, err
    got = json.loads(summ.read_text())
    reasons = mask_table(table, **KNOBS).column("cppo_reason").to_pylist()
    assert got["rows"] == 150
    assert got["rows_with_masked_token"] == sum(any(c >= 3 for c in r) for r in reasons) > 0
    assert got["tokens"] == sum(len(r) for r in reasons)
