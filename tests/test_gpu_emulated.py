"""The CUDA kernels, run on the CPU emulator (tests/cuda_emulator.py), against the NumPy
reference. Same kernel source and same launch plan as on a GPU; no GPU needed.

The emulator uses the C library's exp/log like the reference, so divergences are
identical and only the order of the prefix sums differs: the spec's tolerance rule
applies to masks, reasons and thresholds, and the per-row budgets are exact.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cppo_native
from cppo_native import cppo_mask_reference
from cppo_native._backends.cuda import mask as _cuda
from cuda_emulator import PRODUCTION, SMALL, EmuExecutor, build, compiler, emulated_mask
from gpu_compare import assert_within_tolerance
from strategies import Case, cases

pytestmark = [
    pytest.mark.skipif(compiler() is None, reason="the CUDA emulator needs a C++17 compiler (g++)"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


def check(case: Case, geometry=None, **extra):
    mask, info = emulated_mask(*case.args(), **case.kwargs(), return_info=True, geometry=geometry, **extra)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert_within_tolerance(mask, info, ref)
    plain = emulated_mask(*case.args(), **case.kwargs(), geometry=geometry, **extra)
    np.testing.assert_array_equal(plain, mask)  # the mask alone is the same pass
    return mask, info


# ---------------------------------------------------------------------------------------
# Random batches: every knob, both layouts, rows spanning several tiles (tile = 128 here).


@SETTINGS
@given(cases(max_rows=5, max_len=300))
def test_matches_reference(case: Case):
    check(case)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_rows=3, max_len=2500))
def test_matches_reference_production_geometry(case: Case):
    # The geometry the GPU runs (256 threads, 1024-position tiles).
    check(case, geometry=PRODUCTION)


@SETTINGS
@given(cases(max_rows=4, max_len=200), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_low_precision_inputs(case: Case, dtype):
    """Inputs are widened exactly, so the reference on the widened values is the oracle."""
    def cast(a):
        t = torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))
        return t, t.to(torch.float64).numpy()

    lp, lp64 = cast(case.log_probs)
    lq, lq64 = cast(case.old_log_probs)
    adv, adv64 = cast(case.advantages)
    div, div64 = case.divergence, case.divergence
    if isinstance(div, np.ndarray):
        div, div64 = cast(div)
    low = Case(lp, lq, adv, case.response_mask, div, case.cu_seqlens, case.knobs, case.per_row)
    wide = Case(lp64, lq64, adv64, case.response_mask, div64, case.cu_seqlens, case.knobs, case.per_row)
    mask, info = emulated_mask(*low.args(), **low.kwargs(), return_info=True)
    ref = cppo_mask_reference(*wide.args(), **wide.kwargs())
    assert_within_tolerance(mask, info, ref)


MASK_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bfloat16"]


@SETTINGS
@given(cases(max_rows=4, max_len=200, packed=False), st.sampled_from(MASK_DTYPES), st.integers(0, 3))
def test_strided_inputs_and_mask_dtypes(case: Case, mask_dtype, layout):
    """Non-contiguous views (every other column, column-major, reversed, broadcast) and
    every mask dtype read in place."""
    valid = np.ones(case.log_probs.shape, bool) if case.response_mask is None else case.response_mask

    def view(a):
        a = np.asarray(a)
        if a.ndim != 2:
            return a
        if layout == 0:
            big = np.zeros((a.shape[0], 2 * a.shape[1] + 1), dtype=a.dtype)
            big[:, 1::2] = a
            return big[:, 1::2]
        if layout == 1:
            return np.asfortranarray(a)
        if layout == 2:
            return a[::-1, ::-1].copy()[::-1, ::-1]
        return a

    if mask_dtype == "bfloat16":
        m = torch.from_numpy(valid.astype(np.float32)).to(torch.bfloat16)
        m[torch.from_numpy(~valid)] = -0.0  # negative zero is still "not valid"
    else:
        m = view(valid.astype(mask_dtype))
        if mask_dtype.startswith("float"):
            m = np.where(valid, m, -0.0).astype(mask_dtype)
    adv = case.advantages
    if layout == 3 and adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], case.log_probs.shape)  # zero column stride
    div = view(case.divergence) if isinstance(case.divergence, np.ndarray) else case.divergence
    strided = Case(view(case.log_probs), view(case.old_log_probs), view(adv), m, div, None, case.knobs)
    mask, info = emulated_mask(*strided.args(), **strided.kwargs(), return_info=True)
    plain = Case(case.log_probs, case.old_log_probs, np.ascontiguousarray(adv), valid, case.divergence, None, case.knobs)
    ref = cppo_mask_reference(*plain.args(), **plain.kwargs())
    assert_within_tolerance(mask, info, ref)


@SETTINGS
@given(cases(max_rows=4, max_len=150, packed=True), st.sampled_from(["int64", "int32", "uint32", "int16"]))
def test_packed_offsets_dtypes_and_leading_one(case: Case, cu_dtype):
    cu = case.cu_seqlens.astype(cu_dtype)
    lead = lambda a: a[None, :] if isinstance(a, np.ndarray) and a.shape == case.log_probs.shape else a  # noqa: E731
    adv = case.advantages if case.per_row else lead(case.advantages)  # per-row ones stay [B]
    one = Case(lead(case.log_probs), lead(case.old_log_probs), adv, lead(case.response_mask),
               lead(case.divergence), cu, case.knobs, case.per_row)
    mask, info = emulated_mask(*one.args(), **one.kwargs(), return_info=True)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert mask.shape == (1, case.log_probs.shape[0])
    info = {k: (v.reshape(-1) if k in ("reason", "threshold", "gate") else v) for k, v in info.items()}
    assert_within_tolerance(mask.reshape(-1), info, ref)


# ---------------------------------------------------------------------------------------
# The adaptive budget's exact quantile: every selection path (shared-memory cap 16 here).


def budget_case(rows, length, in_window_fraction, seed, ties=False):
    """Given divergences with a chosen share inside [delta_b, 2 delta_b] (the clamp window
    for budget_scale = 1), so that the quantile needs the exact selection."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.0, 0.019, size=(rows, length))
    inside = rng.random((rows, length)) < in_window_fraction
    window = rng.uniform(0.02, 0.04, size=(rows, length))
    if ties:
        window = rng.choice([0.02, 0.025, 0.03, 0.03, 0.04], size=(rows, length))
    d = np.where(inside, window, d)
    d[:, : length // 20] = rng.uniform(0.05, 0.5, size=(rows, length // 20))  # some above
    lp = -rng.exponential(0.3, size=(rows, length))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=(rows, length)), 0.0)
    valid = rng.random((rows, length)) < 0.9
    return lp, lq, rng.normal(size=rows), valid, d


@pytest.mark.parametrize(
    "length,fraction,ties",
    [
        (300, 0.04, False),  # few candidates: all gathered into shared memory
        (300, 0.6, False),  # more than fit: one radix pass over the row, then gathered
        (100, 0.12, True),  # ties between candidates
        (1000, 0.0, False),  # nothing in the window
        (1000, 1.0, True),  # many equal keys: narrowing cannot split them
    ],
)
@pytest.mark.parametrize("quantile", [0.9, 0.5, 0.0, 1.0, 0.37])
def test_adaptive_budget_selection_paths(length, fraction, ties, quantile):
    for seed in range(3):
        lp, lq, adv, valid, d = budget_case(3, length, fraction, seed, ties)
        knobs = dict(KNOBS, adaptive_budget=True, budget_quantile=quantile)
        case = Case(lp, lq, adv, valid, d, None, knobs)
        _, info = check(case)
        ref = cppo_mask_reference(*case.args(), **case.kwargs())
        np.testing.assert_array_equal(info["row_budget"], ref.row_budget)


def _one_row_budget(d, quantile):
    d = np.asarray(d, dtype=np.float64)[None, :]
    lp = np.full(d.shape, -0.5)
    case = Case(lp, lp - 0.01, np.ones(1), None, d, None, dict(KNOBS, adaptive_budget=True, budget_quantile=quantile))
    _, info = check(case)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    np.testing.assert_array_equal(info["row_budget"], ref.row_budget)
    return float(info["row_budget"][0])


def test_adaptive_budget_selection_edges():
    rng = np.random.default_rng(11)
    # Candidates closer together than one radix digit: several narrowing passes.
    tight = 0.03 + rng.integers(0, 1000, size=200) * 1e-15
    below = rng.uniform(0, 0.01, size=30)
    for q in (0.2, 0.5, 0.83, 0.9):
        _one_row_budget(np.concatenate([below, tight]), q)
    # x[ceil h] is the first key of the next bucket (after narrowing), or the first value
    # above the window, or x[floor h] is the largest value below it.
    spread = np.sort(rng.uniform(0.02, 0.04, size=120))
    for q_rank in (0, 29, 30, 31, 59, 60, 118, 119):
        values = np.concatenate([rng.uniform(0, 0.019, 10), spread, rng.uniform(0.05, 0.1, 10)])
        n = values.size
        for frac in (0.25, 0.5, 0.75):
            _one_row_budget(values, min(1.0, (q_rank + 10 + frac) / (n - 1)))
    few = np.concatenate([rng.uniform(0, 0.019, 10), [0.025, 0.03], rng.uniform(0.05, 0.1, 10)])
    for q in np.linspace(0, 1, 23):
        _one_row_budget(few, q)
    # Only values below and above (no candidates): lo below, hi above.
    for q in np.linspace(0, 1, 11):
        _one_row_budget(np.concatenate([rng.uniform(0, 0.019, 7), rng.uniform(0.05, 0.1, 7)]), q)


def test_adaptive_budget_packed_rows_across_tiles():
    lp, lq, _, valid, d = budget_case(1, 2000, 0.3, 7)
    cu = np.array([0, 5, 5, 300, 301, 1200, 2000], dtype=np.int64)
    adv = np.random.default_rng(0).normal(size=6)
    for q in (0.9, 0.5):
        case = Case(lp[0], lq[0], adv, valid[0], d[0], cu, dict(KNOBS, adaptive_budget=True, budget_quantile=q))
        check(case)


# ---------------------------------------------------------------------------------------
# The spec's worked example, edge cases, launches.


def test_worked_example():
    d = np.array([[0.10, 0.12, 0.30, 0.05, 0.14]])
    lp, lq = np.full((1, 5), -1.0), np.full((1, 5), -1.1)
    for geometry in (SMALL, PRODUCTION):
        mask, info = emulated_mask(lp, lq, np.array([1.0]), divergence=d, return_info=True, geometry=geometry, **KNOBS)
        np.testing.assert_array_equal(mask, [[True, False, False, False, False]])
        np.testing.assert_array_equal(info["reason"], [[2, 4, 3, 4, 4]])
        np.testing.assert_allclose(info["threshold"], [[0.15, 0.07, -0.025, -0.277, -0.3025]], atol=1e-12)
        np.testing.assert_array_equal(info["reason_counts"], [0, 0, 1, 1, 3])
        mask, info = emulated_mask(lp, lq, np.array([-1.0]), divergence=d, return_info=True, geometry=geometry, **KNOBS)
        np.testing.assert_array_equal(mask, np.ones((1, 5), bool))
        np.testing.assert_array_equal(info["reason"], np.ones((1, 5), np.int8))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0), (4, 1), (1, 1)])
@pytest.mark.parametrize("adaptive", [False, True])
def test_empty_and_tiny_shapes(shape, adaptive):
    rng = np.random.default_rng(1)
    lp = -rng.exponential(0.3, size=shape)
    lq = -rng.exponential(0.3, size=shape)
    case = Case(lp, lq, rng.normal(size=shape[0]), None, None, None, dict(KNOBS, adaptive_budget=adaptive))
    mask, info = check(case)
    assert mask.shape == shape
    if not adaptive or shape[1] == 0:
        np.testing.assert_array_equal(info["row_budget"], np.full(shape[0], 0.02))


def test_packed_without_rows_and_empty_rows():
    for cu in ([0], [0, 0], [0, 0, 0, 3, 3]):
        cu = np.asarray(cu, dtype=np.int64)
        n = int(cu[-1])
        case = Case(-np.ones(n) * 0.1, -np.ones(n) * 0.2, np.ones(len(cu) - 1), None, None, cu, dict(KNOBS), True)
        check(case)


def test_all_padding():
    shape = (3, 300)
    case = Case(np.full(shape, np.nan), np.full(shape, np.inf), np.full(shape, np.nan), np.zeros(shape, bool),
                None, None, dict(KNOBS, adaptive_budget=True))
    mask, info = check(case)
    assert not mask.any()
    np.testing.assert_array_equal(info["reason_counts"], [900, 0, 0, 0, 0])
    np.testing.assert_array_equal(info["threshold"], np.full(shape, 0.15))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("geometry,n", [(PRODUCTION, 20_000), (SMALL, 9_000)])
def test_long_row(adaptive, geometry, n):
    # SMALL: more pieces in the row than threads in a block (the per-row prefix carries).
    rng = np.random.default_rng(3)
    lp = -rng.exponential(0.3, size=(1, n))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=(1, n)), 0.0)
    case = Case(lp, lq, np.array([1.0]), rng.random((1, n)) < 0.95, None, None, dict(KNOBS, adaptive_budget=adaptive))
    check(case, geometry=geometry)


def test_at_most_four_launches_and_one_pass_over_tiles():
    rng = np.random.default_rng(0)
    lp = -rng.exponential(0.3, size=(3, 1000))
    for knobs, expect in [
        (dict(KNOBS), ["cppo_stats", "cppo_rows", "cppo_mask_tiles"]),
        (dict(KNOBS, adaptive_budget=True), ["cppo_stats", "cppo_rows", "cppo_mask_tiles"]),
        (dict(KNOBS, position_weight="shuffled"), ["cppo_shuffle", "cppo_stats", "cppo_rows", "cppo_mask_tiles"]),
    ]:
        ex = EmuExecutor(SMALL)
        emulated_mask(lp, lp - 0.01, np.ones(3), executor=ex, **knobs)
        assert [name for name, _, _, _ in ex.launches] == expect
        # one instantiation per dtype set: float64 inputs, no divergence array, no mask
        assert {full for _, _, _, full in ex.launches} == {f"{n}<0, 0, 0, 4, 0>" for n in expect}
        tiles = -(-3000 // (SMALL["CPPO_BLOCK"] * SMALL["CPPO_ITEMS"]))
        assert dict((n, g) for n, g, _, _ in ex.launches)["cppo_mask_tiles"] == tiles


def test_inputs_untouched():
    rng = np.random.default_rng(2)
    lp = -rng.exponential(0.3, size=(3, 200))
    lq = -rng.exponential(0.3, size=(3, 200))
    adv = rng.normal(size=(3, 200))
    valid = rng.random((3, 200)) < 0.8
    d = rng.random((3, 200))
    copies = [a.copy() for a in (lp, lq, adv, valid, d)]
    emulated_mask(lp, lq, adv, valid, divergence=d, return_info=True, adaptive_budget=True,
                  position_weight="shuffled", **KNOBS)
    for a, b in zip((lp, lq, adv, valid, d), copies):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------
# Bad input: the same error as the CPU backend (first bad value by row, column, field).


def _cpu_error(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        cppo_native.cppo_mask(*args, **kwargs)
    return str(err.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_rows=4, max_len=200), st.data())
def test_bad_values_report_like_cpu(case: Case, data):
    arrays = {"log_probs": case.log_probs.copy(), "old_log_probs": case.old_log_probs.copy()}
    # Per-token advantages only: a packed batch with as many rows as tokens has per-row
    # advantages of the log-probs' shape, and a row's entry is not a token's.
    if case.advantages.shape == case.log_probs.shape and not case.per_row:
        arrays["advantages"] = case.advantages.copy()
    if isinstance(case.divergence, np.ndarray):
        arrays["divergence"] = case.divergence.copy()
    valid = np.ones(case.log_probs.shape, bool) if case.response_mask is None else case.response_mask
    flat_valid = np.flatnonzero(valid.reshape(-1))
    if flat_valid.size == 0:
        return
    per_row = "advantages" not in arrays
    if per_row:
        arrays["advantages"] = case.advantages.copy()  # one per row: corrupt a valid token's row
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(arrays)))
        where = int(data.draw(st.sampled_from(flat_valid.tolist())))
        if name == "advantages" and per_row:
            where = (int(np.searchsorted(case.cu_seqlens, where, side="right")) - 1 if case.cu_seqlens is not None
                     else where // case.log_probs.shape[1])
        bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.5] if name != "advantages" else [np.nan, np.inf]))
        if name == "divergence" and bad == 0.5:
            bad = -0.5
        arrays[name].reshape(-1)[where] = bad
    adv = arrays.get("advantages", case.advantages)
    div = arrays.get("divergence", case.divergence)
    args = (arrays["log_probs"], arrays["old_log_probs"], adv, case.response_mask)
    kwargs = dict(case.kwargs(), divergence=div)
    expected = _cpu_error(*args, **kwargs)
    with pytest.raises(ValueError) as err:
        emulated_mask(*args, **kwargs)
    assert str(err.value) == expected
    emulated_mask(*args, **kwargs, validate=False)  # no check, no crash


def test_bad_per_row_advantage_reports_first_valid_position():
    lp = np.full((3, 4), -0.5)
    valid = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], bool)
    adv = np.array([1.0, np.nan, np.inf])
    expected = _cpu_error(lp, lp, adv, valid, **KNOBS)
    with pytest.raises(ValueError, match=r"advantages .* \(row 1, column 2\)") as err:
        emulated_mask(lp, lp, adv, valid, **KNOBS)
    assert str(err.value) == expected


@pytest.mark.parametrize("cu", [[1, 2, 4], [0, 3, 2, 4], [0, 2, 5], [0, 2, 3]])
def test_bad_offsets_report_like_cpu(cu):
    lp = np.full(4, -0.5)
    cu = np.asarray(cu, dtype=np.int64)
    expected = _cpu_error(lp, lp, np.ones(len(cu) - 1), cu_seqlens=cu, **KNOBS)
    with pytest.raises(ValueError) as err:
        emulated_mask(lp, lp, np.ones(len(cu) - 1), cu_seqlens=cu, **KNOBS)
    assert str(err.value) == expected
    emulated_mask(lp, lp, np.ones(len(cu) - 1), cu_seqlens=cu, validate=False, **KNOBS)  # garbage, no crash


def test_bfloat16_bad_value_is_reported_widened():
    lp = torch.full((2, 3), -0.5, dtype=torch.bfloat16)
    lp[1, 1] = 0.5
    expected = _cpu_error(lp, lp.clone(), torch.ones(2), **KNOBS)
    with pytest.raises(ValueError) as err:
        emulated_mask(lp, lp.clone(), torch.ones(2), **KNOBS)
    assert str(err.value) == expected


# ---------------------------------------------------------------------------------------
# The real executor (_cuda.compute / _CupyExecutor / to_cupy) through the public API,
# with a stand-in `cupy` module whose arrays are NumPy memory and whose kernels run on
# the emulator. Checks the glue a GPU run uses: argument struct passed by value,
# kernel lookup, allocation, the validation read, results returned as CuPy arrays.


class _FakePointer:
    def __init__(self, ptr):
        self.ptr = ptr


class _FakeDevice:
    id = 0

    def __init__(self, index=0):
        self.index = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeCupyArray:
    """Just the CuPy ndarray surface the CUDA path touches, over NumPy memory."""

    def __init__(self, a):
        self._a = a

    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    dtype = property(lambda self: self._a.dtype)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    data = property(lambda self: _FakePointer(self._a.ctypes.data))
    device = property(lambda self: _FakeDevice())

    def reshape(self, *shape):
        return FakeCupyArray(self._a.reshape(*shape))

    def astype(self, dtype):
        return FakeCupyArray(self._a.astype(dtype))

    def view(self, dtype):
        return FakeCupyArray(self._a.view(dtype))

    def __getitem__(self, index):
        return FakeCupyArray(np.asarray(self._a[index]))

    def get(self):
        return np.array(self._a)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self._a, dtype=dtype)


def _fake_cupy(geometry, calls, modules, streams=None):
    import types

    streams = [] if streams is None else streams

    class Module:
        def __init__(self, code, options, name_expressions):
            assert code == _cuda.kernel_source()
            assert options == _cuda.compile_options()
            self.names = name_expressions
            self.lib = build(geometry, tuple(int(t) for t in name_expressions[0].split("<")[1][:-1].split(",")))
            modules.append(name_expressions)

        def get_function(self, name):
            assert name in self.names  # only name expressions given at compile time resolve
            lib = self.lib

            def launch(grid, block, args, shared_mem=0, stream=None):
                # cupy.cuda.function.Function.__call__: a 1-element NumPy array is passed by
                # value; `stream` is None (CuPy's current stream) or anything with .ptr
                (struct_arg,) = args
                assert isinstance(struct_arg, np.ndarray) and struct_arg.shape == (1,)
                assert shared_mem == 0
                calls.append(name)
                streams.append(None if stream is None else stream.ptr)
                err = __import__("ctypes").create_string_buffer(256)
                raw = struct_arg.tobytes()
                if lib.emu_launch(name.encode(), grid[0], block[0], raw, len(raw), err, 256):
                    raise RuntimeError(err.value.decode())

            return types.SimpleNamespace(kernel=launch)  # RawKernel.kernel: the Function

    cp = types.ModuleType("cupy")
    cp.ndarray = FakeCupyArray
    cp.int16 = np.int16
    cp.RawModule = lambda code, options, name_expressions: Module(code, options, name_expressions)
    cp.empty = lambda n, dtype: FakeCupyArray(np.empty(n, dtype=dtype))
    cp.asarray = lambda a: FakeCupyArray(np.ascontiguousarray(a))
    cp.cuda = types.SimpleNamespace(Device=_FakeDevice, runtime=types.SimpleNamespace(getDevice=lambda: 0))
    return cp


def test_public_api_through_the_cupy_executor(monkeypatch):
    geometry = dict(_cuda.GEOMETRY)
    calls: list = []
    modules: list = []
    cp = _fake_cupy(geometry, calls, modules)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(_cuda, "_MODULES", {})
    rng = np.random.default_rng(4)
    lp = -rng.exponential(0.3, size=(3, 1500))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=lp.shape), 0.0)
    valid = rng.random(lp.shape) < 0.9
    adv = rng.normal(size=3)
    knobs = dict(KNOBS, adaptive_budget=True)
    mask, info = cppo_native.cppo_mask(cp.asarray(lp), cp.asarray(lq), cp.asarray(adv), cp.asarray(valid),
                                       return_info=True, **knobs)
    targs = "0, 0, 0, 4, 1"  # float64 inputs, computed divergence, 1-byte mask
    assert calls == [f"cppo_stats<{targs}>", f"cppo_rows<{targs}>", f"cppo_mask_tiles<{targs}>"]
    assert modules == [tuple(f"{k}<{targs}>" for k in _cuda.KERNELS)]
    assert isinstance(mask, FakeCupyArray) and isinstance(info.reason, FakeCupyArray)
    case = Case(lp, lq, adv, valid, None, None, knobs)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert_within_tolerance(np.asarray(mask), {k: np.asarray(v) for k, v in vars(info).items()}, ref)
    lp_bad = lp.copy()
    lp_bad[1, 3] = np.nan
    valid[1, 3] = True
    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .* \(row 1, column 3\)"):
        cppo_native.cppo_mask(cp.asarray(lp_bad), cp.asarray(lq), cp.asarray(adv), cp.asarray(valid), **knobs)
    assert len(modules) == 1  # compiled once per device and dtype set, functions cached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_fast_path_through_the_cupy_executor(monkeypatch, dtype):
    """The torch path of the real executor: tensors read by data_ptr()/stride() (no
    DLPack, no CuPy array), outputs from torch.empty, launches on torch's current
    stream by its raw handle, integer advantages converted by torch. CPU tensors stand
    in for CUDA ones (the emulator reads host memory)."""
    from cppo_native._backends import prepare as _prepare
    from cppo_native._backends.arrays import Source
    from cppo_native._backends.cuda import arrays as cuda_arrays
    from cppo_native._core.params import make_params

    geometry = dict(_cuda.GEOMETRY)
    calls, modules, streams = [], [], []
    cp = _fake_cupy(geometry, calls, modules, streams)
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setattr(_cuda, "_MODULES", {})
    monkeypatch.setattr(_cuda, "torch_stream_ptr", lambda index: 0xC0FFEE)
    monkeypatch.setattr(_cuda, "_torch_device", lambda torch_, index: torch.device("cpu"))
    rng = np.random.default_rng(5)
    big = torch.from_numpy(-rng.exponential(0.3, size=(4, 1301))).to(dtype)
    lp = big[:, 1:]  # a storage offset and a row stride != length
    lq = (lp.double() + torch.from_numpy(rng.normal(0, 0.05, size=lp.shape))).clamp(max=0).to(dtype).t().contiguous().t()
    adv = torch.from_numpy(rng.integers(-2, 3, size=4))  # int64: converted by the launch plan
    valid = torch.from_numpy(rng.random(lp.shape) < 0.9)
    knobs = dict(KNOBS, adaptive_budget=True)
    prep = _prepare.prepare(lp, lq, adv, valid, None, None, None, convert=cuda_arrays.torch_view,
                            widen_int_advantages=False)
    prep = __import__("dataclasses").replace(prep, source=Source("torch", "cuda", 0))
    assert prep.log_probs is lp and prep.valid is valid  # no copy, no view, no DLPack
    out = _cuda.compute(prep, make_params(**knobs), True, True)
    mask, reason = out[0], out[1]
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and isinstance(reason, torch.Tensor)
    assert streams == [0xC0FFEE] * 3  # every launch on torch's current stream
    code = 3 if dtype == torch.bfloat16 else 1
    assert calls[0] == f"cppo_stats<{code}, {code}, 0, 4, 1>"
    info = dict(reason=out[1].numpy().reshape(lp.shape), threshold=out[2].numpy().reshape(lp.shape),
                gate=out[3].numpy().reshape(lp.shape), row_budget=out[4].numpy(), reason_counts=out[5].numpy())
    case = Case(lp.double().numpy(), lq.double().numpy(), adv.double().numpy(), valid.numpy(), None, None, knobs)
    ref = cppo_mask_reference(*case.args(), **case.kwargs())
    assert_within_tolerance(mask.numpy().reshape(lp.shape), info, ref)
    lp_bad = lp.clone()
    lp_bad[2, 7] = float("nan")
    valid[2, 7] = True
    prep = _prepare.prepare(lp_bad, lq, adv, valid, None, None, None, convert=cuda_arrays.torch_view,
                            widen_int_advantages=False)
    prep = __import__("dataclasses").replace(prep, source=Source("torch", "cuda", 0))
    with pytest.raises(ValueError, match=r"log_probs must be finite and <= 0 .* \(row 2, column 7\)"):
        _cuda.compute(prep, make_params(**knobs), False, True)
    assert len(modules) == 1


# ---------------------------------------------------------------------------------------
# Exact widening (spec: inputs widened exactly, subnormals included, whatever the
# compiler's flush-to-zero flags). The kernels widen float32/float16/bfloat16 from their
# bits with integer operations and float64 arithmetic (test_gpu.py checks the PTX under
# CuPy's -ftz=true has no float32 -> float64 conversion); here the same code runs on the
# CPU against NumPy's exact conversions.


def _widen(code, raw):
    import ctypes

    lib = build(SMALL)
    raw = np.ascontiguousarray(raw)
    out = np.empty(raw.size, dtype=np.float64)
    assert lib.emu_widen(ctypes.c_int(code), raw.ctypes.data_as(ctypes.c_void_p),
                         out.ctypes.data_as(ctypes.c_void_p), ctypes.c_ulong(raw.size)) == 0
    return out


def _same_bits(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint64), want[~nan].view(np.uint64))  # -0.0 kept too


def test_widening_is_exact_for_every_half_and_bfloat16_pattern():
    bits = np.arange(1 << 16, dtype=np.uint16)
    _same_bits(_widen(2, bits), bits.view(np.float16).astype(np.float64))
    bf16 = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).to(torch.float64).numpy()
    _same_bits(_widen(3, bits), bf16)


def test_widening_is_exact_for_float32_subnormals_and_edges():
    rng = np.random.default_rng(0)
    sub = np.arange(0, 1 << 23, 97, dtype=np.uint32)  # subnormal mantissas (and zero)
    edges = np.array([0, 1, 2, 0x7FFFFF, 0x800000, 0x800001, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000,
                      0x3F800000, 0x00400000], dtype=np.uint32)
    bits = np.concatenate([sub, edges, rng.integers(0, 1 << 32, size=200_000, dtype=np.uint64).astype(np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    with np.errstate(invalid="ignore"):  # NaN patterns (compared as NaN only)
        want = bits.view(np.float32).astype(np.float64)
    _same_bits(_widen(1, bits), want)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_subnormal_inputs_are_not_flushed(dtype):
    """Subnormal advantages, log-probs and divergences of the input dtype: a positive
    subnormal advantage with lp > lq moves away from mu (flushed to 0 it would count as
    toward mu and be kept), a subnormal divergence is within the threshold."""
    tdt = getattr(torch, dtype)
    tiny = float(torch.finfo(tdt).smallest_normal) / 4  # a subnormal of that dtype
    n = 300
    lp = np.full((2, n), -0.5)
    lq = np.full((2, n), -2.0)  # D = |e^-0.5 - e^-2| = 0.47 > delta: masked unless toward mu
    adv = np.full((2, n), tiny)
    adv[1] = -tiny
    lp[:, ::7] = -tiny  # subnormal log-probs (still <= 0, valid)
    div = np.full((2, n), 0.3)
    div[:, ::5] = tiny

    def low(a):
        t = torch.from_numpy(a).to(tdt)
        return t, t.to(torch.float64).numpy()

    (lp_t, lp64), (lq_t, lq64), (adv_t, adv64), (div_t, div64) = low(lp), low(lq), low(adv), low(div)
    assert (np.abs(adv64) > 0).all() and (np.abs(adv64) < float(torch.finfo(tdt).smallest_normal)).all()
    for with_div in (False, True):
        knobs = dict(KNOBS, adaptive_budget=True)
        mask, info = emulated_mask(lp_t, lq_t, adv_t, divergence=div_t if with_div else None, return_info=True,
                                   **knobs)
        case = Case(lp64, lq64, adv64, None, div64 if with_div else None, None, knobs)
        ref = cppo_mask_reference(*case.args(), **case.kwargs())
        assert_within_tolerance(mask, info, ref)
        reason = np.asarray(info["reason"])
        assert (reason[1] == 1).all()  # negative advantage, lp > lq: toward mu
        assert (reason[0] != 1).any()  # positive subnormal advantage: not toward mu


# ---------------------------------------------------------------------------------------
# budget_ceiling m (adaptive budget = clamp(k Q_q(D), delta_b, m delta_b)) and the hard
# selection path in the production geometry: more in-window candidates than fit in shared
# memory (5120), so radix passes over the re-read row narrow them first.


def _spec_row_budgets(d, valid, quantile, scale, delta_b, ceiling):
    """Eq. 22 as the spec writes it (sorted values, h = q (n - 1), linear interpolation)."""
    out = []
    for row, v in zip(d, valid):
        x = np.sort(row[v].astype(np.float64))
        if x.size == 0:
            out.append(delta_b)
            continue
        h = quantile * (x.size - 1)
        lo, hi = int(np.floor(h)), int(np.ceil(h))
        q = x[lo] + (h - np.floor(h)) * (x[hi] - x[lo])
        out.append(min(max(scale * q, delta_b), ceiling * delta_b))
    return np.array(out)


def _check_with_ceiling(lp, lq, adv, valid, d, knobs, geometry):
    """Row budgets exactly as the spec computes them; masks, reasons, thresholds and
    gates as the reference with each row's budget as a fixed delta_b."""
    mask, info = emulated_mask(lp, lq, adv, valid, divergence=d, return_info=True, geometry=geometry, **knobs)
    budgets = _spec_row_budgets(d, valid, knobs.get("budget_quantile", 0.9), knobs.get("budget_scale", 1.0),
                                knobs["delta_b"], knobs["budget_ceiling"])
    np.testing.assert_array_equal(info["row_budget"], budgets)
    full = cppo_mask_reference(lp, lq, adv, valid, divergence=d, **knobs)  # the reference has the knob too
    np.testing.assert_array_equal(info["row_budget"], full.row_budget)
    fixed = {k: v for k, v in knobs.items() if k not in ("adaptive_budget", "budget_ceiling", "budget_quantile",
                                                          "budget_scale")}
    for r in range(lp.shape[0]):
        case = Case(lp[r:r + 1], lq[r:r + 1], adv[r:r + 1], valid[r:r + 1], d[r:r + 1], None,
                    dict(fixed, delta_b=float(budgets[r])))
        ref = cppo_mask_reference(*case.args(), **case.kwargs())
        row_info = {k: (v[r:r + 1] if k in ("reason", "threshold", "gate") else v) for k, v in info.items()}
        row_info["row_budget"] = info["row_budget"][r:r + 1]
        row_info["reason_counts"] = np.bincount(row_info["reason"].reshape(-1), minlength=5).astype(np.int64)
        assert_within_tolerance(mask[r:r + 1], row_info, ref)
    np.testing.assert_array_equal(info["reason_counts"], np.bincount(info["reason"].reshape(-1), minlength=5))
    return info


def ceiling_case(rows, length, ceiling, in_window_fraction, seed, ties=False):
    rng = np.random.default_rng(seed)
    delta_b = KNOBS["delta_b"]
    d = rng.uniform(0.0, 0.95 * delta_b, size=(rows, length))
    inside = rng.random((rows, length)) < in_window_fraction
    window = rng.uniform(delta_b, ceiling * delta_b, size=(rows, length))
    if ties:
        window = rng.choice(np.linspace(delta_b, ceiling * delta_b, 5), size=(rows, length))
    d = np.where(inside, window, d)
    d[:, : length // 20] = rng.uniform(ceiling * delta_b * 1.5, 0.5, size=(rows, length // 20))
    lp = -rng.exponential(0.3, size=(rows, length))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=(rows, length)), 0.0)
    valid = rng.random((rows, length)) < 0.9
    return lp, lq, rng.normal(size=(rows, length)), valid, d


@pytest.mark.parametrize("ceiling", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("quantile", [0.9, 0.5, 0.05])
def test_budget_ceiling(ceiling, quantile):
    for seed, (fraction, ties) in enumerate([(0.3, False), (0.9, True), (0.0, False)]):
        lp, lq, adv, valid, d = ceiling_case(3, 400, ceiling, fraction, seed, ties)
        knobs = dict(KNOBS, adaptive_budget=True, budget_quantile=quantile, budget_ceiling=ceiling)
        _check_with_ceiling(lp, lq, adv, valid, d, knobs, SMALL)


def test_budget_ceiling_two_is_the_default():
    lp, lq, adv, valid, d = ceiling_case(3, 400, 2.0, 0.5, 3)
    knobs = dict(KNOBS, adaptive_budget=True)
    _, a = emulated_mask(lp, lq, adv, valid, divergence=d, return_info=True, **knobs)
    _, b = emulated_mask(lp, lq, adv, valid, divergence=d, return_info=True, budget_ceiling=2.0, **knobs)
    np.testing.assert_array_equal(a["row_budget"], b["row_budget"])
    ref = cppo_mask_reference(lp, lq, adv, valid, divergence=d, **knobs)
    np.testing.assert_array_equal(a["row_budget"], ref.row_budget)


@pytest.mark.parametrize("ceiling,quantile,ties", [(2.0, 0.9, False), (5.0, 0.5, False), (2.0, 0.7, True)])
def test_hard_selection_path_production_geometry(ceiling, quantile, ties):
    """A 12,000-token row with ~7,500 valid divergences inside the clamp window: more
    candidates than the 5,120 that fit in shared memory, so the exact quantile needs
    radix passes over the re-read row before the gather (the path the GPU takes for long
    rows whose quantile lands inside the window)."""
    lp, lq, adv, valid, d = ceiling_case(2, 12_000, ceiling, 0.7, 17, ties)
    valid_d = np.where(valid, d, np.nan)
    in_window = (valid_d >= KNOBS["delta_b"]) & (valid_d <= ceiling * KNOBS["delta_b"])
    assert (in_window.sum(axis=1) > PRODUCTION["CPPO_SELECT_CAP"]).all()
    knobs = dict(KNOBS, adaptive_budget=True, budget_quantile=quantile, budget_ceiling=ceiling)
    info = _check_with_ceiling(lp, lq, adv, valid, d, knobs, PRODUCTION)
    # the quantile landed inside the window, so the selection really ran
    assert ((info["row_budget"] > KNOBS["delta_b"]) & (info["row_budget"] < ceiling * KNOBS["delta_b"])).all()


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
@pytest.mark.parametrize("per_row", [False, True])
def test_integer_advantages_are_converted_by_the_launch_plan(dtype, per_row):
    """Integer advantages reach the CUDA plan unconverted (prepare leaves them for CUDA
    inputs) and are converted by the executor inside the caller's stream scope."""
    rng = np.random.default_rng(5)
    lp = -rng.exponential(0.3, size=(3, 200))
    lq = np.minimum(lp + rng.normal(0, 0.05, size=lp.shape), 0.0)
    adv = rng.integers(0, 3, size=3 if per_row else lp.shape) - (0 if dtype == "uint8" else 1)
    adv = adv.astype(dtype)
    ex = EmuExecutor(SMALL)
    calls = []
    astype = ex.astype
    ex.astype = lambda arr, dt: calls.append((str(arr.dtype), dt)) or astype(arr, dt)
    mask, info = emulated_mask(lp, lq, adv, return_info=True, executor=ex, **KNOBS)
    assert calls == [(dtype, "float64")]
    case = Case(lp, lq, adv.astype(np.float64), None, None, None, dict(KNOBS), per_row)
    assert_within_tolerance(mask, info, cppo_mask_reference(*case.args(), **case.kwargs()))


# ---------------------------------------------------------------------------------------
# The shuffled ablation's row offset: row r of a call with row_offset k is seeded as row
# k + r of the whole input (shuffle_seed ^ (k + r + 1) * C, wrapping), so a batch cut
# out of a larger input gets the same permutations.


@pytest.mark.parametrize("geometry", [SMALL, PRODUCTION])
@pytest.mark.parametrize("offset", [1, 3])
def test_row_offset_seeds_rows_as_in_the_whole_input(geometry, offset):
    rng = np.random.default_rng(11)
    rows, length = 6, 300 if geometry is SMALL else 9000  # > CPPO_SHUFFLE_CAP: the global-memory shuffle
    lp = -rng.exponential(0.3, size=(rows, length))
    lq = np.minimum(lp + rng.normal(0, 0.2, size=lp.shape), 0.0)
    adv = rng.normal(size=rows)
    valid = rng.random(lp.shape) < 0.85
    knobs = dict(KNOBS, position_weight="shuffled", shuffle_seed=12345)
    import types

    whole = cppo_mask_reference(lp, lq, adv, valid, **knobs)
    rows_of_whole = types.SimpleNamespace(**{k: getattr(whole, k)[offset:] for k in (
        "mask", "reason", "threshold", "gate", "row_budget", "weighted_divergence")})
    part, part_info = emulated_mask(lp[offset:], lq[offset:], adv[offset:], valid[offset:], geometry=geometry,
                                    return_info=True, row_offset=offset, **knobs)
    assert_within_tolerance(part, part_info, rows_of_whole)  # the spec's rule (scan order differs)
    unshifted = emulated_mask(lp[offset:], lq[offset:], adv[offset:], valid[offset:], geometry=geometry,
                              return_info=True, **knobs)[1]
    assert np.abs(unshifted["threshold"] - part_info["threshold"]).max() > 1e-6  # the offset matters


def test_row_offset_wraps_and_is_checked():
    lp = -np.full((2, 40), 0.1)
    knobs = dict(KNOBS, position_weight="shuffled", shuffle_seed=7)
    # offset 2**64 - 1 makes row 1 the input's row 2**64 - 1 + 1 = 0 (mod 2**64), i.e. row 0 of offset 0
    lq = np.minimum(lp + np.linspace(-0.3, 0.3, 80).reshape(2, 40), 0.0)
    top = emulated_mask(lp, lq, np.ones(2), return_info=True, row_offset=2**64 - 1, **knobs)[1]
    zero = emulated_mask(lp[::-1].copy(), lq[::-1].copy(), np.ones(2), return_info=True, **knobs)[1]
    np.testing.assert_allclose(top["threshold"][1], zero["threshold"][0], rtol=0, atol=1e-9)
    assert np.abs(top["threshold"][1] - top["threshold"][0]).max() > 1e-6
    for bad in (-1, 2**64, 1.0, True):
        with pytest.raises(ValueError, match="row_offset"):
            emulated_mask(lp, lp, np.ones(2), row_offset=bad, **knobs)
