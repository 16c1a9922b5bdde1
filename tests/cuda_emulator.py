"""Runs the CUDA kernel source on the CPU: cppo_mask.cu compiled with g++ against the
fiber-based shim in tests/cuda_emu, driven by the same launch plan as the real GPU path
(cppo_native._backends.cuda.mask.run) through an executor backed by NumPy arrays.

This checks the kernels' logic (indexing, pieces, scans, selection, validation) and the
host-side argument packing without a GPU. It cannot check the memory model between
blocks, the GPU's exp/log, NVRTC's code generation or speed; tests/test_gpu.py does
that on a CUDA device.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from cppo_native._backends import arrays as _arrays, prepare as _prepare
from cppo_native._backends.cuda import mask as _cuda
from cppo_native._core.params import divergence_array, make_params

HERE = Path(__file__).resolve().parent / "cuda_emu"

# Small tiles so that short test rows span several tiles and pieces; small selection and
# shuffle capacities so that the paths for large rows run too.
SMALL = {"CPPO_BLOCK": 64, "CPPO_ITEMS": 2, "CPPO_SELECT_CAP": 16, "CPPO_SHUFFLE_CAP": 16}
PRODUCTION = dict(_cuda.GEOMETRY)

_LIBS: dict = {}


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def _compile(kernel: Path, defines: list, key: tuple) -> ctypes.CDLL:
    """g++ build of one kernel source against the shim (cached on disk by content)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    parts = [kernel.read_bytes(), (HERE / "emu_cuda.h").read_bytes(), (HERE / "emu_main.cpp").read_bytes(), repr(key).encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "cppo_native_cuda_emu"
    out_dir.mkdir(exist_ok=True)
    lib_path = out_dir / f"emu_{digest}.so"
    if not lib_path.exists():
        tmp = out_dir / f"emu_{digest}.{os.getpid()}.tmp.so"
        cmd = [
            # -fno-gnu-unique: the __shared__ arrays are static locals of templates, which
            # g++ would otherwise bind across every loaded build (geometries, dtype sets).
            cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-w", "-fno-gnu-unique",
            "-fvisibility=hidden",
            "-include", str(HERE / "emu_cuda.h"),
            f'-DCPPO_KERNEL_SOURCE="{kernel}"',
            *defines,
            str(HERE / "emu_main.cpp"), "-o", str(tmp),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, lib_path)
    return ctypes.CDLL(str(lib_path))


def build(geometry: dict, targs: tuple = (0, 0, 0, 4, 0)) -> ctypes.CDLL:
    """Compiles the kernels instantiated for one dtype set (`targs`, the template
    arguments of _cuda.kernel_name) once per geometry, dtype set and source version
    (cached on disk) and loads them."""
    targs_text = ", ".join(str(int(t)) for t in targs)
    key = tuple(sorted(geometry.items())) + (("CPPO_EMU_TARGS", targs_text),)
    if key in _LIBS:
        return _LIBS[key]
    lib = _compile(_cuda.KERNEL_PATH, [*[f"-D{k}={v}" for k, v in geometry.items()],
                                       f"-DCPPO_EMU_TARGS={targs_text}"], key)
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [
        ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong,
    ]
    lib.emu_args_size.restype = ctypes.c_ulong
    lib.emu_targs.restype = ctypes.c_char_p
    if lib.emu_args_size() != _cuda.args_layout().packer.size:
        raise RuntimeError("Args struct size differs between the .cu and the CUDA launcher's packing")
    _LIBS[key] = lib
    return lib


# ---------------------------------------------------------------------------------------
# The Top-K kernel (kernels/topk_logits.cu): the launcher's argument tuple (NumPy
# scalars, pointers as uint64) copied into the emulator's TopkArgs struct.


class _TopkArgs(ctypes.Structure):
    _fields_ = [
        ("logits", ctypes.c_uint64), ("n_rows", ctypes.c_int64), ("vocab", ctypes.c_int64),
        ("row_stride", ctypes.c_int64), ("temp", ctypes.c_double), ("c", ctypes.c_float), ("kind", ctypes.c_int32),
        ("k", ctypes.c_int32), ("topk_ids", ctypes.c_uint64), ("topk_old", ctypes.c_uint64),
        ("sampled_ids", ctypes.c_uint64), ("old_lp", ctypes.c_uint64), ("valid", ctypes.c_uint64),
        ("has_valid", ctypes.c_int32), ("out_div", ctypes.c_uint64), ("out_lp", ctypes.c_uint64),
        ("has_out_lp", ctypes.c_int32), ("out_topk_lp", ctypes.c_uint64), ("has_out_topk_lp", ctypes.c_int32),
        ("error", ctypes.c_uint64), ("row_base", ctypes.c_int64),
    ]


def build_topk() -> ctypes.CDLL:
    from cppo_native._backends.cuda import topk as _topk

    key = ("topk",)
    if key not in _LIBS:
        lib = _compile(_topk.KERNEL_PATH, ["-DCPPO_EMU_TOPK"], key)
        lib.emu_topk_args_size.restype = ctypes.c_ulong
        lib.emu_topk_launch.restype = ctypes.c_int
        lib.emu_topk_launch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                        ctypes.POINTER(_TopkArgs), ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong]
        if lib.emu_topk_args_size() != ctypes.sizeof(_TopkArgs):
            raise RuntimeError("TopkArgs differs between emu_main.cpp and tests/cuda_emulator.py")
        _LIBS[key] = lib
    return _LIBS[key]


class EmuTopkLauncher:
    """topk._compute's launcher interface on the emulator (CPU torch tensors)."""

    stream = None

    def __init__(self):
        self.lib = build_topk()
        self.launches: list = []

    def scope(self):
        import contextlib

        return contextlib.nullcontext()

    def kernel(self, dt: int, vec: int):
        def launch(grid, block, args, shared_mem, stream):
            assert len(args) == len(_TopkArgs._fields_), len(args)
            packed = _TopkArgs(*[a.item() for a in args])
            self.launches.append((dt, vec, grid[0], block[0], shared_mem))
            err = ctypes.create_string_buffer(512)
            if self.lib.emu_topk_launch(dt, vec, grid[0], block[0], ctypes.byref(packed), shared_mem, err, len(err)):
                raise EmulatorError(err.value.decode())

        return launch


class EmulatorError(RuntimeError):
    pass


class EmuExecutor:
    """_cuda.run's executor interface on NumPy memory. New buffers are filled with
    garbage so that a position the kernels forget to write shows up in the results.
    Kernels are launched by name expression (``cppo_stats<1, 1, 1, 4, 1>``), like CuPy's
    RawModule functions; each dtype set is its own build."""

    def __init__(self, geometry: dict):
        self.geometry = geometry
        self.launches: list = []
        self.keep: list = []

    def empty(self, count: int, dtype: str):
        if dtype == "bool":
            arr = np.ones(count, dtype=np.bool_)
        elif dtype.startswith("float"):
            arr = np.full(count, np.nan, dtype=dtype)
        elif dtype == "uint8":
            arr = np.full(count, 0xCD, dtype=np.uint8)
        else:
            arr = np.full(count, 77, dtype=dtype)
        self.keep.append(arr)
        return arr

    def ptr(self, arr) -> int:
        return int(arr.ctypes.data)

    def astype(self, arr, dtype: str):
        out = np.ascontiguousarray(arr, dtype=dtype)
        self.keep.append(out)
        return out

    def launch(self, name: str, grid: int, block: int, packed_args: bytes) -> None:
        base, targs = name.split("<", 1)
        lib = build(self.geometry, tuple(int(t) for t in targs.rstrip(">").split(",")))
        self.launches.append((base, grid, block, name))
        err = ctypes.create_string_buffer(512)
        rc = lib.emu_launch(name.encode(), grid, block, packed_args, len(packed_args), err, len(err))
        if rc:
            raise EmulatorError(f"{name}: {err.value.decode()}")

    def read_u64(self, work, offset: int, count: int) -> np.ndarray:
        return work[offset:offset + 8 * count].view(np.uint64)

    def to_host(self, arr):
        return np.asarray(arr)


def emulated_mask(log_probs, old_log_probs, advantages, response_mask=None, *, geometry: Optional[dict] = None,
                  divergence=None, cu_seqlens=None, per_row_advantages=None, return_info=False, validate=True,
                  executor=None, row_offset=0, **knobs):
    """cppo_mask's contract computed by the emulated kernels (NumPy / torch CPU inputs)."""
    geometry = SMALL if geometry is None else geometry
    div_array = divergence_array(divergence)
    params = make_params(divergence=divergence, **knobs)
    prep = _prepare.prepare(log_probs, old_log_probs, advantages, response_mask, div_array, cu_seqlens,
                             per_row_advantages, convert=_arrays.to_numpy, widen_int_advantages=False)
    ex = executor if executor is not None else EmuExecutor(geometry)
    mask, reason, threshold, gate, row_budget, counts = _cuda.run(prep, params, return_info, validate, ex, geometry,
                                                                     row_offset=row_offset)
    shape = prep.shape
    if not return_info:
        return mask.reshape(shape)
    return mask.reshape(shape), dict(
        reason=reason.reshape(shape), threshold=threshold.reshape(shape), gate=gate.reshape(shape),
        row_budget=row_budget, reason_counts=counts,
    )
