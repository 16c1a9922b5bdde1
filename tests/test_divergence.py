"""Divergence functions: Binary TV/KL and Top-K reduced TV/KL (CPU: Rust; torch path).

Oracles: ``cppo_native.reference.binary_tv/binary_kl`` (scalar, the mask's own
definitions) and ``cppo_native.divergence.topk_divergence_reference`` (plain Python).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cppo_native
from cppo_native import divergence as dv
from cppo_native import reference as ref
from cppo_native.reference import cppo_mask_reference
from strategies import assert_same_as_reference, cpu_rule

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

REF = {"tv": np.vectorize(ref.binary_tv, otypes=[np.float64]), "kl": np.vectorize(ref.binary_kl, otypes=[np.float64])}
BINARY = {"tv": dv.binary_tv, "kl": dv.binary_kl}


def log_probs_array(rng, shape, edge=True):
    """Log-probs in (-inf, 0] with the awkward values a real engine produces."""
    x = np.log(rng.uniform(0.0, 1.0, shape) ** rng.uniform(0.2, 6.0))
    if edge:
        flat = x.reshape(-1)
        picks = rng.integers(0, flat.size, size=max(1, flat.size // 5)) if flat.size else []
        specials = np.array([0.0, -0.0, 1e-7, -1e-300, -1e-12, -40.0, -745.0, -1e-16, np.log(0.5)])
        for i in picks:
            flat[i] = specials[rng.integers(0, specials.size)]
    return x


def widened(x, dtype):
    """What the backend sees after widening a `dtype` array to float64."""
    return torch.tensor(x).to(dtype).to(torch.float64).numpy()


# ---------------------------------------------------------------------------------------
# Binary TV / KL


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(0, 4), cols=st.integers(0, 9), kind=st.sampled_from(["tv", "kl"]))
def test_binary_equals_reference_bitwise(seed, rows, cols, kind):
    rng = np.random.default_rng(seed)
    lp = log_probs_array(rng, (rows, cols))
    lq = log_probs_array(rng, (rows, cols))
    got = BINARY[kind](lp, lq)
    assert got.dtype == np.float64 and got.shape == (rows, cols)
    np.testing.assert_array_equal(got, REF[kind](lp, lq) if lp.size else np.zeros((rows, cols)))


@pytest.mark.parametrize("kind", ["tv", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_binary_low_precision_inputs_are_widened(kind, dtype):
    rng = np.random.default_rng(1)
    lp = log_probs_array(rng, (3, 17))
    lq = log_probs_array(rng, (3, 17))
    lp[np.abs(lp) < 1e-5] = -1e-3  # keep low-precision roundings <= 0 + tolerance
    lq[np.abs(lq) < 1e-5] = -1e-3
    tp, tq = torch.tensor(lp).to(dtype), torch.tensor(lq).to(dtype)
    got = BINARY[kind](tp, tq)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), REF[kind](widened(lp, dtype), widened(lq, dtype)))


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_binary_mask_zeroes_and_skips_invalid_positions(kind):
    rng = np.random.default_rng(2)
    lp = log_probs_array(rng, (4, 6), edge=False)
    lq = log_probs_array(rng, (4, 6), edge=False)
    valid = rng.random((4, 6)) < 0.6
    lp[~valid] = np.nan  # garbage where invalid
    lq[~valid] = 5.0
    keep = (lp.copy(), lq.copy())
    got = BINARY[kind](lp, lq, valid)
    want = np.where(valid, REF[kind](np.where(valid, lp, -1.0), np.where(valid, lq, -1.0)), 0.0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(lp, keep[0])  # caller's arrays untouched
    np.testing.assert_array_equal(lq, keep[1])
    for mask in (valid.astype(np.uint8), valid.astype(np.float32), torch.tensor(valid).int()):
        np.testing.assert_array_equal(np.asarray(BINARY[kind](lp, lq, mask)), want)


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_binary_torch_path_matches_reference(kind):
    rng = np.random.default_rng(3)
    lp = log_probs_array(rng, (5, 40))
    lq = log_probs_array(rng, (5, 40))
    valid = rng.random((5, 40)) < 0.8
    got = dv._binary_torch(kind, torch.tensor(lp), torch.tensor(lq), torch.tensor(valid), True).numpy()
    want = np.where(valid, REF[kind](lp, lq), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", [4, 5, 6])
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_binary_divergence_reproduces_the_masks_internal_estimator(kind, seed):
    """The public estimators are the reference's bits (libm), and so is a mask computed
    from them. The mask's own Binary KL is too; its own Binary TV uses the vectorised
    ``vexp`` (< 1 ulp) and is held to the spec's agreement rule (``cpu_rule``)."""
    rng = np.random.default_rng(seed)
    lp = log_probs_array(rng, (6, 30), edge=False)
    lq = log_probs_array(rng, (6, 30), edge=False)
    adv = rng.normal(size=(6,))
    valid = rng.random((6, 30)) < 0.9
    params = dict(delta=0.15, delta_b=0.02, adaptive_budget=True)
    ref_result = cppo_mask_reference(lp, lq, adv, valid, divergence="binary_" + kind, **params)
    own = cppo_native.cppo_mask(lp, lq, adv, valid, divergence="binary_" + kind, return_info=True, **params)
    given = cppo_native.cppo_mask(lp, lq, adv, valid, divergence=BINARY[kind](lp, lq, valid),
                                  return_info=True, **params)
    assert_same_as_reference(given[0], ref_result, rule="exact", info=given[1])
    assert_same_as_reference(own[0], ref_result, rule=cpu_rule("binary_" + kind), info=own[1])
    if kind == "kl":
        np.testing.assert_array_equal(own[1].threshold, given[1].threshold)


@pytest.mark.parametrize("bad_field", ["log_probs", "old_log_probs"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 0.01])
def test_binary_bad_values_name_position(bad_field, value):
    lp = np.full((3, 4), -1.0)
    lq = np.full((3, 4), -2.0)
    (lp if bad_field == "log_probs" else lq)[1, 2] = value
    for fn in (dv.binary_tv, dv.binary_kl):
        with pytest.raises(ValueError, match=rf"{bad_field} must be finite and <= 0 .* \(row 1, column 2\)"):
            fn(lp, lq)
        with pytest.raises(ValueError, match=rf"{bad_field} must be finite and <= 0 .* \(row 1, column 2\)"):
            dv._binary_torch("tv" if fn is dv.binary_tv else "kl", torch.tensor(lp), torch.tensor(lq), None, True)
    valid = np.ones((3, 4), bool)
    valid[1, 2] = False
    dv.binary_tv(lp, lq, valid)  # invalid positions are not validated


def test_binary_shape_dtype_device_errors():
    lp = np.full((2, 3), -1.0)
    with pytest.raises(ValueError, match=r"old_log_probs must have the shape of log_probs \(2, 3\), got \(3, 2\)"):
        dv.binary_tv(lp, np.full((3, 2), -1.0))
    with pytest.raises(TypeError, match="log_probs: dtype int64 is not supported"):
        dv.binary_tv(np.zeros((2, 3), np.int64), lp)
    with pytest.raises(TypeError, match="expected a numpy array or torch tensor"):
        dv.binary_tv(lp, object())
    with pytest.raises(ValueError, match="num_threads"):
        dv.binary_tv(lp, lp, num_threads=0)


# ---------------------------------------------------------------------------------------
# Top-K


def make_topk(rng, shape, k, vocab, *, pad=False, inf=False, sampled_in=None, dtype=np.float64):
    """Random rollout/top-K data: mu and pi are full distributions over `vocab` tokens,
    topk = mu's K most likely ids (optionally with padding slots and -inf entries)."""
    k = min(k, vocab)
    logits_mu = rng.normal(size=shape + (vocab,)) * rng.uniform(0.5, 4.0)
    logits_pi = logits_mu + rng.normal(size=shape + (vocab,)) * rng.uniform(0.0, 2.0)
    lmu = logits_mu - np.log(np.exp(logits_mu).sum(-1, keepdims=True))
    lpi = logits_pi - np.log(np.exp(logits_pi).sum(-1, keepdims=True))
    ids = np.argsort(-lmu, axis=-1)[..., :k].astype(np.int64)
    y = rng.integers(0, vocab, size=shape).astype(np.int64)
    if sampled_in is not None and k:
        inside = rng.random(shape) < sampled_in
        y = np.where(inside, ids[..., 0], y)
    tlq = np.take_along_axis(lmu, ids, -1)
    tlp = np.take_along_axis(lpi, ids, -1)
    lq = np.take_along_axis(lmu, y[..., None], -1)[..., 0]
    lp = np.take_along_axis(lpi, y[..., None], -1)[..., 0]
    if pad and k:
        drop = rng.random(ids.shape) < 0.25
        ids = np.where(drop, -1, ids)
        tlq = np.where(drop, np.nan, tlq)  # padding values are never read
        tlp = np.where(drop, 7.0, tlp)
    if inf and k:
        tlp = np.where(rng.random(tlp.shape) < 0.15, -np.inf, tlp)
        tlq = np.where(rng.random(tlq.shape) < 0.10, -np.inf, tlq)
    full = dict(lmu=lmu, lpi=lpi)
    return dict(lp=lp, lq=lq, tlp=tlp, tlq=tlq, ids=ids, y=y), full


def call(fn, d, valid=None, **kw):
    return fn(d["lp"], d["lq"], d["tlp"], d["tlq"], d["ids"], d["y"], valid, **kw)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    cols=st.integers(0, 8),
    k=st.integers(0, 7),
    vocab=st.integers(1, 12),
    pad=st.booleans(),
    inf=st.booleans(),
    sampled_in=st.sampled_from([None, 0.5, 1.0]),
    masked=st.booleans(),
    kind=st.sampled_from(["tv", "kl"]),
)
def test_topk_rust_equals_reference_bitwise(seed, rows, cols, k, vocab, pad, inf, sampled_in, masked, kind):
    rng = np.random.default_rng(seed)
    d, _ = make_topk(rng, (rows, cols), k, vocab, pad=pad, inf=inf, sampled_in=sampled_in)
    valid = (rng.random((rows, cols)) < 0.7) if masked else None
    got = call(dv.topk_divergence, d, valid, kind=kind)
    want = call(dv.topk_divergence_reference, d, valid, kind=kind)
    assert got.dtype == np.float64 and got.shape == (rows, cols)
    np.testing.assert_array_equal(got, want)
    assert np.all(got >= 0) and np.all(np.isfinite(got))
    if kind == "tv":
        assert np.all(got <= 1.0 + 1e-12)
    # the torch path (used for CUDA tensors) agrees up to summation order
    t = {key: torch.tensor(v) for key, v in d.items()}
    got_t = dv._topk_torch(kind, t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"],
                           None if valid is None else torch.tensor(valid)).numpy()
    np.testing.assert_allclose(got_t, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_low_precision_and_int32_ids(dtype, kind):
    rng = np.random.default_rng(5)
    d, _ = make_topk(rng, (3, 11), 5, 30, sampled_in=0.4)
    # keep low-precision log-probs <= tolerance after rounding
    for key in ("lp", "lq", "tlp", "tlq"):
        d[key] = np.minimum(d[key], -1e-2)
    t = {key: torch.tensor(v) for key, v in d.items()}
    for key in ("lp", "lq", "tlp", "tlq"):
        t[key] = t[key].to(dtype)
    t["ids"] = t["ids"].to(torch.int32)
    got = dv.topk_divergence(t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"], kind=kind)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    w = {key: (widened(v, dtype) if key in ("lp", "lq", "tlp", "tlq") else v) for key, v in d.items()}
    np.testing.assert_array_equal(got.numpy(), call(dv.topk_divergence_reference, w, kind=kind))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(1, 10), kind=st.sampled_from(["tv", "kl"]))
def test_topk_full_vocabulary_is_exact_and_reduction_never_exceeds_it(seed, vocab, kind):
    rng = np.random.default_rng(seed)
    d, full = make_topk(rng, (2, 5), vocab, vocab)
    mu, pi = np.exp(full["lmu"]), np.exp(full["lpi"])
    exact = 0.5 * np.abs(mu - pi).sum(-1) if kind == "tv" else (mu * (full["lmu"] - full["lpi"])).sum(-1)
    np.testing.assert_allclose(call(dv.topk_divergence, d, kind=kind), exact, rtol=1e-9, atol=1e-12)
    # Coarser partitions can only lose divergence (data-processing inequality).
    for k in range(vocab):
        dk, _ = make_topk(np.random.default_rng(seed), (2, 5), k, vocab)
        assert np.all(call(dv.topk_divergence, dk, kind=kind) <= exact + 1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_topk_with_no_entries_is_the_binary_divergence(seed):
    rng = np.random.default_rng(seed)
    # Above the KL floors (Top-K floors every bucket's probability at 1e-12, Binary KL
    # only the rest masses), the two definitions agree.
    lp = np.maximum(log_probs_array(rng, (3, 7), edge=False), -20.0)
    lq = np.maximum(log_probs_array(rng, (3, 7), edge=False), -20.0)
    empty = np.zeros((3, 7, 0))
    ids = np.zeros((3, 7, 0), np.int64)
    y = np.zeros((3, 7), np.int64)
    np.testing.assert_allclose(dv.topk_tv(lp, lq, empty, empty, ids, y), REF["tv"](lp, lq), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dv.topk_kl(lp, lq, empty, empty, ids, y), REF["kl"](lp, lq), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_sampled_inside_topk_uses_the_topk_entry(kind):
    rng = np.random.default_rng(6)
    d, _ = make_topk(rng, (2, 9), 4, 20, sampled_in=1.0)
    base = call(dv.topk_divergence, d, kind=kind)
    d2 = dict(d, lp=d["lp"] - 0.5, lq=d["lq"] - 0.25)  # sampled-token log-probs are not used
    np.testing.assert_array_equal(call(dv.topk_divergence, d2, kind=kind), base)
    # only a sampled token outside the top-K has its own bucket
    d3, _ = make_topk(np.random.default_rng(6), (2, 9), 4, 20, sampled_in=0.5)
    outside = ~np.any(d3["ids"] == d3["y"][..., None], -1)
    assert outside.any() and not outside.all()
    d4 = dict(d3, lp=d3["lp"] - 0.5, lq=d3["lq"] - 1.0)
    changed = call(dv.topk_divergence, d4, kind=kind) != call(dv.topk_divergence, d3, kind=kind)
    assert changed.any() and not np.any(changed & ~outside)


def test_topk_hand_computed_example():
    # mu top-2: ids 5 (0.5), 9 (0.3); sampled id 2 outside with mu 0.1; other 0.1.
    # pi at 5, 9, 2: 0.4, 0.3, 0.2; pi other 0.1.
    lnp = np.log
    args = dict(
        log_probs=np.array([lnp(0.2)]), old_log_probs=np.array([lnp(0.1)]),
        topk_log_probs=np.array([[lnp(0.4), lnp(0.3)]]), topk_old_log_probs=np.array([[lnp(0.5), lnp(0.3)]]),
        topk_ids=np.array([[5, 9]]), sampled_ids=np.array([2]),
    )
    tv = dv.topk_tv(**args)
    assert tv.shape == (1,)
    assert math.isclose(tv[0], 0.5 * (0.1 + 0.0 + 0.1 + 0.0), rel_tol=1e-12)
    kl = dv.topk_kl(**args)
    want = 0.5 * math.log(0.5 / 0.4) + 0.1 * math.log(0.1 / 0.2)
    assert math.isclose(kl[0], want, rel_tol=1e-12)
    # pi puts no mass on a listed token: finite (floored) KL
    args["topk_log_probs"] = np.array([[-np.inf, lnp(0.3)]])
    assert np.isfinite(dv.topk_kl(**args)[0]) and dv.topk_kl(**args)[0] > 10


@pytest.mark.parametrize(
    "where,value,message",
    [
        ("lp", np.nan, r"log_probs must be finite and <= 0 .*got value nan at \(row 1, column 2\)"),
        ("lq", 0.5, r"old_log_probs must be finite and <= 0 .*got value 0.5 at \(row 1, column 2\)"),
        ("y", -3, r"sampled_ids must be >= 0 .*got value -3 at \(row 1, column 2\)"),
        ("tlq", np.nan, r"topk_old_log_probs must be <= 0 or -inf \(not NaN\) .*\(row 1, column 2\), top-K slot 1"),
        ("tlp", 1.0, r"topk_log_probs must be <= 0 or -inf \(not NaN\) .*got value 1.0 at \(row 1, column 2\), top-K slot 1"),
        ("ids", "dup", r"topk_ids must be distinct .*got duplicate id \d+ at \(row 1, column 2\), top-K slot 1"),
    ],
)
def test_topk_bad_values_name_input_position_and_slot(where, value, message):
    rng = np.random.default_rng(7)
    d, _ = make_topk(rng, (3, 4), 3, 10)
    if where in ("tlq", "tlp"):
        d[where][1, 2, 1] = value
    elif where == "ids":
        d["ids"][1, 2, 1] = d["ids"][1, 2, 0]
    else:
        d[where][1, 2] = value
    # a later bad value must not hide the first one
    d["lp"][2, 3] = np.nan
    snapshot = {k: v.copy() for k, v in d.items()}
    for fn in (dv.topk_divergence, dv.topk_divergence_reference):
        with pytest.raises(ValueError, match=message):
            call(fn, d)
    t = {k: torch.tensor(v) for k, v in d.items()}
    with pytest.raises(ValueError, match=message):
        dv._topk_torch("tv", t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"], None)
    for k in d:
        np.testing.assert_array_equal(d[k], snapshot[k])
    valid = np.ones((3, 4), bool)
    valid[1, 2] = valid[2, 3] = False
    call(dv.topk_divergence, d, valid)  # invalid positions are never read


def test_topk_shape_and_dtype_errors():
    rng = np.random.default_rng(8)
    d, _ = make_topk(rng, (2, 3), 4, 9)
    with pytest.raises(ValueError, match=r"topk_ids must have shape \(2, 3\) \+ \(K,\), got \(2, 4\)"):
        dv.topk_tv(d["lp"], d["lq"], d["tlp"], d["tlq"], d["ids"][:, 0, :], d["y"])
    with pytest.raises(ValueError, match=r"topk_log_probs must have shape \(2, 3, 4\), got \(2, 3, 3\)"):
        dv.topk_tv(d["lp"], d["lq"], d["tlp"][..., :3], d["tlq"], d["ids"], d["y"])
    with pytest.raises(ValueError, match=r"sampled_ids must have shape \(2, 3\)"):
        dv.topk_tv(d["lp"], d["lq"], d["tlp"], d["tlq"], d["ids"], d["y"][:, :2])
    with pytest.raises(TypeError, match="topk_ids: dtype float64 is not supported"):
        dv.topk_tv(d["lp"], d["lq"], d["tlp"], d["tlq"], d["ids"].astype(float), d["y"])
    with pytest.raises(TypeError, match="topk_log_probs: dtype int64"):
        dv.topk_tv(d["lp"], d["lq"], d["ids"], d["tlq"], d["ids"], d["y"])
    with pytest.raises(ValueError, match="kind must be 'tv' or 'kl'"):
        dv.topk_divergence(d["lp"], d["lq"], d["tlp"], d["tlq"], d["ids"], d["y"], kind="js")


def test_topk_strided_and_packed_inputs():
    rng = np.random.default_rng(9)
    d, _ = make_topk(rng, (4, 6), 5, 16, sampled_in=0.3)
    want = call(dv.topk_divergence_reference, d)
    # non-contiguous views (transposed twice, every other K slot reversed) give the same
    tf = {k: np.asfortranarray(v) for k, v in d.items()}
    np.testing.assert_array_equal(call(dv.topk_divergence, tf), want)
    flat = {k: (v.reshape(24, -1) if v.ndim == 3 else v.reshape(24)) for k, v in d.items()}
    np.testing.assert_array_equal(call(dv.topk_divergence, flat), want.reshape(24))


def test_topk_divergence_drives_the_mask():
    rng = np.random.default_rng(10)
    d, _ = make_topk(rng, (3, 12), 4, 25, sampled_in=0.5)
    adv = rng.normal(size=(3,))
    div = call(dv.topk_divergence, d)
    mask = cppo_native.cppo_mask(d["lp"], d["lq"], adv, divergence=div, delta=0.1, delta_b=0.01)
    want = ref.cppo_mask_reference(d["lp"], d["lq"], adv, divergence=div, delta=0.1, delta_b=0.01).mask
    np.testing.assert_array_equal(mask, want)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tv", "kl"])
def test_topk_and_binary_on_cuda(kind):
    rng = np.random.default_rng(11)
    d, _ = make_topk(rng, (4, 50), 8, 64, pad=True, inf=True, sampled_in=0.5)
    valid = rng.random((4, 50)) < 0.8
    t = {k: torch.tensor(v, device="cuda") for k, v in d.items()}
    got = dv.topk_divergence(t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"],
                             torch.tensor(valid, device="cuda"), kind=kind)
    assert got.device.type == "cuda" and got.dtype == torch.float64
    np.testing.assert_allclose(got.cpu().numpy(), call(dv.topk_divergence_reference, d, valid, kind=kind),
                               rtol=1e-10, atol=1e-13)
    b = BINARY[kind](t["lp"], t["lq"], torch.tensor(valid, device="cuda"))
    np.testing.assert_allclose(b.cpu().numpy(), np.where(valid, REF[kind](d["lp"], d["lq"]), 0.0),
                               rtol=1e-12, atol=1e-15)
    t["tlq"][1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"topk_old_log_probs .*\(row 1, column 2\), top-K slot 3"):
        dv.topk_divergence(t["lp"], t["lq"], t["tlp"], t["tlq"], t["ids"], t["y"], kind=kind)
