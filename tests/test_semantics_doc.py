"""The numbers printed in docs/semantics.md against the NumPy reference.

Each example in the page sits between ``<!-- checked: NAME -->`` and ``<!-- /checked -->``:
an ``Inputs: `...` `` line (keyword arguments) and a Markdown table. Every number in
a table must equal the reference's to 1e-12 (the rounded columns ``x_t`` and ``gate``:
to half a unit of their last printed digit), so the page cannot drift from the code.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import numpy as np
import pytest

try:
    from cppo_native.reference import cppo_mask_reference
except ImportError:  # the reference moved inside the package; the public name stays
    from cppo_native import cppo_mask_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "semantics.md"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ROUNDED = {"x_t", "gate"}  # printed to 4 decimals; every other number is exact


def _section(name: str) -> tuple[dict, list[dict]]:
    """(keyword arguments, table rows as {header: cell}) of one checked example."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- checked: {re.escape(name)} -->\n(.*?)<!-- /checked -->", text, re.S)
    assert match, f"no checked example {name!r} in {DOC}"
    body = match.group(1)
    inputs = re.search(r"^Inputs: `([^`]*)`", body, re.M)
    assert inputs, f"example {name!r} has no Inputs line"
    call = ast.parse(f"f({inputs.group(1)})", mode="eval").body
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    lines = [ln.strip() for ln in body.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, rows = cells[0], [r for r in cells[2:]]  # cells[1] is the --- separator
    assert all(len(r) == len(header) for r in rows)
    return kwargs, [dict(zip(header, r)) for r in rows]


def _numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell)


def _close(printed: str, actual: float, what: str, rounded: bool = False) -> None:
    """``actual`` equals ``printed`` to 1e-12, or rounds to it when ``rounded``."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    tol = (0.5 * 10.0 ** -decimals if rounded else 0.0) + 1e-12
    assert abs(float(printed) - actual) <= tol, f"{what}: the doc says {printed}, the reference gives {actual!r}"


def _one_row(name: str):
    kwargs, rows = _section(name)
    adv = kwargs.pop("advantages")
    d = np.array([[float(_numbers(r["D_t"])[0]) for r in rows]])
    n = d.shape[1]
    # lp > lq everywhere, so the sign of the advantage decides the direction.
    ref = cppo_mask_reference(np.full((1, n), -1.0), np.full((1, n), -1.2), np.full(1, adv), None,
                              divergence=d, **kwargs)
    return kwargs, rows, d[0], ref


@pytest.mark.parametrize("name", ["worked-example", "worked-example-flipped"])
def test_worked_example_table(name):
    kwargs, rows, d, ref = _one_row(name)
    z = ref.weighted_divergence[0]
    w = z / d  # D > 0 here
    s_before = np.concatenate([[0.0], np.cumsum(z)[:-1]])
    w_before = np.concatenate([[0.0], np.cumsum(w)[:-1]])
    budget = ref.row_budget[0]
    x = np.maximum(z / kwargs["delta"], np.cumsum(z) / (kwargs["delta"] + budget * w_before))
    expected = {
        "t": np.arange(1, len(rows) + 1), "w_t": w, "Z_t": z, "W_{t-1}": w_before, "S_{t-1}": s_before,
        "c_t": ref.threshold[0], "x_t": x, "gate": ref.gate[0], "reason": ref.reason[0],
        "keep": ref.mask[0].astype(int),
    }
    checked = set()
    for i, row in enumerate(rows):
        for column, values in expected.items():
            if column in row:
                (printed,) = _numbers(row[column])
                _close(printed, float(values[i]), f"{name}, t = {i + 1}, {column}", rounded=column in ROUNDED)
                checked.add(column)
    assert {"c_t", "reason", "keep", "gate"} <= checked


def _supports(option: str) -> bool:
    return option in inspect.signature(cppo_mask_reference).parameters


@pytest.mark.parametrize("ceiling", [2, 5])
def test_adaptive_budget_table(ceiling):
    kwargs, rows = _section("adaptive-budget")
    column = f"row_budget, m = {ceiling}"
    assert column in rows[0]
    if ceiling != 2:  # 2 is the default: checkable without the knob
        if not _supports("budget_ceiling"):
            pytest.skip("cppo_mask_reference has no budget_ceiling argument yet")
        kwargs["budget_ceiling"] = ceiling
    values = [[float(v) for v in _numbers(r["D at valid positions"])] for r in rows]
    width = max(len(v) for v in values)
    d = np.zeros((len(rows), width))
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, v in enumerate(values):
        d[i, : len(v)] = v
        valid[i, : len(v)] = True
    ref = cppo_mask_reference(np.full(d.shape, -1.0), np.full(d.shape, -1.2), np.ones(len(rows)), valid,
                              divergence=d, **kwargs)
    for i, row in enumerate(rows):
        q = _numbers(row["Q_0.9(D)"])
        if values[i]:
            _close(q[0], float(np.quantile(values[i], kwargs["budget_quantile"])), f"row {i}, Q")
        else:
            assert not q
        printed = _numbers(row[column])[0]
        _close(printed, float(ref.row_budget[i]), f"row {i}, {column}")
