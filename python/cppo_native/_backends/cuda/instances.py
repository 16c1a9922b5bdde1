"""Which instantiation of the mask kernels an input needs: the kernels of
``kernels/cppo_mask.cu`` are templates on the input dtypes, compiled per dtype set by
NVRTC name expression (``cppo_stats<1, 1, 1, 4, 1>``)."""

from __future__ import annotations

from typing import Any

from ..arrays import Prepared, dtype_name

# dtype codes shared with the .cu (template parameters of every kernel)
_FLOAT_CODES = {"float64": 0, "float32": 1, "float16": 2}
_BF16 = 3
_F_NONE = 4  # no divergence array
# valid flags: (element width, bits that make a flag set); floats ignore the sign bit
# (-0.0 is not valid, NaN is), bfloat16 is read as its 16-bit pattern like float16.
_MASK_CODES = {
    "bool": (1, 0xFF), "int8": (1, 0xFF), "uint8": (1, 0xFF),
    "int16": (2, 0xFFFF), "uint16": (2, 0xFFFF),
    "int32": (4, 0xFFFFFFFF), "uint32": (4, 0xFFFFFFFF),
    "int64": (8, (1 << 64) - 1), "uint64": (8, (1 << 64) - 1),
    "float16": (2, 0x7FFF),
    "float32": (4, 0x7FFFFFFF),
    "float64": (8, (1 << 63) - 1),
}
_MASK_BF16 = (2, 0x7FFF)


def kernel_name(kernel: str, targs: tuple) -> str:
    """The NVRTC name expression of one instantiation, e.g. 'cppo_stats<1, 1, 1, 4, 1>'
    (template arguments: log_probs, old_log_probs, advantages, divergence dtype codes and
    the valid flags' width)."""
    return f"{kernel}<{', '.join(str(int(t)) for t in targs)}>"


def _dtype_name(arr: Any) -> str:
    """'float32', 'bool', 'bfloat16', ... for torch tensors and CuPy/NumPy arrays alike."""
    return dtype_name(arr)


def _float_code(arr: Any, is_bf16: bool, name: str) -> int:
    if is_bf16:
        return _BF16
    dt = _dtype_name(arr)
    if dt not in _FLOAT_CODES:
        raise TypeError(f"{name}: dtype {dt} is not supported on CUDA")
    return _FLOAT_CODES[dt]


def template_args(prep: Prepared) -> tuple:
    """(template arguments of the kernels, valid_bits) for these inputs' dtypes."""
    bf16 = prep.bf16
    div = prep.divergence
    valid = prep.valid
    if valid is None:
        width, bits = 0, 0
    else:
        width, bits = _MASK_BF16 if bf16.get("response_mask", False) else _MASK_CODES[_dtype_name(valid)]
    targs = (
        _float_code(prep.log_probs, bf16.get("log_probs", False), "log_probs"),
        _float_code(prep.old_log_probs, bf16.get("old_log_probs", False), "old_log_probs"),
        _float_code(prep.advantages, bf16.get("advantages", False), "advantages"),
        _float_code(div, bf16.get("divergence", False), "divergence") if div is not None else _F_NONE,
        width,
    )
    return targs, bits
