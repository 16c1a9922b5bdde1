"""The CUDA path (cppo_native._backends.cuda.mask + kernels/cppo_mask.cu).

Tests marked ``gpu`` need a CUDA device, torch with CUDA and CuPy; they are skipped
otherwise. They compare the GPU with the NumPy reference under the spec's tolerance
rule (the GPU's exp/log may differ from libm in the last bit, and the prefix sums are
summed in another order). The tests at the top run everywhere: the kernel source
compiles with NVRTC for sm_80 and sm_90, and a CUDA input without CuPy raises a clear
ImportError. The kernels' logic is also checked without a GPU in test_gpu_emulated.py.
"""

from __future__ import annotations

import importlib.util
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cppo_native import cppo_mask, cppo_mask_reference
from cppo_native._backends.cuda import mask as _cuda
from gpu_compare import assert_within_tolerance
from nvrtc import compile_program, cupy_options, find_nvrtc, flush_to_zero_conversions, ptx_function, spills, version
from strategies import Case, cases

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

KNOBS = dict(delta=0.15, delta_b=0.02, w_min=0.8)


# ---------------------------------------------------------------------------------------
# Without a GPU.

NVRTC = find_nvrtc()
needs_nvrtc = pytest.mark.skipif(
    NVRTC is None,
    reason="libnvrtc not found (it ships with torch's CUDA wheels as nvidia-cuda-nvrtc; set CPPO_NVRTC_LIB to point at it)",
)


# Dtype sets compiled here: (log_probs, old_log_probs, advantages, divergence codes; mask
# width), as _cuda.template_args makes them. float32, bfloat16, float16, float64 inputs,
# a given divergence, each mask width.
DTYPE_SETS = [(1, 1, 1, 4, 1), (3, 3, 3, 4, 1), (2, 2, 2, 2, 2), (0, 0, 0, 0, 8), (1, 3, 0, 4, 4), (1, 1, 1, 4, 0)]


def _compile_like_cupy(arch, targs):
    """The kernels of one dtype set compiled with exactly the options CuPy 14.2 passes to
    NVRTC for cupy.RawModule(code, options=_cuda.compile_options(), name_expressions=...)."""
    names = [_cuda.kernel_name(k, targs) for k in _cuda.KERNELS]
    out = compile_program(NVRTC, _cuda.kernel_source(), cupy_options(_cuda.compile_options(), arch), names,
                          filename="kern.cu")
    assert out.cubin and out.ptx and set(out.lowered) == set(names), (version(NVRTC), out.log)
    return out, names


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernel_source_compiles_with_cupys_options(arch):
    assert cupy_options(("-std=c++17",), arch) == [
        "-std=c++17", "-ftz=true", f"-arch={arch}", "--device-as-default-execution-space"]
    for targs in DTYPE_SETS[:2] if arch == "sm_80" else DTYPE_SETS:
        out, names = _compile_like_cupy(arch, targs)
        for name in names:
            assert f"Compiling entry function '{out.lowered[name]}'" in out.log, (version(NVRTC), out.log)


@needs_nvrtc
@pytest.mark.parametrize("targs", DTYPE_SETS)
def test_inputs_are_widened_without_flush_to_zero_under_cupys_options(targs):
    """CuPy always adds -ftz=true, under which (double)float compiles to cvt.ftz.f64.f32
    and float32/bfloat16 subnormals become 0. The kernels load every input as raw bits
    and widen with integer operations and float64 arithmetic: no float32 load and no
    float32 -> float64 conversion may appear in any kernel."""
    out, names = _compile_like_cupy("sm_90", targs)
    for name in names:
        body = ptx_function(out.ptx, out.lowered[name])
        widening = [line.strip() for line in body.splitlines() if re.search(r"\bcvt(\.\w+)*\.f64\.f32\b", line)]
        assert widening == [], (name, widening)
        float_loads = [line.strip() for line in body.splitlines() if re.search(r"\bld(\.\w+)*\.f32\b", line)]
        assert float_loads == [], (name, float_loads)
        assert not [line for line in flush_to_zero_conversions(body) if "cvt" in line], name


@needs_nvrtc
def test_streaming_kernels_do_not_spill_on_sm90():
    # The two kernels that stream every position keep their working set in registers.
    for targs in DTYPE_SETS:
        out, names = _compile_like_cupy("sm_90", targs)
        found = spills(out.log)
        for kernel in ("cppo_stats", "cppo_mask_tiles"):
            lowered = out.lowered[_cuda.kernel_name(kernel, targs)]
            assert found.get(lowered) == 0, (targs, version(NVRTC), out.log)


def test_args_layout_matches_kernel_source():
    layout = _cuda.args_layout()
    assert len(set(layout.names)) == len(layout.names)
    assert layout.packer.size == 8 * len(layout.names) == layout.dtype.itemsize
    assert "X(u64, out_counts)" in _cuda.kernel_source()


class FakeCudaArray:
    """A DLPack producer that says it lives on CUDA device 0 (kDLCUDA = 2)."""

    dtype = "float32"
    shape = (2, 3)
    ndim = 2

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be read without CuPy")


def test_cuda_input_without_cupy_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    x = FakeCudaArray()
    # The package is not on PyPI yet: the hint names CuPy's own wheels and the local extras.
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x .*cupy-cuda13x.*pip install '\.\[cuda12\]' or '\.\[cuda13\]'"):
        cppo_mask(x, x, x, **KNOBS)


def test_cpu_path_never_needs_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    lp = np.full((2, 3), -0.5)
    assert cppo_mask(lp, lp, np.ones(2), **KNOBS).all()


# ---------------------------------------------------------------------------------------
# On a CUDA device.

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device, torch with CUDA and CuPy")]
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cuda(a, dtype=None):
    if a is None or isinstance(a, str):
        return a
    t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def run_gpu(case: Case, dtype=torch.float64, **extra):
    args = [cuda(a, dtype) for a in case.args()]
    args[2] = cuda(case.advantages, dtype)
    kwargs = dict(case.kwargs(), divergence=cuda(case.divergence, dtype), cu_seqlens=cuda(case.cu_seqlens))
    return cppo_mask(*args, **kwargs, return_info=True, **extra)


def as_dict(info):
    return dict(reason=info.reason, threshold=info.threshold, gate=info.gate, row_budget=info.row_budget,
                reason_counts=info.reason_counts)


class TestOnDevice:
    pytestmark = gpu

    @SETTINGS
    @given(cases(max_rows=6, max_len=3000))
    def test_matches_reference(self, case: Case):
        mask, info = run_gpu(case)
        assert mask.device.type == "cuda" and mask.dtype == torch.bool
        ref = cppo_mask_reference(*case.args(), **case.kwargs())
        assert_within_tolerance(mask, as_dict(info), ref, budget_rtol=1e-12)

    @SETTINGS
    @given(cases(max_rows=4, max_len=600), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    def test_low_precision(self, case: Case, dtype):
        mask, info = run_gpu(case, dtype)
        widen = lambda a: a if a is None or isinstance(a, str) else torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(torch.float64).numpy()  # noqa: E731
        wide = Case(widen(case.log_probs), widen(case.old_log_probs), widen(case.advantages), case.response_mask,
                    widen(case.divergence), case.cu_seqlens, case.knobs, case.per_row)
        ref = cppo_mask_reference(*wide.args(), **wide.kwargs())
        assert_within_tolerance(mask, as_dict(info), ref, budget_rtol=1e-12)

    @SETTINGS
    @given(cases(max_rows=4, max_len=600, packed=False), st.integers(0, 2),
           st.sampled_from([torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16]))
    def test_non_contiguous(self, case: Case, layout, mask_dtype):
        """Every other column, column-major, and a broadcast (zero-stride) advantage."""
        valid = np.ones(case.log_probs.shape, bool) if case.response_mask is None else case.response_mask

        def view(t):
            if t.dim() != 2:
                return t
            if layout == 0:
                big = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
                big[:, ::2] = t
                return big[:, ::2]
            if layout == 1:
                return t.t().contiguous().t()
            return t

        adv, adv_plain = view(cuda(case.advantages)), case.advantages
        if layout == 2 and case.advantages.ndim == 1:
            adv = cuda(case.advantages)[:, None].expand(case.log_probs.shape)
            adv_plain = np.broadcast_to(case.advantages[:, None], case.log_probs.shape)
        div = view(cuda(case.divergence)) if isinstance(case.divergence, np.ndarray) else case.divergence
        mask, info = cppo_mask(view(cuda(case.log_probs)), view(cuda(case.old_log_probs)), adv,
                               view(cuda(valid).to(mask_dtype)), **dict(case.knobs, divergence=div), return_info=True)
        plain = Case(case.log_probs, case.old_log_probs, np.ascontiguousarray(adv_plain), valid,
                     case.divergence, None, case.knobs)
        ref = cppo_mask_reference(*plain.args(), **plain.kwargs())
        assert_within_tolerance(mask, as_dict(info), ref, budget_rtol=1e-12)

    def test_worked_example(self):
        d = cuda(np.array([[0.10, 0.12, 0.30, 0.05, 0.14]]))
        lp, lq = torch.full((1, 5), -1.0, device="cuda"), torch.full((1, 5), -1.1, device="cuda")
        mask, info = cppo_mask(lp, lq, torch.ones(1, device="cuda"), divergence=d, return_info=True, **KNOBS)
        assert mask.cpu().tolist() == [[True, False, False, False, False]]
        assert info.reason.cpu().tolist() == [[2, 4, 3, 4, 4]]
        np.testing.assert_allclose(info.threshold.cpu().numpy(), [[0.15, 0.07, -0.025, -0.277, -0.3025]], atol=1e-12)
        mask = cppo_mask(lp, lq, -torch.ones(1, device="cuda"), divergence=d, **KNOBS)
        assert mask.all()

    @pytest.mark.parametrize("shape", [(0, 7), (5, 0), (0, 0), (3, 1)])
    def test_empty_and_tiny(self, shape):
        lp = -torch.rand(shape, device="cuda", dtype=torch.float64)
        mask, info = cppo_mask(lp, lp * 0.9, torch.ones(shape[0], device="cuda"), return_info=True, adaptive_budget=True, **KNOBS)
        assert mask.shape == shape and info.row_budget.shape == (shape[0],)
        ref = cppo_mask_reference(lp.cpu().numpy(), (lp * 0.9).cpu().numpy(), np.ones(shape[0]), adaptive_budget=True, **KNOBS)
        np.testing.assert_array_equal(mask.cpu().numpy(), ref.mask)

    def test_all_padding(self):
        lp = torch.full((3, 50), float("nan"), device="cuda")
        mask, info = cppo_mask(lp, lp, torch.ones(3, device="cuda"), torch.zeros(3, 50, dtype=torch.bool, device="cuda"),
                               return_info=True, **KNOBS)
        assert not mask.any()
        assert info.reason_counts.cpu().tolist() == [150, 0, 0, 0, 0]

    @pytest.mark.parametrize("packed", [False, True])
    @pytest.mark.parametrize("adaptive", [False, True])
    def test_200k_token_row(self, packed, adaptive):
        rng = np.random.default_rng(0)
        n = 200_000
        lp = -rng.exponential(0.3, n)
        lq = np.minimum(lp + rng.normal(0, 0.05, n), 0.0)
        valid = rng.random(n) < 0.97
        knobs = dict(KNOBS, adaptive_budget=adaptive)
        if packed:
            cu = np.array([0, 7, n - 1000, n], dtype=np.int64)
            case = Case(lp, lq, rng.normal(size=3), valid, None, cu, knobs, per_row=True)
        else:
            case = Case(lp[None], lq[None], np.ones(1), valid[None], None, None, knobs)
        mask, info = run_gpu(case)
        ref = cppo_mask_reference(*case.args(), **case.kwargs())
        assert_within_tolerance(mask, as_dict(info), ref, budget_rtol=1e-12)

    def test_bad_values_match_cpu_messages(self):
        rng = np.random.default_rng(1)
        lp = -rng.exponential(0.3, (4, 300))
        valid = rng.random((4, 300)) < 0.7
        for field, value in [("lp", np.nan), ("lq", 1.0), ("adv", np.inf), ("div", -1.0)]:
            arrays = {"lp": lp.copy(), "lq": lp.copy() - 0.01, "adv": rng.normal(size=(4, 300)), "div": rng.random((4, 300))}
            r, c = 2, int(np.flatnonzero(valid[2])[5])
            arrays[field][r, c] = value
            arrays[field][3, 0] = value  # a later one must not win
            args = (arrays["lp"], arrays["lq"], arrays["adv"], valid)
            with pytest.raises(ValueError) as cpu_err:
                cppo_mask(*args, divergence=arrays["div"], **KNOBS)
            with pytest.raises(ValueError) as gpu_err:
                cppo_mask(*(cuda(a) for a in args), divergence=cuda(arrays["div"]), **KNOBS)
            assert str(gpu_err.value) == str(cpu_err.value)
            cppo_mask(*(cuda(a) for a in args), divergence=cuda(arrays["div"]), validate=False, **KNOBS)

    @pytest.mark.parametrize("cu", [[1, 2, 4], [0, 3, 2, 4], [0, 2, 5]])
    def test_bad_offsets_match_cpu_messages(self, cu):
        lp = np.full(4, -0.5)
        cu = np.asarray(cu, dtype=np.int64)
        with pytest.raises(ValueError) as cpu_err:
            cppo_mask(lp, lp, np.ones(len(cu) - 1), cu_seqlens=cu, **KNOBS)
        with pytest.raises(ValueError) as gpu_err:
            cppo_mask(cuda(lp), cuda(lp), cuda(np.ones(len(cu) - 1)), cu_seqlens=cuda(cu), **KNOBS)
        assert str(gpu_err.value) == str(cpu_err.value)
        cppo_mask(cuda(lp), cuda(lp), cuda(np.ones(len(cu) - 1)), cu_seqlens=cuda(cu), validate=False, **KNOBS)
        torch.cuda.synchronize()  # the kernels ran to completion on garbage offsets

    def test_inputs_untouched(self):
        g = torch.Generator(device="cuda").manual_seed(0)
        lp = -torch.rand(8, 2000, device="cuda", generator=g, dtype=torch.float64)
        lq = -torch.rand(8, 2000, device="cuda", generator=g, dtype=torch.float64)
        adv = torch.randn(8, 2000, device="cuda", generator=g, dtype=torch.float64)
        valid = torch.rand(8, 2000, device="cuda", generator=g) < 0.8
        d = torch.rand(8, 2000, device="cuda", generator=g, dtype=torch.float64)
        before = [t.clone() for t in (lp, lq, adv, valid, d)]
        cppo_mask(lp, lq, adv, valid, divergence=d, return_info=True, adaptive_budget=True, position_weight="shuffled", **KNOBS)
        for t, b in zip((lp, lq, adv, valid, d), before):
            assert torch.equal(t, b)

    def test_runs_on_the_callers_stream(self):
        rng = np.random.default_rng(2)
        lp_true = cuda(-rng.exponential(0.3, (64, 8192)))
        lq = cuda(-rng.exponential(0.3, (64, 8192)))
        adv = cuda(rng.normal(size=64))
        expected = cppo_mask(lp_true, lq, adv, adaptive_budget=True, **KNOBS)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        lp = torch.zeros_like(lp_true)
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)  # keeps `side` busy; the copy below lands late
            lp.copy_(lp_true)
            mask = cppo_mask(lp, lq, adv, adaptive_budget=True, validate=False, **KNOBS)
            kept = mask.sum()  # consumed on the same stream
        side.synchronize()
        assert torch.equal(mask, expected)
        assert int(kept) == int(expected.sum())

    def test_validate_false_never_syncs(self):
        lp = -torch.rand(16, 4096, device="cuda", dtype=torch.float64)
        cppo_mask(lp, lp * 0.9, torch.ones(16, device="cuda"), validate=False, **KNOBS)  # compile outside
        torch.cuda.set_sync_debug_mode("error")
        try:
            cppo_mask(lp, lp * 0.9, torch.ones(16, device="cuda"), validate=False, adaptive_budget=True, **KNOBS)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def test_result_framework_and_device(self):
        import cupy

        dev = torch.cuda.device_count() - 1
        lp = -torch.rand(3, 100, device=f"cuda:{dev}")
        mask, info = cppo_mask(lp, lp * 0.5, torch.ones(3, device=f"cuda:{dev}"), return_info=True, **KNOBS)
        for t, dt in [(mask, torch.bool), (info.reason, torch.int8), (info.threshold, torch.float64),
                      (info.gate, torch.float64), (info.row_budget, torch.float64), (info.reason_counts, torch.int64)]:
            assert isinstance(t, torch.Tensor) and t.device == lp.device and t.dtype == dt
        with cupy.cuda.Device(dev):
            c = cupy.asarray(lp.cpu().numpy())
            m2, info2 = cppo_mask(c, c * 0.5, cupy.ones(3, dtype=cupy.float32), return_info=True, **KNOBS)
        assert isinstance(m2, cupy.ndarray) and m2.device.id == dev and m2.dtype == np.bool_
        assert isinstance(info2.reason, cupy.ndarray)
        np.testing.assert_array_equal(m2.get(), mask.cpu().numpy())

        class Producer:  # any DLPack producer on CUDA: results come back as CuPy
            def __init__(self, t):
                self.t = t
                self.dtype = str(t.dtype).replace("torch.", "")

            def __dlpack__(self, stream=None):
                return self.t.__dlpack__(stream=stream)

            def __dlpack_device__(self):
                return self.t.__dlpack_device__()

        m3 = cppo_mask(Producer(lp), Producer(lp * 0.5), Producer(torch.ones(3, device=lp.device)), **KNOBS)
        assert isinstance(m3, cupy.ndarray)
        np.testing.assert_array_equal(m3.get(), mask.cpu().numpy())

    def test_kernels_compiled_once_per_device(self):
        lp = -torch.rand(2, 10, device="cuda")
        cppo_mask(lp, lp, torch.ones(2, device="cuda"), **KNOBS)
        key = (torch.cuda.current_device(), (1, 1, 1, 4, 0))  # float32 inputs, no mask
        fns = _cuda._MODULES[key]
        cppo_mask(lp, lp, torch.ones(2, device="cuda"), **KNOBS)
        assert _cuda._MODULES[key] is fns

    def test_validate_false_can_be_captured_in_a_cuda_graph(self):
        """No host synchronisation, no allocation outside torch's allocator, every launch
        on torch's current stream: the call records into a CUDA graph and replays."""
        g = torch.Generator(device="cuda").manual_seed(3)
        lp = -torch.rand(32, 3000, device="cuda", generator=g)
        lq = (lp + 0.05 * torch.randn(32, 3000, device="cuda", generator=g)).clamp(max=0)
        adv = torch.randn(32, device="cuda", generator=g)
        valid = torch.rand(32, 3000, device="cuda", generator=g) < 0.9
        knobs = dict(KNOBS, adaptive_budget=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile) outside the capture
            cppo_mask(lp, lq, adv, valid, validate=False, **knobs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mask = cppo_mask(lp, lq, adv, valid, validate=False, **knobs)
        graph.replay()
        torch.cuda.synchronize()
        want = cppo_mask(lp, lq, adv, valid, **knobs)
        assert torch.equal(mask, want)
        lp.copy_(lq)  # new inputs in the same memory: the replay recomputes
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(mask, cppo_mask(lp, lq, adv, valid, **knobs))

    def test_misaligned_views_and_bfloat16_by_pointer(self):
        """Storage offsets and row strides reach the kernels as data_ptr()/stride()."""
        g = torch.Generator(device="cuda").manual_seed(4)
        big = -torch.rand(9, 2001, device="cuda", generator=g, dtype=torch.float64).to(torch.bfloat16)
        lp_view = big[1:, 1:]  # a 2-byte storage offset and row stride 2001, not contiguous
        assert lp_view.storage_offset() == 2002 and not lp_view.is_contiguous()
        lq = (lp_view.double() * 0.9).to(torch.bfloat16)
        adv = torch.randn(8, device="cuda", generator=g)
        got, info = cppo_mask(lp_view, lq, adv, adaptive_budget=True, return_info=True, **KNOBS)
        want, want_info = cppo_mask(lp_view.contiguous(), lq, adv, adaptive_budget=True, return_info=True, **KNOBS)
        assert torch.equal(got, want) and torch.equal(info.threshold, want_info.threshold)  # same tiles, same bits
        ref = cppo_mask_reference(lp_view.double().cpu().numpy(), lq.double().cpu().numpy(), adv.cpu().numpy(),
                                  adaptive_budget=True, **KNOBS)
        assert_within_tolerance(got, as_dict(info), ref, budget_rtol=1e-12)
