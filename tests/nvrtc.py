"""Compile CUDA source with NVRTC through ctypes (no GPU, no CuPy needed).

torch's CUDA wheels depend on NVIDIA's NVRTC package, so libnvrtc is usually present in
site-packages even on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re
import sys
from typing import Optional


def find_nvrtc() -> Optional[str]:
    """Path of a loadable libnvrtc, or None."""
    candidates = []
    if os.environ.get("CPPO_NVRTC_LIB"):
        candidates.append(os.environ["CPPO_NVRTC_LIB"])
    try:  # NVIDIA's own locator, installed with recent CUDA wheels
        from cuda.pathfinder import load_nvidia_dynamic_lib

        candidates.append(load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:
        pass
    for base in sys.path:
        for pattern in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/lib/nvrtc64*.dll", "nvidia/*/bin/nvrtc64*.dll"):
            candidates.extend(sorted(glob.glob(os.path.join(base, pattern)), reverse=True))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.extend(sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if path and "builtins" not in os.path.basename(path):
            try:
                ctypes.CDLL(path)
                return path
            except OSError:
                continue
    return None


class CompileError(RuntimeError):
    pass


# What CuPy 14.2 adds to a RawModule's `options` before calling NVRTC (cupy/_core/core.pyx
# assemble_cupy_compiler_options, cupy/cuda/compiler.py _compile_with_cache_cuda and
# _compile_using_nvrtc_no_warning): --std=c++17 unless a standard is given, include paths
# (CCCL, CuPy's headers, the CUDA headers; they cannot change the code of a source that
# includes nothing), then -ftz=true, -arch=sm_XX (a cubin) and
# --device-as-default-execution-space.
CUPY_14_2_SUFFIX = ("-ftz=true", "{arch}", "--device-as-default-execution-space")


def cupy_options(options, arch: str) -> list:
    """The NVRTC options CuPy 14.2 compiles `RawModule(code, options=options)` with, for
    `arch` ("sm_90"), include paths left out."""
    opts = list(options)
    if not any("-std=" in o for o in opts):
        opts.append("--std=c++17")
    return opts + [o.format(arch=f"-arch={arch}") for o in CUPY_14_2_SUFFIX]


class Compiled:
    def __init__(self, log: str, ptx: str, cubin: bytes, lowered: dict):
        self.log, self.ptx, self.cubin, self.lowered = log, ptx, cubin, lowered


def compile_program(lib_path: str, source: str, options, name_expressions=(), verbose=True,
                    filename: str = "kernel.cu") -> Compiled:
    """Compiles with exactly `options` (plus --ptxas-options=-v for the register report
    when `verbose`; it changes no code). Returns the log, the PTX, the cubin and the
    lowered names of `name_expressions`."""
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None)
    if rc != 0:
        raise CompileError(f"nvrtcCreateProgram failed ({rc})")
    try:
        for name in name_expressions:
            if lib.nvrtcAddNameExpression(prog, name.encode()) != 0:
                raise CompileError(f"nvrtcAddNameExpression failed for {name}")
        opts = list(options) + (["--ptxas-options=-v"] if verbose else [])
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        if rc != 0:
            raise CompileError(f"NVRTC failed ({rc}) with {opts}:\n{text}")
        ptx = ""
        if lib.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0 and size.value:
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, buf)
            ptx = buf.value.decode(errors="replace")
        cubin = b""
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == 0 and size.value:
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw[: size.value]
        lowered = {}
        for name in name_expressions:
            out = ctypes.c_char_p()
            if lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0:
                lowered[name] = out.value.decode()
        return Compiled(text, ptx, cubin, lowered)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_source(lib_path: str, source: str, arch: str, options=()) -> str:
    """Compiles to a cubin for `arch` (e.g. "sm_90"); returns NVRTC's log (with ptxas -v)."""
    out = compile_program(lib_path, source, [f"--gpu-architecture={arch}", *options])
    if not out.cubin:
        raise CompileError(f"NVRTC produced no cubin for {arch}")
    return out.log


def ptx_function(ptx: str, mangled: str) -> str:
    """The body of one .entry in a PTX module."""
    start = ptx.find(f".entry {mangled}(")
    if start < 0:
        raise KeyError(mangled)
    end = ptx.find("\n}\n", start)
    return ptx[start:end if end >= 0 else len(ptx)]


def flush_to_zero_conversions(ptx: str) -> list:
    """PTX lines that widen float32 with flush-to-zero (cvt.ftz.f64.f32) or use any .ftz
    float32 instruction."""
    return [line.strip() for line in ptx.splitlines() if re.search(r"\.ftz\b", line) or "cvt.f64.f32" in line]


def version(lib_path: str) -> tuple:
    lib = ctypes.CDLL(lib_path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def spills(log: str) -> dict:
    """{kernel: spill-store bytes} from a ptxas -v log."""
    out, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current:
            out[current] = int(m.group(1))
    return out
