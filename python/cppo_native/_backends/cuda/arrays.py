"""CUDA arrays and streams: how caller arrays reach the kernels.

- torch CUDA tensors take the fast path: no DLPack, no CuPy array. The kernels get
  ``data_ptr()`` and ``stride()`` directly, outputs are ``torch.empty`` (torch's
  caching allocator), and launches go to torch's current stream by its raw pointer
  (:func:`torch_stream_ptr`; CuPy's ``Function`` accepts any object with ``.ptr``).
- CuPy arrays are used as they are, on CuPy's current stream.
- Other DLPack producers are imported once as CuPy arrays (or torch tensors where CuPy
  cannot describe the dtype, e.g. bfloat16) and follow one of the two paths above.

Importing this module never imports CuPy; the CPU path never imports it.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ..arrays import Source


def install_hint() -> str:
    return ("pip install cupy-cuda12x (CUDA 12) or cupy-cuda13x (CUDA 13); from a cppo-native checkout: "
            "pip install '.[cuda12]' or '.[cuda13]'")


def require_cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            f"cppo_native got CUDA arrays but CuPy is not installed ({exc}). The native GPU backend "
            f"needs it: {install_hint()}. Or pass backend=\"torch\" to compute the mask with torch "
            f"operations on the GPU (no CuPy). CPU inputs do not need CuPy."
        ) from exc
    return cupy


def _torch():
    return sys.modules.get("torch")


# ---------------------------------------------------------------------------------------
# Streams.


class RawStream:
    """A CUDA stream by its raw handle, in the shape CuPy's ``Function.__call__`` reads
    (``stream.ptr``): launching on torch's stream needs no CuPy stream object."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr


_RAW_STREAM = None


def torch_stream_ptr(device_index: int) -> int:
    """The raw ``cudaStream_t`` of torch's current stream on a device (the private
    binding torch's own compiled code uses when present: no Stream object per call)."""
    global _RAW_STREAM
    torch = _torch()
    if _RAW_STREAM is None:
        _RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda index: torch.cuda.current_stream(index).cuda_stream)
    return int(_RAW_STREAM(device_index))


class _StreamRef:
    """The CUDA stream protocol (version 0) for a torch stream, whatever torch's version;
    keeps the torch stream alive as long as CuPy's wrapper."""

    __slots__ = ("stream",)

    def __init__(self, stream):
        self.stream = stream

    def __cuda_stream__(self):
        return 0, int(self.stream.cuda_stream)


_STREAMS: dict = {}


def torch_stream_scope(cupy, device_index: int):
    """CuPy's current stream set to torch's current stream on that device (for CuPy
    operations on torch data: DLPack imports and exports)."""
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


# ---------------------------------------------------------------------------------------
# Conversions.


def torch_view(x: Any, name: str) -> Any:
    """A torch CUDA tensor as the kernels read it: the tensor itself (detached if it
    requires grad). bfloat16 and bool stay as they are: the kernels read raw bits by
    dtype code (``instances.template_args``), so no view or copy is made."""
    if x.requires_grad:
        x = x.detach()
    if x.is_neg():
        x = x.resolve_neg()
    return x


def import_dlpack(x: Any, name: str):
    """A CUDA DLPack producer as a CuPy array, or a torch tensor for dtypes CuPy cannot
    describe (bfloat16)."""
    cupy = require_cupy()
    try:
        return cupy.from_dlpack(x)
    except Exception as exc:  # e.g. bfloat16
        torch = _torch()
        if torch is None:
            raise TypeError(f"{name}: CuPy cannot import this DLPack array ({exc}); install torch for bfloat16") from exc
        return torch.from_dlpack(x)


def to_cupy(x: Any, name: str):
    """A zero-copy CuPy view of a CUDA input of a CuPy or DLPack caller (torch callers
    take :func:`torch_view`); bfloat16 comes back as its int16 bits. A producer CuPy
    cannot import (bfloat16) goes through torch's DLPack once, on torch's stream."""
    cupy = require_cupy()
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):  # a bfloat16 DLPack producer, imported by torch
        t = torch_view(x, name)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        elif t.dtype == torch.bool:
            t = t.view(torch.uint8)
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(index), torch_stream_scope(cupy, index):
            return cupy.from_dlpack(t)
    if isinstance(x, cupy.ndarray):
        return x.view(cupy.int16) if str(x.dtype) == "bfloat16" else x
    if hasattr(x, "__dlpack__"):
        arr = import_dlpack(x, name)
        return arr if isinstance(arr, cupy.ndarray) else to_cupy(arr, name)
    raise TypeError(f"{name}: expected a CUDA array (torch, CuPy or a DLPack producer), got {type(x).__name__}")


def converter(source: Source) -> Callable[[Any, str], Any]:
    """How ``prepare`` converts the inputs of a CUDA call from ``source``."""
    if source.framework == "torch":
        return torch_view
    return to_cupy


def from_cupy(arr: Any, source: Source) -> Any:
    """A result in the caller's framework: torch tensors for torch inputs (outputs are
    allocated by torch already), CuPy arrays for CuPy and other DLPack producers."""
    if source.framework == "torch":
        torch = _torch()
        if isinstance(arr, torch.Tensor):
            return arr
        cupy = require_cupy()
        with cupy.cuda.Device(source.index), torch_stream_scope(cupy, source.index):
            return torch.from_dlpack(arr)
    return arr
