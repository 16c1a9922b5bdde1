"""Inputs the contract covers: byte order, extreme integers, sparse/ragged inputs and
duplicate column names are accepted or refused with an error naming the argument."""

from __future__ import annotations

import numpy as np
import pytest

import cppo_native
from cppo_native.reference import cppo_mask_reference
from strategies import assert_same_as_reference, cpu_rule

KNOBS = dict(delta=0.15, delta_b=0.02)


def _batch(seed=0, shape=(4, 9)):
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(0.3, shape)
    lq = -rng.exponential(0.3, shape)
    adv = rng.normal(size=shape[0])
    valid = rng.random(shape) < 0.8
    return lp, lq, adv, valid


@pytest.mark.parametrize("float_dtype", [">f8", ">f4"])
def test_big_endian_inputs_match_the_reference(float_dtype):
    lp, lq, adv, valid = _batch()
    lp, lq = lp.astype(float_dtype).astype("<f8"), lq.astype(float_dtype).astype("<f8")  # same values
    ref = cppo_mask_reference(lp, lq, adv, valid, adaptive_budget=True, **KNOBS)
    mask, info = cppo_native.cppo_mask(lp.astype(float_dtype), lq.astype(float_dtype), adv.astype(">f8"),
                                       valid.astype(">i4"), adaptive_budget=True, return_info=True, **KNOBS)
    # Binary TV: the spec's agreement rule (strategies.cpu_rule); a byte-order mistake
    # would be far outside it.
    assert_same_as_reference(mask, ref, info=info, rule=cpu_rule(None))


def test_big_endian_cu_seqlens():
    lp, lq, adv, _ = _batch(1, (3, 6))
    cu = np.array([0, 6, 12, 18])
    want = cppo_native.cppo_mask(lp.ravel(), lq.ravel(), adv, None, cu_seqlens=cu, **KNOBS)
    got = cppo_native.cppo_mask(lp.ravel().astype(">f8"), lq.ravel(), adv, None, cu_seqlens=cu.astype(">i8"), **KNOBS)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want.reshape(3, 6), cppo_mask_reference(lp, lq, adv, None, **KNOBS).mask)


def test_horizon_too_large():
    lp, lq, adv, valid = _batch()
    with pytest.raises(ValueError, match=r"horizon must be below 2\*\*63"):
        cppo_native.cppo_mask(lp, lq, adv, valid, horizon=2**63, **KNOBS)


def test_uint64_cu_seqlens_beyond_int64_named():
    lp, lq, adv, _ = _batch(2, (3, 4))
    cu = np.array([0, 4, 2**64 - 1, 12], np.uint64)
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\]=18446744073709551615 does not fit in int64"):
        cppo_native.cppo_mask(lp.ravel(), lq.ravel(), adv, None, cu_seqlens=cu, **KNOBS)


def test_empty_divergence_name_refused():
    lp, lq, adv, valid = _batch()
    with pytest.raises(ValueError, match="divergence must be None"):
        cppo_native.cppo_mask(lp, lq, adv, valid, divergence="", **KNOBS)


def test_ragged_lists_name_the_argument():
    with pytest.raises(ValueError, match="log_probs: a nested list must be rectangular"):
        cppo_native.cppo_mask([[-0.1, -0.2], [-0.1]], [[-0.1, -0.2], [-0.1, -0.1]], [1.0, 1.0], None, **KNOBS)
    with pytest.raises(ValueError, match="response_mask: a nested list must be rectangular"):
        cppo_native.cppo_mask([[-0.1, -0.2]], [[-0.1, -0.2]], [1.0], [[1, 1, 0], [1]], **KNOBS)


def test_sparse_tensors_name_the_argument():
    torch = pytest.importorskip("torch")
    lp, lq, adv, valid = _batch()
    with pytest.raises(TypeError, match="old_log_probs: torch.sparse_coo torch tensors are not supported"):
        cppo_native.cppo_mask(torch.tensor(lp), torch.tensor(lq).to_sparse(), torch.tensor(adv), None, **KNOBS)


def test_duplicate_parquet_column_names(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from cppo_native import cli

    t = pa.Table.from_arrays(
        [pa.array([[-0.1]]), pa.array([[-0.2]]), pa.array([1.0]), pa.array([[-0.3]])],
        names=["log_probs", "old_log_probs", "advantages", "log_probs"])
    src = tmp_path / "dup.parquet"
    pq.write_table(t, src)
    code = cli.main([str(src), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "duplicate column name(s) 'log_probs'" in err
    assert not (tmp_path / "o.parquet").exists()
