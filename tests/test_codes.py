"""Integer codes are defined once per language; the Rust ones (``_native.codes()``) and
the Python ones must agree."""

from __future__ import annotations

import cppo_native._native as native
from cppo_native import REASON_NAMES
from cppo_native._core.codes import DIVERGENCE_MODES, POSITION_WEIGHT_MODES
from cppo_native._core.errors import FIELDS, TOPK_FIELDS


def test_rust_and_python_codes_agree():
    codes = native.codes()
    assert codes["reason"] == {name: i for i, name in enumerate(REASON_NAMES)}
    assert codes["position_weight"] == POSITION_WEIGHT_MODES
    assert codes["divergence"] == DIVERGENCE_MODES
    assert codes["field"] == {name: i for i, (name, _) in enumerate(FIELDS)}
    assert codes["topk_field"] == {name: i for i, (name, _) in enumerate(TOPK_FIELDS)}
    assert codes["page_kind"] == {"dictionary": 0, "data_v1": 1, "data_v2": 2}
