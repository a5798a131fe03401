"""The micrographs to search: entries with their CTF fits, and CSV/STAR tables of them."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pydantic
from pydantic import model_validator

from dtm.config.base import (
    OutputPath,
    _Model,
    _Problem,
    check_strings,
    format_validation_error,
)
from dtm.errors import ConfigError


class MicrographEntry(_Model):
    """One micrograph with its CTF fit."""

    # Not checked here: a missing micrograph, like an unreadable one, is skipped and
    # reported when the run starts (refused with --strict).
    micrograph_path: OutputPath
    """Micrograph .mrc."""
    defocus_u: float
    """Defocus along the major axis, Å, underfocus positive."""
    defocus_v: float
    """Defocus along the minor axis, Å."""
    astigmatism_angle: float = 0.0
    """Astigmatism angle, degrees."""
    phase_shift: float | None = None
    """Phase shift, degrees (default: optics_group.phase_shift)."""
    name: str | None = None
    """Name of the micrograph in the results (default: the file name without extension)."""

    @model_validator(mode="after")
    def _default_name(self) -> MicrographEntry:
        if not self.name:
            stem = self.micrograph_path.stem
            problem = name_problem(stem)
            if problem is not None:
                raise _Problem(
                    f"{problem}; it comes from the file name: rename the file, or give a "
                    "name in a micrographs entry or table",
                    "name",
                    stem,
                )
            self.name = stem
        else:
            problem = name_problem(self.name)
            if problem is not None:
                raise _Problem(problem, "name", self.name)
        return self


#: Longest micrograph name: names become file names (``maps/NAME_mip.mrc``), zarr groups
#: and table cells.
MAX_NAME_LENGTH = 100
_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a micrograph, or None for a plain token: ASCII letters,
    digits and ``_ . + -``, not starting with ``.``, at most :data:`MAX_NAME_LENGTH`
    characters (it becomes a file name and a zarr group inside ``output_dir``)."""
    if not name:
        return "empty micrograph name"
    if len(name) > MAX_NAME_LENGTH:
        return f"micrograph name longer than {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(name):
        return (
            "a micrograph name may hold only letters, digits and _ . + - and may not start with ."
        )
    return None


def _duplicate_name(entries: list[MicrographEntry]) -> tuple[int, int] | None:
    """Indices (first, second) of the first repeated name, or None."""
    seen: dict[str | None, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in seen:
            return seen[entry.name], i
        seen[entry.name] = i
    return None


_TABLE_COLUMNS = {
    "micrograph_path": ("micrograph_path", "rlnmicrographname", "micrograph", "path", "filename"),
    "defocus_u": ("defocus_u", "rlndefocusu", "defocus_1", "defocusu"),
    "defocus_v": ("defocus_v", "rlndefocusv", "defocus_2", "defocusv"),
    "astigmatism_angle": ("astigmatism_angle", "rlndefocusangle", "defocus_angle", "astigmatism"),
    "phase_shift": ("phase_shift", "rlnphaseshift"),
    "name": ("name", "micrograph_name"),
}


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() != ".star":
        # sep=None sniffs comma, tab or spaces; text keeps names such as "001" intact
        return pd.read_csv(path, sep=None, engine="python", dtype=str)
    import starfile

    blocks = starfile.read(path, always_dict=True)
    tables = [block for block in blocks.values() if isinstance(block, pd.DataFrame)]
    if isinstance(blocks.get("micrographs"), pd.DataFrame):
        return blocks["micrographs"]
    with_names = [table for table in tables if "rlnMicrographName" in table.columns]
    return (with_names or tables or [pd.DataFrame()])[0]


def load_micrograph_table(path: str | Path) -> list[MicrographEntry]:
    """Read a table of micrographs and their CTF fits.

    Parameters
    ----------
    path
        CSV with columns ``micrograph_path``, ``defocus_u``, ``defocus_v`` (Å) and
        ``astigmatism_angle`` (degrees), optional ``phase_shift`` (degrees) and ``name``;
        or RELION STAR with ``rlnMicrographName``, ``rlnDefocusU``, ``rlnDefocusV``,
        ``rlnDefocusAngle``, optional ``rlnPhaseShift`` (block ``data_micrographs``, else the
        first block naming micrographs). Column names are case-insensitive; relative
        micrograph paths are resolved against the table's directory.

    Returns
    -------
    list[MicrographEntry]
        One entry per row, in table order.

    Raises
    ------
    ConfigError
        Unreadable or empty table, a missing column, a micrograph not found, duplicate names.
    """
    path = Path(path)
    try:
        frame = _read_table(path)
    except Exception as exc:  # any parser failure is the user's file
        raise ConfigError(f"{path}: cannot read the table: {exc}".replace("\n", " ")) from None
    by_lower_name = {str(column).lower(): column for column in frame.columns}
    columns = {}
    for name, aliases in _TABLE_COLUMNS.items():
        found = [by_lower_name[alias] for alias in aliases if alias in by_lower_name]
        if found:
            columns[name] = found[0]
        elif name not in ("phase_shift", "name"):
            raise ConfigError(f"{path}: missing column {name} (or {', '.join(aliases[1:])})")
    if frame.empty:
        raise ConfigError(f"{path}: the micrograph table has no rows")
    entries = []
    for row, record in enumerate(frame.to_dict("records"), start=1):
        data = {
            name: str(record[column]) if name in ("micrograph_path", "name") else record[column]
            for name, column in columns.items()
            if not pd.isna(record[column])
        }
        check_strings(data, f"{path}: row {row}")
        try:
            entries.append(MicrographEntry.model_validate(data, context={"base_dir": path.parent}))
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{path}: row {row}")) from None
    duplicate = _duplicate_name(entries)
    if duplicate:
        first, second = duplicate
        raise ConfigError(
            f"{path}: rows {first + 1} and {second + 1}: duplicate micrograph "
            f"name (got {entries[second].name!r})"
        )
    return entries
