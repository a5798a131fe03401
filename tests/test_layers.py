"""The import rule of docs/architecture.md: every module imports only from its own layer or
lower ones, the numerical layers import no Dask or storage library, and no two modules import
each other (directly or through others).

The imports are read from the source with ``ast`` (those inside functions and under
``TYPE_CHECKING`` included), so a lazy import does not escape the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dtm"

#: Lowest first: a module may import from its own layer and the layers before it.
LAYERS = ["base", "physics", "search", "io", "config", "runtime", "programs", "cli"]
#: Modules of the base layer (everything else is named by its folder).
BASE = {"dtm", "dtm.errors", "dtm.backend", "dtm.schema"}
#: Libraries that the numerical layers never import: they run inside tasks and in tests
#: without a cluster, on numpy or cupy arrays alone.
NUMERICAL = {"physics", "search"}
HEAVY = {
    "dask",
    "distributed",
    "xarray",
    "zarr",
    "pandas",
    "pyarrow",
    "fsspec",
    "pydantic",
    "bokeh",
    "matplotlib",
}


def module_name(path: Path) -> str:
    """``dtm/io/mrc.py`` → ``dtm.io.mrc``; ``dtm/io/__init__.py`` → ``dtm.io``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = all_modules()


def layer(module: str) -> str | None:
    """The layer of a dtm module, or None when it is in none."""
    if module in BASE:
        return "base"
    if module == "dtm.cli":
        return "cli"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS[1:-1]:
        return parts[1]
    return None


def imports(module: str, source: str | None = None) -> list[tuple[str, int]]:
    """``(imported name, line)`` of every import of a module (dtm modules resolved to the
    module imported: ``from dtm.runtime import tasks`` → ``dtm.runtime.tasks``); ``source``:
    its text, by default read from its file."""
    path = MODULES.get(module, PACKAGE / "unnamed.py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in MODULES else source, node.lineno))
    return sorted(found, key=lambda item: item[1])


def dtm_imports(module: str, source: str | None = None) -> list[tuple[str, int]]:
    return [(n, line) for n, line in imports(module, source) if n.split(".")[0] == "dtm"]


def upward_imports(module: str, source: str | None = None) -> list[str]:
    """``file:line: module (layer) imports name (layer)`` for each import that breaks the rule."""
    own = LAYERS.index(layer(module) or "cli")
    wrong = []
    for name, line in dtm_imports(module, source):
        target = layer(name)
        if target is None or LAYERS.index(target) > own:
            where = module.replace(".", "/") + ".py"
            wrong.append(f"{where}:{line}: {module} ({layer(module)}) imports {name} ({target})")
    return wrong


def test_every_module_is_in_a_layer():
    assert [m for m in MODULES if layer(m) is None] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module):
    wrong = upward_imports(module)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in NUMERICAL))
def test_numerical_layers_use_no_dask_or_storage_library(module):
    wrong = [
        f"{module}:{line}: imports {name}"
        for name, line in imports(module)
        if name.split(".")[0] in HEAVY
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {m: {name for name, _ in dtm_imports(m) if name in MODULES} for m in MODULES}
    # A package imports its submodules by its own re-exports; importing one of them is no
    # cycle with it.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [module, target]))
            elif target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_the_rule_sees_lazy_and_relative_imports():
    """An import inside a function, under TYPE_CHECKING or relative is read and judged."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import mrc\n"
        "if TYPE_CHECKING:\n"
        "    from dtm.runtime.cluster import session\n"
        "def f():\n"
        "    from dtm.programs.peaks import repick\n"
        "    import dtm.cli\n"
        "    return repick\n"
    )
    wrong = upward_imports("dtm.io.results", source)
    assert [w.split(": ", 1)[1] for w in wrong] == [
        "dtm.io.results (io) imports dtm.runtime.cluster (runtime)",
        "dtm.io.results (io) imports dtm.programs.peaks (programs)",
        "dtm.io.results (io) imports dtm.cli (cli)",
    ]
    assert ("dtm.io.mrc", 2) in dtm_imports("dtm.io.results", source)
