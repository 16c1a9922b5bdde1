"""Input preparation: shapes, dtypes and devices of a mask call, checked once.

``prepare`` validates the caller's arrays and converts every input to the backend's
array type without copying where the layout allows (NumPy on CPU; on CUDA torch
tensors as they are, CuPy arrays for the rest); results go back through
:func:`~cppo_native._backends.arrays.from_numpy` or ``cuda.arrays.from_cupy``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from .arrays import (
    FLOAT_DTYPES,
    Prepared,
    Source,
    _is_torch,
    _torch,
    check_float,
    check_mask,
    dtype_name,
    import_dlpack_cpu,
    source_of,
    to_numpy,
    to_torch,
)


def _adopt(x: Any, source: Source, name: str, backend: str = "native") -> Any:
    """A generic DLPack producer as an array of a framework we know (zero-copy): NumPy on
    CPU, CuPy on CUDA, or a torch tensor where those cannot hold the dtype (bfloat16);
    for the torch backend always a torch tensor. NumPy, torch and CuPy inputs pass
    through unchanged."""
    if source.framework != "dlpack":
        return x
    if backend == "torch":
        return _torch().from_dlpack(x)
    if source.device == "cpu":
        return import_dlpack_cpu(x, name)
    from .cuda.arrays import import_dlpack

    return import_dlpack(x, name)


def _list_array(x: Any, name: str) -> Any:
    """A (nested) Python list or tuple as a NumPy array; other inputs unchanged."""
    if not isinstance(x, (list, tuple)):
        return x
    try:
        return np.asarray(x)
    except ValueError:
        raise ValueError(
            f"{name}: a nested list must be rectangular, got rows of different lengths; pad them (with a "
            "response_mask) or pack them into one flat list with cu_seqlens"
        ) from None


# ---------------------------------------------------------------------------------------
# Shape and dtype rules, shared by every backend.


def prepare(
    log_probs: Any,
    old_log_probs: Any,
    advantages: Any,
    response_mask: Any,
    divergence: Any,
    cu_seqlens: Any,
    per_row_advantages: Optional[bool] = None,
    convert: Optional[Callable[[Any, str], Any]] = None,
    backend: str = "native",
    widen_int_advantages: Optional[bool] = None,
) -> Prepared:
    """Validate shapes/dtypes/devices of the caller's arrays and convert them: to NumPy
    (CPU) or, on CUDA, torch tensors as they are and CuPy arrays for the rest (native
    backends), to torch tensors on the caller's device for ``backend="torch"`` (``convert`` overrides the choice, e.g. for the CUDA
    emulator in the tests). Integer advantages become float64 here for CPU inputs and
    the torch backend; for CUDA inputs of the native backend (or with
    ``widen_int_advantages=False``) the backend converts them, on the caller's stream."""
    log_probs, old_log_probs = _list_array(log_probs, "log_probs"), _list_array(old_log_probs, "old_log_probs")
    advantages, response_mask = _list_array(advantages, "advantages"), _list_array(response_mask, "response_mask")
    divergence, cu_seqlens = _list_array(divergence, "divergence"), _list_array(cu_seqlens, "cu_seqlens")
    named = [("log_probs", log_probs), ("old_log_probs", old_log_probs), ("advantages", advantages)]
    if response_mask is not None:
        named.append(("response_mask", response_mask))
    if divergence is not None:
        named.append(("divergence", divergence))
    sources = {name: source_of(x, name) for name, x in named}
    src = sources["log_probs"]
    for name, s in sources.items():
        if (s.device, s.index) != (src.device, src.index):
            raise ValueError(
                f"all arrays must be on one device: log_probs is on {src.describe()}, {name} is on {s.describe()}"
            )
    named = [(name, _adopt(x, sources[name], name, backend)) for name, x in named]
    advantages, response_mask = named[2][1], dict(named).get("response_mask")

    if convert is None and backend == "torch":
        convert = to_torch
    elif convert is None and src.device == "cpu":
        convert = to_numpy
    elif convert is None:
        from .cuda.arrays import converter

        convert = converter(src)

    for name, x in named:
        if name in ("log_probs", "old_log_probs", "divergence"):
            check_float(x, name)
    adv_dt = dtype_name(advantages)
    if adv_dt not in FLOAT_DTYPES and not adv_dt.startswith(("int", "uint")):
        raise TypeError(f"advantages: dtype {adv_dt} is not supported; use a float dtype")
    if response_mask is not None:
        check_mask(response_mask)

    bf16 = {name: dtype_name(x) == "bfloat16" for name, x in named}
    arrays = {name: convert(x, name) for name, x in named}
    lp = arrays["log_probs"]
    shape = tuple(lp.shape)

    cu = None
    if cu_seqlens is None:
        if lp.ndim != 2:
            raise ValueError(
                f"log_probs must be 2-D [batch, length] (or 1-D with cu_seqlens for the packed layout), got shape {shape}"
            )
        num_rows, token_shape = shape[0], shape
    else:
        cu_src = source_of(cu_seqlens, "cu_seqlens")
        if (cu_src.device, cu_src.index) != (src.device, src.index):
            raise ValueError(
                f"all arrays must be on one device: log_probs is on {src.describe()}, cu_seqlens is on {cu_src.describe()}"
            )
        cu_seqlens = _adopt(cu_seqlens, cu_src, "cu_seqlens", backend)
        cu_dt = dtype_name(cu_seqlens)
        if not cu_dt.startswith(("int", "uint")):
            raise TypeError(f"cu_seqlens: dtype {cu_dt} is not supported; use an integer dtype")
        cu = convert(cu_seqlens, "cu_seqlens")
        if lp.ndim == 2 and shape[0] == 1:
            token_shape = (shape[1],)  # verl's remove-padding path keeps a leading 1
        elif lp.ndim == 1:
            token_shape = shape
        else:
            raise ValueError(f"with cu_seqlens, log_probs must be 1-D [total] (or [1, total]), got shape {shape}")
        if cu.ndim != 1 or cu.shape[0] < 1:
            raise ValueError(f"cu_seqlens must be 1-D with at least one entry, got shape {tuple(cu.shape)}")
        num_rows = cu.shape[0] - 1
        for name in list(arrays):
            if arrays[name].ndim == 2 and arrays[name].shape[0] == 1 and tuple(arrays[name].shape) == shape:
                arrays[name] = arrays[name].reshape(token_shape)
        lp = arrays["log_probs"]

    for name in ("old_log_probs", "response_mask", "divergence"):
        if name in arrays and tuple(arrays[name].shape) != token_shape:
            raise ValueError(
                f"{name} must have the shape of log_probs {token_shape}, got {tuple(arrays[name].shape)}"
            )
    adv = arrays["advantages"]
    adv_shape = tuple(adv.shape)
    token_like = adv_shape == token_shape
    row_like = adv_shape == (num_rows,) or (cu is None and adv_shape == (num_rows, 1))
    if per_row_advantages is None:
        if token_like and row_like and num_rows > 0 and cu is not None:
            raise ValueError(
                f"advantages of shape {adv_shape} are ambiguous: in this packed batch the number of tokens "
                f"equals the number of rows ({num_rows}); pass per_row_advantages=True or False"
            )
        per_row = row_like and not token_like
    else:
        per_row = bool(per_row_advantages)
    if (per_row and not row_like) or (not per_row and not token_like):
        want = f"{token_shape} (per token) or ({num_rows},) (per row)"
        if per_row_advantages is not None:
            want = f"({num_rows},) (per row)" if per_row else f"{token_shape} (per token)"
        raise ValueError(f"advantages must have shape {want}, got {adv_shape}")
    if per_row:
        adv = adv.reshape(num_rows)
    if widen_int_advantages is None:
        widen_int_advantages = src.device == "cpu" or backend == "torch"
    if widen_int_advantages and not dtype_name(adv).startswith(("float", "bfloat")) and not bf16["advantages"]:
        adv = adv.to(_torch().float64) if _is_torch(adv) else adv.astype("float64")
    arrays["advantages"] = adv
    return Prepared(
        log_probs=arrays["log_probs"],
        old_log_probs=arrays["old_log_probs"],
        advantages=adv,
        advantage_per_row=per_row,
        valid=arrays.get("response_mask"),
        divergence=arrays.get("divergence"),
        cu_seqlens=cu,
        shape=shape,
        num_rows=num_rows,
        source=src,
        bf16=bf16,
    )
