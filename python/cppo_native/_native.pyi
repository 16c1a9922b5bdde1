"""The Rust extension (private). Called by ``cppo_native._backends.cpu`` and
``divergence`` (the mask and divergences) and by ``cppo_native._io.parquet.append`` /
``.read`` (Parquet pages).

Inputs are NumPy arrays of native byte order: float64/float32/float16, or int16 holding
bfloat16 bit patterns, for the float inputs; bool/uint8/int8/int32/int64/float32/float64
for ``valid``. Outputs are fresh C-contiguous arrays that the call fills. Parameters are
validated by ``cppo_native._core.params``. The GIL is released while computing. A
thread pool that cannot start (``num_threads`` threads, or one per core for 0) raises
RuntimeError naming ``num_threads``.
"""

from typing import Dict, List, Optional, Protocol, Tuple, final

import numpy as np

class _MaskParams(Protocol):
    """What ``cppo_mask_into`` reads from ``params`` (by attribute): the fields of
    ``cppo_native._core.params.MaskParams`` and its two code properties."""

    @property
    def delta(self) -> float: ...
    @property
    def delta_b(self) -> float: ...
    @property
    def w_min(self) -> float: ...
    @property
    def horizon(self) -> int: ...  # 0: "sequence"
    @property
    def adaptive_budget(self) -> bool: ...
    @property
    def budget_quantile(self) -> float: ...
    @property
    def budget_scale(self) -> float: ...
    @property
    def budget_ceiling(self) -> float: ...
    @property
    def position_weight_code(self) -> int: ...  # codes()["position_weight"]
    @property
    def shuffle_seed(self) -> int: ...
    @property
    def prefix_budget(self) -> bool: ...
    @property
    def divergence_code(self) -> int: ...  # codes()["divergence"]

__all__ = [
    "cppo_mask_into",
    "FastMask",
    "topk_divergence_into",
    "binary_divergence_into",
    "encode_parquet_pages",
    "decode_parquet_chunk",
    "codes",
    "memory_floor",
    "fp_control",
    "simd_variant",
    "__version__",
]

__version__: str

def codes() -> Dict[str, Dict[str, int]]:
    """Every integer code shared with the extension (defined once in Rust,
    ``rust/cppo-core/src/codes.rs``): ``{"reason": {"invalid": 0, ...},
    "position_weight": {...}, "divergence": {...}, "field": {...},
    "topk_field": {...}, "page_kind": {...}}``."""

def memory_floor(
    read: List[np.ndarray],
    copy_from: np.ndarray,
    copy_to: np.ndarray,
    *,
    num_threads: int,
) -> int:
    """Benchmark helper: one pass over the bytes the mask reads (``read``: contiguous
    1-D uint8 views of the inputs) and writes (``copy_from`` copied into ``copy_to``),
    on ``num_threads`` threads (0: all cores). Returns the OR of the words read."""

def fp_control(tokens: int, *, num_threads: int) -> float:
    """Benchmark helper (the compute control): ``tokens`` tokens' worth of independent
    fused multiply-adds in registers (no memory traffic) on ``num_threads`` threads (0:
    all cores). Returns a checksum, the same for any thread count."""

def simd_variant() -> str:
    """The row kernel's instruction-set variant: "portable", "avx2" or "avx512"."""

def cppo_mask_into(
    log_probs: np.ndarray,
    old_log_probs: np.ndarray,
    advantages: np.ndarray,
    advantage_per_row: bool,
    valid: Optional[np.ndarray],
    divergence: Optional[np.ndarray],
    cu_seqlens: Optional[np.ndarray],
    mask_out: np.ndarray,
    reason_out: Optional[np.ndarray],
    threshold_out: Optional[np.ndarray],
    gate_out: Optional[np.ndarray],
    row_budget_out: Optional[np.ndarray],
    *,
    params: _MaskParams,
    num_threads: int,
    row_offset: int = 0,
) -> Tuple[Tuple[int, int, int, int, int], Optional[Tuple[int, int, int, float]]]:
    """Fills the outputs; returns (positions per reason code, None or the first bad
    value as (field, row, column, value), ``row`` counted in this call).
    ``row_offset`` (uint64): the index of the call's first row in the whole input; the
    shuffled ablation seeds row r with ``shuffle_seed ^ (row_offset + r + 1) *
    0xD1B54A32D192ED03`` (wrapping)."""

@final
class FastMask:
    """The commonest call's mask with fixed parameters and thread count (0: all
    cores): NumPy ``ndarray`` inputs (not subclasses, native byte order), C-contiguous
    2-D float32/float64 log-probs of one dtype, float32/float64 advantages ``[B]`` or of
    the log-probs' shape, a mask of their shape (bool, uint8, int8, int32, int64,
    float32 or float64; nonzero is valid) or None. Returns ``(mask, bad)`` (``bad`` as
    ``cppo_mask_into``'s), or None for any other inputs."""

    def __new__(cls, params: _MaskParams, num_threads: int) -> FastMask: ...
    def __call__(
        self,
        log_probs: np.ndarray,
        old_log_probs: np.ndarray,
        advantages: np.ndarray,
        response_mask: Optional[np.ndarray],
    ) -> Optional[Tuple[np.ndarray, Optional[Tuple[int, int, int, float]]]]: ...

# Token divergences (rust/cppo-core/src/topk.rs; called by cppo_native.divergence). Per-position
# inputs are 1-D [N], top-K inputs 2-D [N, K] (any strides; ids int64/int32); `out` is
# a C-contiguous float64 [N] that the call fills (0 at invalid positions). Returns None
# or the first bad value as (field, position, slot, value), field codes as in
# cppo_native.divergence.TOPK_FIELDS (binary: 0 log_probs, 1 old_log_probs).

def topk_divergence_into(
    kind: str,  # "tv" | "kl"
    topk_ids: np.ndarray,
    topk_old_log_probs: np.ndarray,
    topk_log_probs: np.ndarray,
    sampled_ids: np.ndarray,
    old_log_probs: np.ndarray,
    log_probs: np.ndarray,
    valid: Optional[np.ndarray],
    out: np.ndarray,
    *,
    num_threads: int,
) -> Optional[Tuple[int, int, int, float]]: ...

def binary_divergence_into(
    kind: str,  # "tv" | "kl"
    log_probs: np.ndarray,
    old_log_probs: np.ndarray,
    valid: Optional[np.ndarray],
    out: np.ndarray,
    *,
    num_threads: int,
) -> Optional[Tuple[int, int, int, float]]: ...

def encode_parquet_pages(
    kind: str,  # "keep" | "codes" | "f64" | "f64_levels"
    rows: int,
    offsets: Optional[np.ndarray],  # int64 [rows + 1] from 0, or None: one value per row
    nulls: Optional[np.ndarray],  # bool [rows]
    codes: Optional[np.ndarray],  # int8 reason codes (keep, codes)
    values: Optional[np.ndarray],  # float64 (f64, f64_levels)
    max_rep: int,
    max_def: int,
    def_null: int,
    def_empty: int,
    def_present: int,
    page_values: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uncompressed v1 page bytes uint8, page ends int64, [pages * 3] int64: level
    entries, rows, present values per page). Raises ValueError on inconsistent shapes."""
    ...

def decode_parquet_chunk(
    kinds: List[int],  # 0 dictionary, 1 data v1, 2 data v2
    num_values: List[int],
    encodings: List[int],
    reps: List[np.ndarray],  # uint8 (v2 repetition levels; empty otherwise)
    defs: List[np.ndarray],  # uint8 (v2 definition levels; empty otherwise)
    bodies: List[np.ndarray],  # uint8, decompressed
    max_rep: int,
    max_def: int,
    def_present: int,
    def_empty: int,
    width: int,  # 4 or 8 bytes per value
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[str]]:
    """(values as little-endian bytes uint8, row offsets int64 [rows + 1], None), or
    (None, None, why) when the chunk needs something this decoder does not handle."""
    ...
