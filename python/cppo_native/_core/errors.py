"""Error messages shared by every backend, so that all of them say the same thing."""

from __future__ import annotations

import numpy as np

# What each checked input must hold at valid positions; the index is the field code
# the native backends report (Rust core crate, CUDA `cppo_mask.cu`).
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


# Probability floor inside the Top-K KL's logarithms (same value in Rust `topk.rs`).
TOPK_EPS = 1e-12

# Field codes reported by the native backend (Rust `TopKField`), and their rules.
TOPK_FIELDS = (
    ("log_probs", "finite and <= 0"),
    ("old_log_probs", "finite and <= 0"),
    ("sampled_ids", ">= 0"),
    ("topk_ids", "distinct within a position (negative ids are padding)"),
    ("topk_old_log_probs", "<= 0 or -inf (not NaN)"),
    ("topk_log_probs", "<= 0 or -inf (not NaN)"),
)


def describe_position(shape: tuple, flat: int) -> str:
    idx = np.unravel_index(flat, shape) if shape else ()
    if len(shape) == 2:
        return f"(row {int(idx[0])}, column {int(idx[1])})"
    if len(shape) == 1:
        return f"(index {int(idx[0])})"
    return f"(position {tuple(int(i) for i in idx)})"


def topk_error(field: int, shape: tuple, position: int, slot: int, value: float) -> ValueError:
    name, rule = TOPK_FIELDS[field]
    where = describe_position(shape, position)
    if field >= 3:
        where += f", top-K slot {slot}"
    shown = int(value) if field in (2, 3) else value
    what = "duplicate id" if field == 3 else "value"
    return ValueError(f"{name} must be {rule} at valid positions; got {what} {shown!r} at {where}")


def binary_error(field: int, shape: tuple, position: int, value: float) -> ValueError:
    name, rule = FIELDS[field]
    return ValueError(f"{name} must be {rule} at valid positions; got {value!r} at {describe_position(shape, position)}")
