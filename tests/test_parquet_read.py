"""cppo-native's page decoder for the mask's inputs (cppo_native._io.parquet.read) must give
exactly pyarrow's arrays, or None (then the CLI reads that row group with pyarrow)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cppo_native._io.parquet import read as _parquet_read  # noqa: E402
from cppo_native.arrow import mask_table, sample_table  # noqa: E402

NAMES = ["log_probs", "old_log_probs", "advantages"]


def read_all(path, names=NAMES):
    """Every row group through the fast reader; asserts each equals pyarrow's."""
    pf = pq.ParquetFile(path)
    reader = _parquet_read.FastReader.open(str(path), pf.schema_arrow, names)
    assert reader is not None
    got = []
    try:
        for i in range(pf.metadata.num_row_groups):
            batch = reader.read(i)
            want = pf.read_row_group(i, columns=names)
            if batch is None:
                got.append(None)
                continue
            assert batch.schema.equals(want.schema), (batch.schema, want.schema)
            assert pa.Table.from_batches([batch]).equals(want)
            got.append(batch)
    finally:
        reader.close()
    return got


def ragged(lengths, seed=0, dtype=pa.float32(), large=False):
    rng = np.random.default_rng(seed)
    lst = pa.large_list if large else pa.list_
    def col():
        return pa.array([list(-rng.random(k) * 3) for k in lengths], lst(dtype))
    return pa.table({"uid": pa.array(range(len(lengths)), pa.int64()), "log_probs": col(), "old_log_probs": col(),
                     "advantages": pa.array(rng.normal(size=len(lengths)), dtype)})


@pytest.mark.parametrize("opts", [
    dict(),
    dict(use_dictionary=False, compression="none"),
    dict(data_page_version="2.0", compression="zstd", data_page_size=1000),
    dict(compression="gzip", dictionary_pagesize_limit=2000, data_page_size=3000),
    dict(compression="brotli", use_dictionary=["log_probs"]),
    dict(compression="lz4", data_page_version="2.0", use_dictionary=False),
    dict(write_page_index=True, write_statistics=False, row_group_size=7),
])
def test_matches_pyarrow_across_writer_settings(tmp_path, opts):
    lengths = list(np.random.default_rng(1).integers(0, 300, 90)) + [0, 0, 1, 2]
    p = tmp_path / "x.parquet"
    opts = {"row_group_size": 25, **opts}
    pq.write_table(ragged(lengths, seed=3), p, **opts)
    batches = read_all(p)
    assert all(b is not None for b in batches)


@pytest.mark.parametrize("dtype,large", [(pa.float64(), False), (pa.float32(), True), (pa.float64(), True)])
def test_doubles_and_large_lists(tmp_path, dtype, large):
    p = tmp_path / "x.parquet"
    pq.write_table(ragged([5, 0, 17, 3] * 20, seed=4, dtype=dtype, large=large), p, row_group_size=30)
    assert all(b is not None for b in read_all(p))


def test_required_fields_and_per_token_advantages(tmp_path):
    t = sample_table(60, 32, seed=2)
    adv = pa.array([list(np.full(len(r), 0.5, np.float32)) for r in t.column("log_probs").to_pylist()],
                   pa.list_(pa.field("element", pa.float32(), nullable=False)))
    schema = pa.schema([pa.field("uid", pa.int64()),
                        pa.field("log_probs", pa.list_(pa.field("element", pa.float32(), nullable=False)),
                                 nullable=False),
                        pa.field("old_log_probs", pa.list_(pa.float32()), nullable=False),
                        pa.field("advantages", adv.type)])
    t = pa.table([t.column(0), t.column(1), t.column(2), adv], schema=schema)
    p = tmp_path / "x.parquet"
    pq.write_table(t, p, row_group_size=16)
    assert all(b is not None for b in read_all(p))


def test_unsupported_row_groups_return_none(tmp_path):
    # Nulls only in the second row group: that one falls back, the others decode.
    lengths = [4, 2, 0, 3] * 6
    t = ragged(lengths)
    lp = t.column("log_probs").to_pylist()
    lp[9] = None
    lp[10] = [-0.1, None]
    t = t.set_column(1, "log_probs", pa.array(lp, pa.list_(pa.float32())))
    p = tmp_path / "x.parquet"
    pq.write_table(t, p, row_group_size=8)
    batches = read_all(p)
    assert [b is None for b in batches] == [False, True, False]
    # BYTE_STREAM_SPLIT values: not handled here.
    pq.write_table(ragged(lengths), p, use_dictionary=False,
                   column_encoding={"log_probs.list.element": "BYTE_STREAM_SPLIT"})
    assert read_all(p) == [None]


def test_columns_it_does_not_open(tmp_path):
    p = tmp_path / "x.parquet"
    t = ragged([3, 4]).append_column("half", pa.array([[np.float16(1)], [np.float16(2)]], pa.list_(pa.float16())))
    t = t.append_column("nested", pa.array([[[1.0]], [[2.0]]], pa.list_(pa.list_(pa.float64()))))
    t = t.append_column("text", pa.array(["a", "b"]))
    t = t.append_column("flags", pa.array([[True], [False]], pa.list_(pa.bool_())))
    pq.write_table(t, p)
    schema = pq.ParquetFile(p).schema_arrow
    assert _parquet_read.FastReader.open(str(p), schema, ["uid"]) is not None  # int64 numbers are fine
    for cols in (["half"], ["nested"], ["text"], ["flags"], ["missing"]):
        assert _parquet_read.FastReader.open(str(p), schema, cols) is None
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert _parquet_read.FastReader.open(str(empty), schema, NAMES) is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=60),
    row_group=st.integers(1, 25),
    page=st.sampled_from([64, 512, 4096, 1 << 20]),
    dictionary=st.booleans(),
    v2=st.booleans(),
    codec=st.sampled_from(["none", "snappy", "zstd"]),
    repeats=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_random_files(tmp_path_factory, lengths, row_group, page, dictionary, v2, codec, repeats, seed):
    # `repeats` draws values from a small set, so dictionary pages stay in use.
    rng = np.random.default_rng(seed)
    pool = -rng.random(max(1, 50 // repeats)).astype(np.float32)
    def col():
        return pa.array([list(rng.choice(pool, k)) for k in lengths], pa.list_(pa.float32()))
    t = pa.table({"log_probs": col(), "old_log_probs": col(),
                  "advantages": pa.array(rng.normal(size=len(lengths)), pa.float64())})
    p = tmp_path_factory.mktemp("r") / "x.parquet"
    pq.write_table(t, p, row_group_size=row_group, data_page_size=page, use_dictionary=dictionary,
                   data_page_version="2.0" if v2 else "1.0", compression=codec)
    assert all(b is not None for b in read_all(p))


def test_cli_mixes_both_readers(tmp_path, capsys):
    from cppo_native import cli

    t = ragged([4, 2, 0, 3] * 6)
    for i, name in ((1, "log_probs"), (2, "old_log_probs")):
        rows = t.column(name).to_pylist()
        rows[9] = None  # a null response in the second row group only
        t = t.set_column(i, name, pa.array(rows, pa.list_(pa.float32())))
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t, src, row_group_size=8)
    assert cli.main([str(src), "--out", str(out), "-q", "--null-rows", "empty"]) == 0
    assert pq.read_table(out).equals(mask_table(t, null_rows="empty", delta=0.15, delta_b=0.02))


def test_large_row_groups_are_left_to_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setattr(_parquet_read, "MAX_CHUNK_VALUES", 50)
    p = tmp_path / "x.parquet"
    pq.write_table(ragged([40, 30, 1, 2]), p, row_group_size=2)
    assert [b is None for b in read_all(p)] == [True, False]


@pytest.mark.parametrize("flag_type", [pa.int64(), pa.int32(), pa.int8(), pa.uint8(), pa.int16(), pa.uint32()])
def test_integer_flags_and_advantages(tmp_path, capsys, flag_type):
    """Response masks stored as 0/1 integers (as tensors dump) and integer advantages are
    decoded too, and the CLI's results equal the pyarrow-read ones."""
    from cppo_native import cli

    rng = np.random.default_rng(5)
    lengths = [7, 0, 3, 12, 1] * 8
    t = ragged(lengths, seed=6)
    flags = pa.array([list((rng.random(k) < 0.8).astype(int)) for k in lengths], pa.list_(flag_type))
    t = t.append_column("response_mask", flags)
    t = t.set_column(3, "advantages", pa.array(rng.integers(-2, 3, len(lengths)), pa.int64()))
    p = tmp_path / "x.parquet"
    pq.write_table(t, p, row_group_size=9)
    assert all(b is not None for b in read_all(p, NAMES + ["response_mask"]))
    out = tmp_path / "out.parquet"
    assert cli.main([str(p), "--out", str(out), "-q"]) == 0
    assert pq.read_table(out).equals(mask_table(t, delta=0.15, delta_b=0.02))
