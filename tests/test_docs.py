"""The documentation site: it builds with warnings as errors, and it keeps up with the code.

The configuration reference is generated from the pydantic models by a mkdocs hook; the
hand-written pages are checked against the models (Leopard-EM keys), the table columns and
the command-line parser, so that a renamed key, column or flag fails here.
"""

from __future__ import annotations

import argparse
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from dtm.cli import build_parser
from dtm.config import MatchConfig, RefineConfig
from dtm.io.tables import PEAK_COLUMNS

pytest.importorskip("mkdocs")
pytest.importorskip("material")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [
    "index",
    "quickstart",
    "tutorial",
    "configuration",
    "from-a-model",
    "outputs",
    "conventions",
    "many-micrographs",
    "deployment",
    "leopard-cistem",
    "performance",
    "architecture",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={"NO_MKDOCS_2_WARNING": "1", **__import__("os").environ},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _text(site: Path, page: str) -> str:
    return html.unescape((site / page / "index.html").read_text())


def _models(model: type[BaseModel], seen: list[type[BaseModel]]) -> list[type[BaseModel]]:
    """Every model reachable from ``model`` through its fields (the sections of the YAML)."""

    def walk(annotation: object) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.append(annotation)
                for field in annotation.model_fields.values():
                    walk(field.annotation)
        for arg in getattr(annotation, "__args__", ()):
            walk(arg)
        for meta in getattr(annotation, "__metadata__", ()):
            walk(meta)

    walk(model)
    return seen


def test_site_builds_with_every_page(site: Path) -> None:
    for page in PAGES:
        path = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert path.is_file(), f"page {page} missing from the built site"
    assert not list(site.rglob("*.py")), "the hook script must not be published"


_ROW = re.compile(r"<td><code>(\w+)</code></td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>\s*<td>(.*?)</td>")


def _sections(page: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    """Model name (lower case) → its table: key → (type, default, description), as HTML."""
    parts = re.split(r'<h3 id="(?:match|refine)-(\w+)"', page)
    return {
        name: {
            m.group(1): (m.group(2), m.group(3), m.group(4))
            for m in _ROW.finditer(body.split("<h2")[0])
        }
        for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


def test_configuration_reference_lists_every_key(site: Path) -> None:
    sections = _sections(_text(site, "configuration"))
    models = _models(RefineConfig, _models(MatchConfig, []))
    assert len(models) > 15
    for model in models:
        table = sections.get(model.__name__.lower())
        assert table is not None, f"no section for {model.__name__}"
        assert list(table) == list(model.model_fields), model.__name__
        for name, field in model.model_fields.items():
            assert ("required" in table[name][1]) == field.is_required(), f"{model.__name__}.{name}"


def test_configuration_reference_shows_defaults_types_and_units(site: Path) -> None:
    sections = _sections(_text(site, "configuration"))
    kind, default, description = sections["opticsgroup"]["pixel_size"]
    assert kind == "number (&gt; 0)" or kind == "number (> 0)"
    assert "required" in default and "Å" in description
    assert "kV" in sections["opticsgroup"]["voltage"][2]
    assert sections["opticsgroup"]["spherical_aberration"][1] == "<code>2.7</code>"
    assert sections["orientationsearchconfig"]["psi_step"][1] == "<code>1.5</code>"
    assert "degrees" in sections["orientationsearchconfig"]["psi_step"][2]
    assert sections["defocussearchconfig"]["defocus_step"][1] == "<code>200.0</code>"
    assert sections["defocusrefinementconfig"]["defocus_step"][1] == "<code>20.0</code>"
    mode = sections["matchconfig"]["correlation_mode"]
    assert "<code>valid</code>" in mode[0] and "<code>same</code>" in mode[0]
    assert mode[1] == "<code>valid</code>"
    # a nested section is linked from its parent's row
    assert 'href="#match-opticsgroup"' in sections["matchconfig"]["optics_group"][0]


def test_leopard_page_names_every_ignored_key(site: Path) -> None:
    page = _text(site, "leopard-cistem")
    for model in _models(RefineConfig, _models(MatchConfig, [])):
        for name in getattr(model, "leopard_unused", ()):
            assert f"<code>{name}</code>" in page, f"{model.__name__}.{name} not documented"


def test_outputs_page_lists_every_table_column(site: Path) -> None:
    from dtm.programs.refine import REFINED_DTYPES

    page = _text(site, "outputs")
    for column in [*PEAK_COLUMNS, *REFINED_DTYPES]:
        assert f"<code>{column}</code>" in page, f"column {column} not documented"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_documented_command_lines_use_existing_options() -> None:
    commands = _subcommands()
    found = 0
    for path in DOCS.glob("*.md"):
        for match in re.finditer(r"\bdtm (\w+)\b([^\n`|]*)", path.read_text()):
            command, rest = match.group(1), match.group(2)
            if command not in commands:
                continue
            options = {s for a in commands[command]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                found += 1
                assert flag in options, f"{path.name}: dtm {command} has no option {flag}"
    assert found >= 10  # the pages do show command lines with options
