"""Generate the configuration reference page from dtm's pydantic models.

Used as a mkdocs hook (``hooks:`` in ``mkdocs.yml``): :func:`on_files` adds the generated
page ``configuration.md`` to the site, so the reference never lags behind the models.
``python docs/gen_config_reference.py [OUT.md]`` prints (or writes) the same page.

Every section of the YAML file becomes a table of its keys with type, default and the
field's description (the attribute docstrings of :mod:`dtm.config`, which carry the units).
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dtm.config import MatchConfig, RefineConfig
from dtm.config.base import _existing_file

PAGE = "configuration.md"

_INTRO = """\
# Configuration reference

`dtm match` and `dtm refine` each read one YAML file. This page is generated from the
pydantic models in `dtm.config` when the documentation is built, so it lists exactly the
keys that the installed version accepts.

- **Unknown keys are errors**, reported with the file, the dotted key and the key it most
  resembles, e.g. `config.yaml: optics_group.pixelsize: unknown key (did you mean
  pixel_size?)`; `dtm` exits with status 2 and writes nothing. **Every problem of a file is
  reported at once**: one line for one problem, else a line `config.yaml: 3 problems:` with
  each problem on its own line below it.
- **Relative paths** in the file are resolved against the directory of the file (relative
  paths given on the command line, such as `--output-dir`, against the current directory).
  A **Leopard-EM file** resolves them as Leopard-EM does, from the working directory, so
  that it runs in dtm from the folder it runs from in Leopard-EM. A file is Leopard-EM's
  when it records `leopard_em_version` (Leopard-EM 1.3 writes it), or when it has every
  top-level key Leopard-EM requires and no key that only dtm knows (such as `output_dir`,
  `cluster` or `peaks`). If its input files (`micrograph_path`, `template_volume_path`,
  `particle_stack.df_path`) are not all found from the working directory but are from the
  file's folder, the file's folder is used instead. One folder serves every relative path of
  a file, outputs included (the default `output_dir`, `dtm-out`, too), and where the working
  directory is not the file's folder `dtm` prints which it used, e.g. `notice: relative
  paths are resolved from the working directory /data/run1, as Leopard-EM does (match.yaml
  is a Leopard-EM file: it records leopard_em_version '1.3.0')`.
- Keys marked *Leopard-EM; unused* exist so that a Leopard-EM file loads unchanged; when they
  are set to anything but their default, `dtm` prints a one-line notice and ignores them,
  `notice: KEY: accepted, has no effect in dtm (REASON; got VALUE)` (see
  [For Leopard-EM and cisTEM users](leopard-cistem.md)).
- `null` in the *default* column means "not set"; the description says what happens then.
- **The text is checked before the values**: a key given twice is an error naming both lines
  (`config.yaml: duplicate key 'output_dir' at lines 3 and 41; keep one`); YAML aliases
  (`*name`) are refused; a control character (newline, tab, NUL, ...) in any string or key,
  in the file, a micrograph table or on the command line, is an error naming the field
  (`config.yaml: cluster.account: control character \\n in a string`).
- **Search size** is checked from the configuration before anything is allocated: more than
  50 million orientations (`orientation_search_config.psi_step`, `theta_step`), more than
  1,000 defocus planes (`defocus_search_config.defocus_step`), more than 10¹² correlations
  in the whole run, a task that needs more memory than a worker has
  (`cluster.memory_limit`, else this machine's memory for a local cluster), or an MRC file
  whose header claims more data than the file holds or than memory allows, is a one-line
  error saying how large it is and which key to change.

Units: lengths in Å, angles in degrees, voltage in kV, spherical aberration in mm,
frequencies in cycles/pixel, unless a description says otherwise.
"""

_PRIMITIVES = {bool: "bool", int: "integer", float: "number", str: "text", Path: "path"}


def _anchor(program: str, model: type[BaseModel]) -> str:
    return f"{program}-{model.__name__.lower()}"


def _rst_to_markdown(text: str) -> str:
    """Docstrings use reStructuredText literals (````x````); Markdown wants `x`."""
    return text.replace("``", "`")


def _constraint(meta: Any) -> str | None:
    if isinstance(meta, FieldInfo):
        parts = [_constraint(inner) for inner in meta.metadata]
        return ", ".join(part for part in parts if part) or None
    symbols = {
        annotated_types.Gt: ("gt", ">"),
        annotated_types.Ge: ("ge", "≥"),
        annotated_types.Lt: ("lt", "<"),
        annotated_types.Le: ("le", "≤"),
    }
    for kind, (attr, symbol) in symbols.items():
        if isinstance(meta, kind):
            return f"{symbol} {getattr(meta, attr)}"
    if isinstance(meta, annotated_types.MinLen):
        return f"at least {meta.min_length} item{'s' * (meta.min_length > 1)}"
    if getattr(meta, "func", None) is _existing_file:
        return "existing file"
    return None


def _with_constraints(text: str, metadata: list[Any]) -> str:
    notes = [note for note in (_constraint(meta) for meta in metadata) if note]
    return f"{text} ({', '.join(notes)})" if notes else text


def format_type(annotation: Any, links: dict[type, str], metadata: Sequence[Any] = ()) -> str:
    """A short human-readable rendering of a field's type, with links to model sections."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return format_type(args[0], links, [*args[1:], *metadata])
    if origin in (typing.Union, types.UnionType):
        rendered = [format_type(arg, links) for arg in args if arg is not type(None)]
        text = " or ".join(rendered) + (" or null" if type(None) in args else "")
        return _with_constraints(text, list(metadata))
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in args)
    if origin is list:
        return _with_constraints(f"list of {format_type(args[0], links)}", list(metadata))
    if origin is tuple:
        return f"[{', '.join(format_type(arg, links) for arg in args)}]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        anchor = links.get(annotation)
        return f"[{annotation.__name__}](#{anchor})" if anchor else annotation.__name__
    name = _PRIMITIVES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return _with_constraints(name, list(metadata))


def format_default(field: FieldInfo) -> str:
    """The default as YAML, ``required`` when there is none."""
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        value = str(value)
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    return f"`{text}`"


def _cell(text: str) -> str:
    return _rst_to_markdown(" ".join(text.split())).replace("|", "\\|")


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models mentioned in a type, in order of appearance."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [model for model in _models_in(arg) if model not in found]
    return found


def _walk(
    model: type[BaseModel], program: str, dotted: str, links: dict[type, str]
) -> list[tuple[type[BaseModel], str]]:
    """Sections (model, dotted key) below ``model``, depth first; each model once."""
    sections = [(model, dotted)]
    links.setdefault(model, _anchor(program, model))
    for name, field in model.model_fields.items():
        key = f"{dotted}.{name}" if dotted else name
        origins = [typing.get_origin(field.annotation)]
        origins += [typing.get_origin(arg) for arg in typing.get_args(field.annotation)]
        if list in origins:
            key += "[i]"  # the section describes each item of a list
        for sub in _models_in(field.annotation):
            if sub not in links:
                sections += _walk(sub, program, key, links)
    return sections


def _section(model: type[BaseModel], program: str, dotted: str, links: dict[type, str]) -> str:
    title = f"`{dotted}` ({model.__name__})" if dotted else "Top level"
    lines = [f"### {title} {{#{links[model]}}}", ""]
    if dotted:
        lines += [_cell(model.__doc__ or ""), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        kind = format_type(field.annotation, links, field.metadata)
        description = _cell(field.description or "")
        lines.append(f"| `{name}` | {kind} | {format_default(field)} | {description} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole reference page (Markdown)."""
    parts = [_INTRO]
    links: dict[type, str] = {}
    for program, model in (("match", MatchConfig), ("refine", RefineConfig)):
        parts.append(f"\n## `dtm {program}` ({model.__name__}) {{#{program}}}\n\n")
        parts.append(_cell(model.__doc__ or "") + "\n")
        fields = [_models_in(field.annotation) for field in model.model_fields.values()]
        shared = [sub for subs in fields for sub in subs if sub in links]
        if shared:
            names = ", ".join(f"[{sub.__name__}](#{links[sub]})" for sub in shared)
            parts.append(f"\nSections shared with `dtm match` are described there: {names}.\n")
        for sub, dotted in _walk(model, program, "", links):
            parts.append("\n" + _section(sub, program, dotted, links))
    return "".join(parts)


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the generated ``configuration.md`` to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    page = render()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(page)
    else:
        sys.stdout.write(page)
