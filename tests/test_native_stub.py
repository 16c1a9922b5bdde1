"""The type stub of the private extension describes it exactly."""

from __future__ import annotations

import ast
import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import cppo_native._native as native
from cppo_native._core.params import make_params

STUB = os.path.join(os.path.dirname(native.__file__), "_native.pyi")

# stubtest type-checks the package around the stub; only the stub's own errors count.
MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = True

[mypy-cppo_native.*]
ignore_errors = True

[mypy-cppo_native._native]
ignore_errors = False
"""


def _stub_tree() -> ast.Module:
    with open(STUB) as fh:
        return ast.parse(fh.read())


def test_stub_matches_extension():
    tree = _stub_tree()
    declared = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")}
    exported = {n for n in dir(native) if callable(getattr(native, n)) and not n.startswith("_")}
    assert declared == exported


def test_stubtest(tmp_path):
    """mypy's stubtest compares every name, signature and default with the extension."""
    pytest.importorskip("mypy")
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_CONFIG)
    package_root = os.path.dirname(os.path.dirname(native.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(  # in tmp_path: mypy's cache goes there
        [sys.executable, "-m", "mypy.stubtest", "--mypy-config-file", str(ini), "cppo_native._native"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _params_protocol_attributes() -> list[str]:
    """The attributes the stub says ``cppo_mask_into`` reads from ``params``."""
    cls = next(n for n in _stub_tree().body if isinstance(n, ast.ClassDef) and n.name == "_MaskParams")
    return [n.name for n in cls.body if isinstance(n, ast.FunctionDef)]


def _mask_into(params) -> tuple:
    lp = np.full((2, 3), -0.5)
    return native.cppo_mask_into(
        lp, lp, np.ones(2), True, None, None, None, np.empty((2, 3), dtype=bool),
        None, None, None, None, params=params, num_threads=1,
    )


def test_params_are_read_by_exactly_the_stubs_attributes():
    names = _params_protocol_attributes()
    params = make_params(delta=0.15, delta_b=0.02)
    assert set(names) <= {f.name for f in dataclasses.fields(params)} | {"position_weight_code", "divergence_code"}
    full = types.SimpleNamespace(**{n: getattr(params, n) for n in names})
    assert _mask_into(full)[1] is None  # nothing beyond the stub's attributes is read
    for missing in names:
        partial = types.SimpleNamespace(**{n: getattr(params, n) for n in names if n != missing})
        with pytest.raises((TypeError, AttributeError), match=missing):
            _mask_into(partial)
