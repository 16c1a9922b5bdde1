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


def compile_source(lib_path: str, source: str, arch: str, options=()) -> str:
    """Compiles to a cubin for `arch` (e.g. "sm_90"); returns NVRTC's log (with ptxas -v)."""
    lib = ctypes.CDLL(lib_path)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"cppo_mask.cu", 0, None, None)
    if rc != 0:
        raise CompileError(f"nvrtcCreateProgram failed ({rc})")
    try:
        opts = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *options]
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace")
        if rc != 0:
            raise CompileError(f"NVRTC failed for {arch} ({rc}):\n{text}")
        cubin_size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin_size)) != 0 or cubin_size.value == 0:
            raise CompileError(f"NVRTC produced no cubin for {arch}")
        return text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


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
