"""cppo_native.arrow: list columns as the packed layout, checked against cppo_mask (packed
and padded) and the NumPy reference on hypothesis-generated ragged tables."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")

from cppo_native import cppo_mask, cppo_mask_reference  # noqa: E402
from strategies import assert_same_as_reference, cpu_rule  # noqa: E402
from cppo_native.arrow import (  # noqa: E402
    Columns,
    compute_batch,
    mask_record_batch,
    mask_table,
    output_schema,
    sample_table,
)

KNOBS = dict(delta=0.15, delta_b=0.02)


# ---------------------------------------------------------------------------------------
# Building tables from Python rows.


def _list_array(rows, value_type, large=False, nulls=None):
    """A list column from a list of 1-D arrays (None entries -> null lists)."""
    lengths = [0 if r is None else len(r) for r in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = [np.asarray(r) for r in rows if r is not None and len(r)]
    values = np.concatenate(flat) if flat else np.zeros(0)
    child = pa.array(values, type=value_type)
    mask = None if nulls is None else pa.array(nulls)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(offsets), child, mask=mask)


@st.composite
def ragged(draw):
    rows = draw(st.integers(0, 7))
    lengths = draw(st.lists(st.integers(0, 11), min_size=rows, max_size=rows))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    per_token_adv = draw(st.booleans())
    with_mask = draw(st.sampled_from([None, "bool", "int8"]))
    with_div = draw(st.booleans())
    large = draw(st.booleans())
    lp, lq, adv_tok, valid, div = [], [], [], [], []
    for n in lengths:
        q = -rng.exponential(0.4, n)
        drift = rng.choice([0.0, 0.05, 0.3])
        p = np.minimum(q + rng.normal(0, 1, n) * drift, 0.0)
        lp.append(p.astype(dtype))
        lq.append(q.astype(dtype))
        adv_tok.append(rng.normal(0, 1, n).astype(dtype))
        valid.append(rng.random(n) > 0.2)
        div.append((rng.exponential(0.05, n)).astype(dtype))
    adv_row = rng.normal(0, 1, rows).astype(dtype)
    knobs = dict(
        delta=draw(st.sampled_from([0.05, 0.15, 0.3])),
        delta_b=draw(st.sampled_from([0.0, 0.01, 0.02, 0.1])),
        w_min=draw(st.sampled_from([0.5, 0.8, 1.0])),
        horizon=draw(st.sampled_from(["sequence", 1, 8, 40])),
        adaptive_budget=draw(st.booleans()),
        position_weight=draw(st.sampled_from([True, False])),
        prefix_budget=draw(st.booleans()),
    )
    if not with_div:
        knobs["divergence"] = draw(st.sampled_from(["binary_tv", "binary_kl"]))
    ftype = pa.float32() if dtype == np.float32 else pa.float64()
    cols = {
        "log_probs": _list_array(lp, ftype, large),
        "old_log_probs": _list_array(lq, ftype, large),
        "advantages": _list_array(adv_tok, ftype, large) if per_token_adv else pa.array(adv_row),
    }
    if with_mask:
        vt = pa.bool_() if with_mask == "bool" else pa.int8()
        cols["response_mask"] = _list_array([v.astype(np.int8) if with_mask == "int8" else v for v in valid], vt,
                                            large)
    if with_div:
        cols["divergence"] = _list_array(div, ftype, large)
    table = pa.table(cols)
    rows_np = dict(lp=lp, lq=lq, adv_tok=adv_tok, adv_row=adv_row, valid=valid if with_mask else None,
                   div=div if with_div else None, per_token_adv=per_token_adv)
    return table, rows_np, knobs, with_div


def _packed(rows_np):
    lengths = [len(r) for r in rows_np["lp"]]
    cu = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=cu[1:])
    cat = lambda rs: np.concatenate(rs) if rs else np.zeros(0, np.float64)  # noqa: E731
    lp, lq = cat(rows_np["lp"]), cat(rows_np["lq"])
    if rows_np["per_token_adv"]:
        adv = cat(rows_np["adv_tok"])
    else:
        adv = np.repeat(rows_np["adv_row"], lengths)  # per token: unambiguous for cppo_mask
    valid = None if rows_np["valid"] is None else cat(rows_np["valid"]).astype(bool)
    div = None if rows_np["div"] is None else cat(rows_np["div"])
    return lp, lq, adv, valid, div, cu


def _padded(rows_np):
    lengths = [len(r) for r in rows_np["lp"]]
    b, width = len(lengths), max(lengths + [1])
    out = {}
    for key in ("lp", "lq", "adv_tok", "div"):
        if rows_np.get(key) is None:
            continue
        a = np.zeros((b, width), dtype=np.float64)
        for i, r in enumerate(rows_np[key]):
            a[i, : len(r)] = r
        out[key] = a
    valid = np.zeros((b, width), bool)
    for i, n in enumerate(lengths):
        valid[i, :n] = True if rows_np["valid"] is None else rows_np["valid"][i]
    out["valid"] = valid
    return out, lengths


def _flat(col):
    """Flattened values of a (chunked) list column as NumPy."""
    if isinstance(col, pa.ChunkedArray):
        parts = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
        return np.concatenate(parts) if parts else np.zeros(0)
    return col.flatten().to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------------------------
# Equivalence with the packed and padded cppo_mask and with the reference.


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=ragged(), chunk=st.integers(1, 4), slice_start=st.integers(0, 2))
def test_arrow_equals_packed_padded_and_reference(case, chunk, slice_start):
    table, rows_np, knobs, with_div = case
    columns = Columns(divergence="divergence" if with_div else None)

    # Slicing (list offsets != 0) and re-chunking must not change anything.
    start = min(slice_start, table.num_rows)
    sliced = table.slice(start)
    sub = {k: (v[start:] if isinstance(v, (list, np.ndarray)) else v) for k, v in rows_np.items()}
    batches = [b for i in range(0, sliced.num_rows, chunk) for b in sliced.slice(i, chunk).to_batches()]
    chunked = pa.Table.from_batches(batches, schema=sliced.schema) if batches else sliced
    out = mask_table(chunked, columns=columns, **knobs)
    assert out.schema.equals(output_schema(sliced.schema, columns=columns))
    assert out.num_rows == sliced.num_rows

    lp, lq, adv, valid, div, cu = _packed(sub)
    got_mask = _flat(out.column("cppo_mask")).astype(bool)
    got_reason = _flat(out.column("cppo_reason"))
    got_thr = _flat(out.column("cppo_threshold"))
    got_budget = out.column("cppo_row_budget").to_numpy()
    # Row structure is the input's.
    lens = out.column("cppo_mask").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(lens, np.diff(cu))

    call = dict(knobs)
    if with_div:
        call["divergence"] = div
    m, info = cppo_mask(lp, lq, adv, valid, cu_seqlens=cu, per_row_advantages=False, return_info=True, **call)
    np.testing.assert_array_equal(got_mask, m)
    np.testing.assert_array_equal(got_reason, info.reason)
    np.testing.assert_array_equal(got_thr, info.threshold)
    np.testing.assert_array_equal(got_budget, info.row_budget)

    # Against the reference under the CPU backend's rule for this divergence
    # (strategies.cpu_rule: exact for a given array, the spec's agreement rule for
    # Binary TV); the Arrow layer itself is held to exact equality with cppo_mask above.
    ref = cppo_mask_reference(lp, lq, adv, valid, cu_seqlens=cu, **call)
    got_info = SimpleNamespace(reason=got_reason, threshold=got_thr, gate=info.gate, row_budget=got_budget)
    assert_same_as_reference(got_mask, ref, info=got_info, rule=cpu_rule(call.get("divergence")))

    # Padded: the same tokens at the same columns, padding invalid.
    if not sub["lp"]:
        return
    pad, lengths = _padded(sub)
    p_adv = pad["adv_tok"] if sub["per_token_adv"] else sub["adv_row"]
    p_call = dict(knobs)
    if with_div:
        p_call["divergence"] = pad["div"]
    pm, pinfo = cppo_mask(pad["lp"], pad["lq"], p_adv, pad["valid"], return_info=True, **p_call)
    sel = np.arange(pm.shape[1])[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(got_mask, pm[sel])
    np.testing.assert_array_equal(got_reason, pinfo.reason[sel])
    np.testing.assert_array_equal(got_thr, pinfo.threshold[sel])
    np.testing.assert_array_equal(got_budget, pinfo.row_budget)


def test_spec_worked_example_through_arrow():
    d = [0.10, 0.12, 0.30, 0.05, 0.14]
    t = pa.table({
        "log_probs": pa.array([[-0.5] * 5, [-0.5] * 5], pa.list_(pa.float64())),
        "old_log_probs": pa.array([[-0.7] * 5, [-0.7] * 5], pa.list_(pa.float64())),
        "advantages": pa.array([1.0, -1.0]),  # row 0 moves away from mu, row 1 toward it
        "divergence": pa.array([d, d]),
    })
    out = mask_table(t, columns=Columns(divergence="divergence"), delta=0.15, delta_b=0.02, w_min=0.8)
    assert out.column("cppo_mask").to_pylist() == [[True, False, False, False, False], [True] * 5]
    assert out.column("cppo_reason").to_pylist() == [[2, 4, 3, 4, 4], [1] * 5]
    np.testing.assert_allclose(out.column("cppo_threshold").to_pylist()[0],
                               [0.15, 0.070, -0.025, -0.277, -0.3025], atol=1e-12)
    assert out.column("cppo_row_budget").to_pylist() == [0.02, 0.02]


# ---------------------------------------------------------------------------------------
# Zero copy, layout details.


def _data_address(arr):
    return arr.__array_interface__["data"][0]


def test_inputs_are_zero_copy_views_of_the_child_buffers():
    t = sample_table(50, 64, seed=2)
    batch = t.to_batches()[0].slice(7, 30)  # list offsets start past 0
    res = compute_batch(batch, **KNOBS)
    lp = batch.column(1)
    start = lp.offsets.to_numpy()[0]
    child = lp.values
    expected = child.buffers()[1].address + (child.offset + int(start)) * 4
    assert _data_address(res.inputs["log_probs"]) == expected
    assert res.inputs["log_probs"].dtype == np.float32
    assert res.inputs["log_probs"].shape[0] == int(lp.offsets.to_numpy()[-1] - start)
    np.testing.assert_array_equal(res.offsets, lp.offsets.to_numpy() - start)


def test_large_list_in_large_list_out():
    rows = [np.array([-0.1, -0.2]), np.array([-0.3])]
    t = pa.table({
        "log_probs": _list_array(rows, pa.float32(), large=True),
        "old_log_probs": _list_array([r - 0.05 for r in rows], pa.float32(), large=True),
        "advantages": pa.array([1.0, 1.0]),
    })
    out = mask_table(t, **KNOBS)
    assert out.schema.field("cppo_mask").type == pa.large_list(pa.bool_())
    assert out.schema.field("cppo_threshold").type == pa.large_list(pa.float64())
    assert out.schema.field("cppo_row_budget").type == pa.float64()


def test_columns_chunked_differently():
    t = sample_table(40, 16, seed=5)
    lp = t.column("log_probs").combine_chunks()
    lq = t.column("old_log_probs").combine_chunks()
    t2 = pa.table({
        "uid": t.column("uid"),
        "log_probs": pa.chunked_array([lp.slice(0, 13), lp.slice(13)]),
        "old_log_probs": pa.chunked_array([lq.slice(0, 29), lq.slice(29, 5), lq.slice(34)]),
        "advantages": t.column("advantages"),
    })
    a = mask_table(t2, **KNOBS)
    b = mask_table(t.combine_chunks(), **KNOBS)
    for name in ("cppo_mask", "cppo_reason", "cppo_threshold", "cppo_row_budget"):
        assert a.column(name).combine_chunks().equals(b.column(name).combine_chunks())


def test_per_row_advantage_when_tokens_equal_rows():
    # 3 rows, 3 tokens: an advantage array of the tokens' length is read per token by
    # cppo_mask, so the Arrow path must broadcast the per-row column itself.
    t = pa.table({
        "log_probs": pa.array([[-0.1, -0.1], [], [-0.1]], pa.list_(pa.float64())),
        "old_log_probs": pa.array([[-0.9, -0.9], [], [-0.9]], pa.list_(pa.float64())),
        "advantages": pa.array([1.0, -1.0, -1.0]),
    })
    out = mask_table(t, delta=0.01, delta_b=0.0)
    # Row 0 moves away from mu (A > 0, lp > lq) with a large D: masked by the token threshold.
    assert out.column("cppo_reason").to_pylist() == [[3, 3], [], [1]]


def test_empty_table_and_empty_rows():
    t = sample_table(0, 8)
    out = mask_table(t, **KNOBS)
    assert out.num_rows == 0 and "cppo_mask" in out.schema.names
    t = pa.table({
        "log_probs": pa.array([[], [], []], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[], [], []], pa.list_(pa.float32())),
        "advantages": pa.array([0.5, 0.5, 0.5], pa.float32()),
    })
    out = mask_table(t, **KNOBS)
    assert out.column("cppo_mask").to_pylist() == [[], [], []]
    assert out.column("cppo_row_budget").to_pylist() == [0.02] * 3


def test_record_batch_in_record_batch_out():
    b = sample_table(10, 16).to_batches()[0]
    out = mask_record_batch(b, **KNOBS)
    assert isinstance(out, pa.RecordBatch)
    assert out.num_rows == 10
    assert out.schema.names[-4:] == ["cppo_mask", "cppo_reason", "cppo_threshold", "cppo_row_budget"]


def test_gate_and_custom_names():
    t = sample_table(20, 16).rename_columns(["uid", "lp", "old_lp", "adv"])
    cols = Columns(log_probs="lp", old_log_probs="old_lp", advantages="adv", mask="keep", reason="why",
                   threshold="c", row_budget="b", gate="g")
    out = mask_table(t, columns=cols, include_gate=True, **KNOBS)
    assert out.schema.names == ["uid", "lp", "old_lp", "adv", "keep", "why", "c", "b", "g"]
    gate = _flat(out.column("g"))
    reason = _flat(out.column("why"))
    assert np.all(gate[(reason == 1) | (reason == 2)] == 1.0)
    assert np.all((gate[reason >= 3] < 1.0) & (gate[reason >= 3] > 0.0))


def test_response_mask_auto_and_off():
    t = pa.table({
        "log_probs": pa.array([[-0.1, -0.1]], pa.list_(pa.float64())),
        "old_log_probs": pa.array([[-0.9, -0.9]], pa.list_(pa.float64())),
        "advantages": pa.array([1.0]),
        "response_mask": pa.array([[True, False]]),
    })
    assert mask_table(t, delta=0.01, delta_b=0.0).column("cppo_reason").to_pylist() == [[3, 0]]
    off = mask_table(t, columns=Columns(response_mask=None), delta=0.01, delta_b=0.0)
    assert off.column("cppo_reason").to_pylist() == [[3, 3]]
    with pytest.raises(KeyError, match="column 'valid' not found"):
        mask_table(t, columns=Columns(response_mask="valid"), **KNOBS)


# ---------------------------------------------------------------------------------------
# Nulls.


def _null_table(hidden_values=False):
    lp_child = pa.array([-0.1, -0.2, -0.3, -0.4, -0.5], pa.float32())
    # Row 1 is null; with hidden_values its (ignored) child range is non-empty.
    offs = [0, 2, 4, 5] if hidden_values else [0, 2, 2, 3]
    lp = pa.ListArray.from_arrays(pa.array(offs, pa.int32()), lp_child if hidden_values else lp_child.slice(0, 3),
                                  mask=pa.array([False, True, False]))
    lq = pa.array([[-0.3, -0.3], None, [-0.3]], pa.list_(pa.float32()))
    return pa.table({"log_probs": lp, "old_log_probs": lq, "advantages": pa.array([1.0, None, -1.0])})


def test_null_rows_error_by_default():
    with pytest.raises(ValueError, match=r"column 'log_probs' is null at row 1; .*null_rows='empty'"):
        mask_table(_null_table(), **KNOBS)


@pytest.mark.parametrize("hidden", [False, True])
def test_null_rows_empty(hidden):
    out = mask_table(_null_table(hidden), null_rows="empty", **KNOBS)
    assert out.column("cppo_mask").to_pylist()[1] is None
    assert out.column("cppo_reason").to_pylist()[1] is None
    assert out.column("cppo_row_budget").to_pylist() == [0.02, None, 0.02]
    clean = pa.table({
        "log_probs": pa.array([[-0.1, -0.2], [-0.5 if hidden else -0.3]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.3, -0.3], [-0.3]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0, -1.0]),
    })
    ref = mask_table(clean, **KNOBS)
    got = out.column("cppo_reason").to_pylist()
    assert [got[0], got[2]] == ref.column("cppo_reason").to_pylist()


def test_null_rows_empty_still_requires_matching_lengths():
    t = _null_table().set_column(1, "old_log_probs", pa.array([[-0.3, -0.3], [-0.3], [-0.3]], pa.list_(pa.float32())))
    with pytest.raises(ValueError, match=r"column 'old_log_probs' has 1 values at row 1 but column 'log_probs' has 0"):
        mask_table(t, null_rows="empty", **KNOBS)


def test_null_token_is_nan_allowed_only_at_invalid_positions():
    base = {
        "log_probs": pa.array([[-0.1, None]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.2, -0.2]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0]),
    }
    with pytest.raises(ValueError, match=r"column 'log_probs' must be finite and <= 0 at valid tokens; got nan "
                                         r"\(NaN or a null value in the data\) at row 0, token 1"):
        mask_table(pa.table(base), **KNOBS)
    ok = mask_table(pa.table({**base, "response_mask": pa.array([[1, 0]], pa.list_(pa.int8()))}), **KNOBS)
    assert ok.column("cppo_reason").to_pylist()[0][1] == 0


def test_null_flag_in_response_mask_is_an_error():
    t = pa.table({
        "log_probs": pa.array([[-0.1], [-0.1, -0.1]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.2], [-0.2, -0.2]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0, 1.0]),
        "response_mask": pa.array([[True], [True, None]]),
    })
    with pytest.raises(ValueError, match=r"column 'response_mask' has a null flag at row 1, token 1"):
        mask_table(t, **KNOBS)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors naming the column and the (table) row.


def test_ragged_mismatch_names_column_and_global_row():
    t = sample_table(30, 16, seed=1)
    lq = t.column("old_log_probs").combine_chunks().to_pylist()
    lq[17] = lq[17][:-1]
    t = t.set_column(2, "old_log_probs", pa.array(lq, pa.list_(pa.float32())))
    chunked = pa.Table.from_batches(t.to_batches(max_chunksize=8))
    with pytest.raises(ValueError, match=r"column 'old_log_probs' has \d+ values at row 17 but column 'log_probs'"):
        mask_table(chunked, **KNOBS)


def test_per_token_advantage_length_mismatch():
    t = pa.table({
        "log_probs": pa.array([[-0.1, -0.1]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.2, -0.2]], pa.list_(pa.float32())),
        "advantages": pa.array([[1.0]], pa.list_(pa.float32())),
    })
    with pytest.raises(ValueError, match=r"column 'advantages' has 1 values at row 0 but column 'log_probs' has 2"):
        mask_table(t, **KNOBS)


def test_bad_value_names_column_row_and_token():
    t = sample_table(30, 16, seed=1)
    adv = t.column("advantages").to_numpy().copy()
    adv[21] = np.inf
    t = pa.Table.from_batches(t.set_column(3, "advantages", pa.array(adv)).to_batches(max_chunksize=8))
    with pytest.raises(ValueError, match=r"column 'advantages' must be finite at valid tokens; got inf at row 21, token 0"):
        mask_table(t, **KNOBS)


@pytest.mark.parametrize(
    "column, array, message",
    [
        ("log_probs", pa.array([[-1, -2]], pa.list_(pa.int64())), r"column 'log_probs' must hold floats"),
        ("log_probs", pa.array([-0.1]), r"column 'log_probs' must be a list<float> column"),
        ("advantages", pa.array(["x"]), r"column 'advantages' must be numeric .* got string"),
        ("response_mask", pa.array([["a", "b"]]), r"column 'response_mask' must hold bool, int or float flags"),
    ],
)
def test_wrong_types(column, array, message):
    cols = {
        "log_probs": pa.array([[-0.1, -0.2]], pa.list_(pa.float32())),
        "old_log_probs": pa.array([[-0.2, -0.2]], pa.list_(pa.float32())),
        "advantages": pa.array([1.0]),
    }
    cols[column] = array
    with pytest.raises(TypeError, match=message):
        mask_table(pa.table(cols), **KNOBS)


def test_missing_column_and_output_clash_and_knobs():
    t = sample_table(4, 8)
    with pytest.raises(KeyError, match=r"column 'old_log_probs' not found \(columns: 'uid', 'log_probs', 'advantages'\)"):
        mask_table(t.drop_columns(["old_log_probs"]), **KNOBS)
    with pytest.raises(ValueError, match=r"output column 'uid' already exists"):
        mask_table(t, columns=Columns(mask="uid"), **KNOBS)
    with pytest.raises(ValueError, match=r"delta must be > 0"):
        mask_table(t, delta=0.0, delta_b=0.02)
    with pytest.raises(ValueError, match=r"delta must be > 0"):
        mask_table(t.slice(0, 0), delta=0.0, delta_b=0.02)
    with pytest.raises(ValueError, match=r"output column names must differ"):
        mask_table(t, columns=Columns(mask="x", reason="x"), **KNOBS)
    with pytest.raises(TypeError, match=r"delta and delta_b are required"):
        mask_table(t, delta=0.1)
    with pytest.raises(TypeError, match=r"unknown CPPO option\(s\): deltab"):
        mask_table(t, delta=0.1, delta_b=0.1, deltab=0.1)
    with pytest.raises(ValueError, match=r"both given"):
        mask_table(t.append_column("divergence", t.column("log_probs")), columns=Columns(divergence="divergence"),
                   divergence="binary_kl", **KNOBS)


def test_sample_is_deterministic():
    a = sample_table(300, 32, seed=4)
    b = sample_table(300, 32, seed=4)
    c = sample_table(300, 32, seed=5)
    assert a.equals(b)
    assert not a.equals(c)
    assert a.column("uid").to_pylist() == list(range(300))
