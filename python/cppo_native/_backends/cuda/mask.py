"""CUDA backend: the kernels of ``kernels/cppo_mask.cu``, compiled with CuPy (NVRTC).

Inputs arrive as the caller's torch tensors (read by ``data_ptr()`` and ``stride()``)
or as CuPy arrays (CuPy callers and other DLPack producers; see :mod:`.arrays`).
:func:`compute` launches three kernels (four with the shuffled ablation) on the
caller's stream -- torch's current stream for torch inputs, CuPy's current stream
otherwise -- and returns device arrays (torch outputs from ``torch.empty``).
Nothing synchronises the host except, with ``validate=True``, one 16-byte read of the
error record the kernels write (which waits for the kernels to finish).

The launch plan (:func:`run`) is written against a small executor interface so that
the tests can run the same plan on the CPU emulator of the kernel source
(``tests/cuda_emu``); :class:`_CupyExecutor` is the real one.

CuPy is optional: without it a CUDA input raises ImportError naming the extra to
install. Importing this module never imports CuPy, and the CPU path never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..._core.errors import bad_value_error
from ..._core.params import MaskParams
from ..arrays import Prepared, Source, check_offsets
from .arrays import RawStream, from_cupy, install_hint, require_cupy, torch_stream_ptr  # noqa: F401 (re-exported)
from .instances import _dtype_name, kernel_name, template_args

_require_cupy = require_cupy

KERNEL_PATH = Path(__file__).with_name("kernels") / "cppo_mask.cu"

# Launch geometry (compile-time constants of the .cu, passed as -D options). One place.
GEOMETRY = {
    "CPPO_BLOCK": 256,  # threads per block
    "CPPO_ITEMS": 4,  # positions per thread per tile (tile = 1024 positions)
    "CPPO_SELECT_CAP": 5120,  # adaptive budget: candidates selected in shared memory
    "CPPO_SHUFFLE_CAP": 8192,  # shuffled ablation: rows up to this many valid tokens in shared memory
}
COMPILE_OPTIONS = ("-std=c++17", "--fmad=false")
KERNELS = ("cppo_shuffle", "cppo_stats", "cppo_rows", "cppo_mask_tiles")
# What CuPy 14.2 appends to a RawModule's options (cupy/cuda/compiler.py,
# _compile_with_cache_cuda and _compile_using_nvrtc_no_warning; include paths aside).
# The kernels must be exact under these: tests/nvrtc.py compiles with exactly them.
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

# MaskParams fields whose Args field has another name (every other field the kernels
# read has its own name in the struct; tests/test_codes.py checks both).
KNOB_ARG_NAMES = {"adaptive_budget": "adaptive", "divergence": "divergence_mode"}

_NSTAT = 10  # doubles per piece statistic (ST_* in the .cu)
_NO_ERROR = (1 << 64) - 1

_OFFSET_CODES = {"int64": 0, "uint64": 0, "int32": 1, "uint32": 2}


# ---------------------------------------------------------------------------------------
# The kernel source, its argument block and the compiled modules.


@dataclass(frozen=True)
class _ArgsLayout:
    names: tuple
    packer: struct.Struct
    dtype: np.dtype


def kernel_source() -> str:
    return KERNEL_PATH.read_text()


def _parse_args_layout(source: str) -> _ArgsLayout:
    """The ``Args`` struct of the .cu (all 8-byte fields, in order)."""
    block = source.split("// BEGIN ARGS", 1)[1].split("// END ARGS", 1)[0]
    fields = re.findall(r"X\((u64|i64|f64),\s*(\w+)\)", block)
    if not fields:
        raise RuntimeError(f"no kernel arguments found in {KERNEL_PATH}")
    code = {"u64": "Q", "i64": "q", "f64": "d"}
    npcode = {"u64": "<u8", "i64": "<i8", "f64": "<f8"}
    names = tuple(name for _, name in fields)
    packer = struct.Struct("<" + "".join(code[t] for t, _ in fields))
    dtype = np.dtype([(name, npcode[t]) for t, name in fields])
    return _ArgsLayout(names, packer, dtype)


_LAYOUT: Optional[_ArgsLayout] = None


def args_layout() -> _ArgsLayout:
    global _LAYOUT
    if _LAYOUT is None:
        _LAYOUT = _parse_args_layout(kernel_source())
    return _LAYOUT


def compile_options(geometry: Optional[dict] = None) -> tuple:
    geometry = GEOMETRY if geometry is None else geometry
    return COMPILE_OPTIONS + tuple(f"-D{k}={v}" for k, v in geometry.items())


_MODULES: dict = {}  # (device id, template args) -> {name expression: cupy Function}


def _functions(cupy, device_id: int, targs: tuple) -> dict:
    """The kernels of one dtype set compiled for one device (CuPy's NVRTC with name
    expressions; cached here per device and dtype set, and on disk by CuPy). The values
    are CuPy's low-level ``Function`` objects (``RawKernel.kernel`` on that device),
    launched with an explicit stream and no per-call lookup."""
    key = (device_id, targs)
    fns = _MODULES.get(key)
    if fns is None:
        names = tuple(kernel_name(k, targs) for k in KERNELS)
        with cupy.cuda.Device(device_id):
            module = cupy.RawModule(code=kernel_source(), options=compile_options(), name_expressions=names)
            fns = {name: module.get_function(name).kernel for name in names}
        _MODULES[key] = fns
    return fns


# ---------------------------------------------------------------------------------------
# The launch plan.


def _strides(arr: Any) -> tuple:
    """Element strides (s0, s1) of a 1-D or 2-D array (torch tensors: ``stride()``,
    CuPy/NumPy: byte strides over the item size); (0, 0) for None."""
    if arr is None:
        return 0, 0
    stride = getattr(arr, "stride", None)
    if stride is not None and callable(stride):  # torch
        s = stride()
        return (s[0], s[1]) if len(s) == 2 else ((s[0] if s else 0), 0)
    s, item = arr.strides, arr.itemsize
    if len(s) == 2:
        return s[0] // item, s[1] // item
    return (s[0] // item if s else 0), 0


def _window(params: MaskParams) -> tuple:
    """Bounds on D outside which the adaptive budget is clamped anyway: Q <= lo gives
    delta_b, Q >= hi gives m delta_b, m = budget_ceiling (checked in float64, as the
    kernel computes)."""
    k, b, m = params.budget_scale, params.delta_b, params.budget_ceiling
    lo = b / k
    while lo > 0 and k * lo > b:
        lo = math.nextafter(lo, 0.0)
    top = m * b
    hi = top / k
    while k * hi < top:
        hi = math.nextafter(hi, math.inf)
    return lo, hi


@dataclass
class _Workspace:
    """Byte offsets of the per-call scratch sections (one allocation)."""

    size: int
    stats: int
    prefix: int
    horizon: int
    budget: int
    error: int
    shuffle_columns: Optional[int]
    shuffle_weight: Optional[int]


def _workspace(rows: int, positions: int, tiles: int, shuffled: bool) -> _Workspace:
    at = 0

    def take(nbytes: int) -> int:
        nonlocal at
        start = at
        at += (nbytes + 255) // 256 * 256
        return start

    pieces = rows + tiles
    stats = take(pieces * _NSTAT * 8)
    prefix = take(pieces * 2 * 8)
    horizon = take(rows * 8)
    budget = take(rows * 8)
    error = take(16)
    columns = take(positions * 8) if shuffled else None
    weight = take(positions * 8) if shuffled else None
    return _Workspace(max(at, 256), stats, prefix, horizon, budget, error, columns, weight)


@functools.lru_cache(maxsize=256)
def _knob_fields(params: MaskParams, validate: bool, row_offset: int) -> tuple:
    """(argument fields that depend on the knobs only, adaptive, shuffled): computed
    once per distinct set of knobs (part of the cached launch plan)."""
    adaptive = params.adaptive_budget and params.budget_scale > 0 and params.delta_b > 0
    window_lo, window_hi = _window(params) if adaptive else (0.0, 0.0)
    fields = {
        "delta": params.delta, "delta_b": params.delta_b, "w_min": params.w_min, "horizon": params.horizon,
        "position_weight": params.position_weight_code, "shuffle_seed": params.shuffle_seed,
        "row_offset": row_offset, "prefix_budget": int(params.prefix_budget),
        "divergence_mode": params.divergence_code, "adaptive": int(adaptive),
        "budget_quantile": params.budget_quantile, "budget_scale": params.budget_scale,
        "budget_ceiling": params.budget_ceiling, "window_lo": window_lo, "window_hi": window_hi,
        "check_offsets": int(validate),
    }
    return fields, adaptive, params.position_weight == "shuffled"


@functools.lru_cache(maxsize=256)
def _kernel_names(targs: tuple) -> dict:
    return {k: kernel_name(k, targs) for k in KERNELS}


def run(prep: Prepared, params: MaskParams, return_info: bool, validate: bool, ex, geometry: Optional[dict] = None,
        row_offset: int = 0):
    """Plan and launch the kernels with executor ``ex``; see :func:`compute`.
    ``row_offset``: the index of the batch's first row in a larger input (the shuffled
    ablation seeds row r with ``shuffle_seed ^ (row_offset + r + 1) * C``)."""
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or not 0 <= row_offset < 2**64:
        raise ValueError(f"row_offset must be an int in [0, 2**64), got {row_offset!r}")
    geometry = GEOMETRY if geometry is None else geometry
    block = geometry["CPPO_BLOCK"]
    tile = block * geometry["CPPO_ITEMS"]
    if not prep.bf16.get("advantages", False) and not _dtype_name(prep.advantages).startswith("float"):
        # integer advantages: converted here, on the caller's stream (compute)
        prep = dataclasses.replace(prep, advantages=ex.astype(prep.advantages, "float64"))
    lp, lq, adv = prep.log_probs, prep.old_log_probs, prep.advantages
    valid, div, cu = prep.valid, prep.divergence, prep.cu_seqlens
    packed = cu is not None
    rows = prep.num_rows
    if packed:
        positions, cols = int(lp.shape[0]), 0
        if _dtype_name(cu) not in _OFFSET_CODES:
            cu = ex.astype(cu, "int64")
    else:
        positions, cols = rows * int(lp.shape[1]), int(lp.shape[1])
    tiles = -(-positions // tile)

    knob_fields, adaptive, shuffled = _knob_fields(params, bool(validate), row_offset)
    ws = _workspace(rows, positions, tiles, shuffled)
    work = ex.empty(ws.size, "uint8")
    base = ex.ptr(work)

    mask = ex.empty(positions, "bool")
    reason = threshold = gate = row_budget = counts = None
    if return_info:
        reason = ex.empty(positions, "int8")
        threshold = ex.empty(positions, "float64")
        gate = ex.empty(positions, "float64")
        row_budget = ex.empty(rows, "float64")
        counts = ex.empty(5, "int64")

    targs, valid_bits = template_args(prep)
    fields = dict(knob_fields)
    fields.update(
        log_probs=ex.ptr(lp), old_log_probs=ex.ptr(lq), advantages=ex.ptr(adv),
        valid=ex.ptr(valid) if valid is not None else 0, divergence=ex.ptr(div) if div is not None else 0,
        cu_seqlens=ex.ptr(cu) if packed else 0, cu_s0=_strides(cu)[0], valid_bits=valid_bits,
        cu_type=_OFFSET_CODES[_dtype_name(cu)] if packed else 0,
        rows=rows, cols=cols, positions=positions, packed=int(packed), tiles=tiles,
        adv_per_row=int(prep.advantage_per_row),
        piece_stats=base + ws.stats, piece_prefix=base + ws.prefix, row_horizon=base + ws.horizon,
        row_budget=base + ws.budget,
        shuffle_columns=base + ws.shuffle_columns if ws.shuffle_columns is not None else 0,
        shuffle_weight=base + ws.shuffle_weight if ws.shuffle_weight is not None else 0,
        error=base + ws.error, out_mask=ex.ptr(mask),
        out_reason=ex.ptr(reason) if return_info else 0, out_threshold=ex.ptr(threshold) if return_info else 0,
        out_gate=ex.ptr(gate) if return_info else 0, out_row_budget=ex.ptr(row_budget) if return_info else 0,
        out_counts=ex.ptr(counts) if return_info else 0,
    )
    fields["lp_s0"], fields["lp_s1"] = _strides(lp)
    fields["lq_s0"], fields["lq_s1"] = _strides(lq)
    fields["adv_s0"], fields["adv_s1"] = _strides(adv)
    fields["valid_s0"], fields["valid_s1"] = _strides(valid)
    fields["div_s0"], fields["div_s1"] = _strides(div)
    layout = args_layout()
    packed_args = layout.packer.pack(*[fields[name] for name in layout.names])

    name = _kernel_names(targs)
    if shuffled and rows > 0:
        ex.launch(name["cppo_shuffle"], rows, block, packed_args)
    ex.launch(name["cppo_stats"], max(tiles, 1), block, packed_args)
    ex.launch(name["cppo_rows"], max(rows, 1), block, packed_args)
    if tiles > 0:
        ex.launch(name["cppo_mask_tiles"], tiles, block, packed_args)

    if validate:
        bad_key, offsets_flag = (int(v) for v in ex.read_u64(work, ws.error, 2))
        if offsets_flag != _NO_ERROR:
            check_offsets(ex.to_host(cu), positions)
            raise ValueError("cu_seqlens must start at 0, be non-decreasing and end at the number of tokens")
        if bad_key != _NO_ERROR:
            raise _bad_value(prep, ex, cu, cols, bad_key)
    return mask, reason, threshold, gate, row_budget, counts


def _bad_value(prep: Prepared, ex, cu, cols: int, key: int) -> ValueError:
    """The error for the first bad value (the kernel reports its flat position and field)."""
    flat, field = key >> 2, key & 3
    if cu is not None:
        offsets = np.asarray(ex.to_host(cu), dtype=np.int64)
        row = int(np.searchsorted(offsets, flat, side="right")) - 1
        column = flat - int(offsets[row])
    else:
        row, column = divmod(flat, cols)
    name = ("log_probs", "old_log_probs", "advantages", "divergence")[field]
    arr = (prep.log_probs, prep.old_log_probs, prep.advantages, prep.divergence)[field]
    if field == 2 and prep.advantage_per_row:
        index: tuple = (row,)
    elif cu is not None:
        index = (flat,)
    else:
        index = (row, column)
    raw = np.asarray(ex.to_host(arr[index]))
    if prep.bf16.get(name, False):
        value = float((raw.astype(np.int16).view(np.uint16).astype(np.uint32) << 16).view(np.float32))
    else:
        value = float(raw)
    return bad_value_error(field, row, column, value, flat if cu is not None else None)


# ---------------------------------------------------------------------------------------
# The real executor: CuPy's compiled functions launched on the caller's stream. For
# torch callers everything stays in torch (pointers from data_ptr(), outputs from
# torch.empty, torch's current stream by its raw handle): no DLPack, no CuPy arrays.


_TORCH_DEVICES: dict = {}


def _torch_device(torch, index: int):
    dev = _TORCH_DEVICES.get(index)
    if dev is None:
        dev = _TORCH_DEVICES[index] = torch.device("cuda", index)
    return dev


class _CupyExecutor:
    def __init__(self, cupy, source: Source):
        self.cupy = cupy
        self.device = source.index
        self.torch = None
        self.stream = None  # None: CuPy's current stream
        if source.framework == "torch":
            torch = self.torch = sys.modules["torch"]
            self.torch_device = _torch_device(torch, self.device)
            self.stream = RawStream(torch_stream_ptr(self.device))
        self.fns: dict = {}
        self._args_key = self._args = None

    def empty(self, count: int, dtype: str):
        if self.torch is not None:
            return self.torch.empty(count, dtype=getattr(self.torch, dtype), device=self.torch_device)
        return self.cupy.empty(count, dtype=dtype)

    def ptr(self, arr) -> int:
        data_ptr = getattr(arr, "data_ptr", None)
        return data_ptr() if data_ptr is not None else arr.data.ptr

    def astype(self, arr, dtype: str):
        if self.torch is not None and isinstance(arr, self.torch.Tensor):
            return arr.to(getattr(self.torch, dtype))
        return arr.astype(dtype)

    def launch(self, name: str, grid: int, block: int, packed_args: bytes) -> None:
        fn = self.fns.get(name)
        if fn is None:
            targs = tuple(int(t) for t in name[name.index("<") + 1:-1].split(","))
            self.fns = _functions(self.cupy, self.device, targs)
            fn = self.fns[name]
        if packed_args is not self._args_key:  # one struct per call, passed by value to each launch
            self._args_key, self._args = packed_args, np.frombuffer(packed_args, dtype=args_layout().dtype)
        fn((grid,), (block,), (self._args,), 0, self.stream)

    def read_u64(self, work, offset: int, count: int) -> np.ndarray:
        view = work[offset:offset + 8 * count]
        if self.torch is not None and isinstance(view, self.torch.Tensor):
            return view.cpu().numpy().view(np.uint64)  # waits for the kernels (one sync)
        return view.get().view(np.uint64)

    def to_host(self, arr):
        if self.torch is not None and isinstance(arr, self.torch.Tensor):
            if arr.dtype == self.torch.bfloat16:
                arr = arr.view(self.torch.int16)
            return arr.cpu().numpy()
        return arr.get()


def compute(prep: Prepared, params: MaskParams, return_info: bool, validate: bool, row_offset: int = 0):
    """Returns (mask, reason, threshold, gate, row_budget, counts) as device arrays in
    the caller's framework (torch tensors for torch inputs, CuPy arrays otherwise); the
    info arrays are None unless ``return_info``. Launches on the caller's stream (torch's
    current stream for torch inputs, CuPy's otherwise) and, with ``validate=False``,
    never synchronises the host."""
    cupy = require_cupy()
    src = prep.source
    ex = _CupyExecutor(cupy, src)
    if cupy.cuda.runtime.getDevice() == src.index:
        return run(prep, params, return_info, validate, ex, row_offset=row_offset)
    with cupy.cuda.Device(src.index):
        return run(prep, params, return_info, validate, ex, row_offset=row_offset)
