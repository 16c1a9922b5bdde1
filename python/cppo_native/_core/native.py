"""The compiled Rust extension ``cppo_native._native``, or a clear error saying how to
build it (never a silent fallback to slower code)."""

from __future__ import annotations

try:
    from .. import _native
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _native = None
    _IMPORT_ERROR = exc


def native_module():
    """The compiled extension, or an ImportError saying how to get it."""
    if _native is None:
        raise ImportError(
            "cppo_native's Rust extension (cppo_native._native) is not built or failed to load "
            f"({_IMPORT_ERROR}). Build and install it from a checkout with `pip install .` (needs a "
            "Rust toolchain) or install a built wheel. The NumPy reference "
            "cppo_native.reference.cppo_mask_reference is available but is not used as a silent fallback."
        )
    return _native
