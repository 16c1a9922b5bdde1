"""Error messages shared by every backend, so that all of them say the same thing."""

from __future__ import annotations

# What each checked input must hold at valid positions; the index is the field code
# the native backends report (Rust `core.rs`, CUDA `cppo_mask.cu`).
FIELDS = (
    ("log_probs", "finite and <= 0"),
    ("old_log_probs", "finite and <= 0"),
    ("advantages", "finite"),
    ("divergence", "finite and >= 0"),
)

# Log-probs may exceed 0 by this much (rounding in the producer) before we complain.
LOG_PROB_TOLERANCE = 1e-6


def bad_value_error(field: int, row: int, column: int, value: float, flat: int | None = None) -> ValueError:
    name, rule = FIELDS[field]
    where = f"(row {row}, column {column})"
    if flat is not None:
        where = f"(row {row}, column {column}; flat index {flat})"
    return ValueError(f"{name} must be {rule} at valid positions; got {value!r} at {where}")
