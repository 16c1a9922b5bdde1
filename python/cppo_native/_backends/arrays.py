"""Array adoption: the one place that knows about frameworks and devices.

Inputs arrive as NumPy arrays, torch tensors, CuPy arrays or any DLPack producer.
``prepare`` checks shapes, dtypes and devices once, converts every input to the
backend's array type without copying where the layout allows (NumPy on CPU, CuPy on
CUDA), and ``wrap`` hands results back in the caller's framework on the same device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

# DLPack device types (dlpack.h).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
MASK_DTYPES = ("bool", "uint8", "int8", "int32", "int64", "float32", "float64")


@dataclass(frozen=True)
class Source:
    """Where the caller's arrays live: their framework and device."""

    framework: str  # "numpy" | "torch" | "cupy" | "dlpack"
    device: str  # "cpu" | "cuda"
    index: int  # CUDA device ordinal (0 on CPU)

    def describe(self) -> str:
        return "cpu" if self.device == "cpu" else f"cuda:{self.index}"


def _torch():
    return sys.modules.get("torch")


def _is_torch(x: Any) -> bool:
    t = _torch()
    return t is not None and isinstance(x, t.Tensor)


def _is_cupy(x: Any) -> bool:
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(x, cp.ndarray)


def source_of(x: Any, name: str) -> Source:
    if isinstance(x, np.ndarray):
        return Source("numpy", "cpu", 0)
    if _is_torch(x):
        if x.layout != _torch().strided:
            raise TypeError(f"{name}: {x.layout} torch tensors are not supported; pass a dense tensor ({name}.to_dense())")
        if x.device.type == "cpu":
            return Source("torch", "cpu", 0)
        if x.device.type == "cuda":
            return Source("torch", "cuda", x.device.index or 0)
        raise ValueError(f"{name}: torch device {x.device} is not supported (cpu or cuda only)")
    if _is_cupy(x):
        return Source("cupy", "cuda", x.device.id)
    if hasattr(x, "__dlpack_device__"):
        dev_type, dev_id = x.__dlpack_device__()
        if dev_type in (_DL_CPU, _DL_CUDA_HOST):
            return Source("dlpack", "cpu", 0)
        if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED):
            return Source("dlpack", "cuda", int(dev_id))
        raise ValueError(f"{name}: DLPack device type {dev_type} is not supported (CPU or CUDA only)")
    raise TypeError(
        f"{name}: expected a numpy array, torch tensor, CuPy array or DLPack producer, got {type(x).__name__}"
    )


_DTYPE_NAMES: dict = {}


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', 'int64', ... for any supported array type."""
    dt = x.dtype
    try:
        return _DTYPE_NAMES[dt]  # str(dtype) is slow for NumPy/CuPy dtypes
    except (KeyError, TypeError):
        # NumPy/CuPy: the name without byte order ('>f8' is float64, byte-swapped later).
        name = dt.name if isinstance(dt, np.dtype) else str(dt).replace("torch.", "")
        try:
            _DTYPE_NAMES[dt] = name
        except TypeError:  # unhashable dtype object
            pass
        return name


# ---------------------------------------------------------------------------------------
# CPU: everything becomes a NumPy array (a view where possible).


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A NumPy view of a CPU input; bfloat16 comes back as its int16 bit patterns."""
    if isinstance(x, np.ndarray):
        arr = x
    elif _is_torch(x):
        t = x.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        if t.dtype == _torch().bfloat16:
            return t.view(_torch().int16).numpy()
        arr = t.numpy()
    elif hasattr(x, "__dlpack__"):
        arr = import_dlpack_cpu(x, name)
        if _is_torch(arr):  # bfloat16, read through torch
            return to_numpy(arr, name)
    else:
        arr = np.asarray(x)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def from_numpy(arr: np.ndarray, source: Source) -> Any:
    """Result array in the caller's framework (zero-copy)."""
    if source.framework == "torch":
        return _torch().from_numpy(arr)
    return arr


def import_dlpack_cpu(x: Any, name: str) -> Any:
    """A CPU DLPack producer as a NumPy array, or a torch tensor for dtypes NumPy lacks
    (bfloat16)."""
    try:
        return np.from_dlpack(x)
    except Exception as exc:  # e.g. bfloat16, which NumPy cannot hold
        if _torch() is None:
            raise TypeError(f"{name}: NumPy cannot import this DLPack array ({exc}); install torch for bfloat16") from exc
        return _torch().from_dlpack(x)


@dataclass
class Prepared:
    """Inputs normalised for a backend (NumPy or CuPy arrays)."""

    log_probs: Any
    old_log_probs: Any
    advantages: Any
    advantage_per_row: bool
    valid: Optional[Any]
    divergence: Optional[Any]
    cu_seqlens: Optional[Any]  # int64 [B + 1] or None
    shape: tuple  # shape of the outputs (the caller's log-probs shape)
    num_rows: int
    source: Source
    bf16: dict  # input name -> True where the array holds bfloat16 bits


def check_offsets(cu: np.ndarray, total: int) -> np.ndarray:
    """cu_seqlens as contiguous int64, checked: starts at 0, non-decreasing, ends at total."""
    if cu.dtype.kind == "u" and cu.size and cu.max() > np.iinfo(np.int64).max:
        i = int(np.argmax(cu > np.iinfo(np.int64).max))
        raise ValueError(f"cu_seqlens[{i}]={int(cu[i])} does not fit in int64 (offsets must be at most 2**63 - 1)")
    cu = np.ascontiguousarray(cu, dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    steps = np.diff(cu)
    if steps.size and steps.min() < 0:
        i = int(np.argmax(steps < 0))
        raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{i + 1}]={int(cu[i + 1])} < cu_seqlens[{i}]={int(cu[i])}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens {total}, got {int(cu[-1])}")
    return cu


# ---------------------------------------------------------------------------------------
# Checks shared by every public face that takes arrays (mask, divergences, baselines).


def check_float(x: Any, name: str) -> None:
    dt = dtype_name(x)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {dt} is not supported; use one of {', '.join(FLOAT_DTYPES)}")


def check_int(x: Any, name: str) -> None:
    dt = dtype_name(x)
    if not dt.startswith(("int", "uint")):
        raise TypeError(f"{name}: dtype {dt} is not supported; use an integer dtype (int64 or int32)")


def check_mask(x: Any, name: str = "response_mask") -> None:
    dt = dtype_name(x)
    if not (dt == "bool" or dt.startswith(("int", "uint", "float", "bfloat"))):
        raise TypeError(f"{name}: dtype {dt} is not supported; use bool, int or float")


def common_source(named: list, *, same_framework_on_cuda: bool = True) -> Source:
    """The common source of NumPy arrays / torch tensors ``[(name, array or None)]``:
    one device, and on CUDA one framework."""
    named = [(name, x) for name, x in named if x is not None]
    for name, x in named:
        if not (isinstance(x, np.ndarray) or _is_torch(x)):
            raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    first_name = named[0][0]
    src = source_of(named[0][1], first_name)
    for name, x in named[1:]:
        s = source_of(x, name)
        if (s.device, s.index) != (src.device, src.index):
            raise ValueError(
                f"all arrays must be on one device: {first_name} is on {src.describe()}, {name} is on {s.describe()}"
            )
        if same_framework_on_cuda and s.framework != src.framework and s.device != "cpu":
            raise TypeError(f"{name}: mixing {s.framework} and {src.framework} arrays on {s.describe()}")
    return src
