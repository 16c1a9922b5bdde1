"""Integer codes shared with the native backends, defined once for Python.

Rust defines them once in the core crate (exported as ``_native.codes()``) and CUDA once
in ``cppo_mask.cu``; ``tests/test_codes.py`` checks the three agree.
"""

from __future__ import annotations

# Reason codes, one per position (docs/semantics.md, "Reason codes").
INVALID, KEPT_TOWARD_MU, KEPT_WITHIN_THRESHOLD, MASKED_TOKEN_THRESHOLD, MASKED_PREFIX_BUDGET = 0, 1, 2, 3, 4
REASON_NAMES = (
    "invalid",
    "kept_toward_mu",
    "kept_within_threshold",
    "masked_token_threshold",
    "masked_prefix_budget",
)
REASON_CODES = {name: code for code, name in enumerate(REASON_NAMES)}

# Position-weight modes and divergence modes (how the backends read MaskParams).
POSITION_WEIGHT_MODES = {"linear": 0, "none": 1, "shuffled": 2}
DIVERGENCE_MODES = {"binary_tv": 0, "binary_kl": 1, "given": 2}
