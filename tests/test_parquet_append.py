"""The append writer (cppo_native._io.parquet.append): the input's column chunks copied byte for
byte, the CPPO columns appended. Whatever the input, pyarrow must read back the table
that pyarrow's own writer gives (mask_table of the input)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cppo_native._io.parquet import append as _parquet  # noqa: E402
from cppo_native._io.parquet import thrift as T  # noqa: E402
from cppo_native.arrow import Columns, compute_batch, mask_table, output_schema, sample_table  # noqa: E402

KNOBS = dict(delta=0.15, delta_b=0.02)


def append(src, out, *, columns=Columns(), copy=None, gate=False, compression="snappy", null_rows="error",
           batch_rows=64, knobs=KNOBS):
    """What cppo-mask does on its append path, in process."""
    pf = pq.ParquetFile(src)
    schema = output_schema(pf.schema_arrow, columns=columns, include_gate=gate)
    if copy is not None:
        n = len(pf.schema_arrow)
        schema = pa.schema([schema.field(i) for i in copy] + [schema.field(i) for i in range(n, len(schema))],
                           metadata=schema.metadata)
    added = [(columns.mask, "mask"), (columns.reason, "reason"), (columns.threshold, "threshold"),
             (columns.row_budget, "row_budget")] + ([(columns.gate, "gate")] if gate else [])
    wanted = [c for c in (columns.log_probs, columns.old_log_probs, columns.advantages,
                          columns.resolved_response_mask(pf.schema_arrow.names), columns.divergence)
              if c is not None]
    writer = _parquet.AppendWriter(str(src), str(out), schema, copy, added, compression)
    offset = 0
    for i in range(pf.metadata.num_row_groups):
        for b in pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=wanted):
            r = compute_batch(b, columns=columns, null_rows=null_rows, include_gate=gate, row_offset=offset, **knobs)
            offset += b.num_rows
            writer.add(r.offsets, r.nulls, {"reason": r.reason_values, "threshold": r.threshold_values,
                                            "row_budget": r.row_budget_values, "gate": r.gate_values})
        writer.end_row_group()
    writer.close()
    return pq.read_table(out)


def expected(src, *, columns=Columns(), copy=None, gate=False, null_rows="error", knobs=KNOBS):
    table = pq.read_table(src)
    want = mask_table(table, columns=columns, include_gate=gate, null_rows=null_rows, **knobs)
    if copy is not None:
        n = table.num_columns
        want = want.select(list(copy) + list(range(n, want.num_columns)))
    return want


def assert_tables_equal(got, want):
    assert got.schema.equals(want.schema), (got.schema, want.schema)
    assert got.equals(want)


def rich_table(rows: int = 120, seed: int = 3) -> "pa.Table":
    """The sample rollouts plus columns of many Arrow types, with nulls."""
    rng = np.random.default_rng(seed)
    t = sample_table(rows, 24, seed=seed, drift=0.05)
    n = t.num_rows
    null = rng.random(n) < 0.2
    words = [None if null[i] else "p" * int(rng.integers(0, 9)) for i in range(n)]
    extra = {
        "prompt": pa.array(words, pa.string()),
        "meta": pa.array([None if null[i] else {"a": i, "tags": ["x"] * (i % 3)} for i in range(n)],
                         pa.struct([("a", pa.int64()), ("tags", pa.list_(pa.string()))])),
        "turns": pa.array([[{"role": "user", "n": i}] * (i % 4) for i in range(n)],
                          pa.list_(pa.struct([("role", pa.string()), ("n", pa.int32())]))),
        "source": pa.array([["gsm8k", "math", None][i % 3] for i in range(n)]).dictionary_encode(),
        "ts": pa.array(np.arange(n, dtype=np.int64) * 1_000_003, pa.timestamp("us", tz="UTC")),
        "scores": pa.array([{"r": float(i)} if i % 5 else None for i in range(n)], pa.map_(pa.string(), pa.float64())),
        "digest": pa.array([bytes([i % 256]) * 4 for i in range(n)], pa.binary(4)),
        "nested": pa.array([[[float(i)] * (i % 2), None] if i % 7 else None for i in range(n)],
                           pa.list_(pa.list_(pa.float32()))),
    }
    for name, arr in extra.items():
        t = t.append_column(name, arr)
    return t.replace_schema_metadata({"origin": "test", "k": "v"})


# ---------------------------------------------------------------------------------------
# Thrift compact protocol.


def footer_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    n = int.from_bytes(data[-8:-4], "little")
    return data[-8 - n:-8]


@pytest.mark.parametrize("opts", [dict(), dict(compression="zstd", write_page_index=True),
                                  dict(data_page_version="2.0", use_dictionary=False, write_statistics=False)])
def test_thrift_round_trips_pyarrow_footers(tmp_path, opts):
    p = tmp_path / "x.parquet"
    pq.write_table(rich_table(60), p, row_group_size=17, **opts)
    raw = footer_bytes(p)
    meta, used = T.loads(raw)
    assert used == len(raw)
    assert T.dumps(meta) == raw


def test_thrift_values():
    s = T.Struct()
    s.set(1, T.I32, -5).set(2, T.I64, 2**62).set(3, T.TRUE, False).set(4, T.BINARY, b"\x00abc")
    s.set(40, T.DOUBLE, -0.25).set(41, T.BYTE, -3).set(300, T.I16, 7)  # field-id jumps > 15
    s.set(5, T.LIST, T.List(T.I32, list(range(-20, 20))))  # >= 15 elements: long header
    s.set(6, T.LIST, T.List(T.TRUE, [True, False, True]))
    s.set(7, T.MAP, T.Map(T.BINARY, T.I64, [(b"a", 1), (b"b", -2)]))
    s.set(8, T.MAP, T.Map(0, 0, []))
    s.set(9, T.STRUCT, T.Struct().set(1, T.STRUCT, T.Struct()))
    raw = T.dumps(s)
    back, used = T.loads(raw + b"trailing")
    assert used == len(raw)
    assert back == s
    assert T.dumps(back) == raw
    with pytest.raises(T.ThriftError):
        T.loads(raw[:-3])


# ---------------------------------------------------------------------------------------
# Equality with pyarrow's writer.


@pytest.mark.parametrize("write_opts", [
    dict(row_group_size=37),
    dict(row_group_size=50, compression="zstd", write_page_index=True, data_page_size=512),
    dict(row_group_size=1000, data_page_version="2.0", compression="gzip"),
    dict(row_group_size=29, use_dictionary=False, compression="none", write_statistics=False,
         column_encoding={"log_probs.list.element": "BYTE_STREAM_SPLIT",
                          "old_log_probs.list.element": "BYTE_STREAM_SPLIT"}),
])
def test_rich_input_equals_pyarrow_writer(tmp_path, write_opts):
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(rich_table(), src, **write_opts)
    got = append(src, out)
    assert_tables_equal(got, expected(src))
    # Row groups are the input's; copied chunks keep their statistics and encodings.
    m_in, m_out = pq.ParquetFile(src).metadata, pq.ParquetFile(out).metadata
    assert m_out.num_row_groups == m_in.num_row_groups
    for i in range(m_in.num_row_groups):
        assert m_out.row_group(i).num_rows == m_in.row_group(i).num_rows
        for j in range(m_in.num_columns):
            a, b = m_in.row_group(i).column(j), m_out.row_group(i).column(j)
            assert (a.path_in_schema, a.compression, a.encodings, a.total_compressed_size) == \
                   (b.path_in_schema, b.compression, b.encodings, b.total_compressed_size)
            assert (a.statistics is None) == (b.statistics is None)
            if a.statistics is not None and a.statistics.has_min_max:
                assert (a.statistics.min, a.statistics.max) == (b.statistics.min, b.statistics.max)
        # Every row group reads alone, too.
        assert pq.ParquetFile(out).read_row_group(i).equals(
            mask_table(pq.ParquetFile(src).read_row_group(i), **KNOBS))
    # Schema metadata: the input's; the file's key-value metadata adds a note naming the writer.
    md = got.schema.metadata
    assert md[b"origin"] == b"test" and md[b"k"] == b"v"
    note = json.loads(pq.ParquetFile(out).metadata.metadata[b"cppo_native"])
    assert note["copied_from"].startswith("parquet-cpp-arrow")
    assert note["appended_columns"] == ["cppo_mask", "cppo_reason", "cppo_threshold",
                                                                  "cppo_row_budget"]


@pytest.mark.parametrize("compression", ["none", "snappy", "zstd", "gzip", "brotli", "lz4"])
def test_output_codecs(tmp_path, compression):
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(sample_table(80, 40, seed=1), src, row_group_size=30)
    got = append(src, out, compression=compression, gate=True)
    assert_tables_equal(got, expected(src, gate=True))
    meta, _ = T.loads(footer_bytes(out))
    codecs = {cc.get_value(3).get_value(4) for rg in meta.get_value(4).values for cc in rg.get_value(1).values[4:]}
    assert codecs == {_parquet._CODECS[compression]}  # parquet.thrift CompressionCodec (lz4: LZ4_RAW = 7)


def test_null_rows_holes_per_token_advantages_divergence(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    lengths = rng.integers(0, 30, n)
    null = rng.random(n) < 0.15
    def lists(fn, typ):
        return pa.array([None if null[i] else fn(i, lengths[i]) for i in range(n)], pa.list_(typ))
    t = pa.table({
        "log_probs": lists(lambda i, k: list(-rng.random(k) * 2), pa.float64()),
        "old_log_probs": lists(lambda i, k: list(-rng.random(k) * 2), pa.float64()),
        "advantages": lists(lambda i, k: list(rng.normal(size=k)), pa.float32()),
        "response_mask": lists(lambda i, k: list(rng.random(k) < 0.8), pa.bool_()),
        "d": lists(lambda i, k: list(rng.random(k) * 0.3), pa.float64()),
    })
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t, src, row_group_size=25)
    cols = Columns(divergence="d")
    got = append(src, out, columns=cols, null_rows="empty", gate=True, batch_rows=7)
    assert_tables_equal(got, expected(src, columns=cols, null_rows="empty", gate=True))
    assert got.column("cppo_mask").null_count == int(null.sum())


def test_large_list_and_not_nullable_fields(tmp_path):
    t = sample_table(40, 32, seed=5)
    schema = pa.schema([pa.field("uid", pa.int64(), nullable=False),
                        pa.field("log_probs", pa.large_list(pa.float32())),
                        pa.field("old_log_probs", pa.large_list(pa.float32())),
                        pa.field("advantages", pa.float32(), nullable=False)])
    t = t.cast(schema)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t, src, row_group_size=15)
    got = append(src, out)
    assert got.schema.field("cppo_mask").type == pa.large_list(pa.bool_())
    assert_tables_equal(got, expected(src))


@pytest.mark.parametrize("copy", [[], [0], [4, 0], [3, 2, 1]])
def test_copy_subsets(tmp_path, copy):
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(rich_table(70), src, row_group_size=20)
    got = append(src, out, copy=copy)
    assert_tables_equal(got, expected(src, copy=copy))


def test_sorting_columns_kept_only_when_every_column_is_copied(tmp_path):
    t = sample_table(60, 16)
    src = tmp_path / "in.parquet"
    sc = (pq.SortingColumn(0),)
    with pq.ParquetWriter(src, t.schema, sorting_columns=sc) as w:
        w.write_table(t, row_group_size=25)
    append(src, tmp_path / "all.parquet")
    append(src, tmp_path / "some.parquet", copy=[1, 2, 3])
    assert pq.ParquetFile(tmp_path / "all.parquet").metadata.row_group(0).sorting_columns == sc
    assert pq.ParquetFile(tmp_path / "some.parquet").metadata.row_group(0).sorting_columns == ()


def test_empty_files_and_empty_row_groups(tmp_path):
    t = sample_table(30, 16)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t.slice(0, 0), src)
    got = append(src, out)
    assert got.num_rows == 0 and got.schema.equals(expected(src).schema)
    with pq.ParquetWriter(src, t.schema) as w:
        w.write_table(t.slice(0, 10))
        w.write_table(t.slice(10, 0))
        w.write_table(t.slice(10, 20))
    assert pq.ParquetFile(src).metadata.num_row_groups == 3
    got = append(src, out)
    assert_tables_equal(got, expected(src))
    assert pq.ParquetFile(out).metadata.num_row_groups == 2  # the empty one is dropped


def test_page_splits_spills_and_long_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(_parquet, "PAGE_VALUES", 50)
    monkeypatch.setattr(_parquet, "SPILL_BYTES", 300)
    rng = np.random.default_rng(2)
    lengths = [0, 500, 3, 0, 120, 1, 49, 50, 51] * 4
    t = pa.table({
        "log_probs": pa.array([list(-rng.random(k)) for k in lengths], pa.list_(pa.float32())),
        "old_log_probs": pa.array([list(-rng.random(k)) for k in lengths], pa.list_(pa.float32())),
        "advantages": pa.array(rng.normal(size=len(lengths))),
    })
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(t, src, row_group_size=13)
    got = append(src, out, gate=True, batch_rows=5)
    assert_tables_equal(got, expected(src, gate=True))
    assert not [f for f in os.listdir(tmp_path) if f not in ("in.parquet", "out.parquet")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(0, 60), min_size=0, max_size=40),
    null_every=st.integers(0, 5),
    row_group=st.integers(1, 17),
    batch_rows=st.integers(1, 9),
    page_values=st.integers(1, 80),
    seed=st.integers(0, 2**16),
)
def test_random_ragged_inputs(tmp_path_factory, lengths, null_every, row_group, batch_rows, page_values, seed):
    tmp = tmp_path_factory.mktemp("h")
    rng = np.random.default_rng(seed)
    null = [null_every > 0 and i % (null_every + 1) == null_every for i in range(len(lengths))]
    def col():
        return pa.array([None if null[i] else list(-rng.random(k) * 3) for i, k in enumerate(lengths)],
                        pa.list_(pa.float32()))
    t = pa.table({"uid": pa.array(range(len(lengths)), pa.int64()), "log_probs": col(), "old_log_probs": col(),
                  "advantages": pa.array(rng.normal(size=len(lengths)), pa.float64())})
    src, out = tmp / "in.parquet", tmp / "out.parquet"
    pq.write_table(t, src, row_group_size=row_group)
    old = _parquet.PAGE_VALUES
    _parquet.PAGE_VALUES = page_values
    try:
        got = append(src, out, null_rows="empty", batch_rows=batch_rows, knobs=dict(delta=0.1, delta_b=0.01))
    finally:
        _parquet.PAGE_VALUES = old
    assert_tables_equal(got, expected(src, null_rows="empty", knobs=dict(delta=0.1, delta_b=0.01)))


# ---------------------------------------------------------------------------------------
# Refusals and misuse.


def test_not_parquet_and_row_count_mismatch(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 definitely not parquet")
    schema = output_schema(sample_table(1, 4).schema)
    with pytest.raises(_parquet.Unsupported):
        _parquet.AppendWriter(str(bad), str(tmp_path / "o.parquet"), schema, None, [], "snappy")
    src = tmp_path / "in.parquet"
    pq.write_table(sample_table(10, 8), src)
    added = [("cppo_mask", "mask"), ("cppo_reason", "reason"), ("cppo_threshold", "threshold"),
             ("cppo_row_budget", "row_budget")]
    w = _parquet.AppendWriter(str(src), str(tmp_path / "o.parquet"), schema, None, added, "snappy")
    with pytest.raises(ValueError, match="row group 0 has 10 rows, 0 were added"):
        w.end_row_group()
    with pytest.raises(ValueError, match="0 of 1 row groups written"):
        w.close()
    w.abort()
    with pytest.raises(ValueError, match="unsupported compression"):
        _parquet.AppendWriter(str(src), str(tmp_path / "o.parquet"), schema, None, added, "lzo")


def test_native_encoder_checks_shapes():
    from cppo_native._core.native import native_module

    enc = native_module().encode_parquet_pages
    off = np.array([0, 2, 5], np.int64)
    with pytest.raises(ValueError, match="3 values for 5 present positions"):
        enc("f64", 2, off, None, None, np.zeros(3), 1, 3, 0, 1, 3, 100)
    with pytest.raises(ValueError, match="needs codes"):
        enc("codes", 2, off, None, None, np.zeros(5), 1, 3, 0, 1, 3, 100)
    with pytest.raises(ValueError, match="non-decreasing"):
        enc("codes", 2, np.array([0, 3, 2], np.int64), None, np.zeros(2, np.int8), None, 1, 3, 0, 1, 3, 100)


def test_new_column_levels_follow_arrows_layout():
    meta = _parquet._footer_of(pa.schema([("x", pa.list_(pa.int8())), ("y", pa.float64())]))
    elements = meta.get_value(2).values
    assert [e.get_value(4) for e in elements] == [b"schema", b"x", b"list", b"element", b"y"]
    x = _parquet._new_column(elements[1:4], "x", "codes", "reason")
    assert (x.max_rep, x.max_def, x.def_empty, x.def_present, x.is_list) == (1, 3, 1, 3, True)
    y = _parquet._new_column(elements[4:5], "y", "f64", "row_budget")
    assert (y.max_rep, y.max_def, y.def_present, y.is_list) == (0, 1, 1, False)


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    """Where copy_file_range is missing or refused (other OSes, some file systems), the
    chunks are copied with pread/write: same output."""
    def refuse(*a, **k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(rich_table(50), src, row_group_size=20)
    assert_tables_equal(append(src, out), expected(src))
    monkeypatch.delattr(os, "copy_file_range")
    assert_tables_equal(append(src, tmp_path / "out2.parquet"), expected(src))
