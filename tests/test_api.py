"""The top-level API: every exported name resolves, and the stub that type checkers read
names exactly the same ones."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
from pathlib import Path

import dtm


def test_every_exported_name_resolves():
    for name in dtm.__all__:
        value = getattr(dtm, name)
        assert value is not None, name
        if name != "__version__":
            assert callable(value), name
            # Loaded from the module that defines it, not a copy.
            assert inspect.getmodule(value).__name__.startswith("dtm."), name
    assert sorted(dir(dtm)) == sorted(dtm.__all__)


def test_unknown_names_raise_attribute_error():
    try:
        dtm.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("dtm.no_such_name resolved")


def test_the_stub_names_every_export_from_its_module():
    stub = Path(dtm.__file__).with_suffix(".pyi")
    tree = ast.parse(stub.read_text())
    imported = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    annotated = {
        node.target.id
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    assert set(imported) | (annotated - {"__all__"}) == set(dtm.__all__)
    # Each name comes from where the lazy loader takes it.
    for name, module in imported.items():
        assert getattr(importlib.import_module(module), name) is getattr(dtm, name), name


def test_version_is_the_installed_package_metadata():
    assert dtm.__version__ == importlib.metadata.version("dtm")
    assert dtm.__version__[0].isdigit()
