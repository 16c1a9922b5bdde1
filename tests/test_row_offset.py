"""The shuffled ablation is seeded by a row's index in the whole input: a call's
``row_offset`` (the extension's keyword, the CPU backend's ``first_row``, the Arrow
layer's ``row_offset``) shifts the seed of its rows, so results do not depend on how an
input is split into calls. Same formula in Rust, the NumPy reference and torch."""

from __future__ import annotations

import numpy as np
import pytest

from cppo_native import cppo_mask_reference
from cppo_native._backends import cpu, dispatch
from cppo_native._core.params import make_params
from cppo_native.reference import SplitMix64, shuffle_permutation
from cppo_native.sample import make_rollout_batch

KNOBS = dict(delta=0.15, delta_b=0.02, position_weight="shuffled", shuffle_seed=12345)
OFFSETS = [0, 1, 7, 1000, 2**63 - 1, 2**63 + 5, 2**64 - 1]


def _batch(rows=9, width=48, seed=0):
    b = make_rollout_batch(rows, width, seed=seed)
    return b.log_probs, b.old_log_probs, b.advantages, b.response_mask


def _packed(rows=9, width=48, seed=0):
    """The same rows, packed: 1-D tokens, cu_seqlens, per-row advantages."""
    lp, lq, adv, valid = _batch(rows, width, seed)
    lengths = np.random.default_rng(seed).integers(0, width + 1, rows)
    take = np.arange(width)[None, :] < lengths[:, None]
    cu = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    return lp[take], lq[take], adv, valid[take], cu


def _native(lp, lq, adv, valid, cu=None, first_row=0, **knobs):
    params = make_params(**{**KNOBS, **knobs})
    prep = dispatch.prepare_mask_inputs(lp, lq, adv, valid, None, cu, None)
    return cpu.compute(prep, params, True, 0, first_row=first_row)


def _assert_same(native, ref):
    mask, reason, threshold, gate, row_budget, _ = native
    np.testing.assert_array_equal(mask, ref.mask)
    np.testing.assert_array_equal(reason, ref.reason)
    np.testing.assert_allclose(threshold, ref.threshold, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gate, ref.gate, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(row_budget, ref.row_budget, rtol=1e-12, atol=1e-14)


def test_reference_generator_offset_is_added_to_the_row_mod_2_64():
    for offset in OFFSETS:
        for row in (0, 1, 5):
            assert SplitMix64(7, row, offset).state == SplitMix64(7, (offset + row) % 2**64).state
            assert shuffle_permutation(20, 7, row, offset) == shuffle_permutation(20, 7, (offset + row) % 2**64)
    assert SplitMix64(7, 1, 2**64 - 1).state == SplitMix64(7, 0).state  # wraps
    # Known answer shared with rust/cppo-core/src/weights.rs.
    assert shuffle_permutation(10, 3, 2, 2**64 - 1) == [8, 1, 0, 6, 3, 7, 4, 9, 2, 5]


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_native_row_offset_matches_reference(offset, layout):
    if layout == "padded":
        lp, lq, adv, valid = _batch()
        cu = None
    else:
        lp, lq, adv, valid, cu = _packed()
    native = _native(lp, lq, adv, valid, cu, first_row=offset)
    ref = cppo_mask_reference(lp, lq, adv, valid, **KNOBS, cu_seqlens=cu, row_offset=offset)
    _assert_same(native, ref)
    if offset:  # the offset matters (9 rows: some permutation differs)
        plain = cppo_mask_reference(lp, lq, adv, valid, **KNOBS, cu_seqlens=cu)
        assert not np.array_equal(plain.threshold, ref.threshold)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_split_calls_match_one_call(layout):
    """Masking rows [a, b) with row_offset=a gives the whole call's rows [a, b)."""
    if layout == "padded":
        lp, lq, adv, valid = _batch(rows=13, seed=3)
        whole = _native(lp, lq, adv, valid)
        for a, b in [(0, 4), (4, 5), (5, 13)]:
            part = _native(lp[a:b], lq[a:b], adv[a:b], valid[a:b], first_row=a)
            for got, want in zip(part[:4], whole[:4]):
                np.testing.assert_array_equal(got, want[a:b])
            np.testing.assert_array_equal(part[4], whole[4][a:b])
    else:
        lp, lq, adv, valid, cu = _packed(rows=13, seed=3)
        whole = _native(lp, lq, adv, valid, cu)
        for a, b in [(0, 4), (4, 5), (5, 13)]:
            s, e = cu[a], cu[b]
            part = _native(lp[s:e], lq[s:e], adv[a:b], valid[s:e], cu[a : b + 1] - s, first_row=a)
            for got, want in zip(part[:4], whole[:4]):
                np.testing.assert_array_equal(got, want[s:e])
            np.testing.assert_array_equal(part[4], whole[4][a:b])


def test_bad_values_name_the_row_in_the_call():
    lp, lq, adv, valid = _batch(rows=4)
    lp = lp.copy()
    lp[2, np.flatnonzero(valid[2])[0]] = np.nan
    with pytest.raises(ValueError, match="row 2"):
        _native(lp, lq, adv, valid, first_row=1000)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_first_row_out_of_range(bad):
    lp, lq, adv, valid = _batch(rows=2)
    with pytest.raises(ValueError, match="row_offset"):
        _native(lp, lq, adv, valid, first_row=bad)


def test_extension_keyword_defaults_to_zero():
    lp, lq, adv, valid = _batch(rows=5)
    np.testing.assert_array_equal(_native(lp, lq, adv, valid)[3],
                                  cppo_mask_reference(lp, lq, adv, valid, **KNOBS).gate)


def test_torch_backend_row_offset_matches_reference():
    torch = pytest.importorskip("torch")
    from cppo_native._backends import torch_ops
    from cppo_native._backends.torch_ops import shuffle_permutations

    counts = torch.tensor([0, 1, 2, 3, 7, 31])
    rows = torch.arange(6)
    for offset in OFFSETS:
        perm = shuffle_permutations(counts, 99, 40, rows, offset)
        for r in range(6):
            n = int(counts[r])
            assert perm[r, :n].tolist() == shuffle_permutation(n, 99, r, offset), (offset, r)

    for packed in (False, True):
        args = _packed() if packed else (*_batch(), None)
        lp, lq, adv, valid, cu = args
        prep = dispatch.prepare_mask_inputs(
            torch.from_numpy(lp), torch.from_numpy(lq), torch.from_numpy(adv), torch.from_numpy(valid), None,
            None if cu is None else torch.from_numpy(cu), None, backend="torch",
        )
        mask, reason, threshold, _, row_budget, _ = torch_ops.compute(
            prep, make_params(**KNOBS), True, True, row_offset=2**63 + 5
        )
        ref = cppo_mask_reference(lp, lq, adv, valid, **KNOBS, cu_seqlens=cu, row_offset=2**63 + 5)
        np.testing.assert_array_equal(mask.numpy(), ref.mask)
        np.testing.assert_array_equal(reason.numpy(), ref.reason)
        np.testing.assert_allclose(threshold.numpy(), ref.threshold, rtol=1e-12, atol=1e-14)
