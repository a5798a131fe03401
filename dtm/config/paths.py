"""Where the relative paths of a configuration file are resolved from.

dtm resolves them from the file's folder, so a configuration runs the same from anywhere;
Leopard-EM resolves them from the working directory. A Leopard-EM file
(:func:`dtm.config.leopard.leopard_file_reason`) follows Leopard-EM's rule, so that it runs
in dtm from the folder it runs from in Leopard-EM; if its input files are not all found
from the working directory but are from the file's folder, the file's folder is used. One
base serves every relative path of a file, outputs included; the notice says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm.config.leopard import Program, leopard_file_reason

#: Input files of a configuration: ``(section, key)``, section ``""`` for the top level.
_INPUTS = (
    ("", "micrograph_path"),
    ("", "template_volume_path"),
    ("", "micrograph_table"),
    ("particle_stack", "df_path"),
)


def relative_inputs(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``(dotted key, path)`` of every input file given by a relative path."""
    found = []
    for section, key in _INPUTS:
        node = data.get(section) if section else data
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            found.append((f"{section}.{key}" if section else key, value))
    entries = data.get("micrographs")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        value = entry.get("micrograph_path") if isinstance(entry, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            found.append((f"micrographs.{i}.micrograph_path", value))
    return found


def relative_base(data: dict[str, Any], path: Path, program: Program) -> tuple[Path, str | None]:
    """The folder that the relative paths of the configuration ``data`` (read from ``path``)
    are resolved from, and a one-line notice saying which (None where there is no choice).

    A dtm file: its folder. A Leopard-EM file: the working directory (Leopard-EM's rule)
    when every relative input file is found from there, else the file's folder when every
    one is found from there, else the working directory (whose missing file is then
    reported). Where the two folders are one, there is no choice and no notice.
    """
    folder, cwd = path.parent.absolute(), Path.cwd()
    reason = leopard_file_reason(data, program)
    if reason is None or folder.resolve() == cwd.resolve():
        return folder, None
    inputs = relative_inputs(data)
    missing_from_cwd = [(key, value) for key, value in inputs if not (cwd / value).exists()]
    if not missing_from_cwd or any(not (folder / value).exists() for _, value in inputs):
        return cwd, (
            f"relative paths are resolved from the working directory {cwd}, as Leopard-EM "
            f"does ({path.name} is a Leopard-EM file: {reason})"
        )
    key, value = missing_from_cwd[0]
    return folder, (
        f"relative paths are resolved from the configuration's folder {folder}: {path.name} "
        f"is a Leopard-EM file ({reason}), but its {key} {value} is not in the working "
        f"directory {cwd}"
    )
