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


# ---------------------------------------------------------------------------------------
# CUDA: the .cu defines its codes as enums and its knobs as fields of the Args struct.


def _cu_enums(source: str) -> dict:
    """{name: value} of every `enum { A = 0, B = 1, ... };` (implicit values counted)."""
    import re

    out = {}
    for body in re.findall(r"enum\s*\{([^}]*)\}", source):
        value = -1
        for item in body.split(","):
            item = item.split("//")[0].strip()
            if not item:
                continue
            name, _, given = item.partition("=")
            value = int(given.strip(), 0) if given.strip() else value + 1
            out[name.strip()] = value
    return out


def test_cuda_codes_and_knob_fields_agree_with_python():
    from dataclasses import fields

    from cppo_native._backends.cuda import instances, mask as cuda_mask
    from cppo_native._core.codes import REASON_CODES
    from cppo_native._core.params import KNOB_NAMES, MaskParams, make_params

    enums = _cu_enums(cuda_mask.kernel_source())
    reasons = ("INVALID", "KEPT_TOWARD_MU", "KEPT_WITHIN", "MASKED_TOKEN", "MASKED_PREFIX")
    assert {REASON_NAMES[enums[n]]: enums[n] for n in reasons} == REASON_CODES
    assert [enums[n] for n in reasons] == list(range(len(REASON_NAMES)))
    assert {m: enums["PW_" + m.upper()] for m in POSITION_WEIGHT_MODES} == POSITION_WEIGHT_MODES
    cu_div = {"binary_tv": "DIV_TV", "binary_kl": "DIV_KL", "given": "DIV_GIVEN"}
    assert {m: enums[cu_div[m]] for m in DIVERGENCE_MODES} == DIVERGENCE_MODES
    assert {name: enums["FIELD_" + name.upper()] for name, _ in FIELDS} == {n: i for i, (n, _) in enumerate(FIELDS)}
    assert {dt: enums[c] for dt, c in (("float64", "F64"), ("float32", "F32"), ("float16", "F16"))} \
        == instances._FLOAT_CODES
    assert (enums["BF16"], enums["F_NONE"]) == (instances._BF16, instances._F_NONE)
    assert {dt: enums[c] for dt, c in (("int64", "CU_I64"), ("int32", "CU_I32"), ("uint32", "CU_U32"))} \
        == {k: v for k, v in cuda_mask._OFFSET_CODES.items() if k != "uint64"}

    # Every knob reaches the kernels: each MaskParams field is an Args field, by name or
    # through the documented renaming, and the launch plan fills it from the knob.
    arg_names = set(cuda_mask.args_layout().names)
    assert tuple(f.name for f in fields(MaskParams)) == KNOB_NAMES
    for knob in KNOB_NAMES:
        assert cuda_mask.KNOB_ARG_NAMES.get(knob, knob) in arg_names, knob
    params = make_params(delta=0.2, delta_b=0.01, w_min=0.7, horizon=33, adaptive_budget=True, budget_quantile=0.8,
                         budget_scale=1.5, budget_ceiling=3.0, position_weight="shuffled", shuffle_seed=99,
                         prefix_budget=False, divergence="binary_kl")
    filled, _, _ = cuda_mask._knob_fields(params, True, 0)
    assert set(filled) <= arg_names
    expect = {f.name: getattr(params, f.name) for f in fields(MaskParams)}
    expect.update(position_weight=params.position_weight_code, divergence=params.divergence_code,
                  adaptive_budget=1, prefix_budget=0)
    for knob, value in expect.items():
        assert filled[cuda_mask.KNOB_ARG_NAMES.get(knob, knob)] == value, knob


def test_cuda_topk_field_codes_agree_with_python():
    from cppo_native._backends.cuda import topk as topk_cuda

    enums = _cu_enums(topk_cuda.KERNEL_PATH.read_text())
    names = ["TK_" + name.upper() for name, _ in TOPK_FIELDS] + ["TK_LOGITS", "TK_TOPK_IDS_RANGE",
                                                                 "TK_SAMPLED_IDS_RANGE"]
    assert [enums[n] for n in names] == list(range(len(topk_cuda.FIELDS)))
    assert [name for name, _ in topk_cuda.FIELDS[len(TOPK_FIELDS):]] == ["logits", "topk_ids", "sampled_ids"]
