"""Detector curves (MTF, DQE) as a function of spatial frequency, from STAR or text files.

A RELION MTF file (the format of RELION's, Gatan's and ttsim3d's curves): a STAR loop with
``_rlnResolutionInversePixel`` (cycles/pixel, 0 to 0.5) and one value column
(``_rlnMtfValue``, or any other). A plain text file: two numeric columns, frequency then
value, separated by spaces, tabs or commas; ``#`` starts a comment.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dtm.errors import InputError

FREQUENCY_LABEL = "rlnResolutionInversePixel"


def read_curve(path: str | os.PathLike[str], what: str = "curve") -> tuple[np.ndarray, np.ndarray]:
    """Read a detector curve.

    Parameters
    ----------
    path
        STAR or text file (see the module).
    what
        Its name in error messages (``--mtf``, ``template_simulation.mtf_path``).

    Returns
    -------
    frequencies, values : numpy.ndarray
        float64 ``(m,)``; frequencies increasing, in cycles/pixel.

    Raises
    ------
    InputError
        Unreadable file, fewer than two points, frequencies not increasing or outside
        [0, 1], values negative or not finite.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot read ({exc})") from None
    table = _star_columns(path) if "loop_" in text else _text_columns(path)
    if table is None:
        raise InputError(
            f"{what} {path}: expected a STAR loop with _{FREQUENCY_LABEL} and a value column, "
            "or two numeric columns (frequency in cycles/pixel, value)"
        )
    frequencies, values = table
    problem = None
    if len(frequencies) < 2:
        problem = "fewer than two points"
    elif not (np.isfinite(frequencies).all() and np.isfinite(values).all()):
        problem = "a value is not a finite number"
    elif (np.diff(frequencies) <= 0).any():
        problem = "frequencies do not increase"
    elif frequencies[0] < 0 or frequencies[-1] > 1:
        problem = "frequencies must lie in [0, 1] cycles/pixel"
    elif (values < 0).any():
        problem = "negative values"
    if problem:
        raise InputError(f"{what} {path}: {problem}")
    return frequencies, values


def _star_columns(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The frequency column and the first other column of the first STAR loop holding it."""
    import starfile  # noqa: PLC0415 (only for STAR curves)

    try:
        blocks = starfile.read(path, always_dict=True)
    except (OSError, ValueError, KeyError):
        return None
    for block in blocks.values():
        columns = list(getattr(block, "columns", []))
        if FREQUENCY_LABEL in columns and len(columns) >= 2:
            value = next(c for c in columns if c != FREQUENCY_LABEL)
            try:
                return (
                    block[FREQUENCY_LABEL].to_numpy(dtype=np.float64),
                    block[value].to_numpy(dtype=np.float64),
                )
            except (TypeError, ValueError):
                return None
    return None


def _text_columns(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        table = np.loadtxt(path, comments="#", ndmin=2)
    except ValueError:
        try:
            table = np.loadtxt(path, delimiter=",", comments="#", ndmin=2)
        except ValueError:
            return None
    if table.shape[1] != 2:
        return None
    return table[:, 0], table[:, 1]
