"""CUDA backend: the kernels of ``kernels/cppo_mask.cu``, compiled with CuPy (NVRTC).

Inputs arrive as CuPy arrays (zero-copy views of the caller's torch tensors, CuPy
arrays or DLPack producers, made by :func:`to_cupy`). :func:`compute` launches three
kernels (four with the shuffled ablation) on the caller's stream -- torch's current
stream for torch inputs, CuPy's current stream otherwise -- and returns device arrays.
Nothing synchronises the host except, with ``validate=True``, one 16-byte read of the
error record the kernels write (which waits for the kernels to finish).

The launch plan (:func:`run`) is written against a small executor interface so that
the tests can run the same plan on the CPU emulator of the kernel source
(``tests/cuda_emu``); :class:`_CupyExecutor` is the real one.

CuPy is optional: without it a CUDA input raises ImportError naming the extra to
install. Importing this module never imports CuPy, and the CPU path never imports it.
"""

from __future__ import annotations

import contextlib
import math
import re
import struct
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..._core.errors import bad_value_error
from ..._core.params import MaskParams
from ..arrays import Prepared, Source, check_offsets
from .instances import _dtype_name, kernel_name, template_args

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

_NSTAT = 10  # doubles per piece statistic (ST_* in the .cu)
_NO_ERROR = (1 << 64) - 1

_OFFSET_CODES = {"int64": 0, "uint64": 0, "int32": 1, "uint32": 2}


def install_hint() -> str:
    return ("pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13); from a cppo-native checkout: "
            "pip install '.[cuda12]' or '.[cuda13]'")


def _require_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            f"cppo_native got CUDA arrays but CuPy is not installed ({exc}). The native GPU backend "
            f"needs it: {install_hint()}. Or pass backend=\"torch\" to compute the mask with torch "
            f"operations on the GPU (no CuPy). CPU inputs do not need CuPy."
        ) from exc
    return cupy


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


_MODULES: dict = {}  # (device id, template args) -> {kernel: cupy RawKernel function}


def _functions(cupy, device_id: int, targs: tuple) -> dict:
    """The kernels of one dtype set compiled for one device (CuPy's NVRTC with name
    expressions; cached here per device and dtype set, and on disk by CuPy)."""
    key = (device_id, targs)
    fns = _MODULES.get(key)
    if fns is None:
        names = tuple(kernel_name(k, targs) for k in KERNELS)
        with cupy.cuda.Device(device_id):
            module = cupy.RawModule(code=kernel_source(), options=compile_options(), name_expressions=names)
            fns = {name: module.get_function(name) for name in names}
        _MODULES[key] = fns
    return fns


# ---------------------------------------------------------------------------------------
# Framework conversion (zero-copy via DLPack) and streams.


def _torch():
    return sys.modules.get("torch")


_STREAMS: dict = {}


class _StreamRef:
    """The CUDA stream protocol (version 0) for a torch stream, whatever torch's version;
    keeps the torch stream alive as long as CuPy's wrapper."""

    __slots__ = ("stream",)

    def __init__(self, stream):
        self.stream = stream

    def __cuda_stream__(self):
        return 0, int(self.stream.cuda_stream)


def _torch_stream_scope(cupy, device_index: int):
    """CuPy's current stream set to torch's current stream on that device."""
    torch = _torch()
    current = torch.cuda.current_stream(device_index)
    key = (device_index, current.cuda_stream)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy >= 14
        if from_external is not None:
            stream = from_external(_StreamRef(current))
        else:  # CuPy 13 (ExternalStream is deprecated from CuPy 14 on)
            stream = cupy.cuda.ExternalStream(current.cuda_stream, device_index)
        _STREAMS[key] = stream
    return stream


def _stream_scope(cupy, source: Source):
    if source.framework == "torch":
        return _torch_stream_scope(cupy, source.index)
    return contextlib.nullcontext()


def to_cupy(x: Any, name: str):
    """A zero-copy CuPy view of a CUDA array; bfloat16 comes back as its int16 bits and
    torch bool as uint8 (the kernels read both as raw bytes)."""
    cupy = _require_cupy()
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        elif t.dtype == torch.bool:
            t = t.view(torch.uint8)
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(index), _torch_stream_scope(cupy, index):
            return cupy.from_dlpack(t)
    if isinstance(x, cupy.ndarray):
        return x.view(cupy.int16) if str(x.dtype) == "bfloat16" else x
    if hasattr(x, "__dlpack__"):
        arr = import_dlpack(x, name)
        return arr if isinstance(arr, cupy.ndarray) else to_cupy(arr, name)
    raise TypeError(f"{name}: expected a CUDA array (torch, CuPy or a DLPack producer), got {type(x).__name__}")


def import_dlpack(x: Any, name: str):
    """A CUDA DLPack producer as a CuPy array, or a torch tensor for dtypes CuPy cannot
    describe (bfloat16)."""
    cupy = _require_cupy()
    try:
        return cupy.from_dlpack(x)
    except Exception as exc:  # e.g. bfloat16
        torch = _torch()
        if torch is None:
            raise TypeError(f"{name}: CuPy cannot import this DLPack array ({exc}); install torch for bfloat16") from exc
        return torch.from_dlpack(x)


def from_cupy(arr: Any, source: Source) -> Any:
    """A result in the caller's framework: torch tensors for torch inputs (outputs are
    allocated by torch already), CuPy arrays for CuPy and other DLPack producers."""
    if source.framework == "torch":
        torch = _torch()
        if isinstance(arr, torch.Tensor):
            return arr
        cupy = _require_cupy()
        with cupy.cuda.Device(source.index), _stream_scope(cupy, source):
            return torch.from_dlpack(arr)
    return arr


# ---------------------------------------------------------------------------------------
# The launch plan.


def _strides(arr: Any) -> tuple:
    """Element strides (s0, s1) of a 1-D or 2-D array; (0, 0) for None."""
    if arr is None:
        return 0, 0
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


def run(prep: Prepared, params: MaskParams, return_info: bool, validate: bool, ex, geometry: Optional[dict] = None):
    """Plan and launch the kernels with executor ``ex``; see :func:`compute`."""
    geometry = GEOMETRY if geometry is None else geometry
    block = geometry["CPPO_BLOCK"]
    tile = block * geometry["CPPO_ITEMS"]
    if not prep.bf16.get("advantages", False) and not _dtype_name(prep.advantages).startswith("float"):
        # integer advantages: converted here, inside the caller's stream scope (compute)
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

    adaptive = params.adaptive_budget and params.budget_scale > 0 and params.delta_b > 0
    shuffled = params.position_weight == "shuffled"
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
    window_lo, window_hi = _window(params) if adaptive else (0.0, 0.0)
    fields = {
        "log_probs": ex.ptr(lp),
        "old_log_probs": ex.ptr(lq),
        "advantages": ex.ptr(adv),
        "valid": ex.ptr(valid) if valid is not None else 0,
        "divergence": ex.ptr(div) if div is not None else 0,
        "cu_seqlens": ex.ptr(cu) if packed else 0,
        "cu_s0": _strides(cu)[0],
        "valid_bits": valid_bits,
        "cu_type": _OFFSET_CODES[_dtype_name(cu)] if packed else 0,
        "rows": rows,
        "cols": cols,
        "positions": positions,
        "packed": int(packed),
        "tiles": tiles,
        "adv_per_row": int(prep.advantage_per_row),
        "delta": params.delta,
        "delta_b": params.delta_b,
        "w_min": params.w_min,
        "horizon": params.horizon,
        "position_weight": params.position_weight_code,
        "shuffle_seed": params.shuffle_seed,
        "prefix_budget": int(params.prefix_budget),
        "divergence_mode": params.divergence_code,
        "adaptive": int(adaptive),
        "budget_quantile": params.budget_quantile,
        "budget_scale": params.budget_scale,
        "budget_ceiling": params.budget_ceiling,
        "window_lo": window_lo,
        "window_hi": window_hi,
        "check_offsets": int(validate),
        "piece_stats": base + ws.stats,
        "piece_prefix": base + ws.prefix,
        "row_horizon": base + ws.horizon,
        "row_budget": base + ws.budget,
        "shuffle_columns": base + ws.shuffle_columns if ws.shuffle_columns is not None else 0,
        "shuffle_weight": base + ws.shuffle_weight if ws.shuffle_weight is not None else 0,
        "error": base + ws.error,
        "out_mask": ex.ptr(mask),
        "out_reason": ex.ptr(reason) if return_info else 0,
        "out_threshold": ex.ptr(threshold) if return_info else 0,
        "out_gate": ex.ptr(gate) if return_info else 0,
        "out_row_budget": ex.ptr(row_budget) if return_info else 0,
        "out_counts": ex.ptr(counts) if return_info else 0,
    }
    fields["lp_s0"], fields["lp_s1"] = _strides(lp)
    fields["lq_s0"], fields["lq_s1"] = _strides(lq)
    fields["adv_s0"], fields["adv_s1"] = _strides(adv)
    fields["valid_s0"], fields["valid_s1"] = _strides(valid)
    fields["div_s0"], fields["div_s1"] = _strides(div)
    layout = args_layout()
    packed_args = layout.packer.pack(*(fields[name] for name in layout.names))

    name = {k: kernel_name(k, targs) for k in KERNELS}
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
# The real executor: CuPy kernels on the current stream, outputs from torch's allocator
# for torch callers (so the memory stays in torch's caching allocator).


class _CupyExecutor:
    def __init__(self, cupy, source: Source):
        self.cupy = cupy
        self.device = source.index
        self.torch = _torch() if source.framework == "torch" else None
        self.fns: dict = {}

    def empty(self, count: int, dtype: str):
        if self.torch is not None:
            return self.torch.empty(count, dtype=getattr(self.torch, dtype), device=f"cuda:{self.device}")
        return self.cupy.empty(count, dtype=dtype)

    def ptr(self, arr) -> int:
        if self.torch is not None and isinstance(arr, self.torch.Tensor):
            return arr.data_ptr()
        return arr.data.ptr

    def astype(self, arr, dtype: str):
        return arr.astype(dtype)

    def launch(self, name: str, grid: int, block: int, packed_args: bytes) -> None:
        fn = self.fns.get(name)
        if fn is None:
            targs = tuple(int(t) for t in name[name.index("<") + 1:-1].split(","))
            self.fns = _functions(self.cupy, self.device, targs)
            fn = self.fns[name]
        args = np.frombuffer(packed_args, dtype=args_layout().dtype)  # one struct, by value
        fn((grid,), (block,), (args,))

    def read_u64(self, work, offset: int, count: int) -> np.ndarray:
        view = work[offset:offset + 8 * count]
        if self.torch is not None and isinstance(view, self.torch.Tensor):
            return view.cpu().numpy().view(np.uint64)  # waits for the kernels (one sync)
        return view.get().view(np.uint64)

    def to_host(self, arr):
        if self.torch is not None and isinstance(arr, self.torch.Tensor):
            return arr.cpu().numpy()
        return arr.get()


def compute(prep: Prepared, params: MaskParams, return_info: bool, validate: bool):
    """Returns (mask, reason, threshold, gate, row_budget, counts) as device arrays in
    the caller's framework (torch tensors for torch inputs, CuPy arrays otherwise); the
    info arrays are None unless ``return_info``. Launches on the caller's stream."""
    cupy = _require_cupy()
    src = prep.source
    with cupy.cuda.Device(src.index), _stream_scope(cupy, src):
        return run(prep, params, return_info, validate, _CupyExecutor(cupy, src))
