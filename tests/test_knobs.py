"""The knob table (``cppo_native._core.params.KNOBS``) is the one definition of every CPPO
hyper-parameter: every face that names knobs is derived from it or checked here."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path

import pytest

import cppo_native
from cppo_native._core import params as P
from cppo_native._core.params import KNOB_NAMES, KNOBS, REQUIRED, MaskParams, make_params

ROOT = Path(__file__).resolve().parents[1]


def _check_signature(fn, skip=()):
    sig = inspect.signature(fn)
    for k in KNOBS:
        if k.name in skip:
            continue
        assert k.name in sig.parameters, f"{fn.__qualname__} lacks knob {k.name}"
        param = sig.parameters[k.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, (fn.__qualname__, k.name)
        if k.required:
            assert param.default is inspect.Parameter.empty, f"{fn.__qualname__}: {k.name} must be required"
        else:
            assert param.default == k.default and type(param.default) is type(k.default), (
                f"{fn.__qualname__}: {k.name} defaults to {param.default!r}, the table says {k.default!r}"
            )


def test_table_is_complete_and_checks_its_defaults():
    assert len(set(KNOB_NAMES)) == len(KNOBS)
    assert [f.name for f in dataclasses.fields(MaskParams)] == list(KNOB_NAMES)
    for k in KNOBS:
        assert k.doc and k.rule, k.name
        value = k.paper if k.required else k.default
        assert value is not None or k.name == "divergence"
        k.check(k.name, value)  # every default passes its own check
    # Normalised defaults equal MaskParams' field defaults.
    p = make_params(delta=0.15, delta_b=0.02)
    for f in dataclasses.fields(MaskParams):
        if f.default is not dataclasses.MISSING:
            assert getattr(p, f.name) == f.default, f.name


def test_required_knobs_and_unknown_names():
    with pytest.raises(TypeError, match="delta is required"):
        make_params(delta_b=0.02)
    with pytest.raises(TypeError, match="unknown CPPO option.*budget_cieling"):
        make_params(delta=0.1, delta_b=0.0, budget_cieling=2)
    assert repr(REQUIRED) == "REQUIRED"


@pytest.mark.parametrize("name, bad, exc", [
    ("budget_ceiling", 0.5, ValueError), ("budget_ceiling", math.inf, ValueError),
    ("budget_ceiling", "2", TypeError), ("budget_ceiling", True, TypeError),
    ("horizon", 2**63, ValueError), ("divergence", "", ValueError), ("divergence", "given", ValueError),
])
def test_checks(name, bad, exc):
    with pytest.raises(exc, match=name):
        make_params(delta=0.15, delta_b=0.02, **{name: bad})


def test_public_signatures_follow_the_table():
    import cppo_native.torch as ct

    _check_signature(cppo_native.cppo_mask)
    _check_signature(cppo_native.cppo_mask_reference)
    _check_signature(ct.cppo_policy_loss)


def test_arrow_and_ray_take_the_tables_knobs():
    arrow = pytest.importorskip("cppo_native.arrow")
    assert arrow.knob_names() == KNOB_NAMES + ("num_threads",)
    with pytest.raises(ValueError, match="budget_ceiling must be >= 1"):
        arrow.validate_knobs(delta=0.15, delta_b=0.02, budget_ceiling=0.5)


def test_verl_keys_cover_the_table():
    cv = pytest.importorskip("cppo_native.integrations.verl")
    assert sorted(cv.VERL_KEYS.values()) == sorted(set(KNOB_NAMES) - {"delta"})  # delta is actor.clip_ratio
    fields = {f.name: f.default for f in dataclasses.fields(cv.CPPOPolicyLossConfig)}
    for key, name in cv.VERL_KEYS.items():
        assert key in fields, key
        assert fields[key] == cv.DEFAULTS[key], key
        table = P.knob(name)
        want = table.paper if table.required else table.default
        if name not in cv._DEFAULT_OVERRIDES:
            assert cv.DEFAULTS[key] == want, key
    # The documented differences, and nothing else.
    assert cv._DEFAULT_OVERRIDES == {"adaptive_budget": True, "divergence": "binary_tv"}


def test_versions_agree():
    cargo = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', cargo, re.M)
    assert m and m.group(1) == cppo_native.__version__


def test_cli_has_one_flag_per_knob():
    pytest.importorskip("pyarrow")
    from cppo_native import cli

    parser = cli.build_parser()
    dests = {a.dest: a for a in parser._actions}
    for k in KNOBS:
        assert k.name in dests, f"no CLI flag for knob {k.name}"
        assert k.flag in dests[k.name].option_strings or k.name == "prefix_budget", k.name
        want = k.paper if k.required else k.default
        if k.kind == "position_weight":
            want = {True: "linear", False: "none"}.get(want, want)
        assert dests[k.name].default == want, (k.name, dests[k.name].default, want)
    args = parser.parse_args(["--sample", "3", "--budget-ceiling", "5"])
    assert args.budget_ceiling == 5.0


def test_custom_op_takes_every_normalised_knob():
    pytest.importorskip("torch")
    from cppo_native import ops

    import torch

    assert ops is not None  # registers the op
    names = {a.name for a in torch.ops.cppo_native.mask.default._schema.arguments}
    for f in dataclasses.fields(MaskParams):
        assert f.name in names or f"{f.name}_mode" in names, f"custom op lacks {f.name}"
