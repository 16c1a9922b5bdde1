"""The type stub of the private extension lists exactly the functions it exports."""

from __future__ import annotations

import ast
import os

import cppo_native._native as native

STUB = os.path.join(os.path.dirname(native.__file__), "_native.pyi")


def test_stub_matches_extension():
    with open(STUB) as fh:
        tree = ast.parse(fh.read())
    declared = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    exported = {n for n in dir(native) if callable(getattr(native, n)) and not n.startswith("_")}
    assert declared == exported
