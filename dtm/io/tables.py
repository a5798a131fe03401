"""Particle tables on disk: CSV, parquet (partitioned by micrograph) and RELION STAR.

The columns are those the users asked for (``docs/outputs.md``, "The peak table"), in their order,
followed by ``micrograph_name``, ``particle_index``, ``micrograph_pixel_size`` (the
micrograph file's pixel size: ``pixel_size`` and the positions are at the cropped sampling
of a search with ``high_resolution_limit``), ``detection_z`` (the detection statistic,
:mod:`dtm.search.detection`), ``neg_log_pvalue`` (−ln p of
:func:`dtm.search.metrics.pvalue_map`) and the columns Leopard-EM's ``ParticleStack`` also
requires (:data:`LEOPARD_DTYPES`: so that its refine, optimize and constrained-search programs
read dtm's tables unchanged); :data:`PEAK_DTYPES` gives their types (ints ``int64``, floats
``float64``, text the pandas string type). Extra columns (e.g. the ``refined_*`` columns of
refine-template) are carried through unchanged.

STAR export (:func:`to_star`) follows RELION's conventions:

- ``rlnCoordinateX/Y`` are the particle centre in pixels of the micrograph file
  (``pos_x_img``, ``pos_y_img``; after Fourier cropping ``pos_*_img_angstrom /
  micrograph_pixel_size``, rounded), and ``rlnMicrographPixelSize`` is that file's pixel
  size.
  RELION extracts a box of size n around ``round(coordinate)`` with its
  centre at index ``n // 2`` of 0-based image arrays, the same convention as dtm's.
- ``rlnAngleRot, rlnAngleTilt, rlnAnglePsi`` = dtm's ``phi, theta, psi`` without change.
  RELION's ``Euler_angles2matrix(rot, tilt, psi)`` is ``A = Rz(-psi) Ry(-tilt) Rz(-rot)``,
  i.e. the transpose of dtm's ``R = Rz(phi) Ry(theta) Rz(psi)``, and its projector samples
  the 3-D transform at ``A^T (kx, ky, 0) = R (kx, ky, 0)``: exactly dtm's central slice
  (conventions.md#orientations). No sign change or inversion is needed (the same holds
  for cisTEM/Leopard-EM).
- ``rlnDefocusU/V`` = ``defocus_u/v + relative_defocus`` (the particle's absolute defocus,
  Å), ``rlnDefocusAngle`` = ``astigmatism_angle``; optics per particle in the RELION 3.0
  style (``rlnVoltage`` kV, ``rlnSphericalAberration`` mm, ``rlnAmplitudeContrast``;
  RELION ≥ 3.1 converts such files on reading).
  ``rlnDetectorPixelSize`` is not written: RELION defines it in µm, with ``rlnMagnification``.
- ``rlnAutopickFigureOfMerit`` = ``scaled_mip``.

:func:`write_star` writes that block as ``data_particles`` and the full dtm table as
``data_dtm``, with floats in shortest round-trip form, so :func:`read_star` gets the dtm
table back exactly.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import starfile

from dtm.errors import InputError, OutputError
from dtm.io.atomic import check_inside, flush_to_disk, move_into_place, temporary_name
from dtm.io.leopard import drop_pandas_index, variance_column

_FLOAT = "float64"
_INT = "int64"
_STR = "str"

#: Column → dtype of the match-template table, in the user's order (docs/outputs.md).
SEED_DTYPES: dict[str, str] = {
    "mip": _FLOAT,
    "scaled_mip": _FLOAT,
    "correlation_mean": _FLOAT,
    "correlation_variance": _FLOAT,
    "total_correlations": _INT,
    "pos_x": _INT,
    "pos_y": _INT,
    "pos_x_img": _INT,
    "pos_y_img": _INT,
    "pos_x_img_angstrom": _FLOAT,
    "pos_y_img_angstrom": _FLOAT,
    "psi": _FLOAT,
    "theta": _FLOAT,
    "phi": _FLOAT,
    "relative_defocus": _FLOAT,
    "defocus_u": _FLOAT,
    "defocus_v": _FLOAT,
    "astigmatism_angle": _FLOAT,
    "pixel_size": _FLOAT,
    "voltage": _FLOAT,
    "spherical_aberration": _FLOAT,
    "amplitude_contrast_ratio": _FLOAT,
    "phase_shift": _FLOAT,
    "ctf_B_factor": _FLOAT,
    "micrograph_path": _STR,
    "template_path": _STR,
    "mip_path": _STR,
    "scaled_mip_path": _STR,
    "psi_path": _STR,
    "theta_path": _STR,
    "phi_path": _STR,
    "defocus_path": _STR,
    "correlation_average_path": _STR,
    "correlation_variance_path": _STR,
}

#: The columns that Leopard-EM's ``ParticleStack`` requires besides the seed's, with its
#: meanings: the pixel size the search used, and the CTF's aberrations and magnification
#: as compact JSON text (empty: none; ``dtm.physics.aberrations``).
LEOPARD_DTYPES: dict[str, str] = {
    "refined_pixel_size": _FLOAT,
    "even_zernikes": _STR,
    "odd_zernikes": _STR,
    "mag_matrix": _STR,
}

#: All columns of a dtm peak table → dtype: the seed's, then the micrograph and particle ids.
PEAK_DTYPES: dict[str, str] = {
    **SEED_DTYPES,
    "micrograph_name": _STR,
    "particle_index": _INT,
    "micrograph_pixel_size": _FLOAT,
    "detection_z": _FLOAT,
    "neg_log_pvalue": _FLOAT,
    **LEOPARD_DTYPES,
}

#: The ordered columns of a dtm peak table.
PEAK_COLUMNS: list[str] = list(PEAK_DTYPES)

_STRING_COLUMNS = [name for name, dtype in PEAK_DTYPES.items() if dtype == _STR]

#: dtm column → RELION label, for the columns copied as they are.
_STAR_COPIED = {
    "micrograph_path": "rlnMicrographName",
    "phi": "rlnAngleRot",
    "theta": "rlnAngleTilt",
    "psi": "rlnAnglePsi",
    "astigmatism_angle": "rlnDefocusAngle",
    "phase_shift": "rlnPhaseShift",
    "ctf_B_factor": "rlnCtfBfactor",
    "voltage": "rlnVoltage",
    "spherical_aberration": "rlnSphericalAberration",
    "amplitude_contrast_ratio": "rlnAmplitudeContrast",
    "scaled_mip": "rlnAutopickFigureOfMerit",
}

#: RELION label → dtm column, for reading a STAR file without a ``dtm`` block.
_FROM_STAR = {
    **{label: name for name, label in _STAR_COPIED.items()},
    "rlnCoordinateX": "pos_x_img",
    "rlnCoordinateY": "pos_y_img",
    "rlnDefocusU": "defocus_u",
    "rlnDefocusV": "defocus_v",
    "rlnMicrographPixelSize": "pixel_size",
}


def empty_peak_table() -> pd.DataFrame:
    """A peak table with no rows and the right columns and dtypes (dask ``meta``)."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in PEAK_DTYPES.items()})


def coerce_peak_dtypes(df: pd.DataFrame, *, source: str = "table") -> pd.DataFrame:
    """Cast the known columns of ``df`` to :data:`PEAK_DTYPES`; other columns are kept.

    Known columns come first, in :data:`PEAK_COLUMNS` order.

    Raises
    ------
    InputError
        A column cannot be cast (e.g. an integer column holds empty cells); ``source`` names
        the file in the message.
    """
    known = [name for name in PEAK_COLUMNS if name in df.columns]
    out = df[known + [name for name in df.columns if name not in PEAK_DTYPES]].copy()
    for name in known:
        try:
            if PEAK_DTYPES[name] == _STR:
                out[name] = out[name].fillna("").astype(_STR)
            else:
                out[name] = out[name].astype(PEAK_DTYPES[name])
        except (ValueError, TypeError) as error:
            raise InputError(
                f"{source}: column {name!r} cannot be read as {PEAK_DTYPES[name]} ({error})"
            ) from None
    return out.reset_index(drop=True)


def to_star(df: pd.DataFrame) -> pd.DataFrame:
    """The RELION particle block of a peak table (see the module docstring for the mapping).

    Parameters
    ----------
    df
        A peak table with the seed's columns.

    Returns
    -------
    pandas.DataFrame
        One row per particle, ``rln*`` columns.
    """
    needed = [*_STAR_COPIED, "pos_x_img", "pos_y_img", "defocus_u", "defocus_v", "pixel_size"]
    needed += ["pos_x_img_angstrom", "pos_y_img_angstrom"]
    missing = [name for name in needed if name not in df]
    if missing:
        raise InputError(f"STAR export: the table lacks column(s) {', '.join(missing)}")
    column = {name: df[name].to_numpy() for name in df.columns}
    # Tables written before the column existed hold positions at the micrograph's sampling.
    file_pixel = column.get("micrograph_pixel_size", column["pixel_size"])
    searched_there = column["pixel_size"] == file_pixel

    def in_file_pixels(axis: str) -> np.ndarray:
        # After cropping, from the physical position: exact whatever the cropped sizes.
        physical = np.rint(column[f"pos_{axis}_img_angstrom"] / file_pixel)
        return np.where(searched_there, column[f"pos_{axis}_img"], physical).astype(np.int64)

    relative = column.get("relative_defocus", 0.0)
    copied = {label: column[name] for name, label in _STAR_COPIED.items()}
    star = {
        "rlnMicrographName": copied.pop("rlnMicrographName"),
        "rlnCoordinateX": in_file_pixels("x"),
        "rlnCoordinateY": in_file_pixels("y"),
        **copied,
        "rlnDefocusU": column["defocus_u"] + relative,
        "rlnDefocusV": column["defocus_v"] + relative,
        "rlnMicrographPixelSize": file_pixel,
    }
    return pd.DataFrame(star)


def _shortest_floats(df: pd.DataFrame) -> pd.DataFrame:
    """Floats as their shortest round-trip text, so STAR keeps every digit (and no more)."""
    out = df.copy()
    for name in out.columns:
        if pd.api.types.is_float_dtype(out[name]):
            out[name] = [repr(float(value)) for value in out[name]]
    return out


def write_star(df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``data_particles`` (RELION labels) and ``data_dtm`` (the full table) to ``path``."""
    blocks = {"particles": _shortest_floats(to_star(df)), "dtm": _shortest_floats(df)}
    starfile.write(blocks, Path(path))


def read_star(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a STAR file written by :func:`write_star` (or a plain RELION particle file).

    The ``dtm`` block is returned as is, with :data:`PEAK_DTYPES`. Without one, the
    ``rln*`` columns are mapped back to dtm names (absolute defocus in ``defocus_u/v``,
    ``relative_defocus`` 0); the other seed columns are then absent.
    """
    path = Path(path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable STAR file ({error})") from None
    if "dtm" in blocks:
        return coerce_peak_dtypes(pd.DataFrame(blocks["dtm"]), source=str(path))
    particles = blocks.get("particles", next(iter(blocks.values()), None))
    if not isinstance(particles, pd.DataFrame):
        raise InputError(f"{path}: no particle table (loop_ block) in this STAR file")
    present = [label for label in _FROM_STAR if label in particles]
    table = particles[present].rename(columns=_FROM_STAR)
    table = table.assign(relative_defocus=0.0)
    return coerce_peak_dtypes(table, source=str(path))


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    if df.empty:
        # pyarrow writes no file for an empty partitioned table; keep the schema readable.
        path.mkdir()
        df.to_parquet(path / "part-0.parquet", index=False)
    else:
        df.to_parquet(path, index=False, partition_cols=["micrograph_name"])


def write_table(
    df: pd.DataFrame | dd.DataFrame, directory: str | os.PathLike[str], stem: str = "peaks"
) -> dict[str, Path]:
    """Write a peak table as CSV, parquet (partitioned by micrograph) and STAR.

    Everything is written under temporary names first and renamed into place only when all
    three succeeded, so an error leaves earlier tables untouched. A dask dataframe is
    computed once (peak tables are small; computing per format would pick peaks three times).

    Parameters
    ----------
    df
        Peak table (pandas or dask) with at least ``micrograph_name``.
    directory
        Output directory (created if missing).
    stem
        File name stem: ``STEM.csv``, ``STEM.parquet/``, ``STEM.star``.

    Returns
    -------
    dict of str to Path
        ``{"csv": ..., "parquet": ..., "star": ...}``.
    """
    table = df.compute() if isinstance(df, dd.DataFrame) else df
    table = coerce_peak_dtypes(table)
    directory = Path(directory)
    writers: dict[str, tuple[str, Callable[[pd.DataFrame, Path], Any]]] = {
        "csv": (".csv", lambda t, p: t.to_csv(p, index=False)),
        "parquet": (".parquet", _write_parquet),
        "star": (".star", write_star),
    }
    finals = {kind: directory / f"{stem}{suffix}" for kind, (suffix, _) in writers.items()}
    temporaries = {
        kind: temporary_name(check_inside(path, directory)) for kind, path in finals.items()
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for kind, (_, write) in writers.items():
            write(table, temporaries[kind])
            flush_to_disk(temporaries[kind])
        for kind, final in finals.items():
            move_into_place(temporaries[kind], final)
    except OSError as error:
        raise OutputError(f"{directory}: cannot write the {stem} tables ({error})") from None
    finally:
        for temporary in temporaries.values():
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            elif temporary.exists():
                temporary.unlink()
    return finals


def _read_parquet(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path)
    # A partition column comes back categorical and last: restore type and a stable order.
    table["micrograph_name"] = table["micrograph_name"].astype(_STR)
    order = [name for name in ("micrograph_name", "particle_index") if name in table]
    return table.sort_values(order, kind="stable")


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a peak table from CSV, parquet (file or partitioned directory) or STAR.

    Parameters
    ----------
    path
        ``*.csv``, ``*.parquet`` (file or directory) or ``*.star``.

    Returns
    -------
    pandas.DataFrame
        Columns in :data:`PEAK_COLUMNS` order with :data:`PEAK_DTYPES`, extra columns after.
        ``micrograph_name`` (micrograph file stem) and ``particle_index`` (row number within
        the micrograph) are added when absent, e.g. for a Leopard-EM table, and
        ``refined_pixel_size`` (= ``pixel_size``) for tables written before it; the unnamed
        index column of a Leopard-EM CSV is dropped. ``correlation_variance`` is the
        variance: a standard deviation (Leopard-EM's column of that name) is squared
        (:func:`dtm.io.leopard.variance_column`), and ``attrs[STD_READ]`` says so.

    Raises
    ------
    InputError
        Missing file, unknown format, unreadable content or missing seed columns.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: particle table not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            numeric = [name for name, dtype in PEAK_DTYPES.items() if dtype != _STR]
            table = pd.read_csv(
                path,
                dtype={name: _STR for name in _STRING_COLUMNS},
                keep_default_na=False,
                na_values={name: ["", "nan", "NaN"] for name in numeric},
            )
        elif suffix == ".parquet":
            table = _read_parquet(path)
        elif suffix == ".star":
            table = read_star(path)
        else:
            raise InputError(f"{path}: unknown table format {suffix!r} (use .csv, .parquet, .star)")
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path}: cannot read the table ({error})") from None
    table = drop_pandas_index(table)
    missing = [name for name in SEED_DTYPES if name not in table.columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {', '.join(missing)}")
    if "refined_pixel_size" not in table:  # written before the column existed
        table["refined_pixel_size"] = table["pixel_size"]
    table, std = variance_column(table)
    if "micrograph_name" not in table:
        table["micrograph_name"] = [Path(p).stem for p in table["micrograph_path"]]
    if "particle_index" not in table:
        table["particle_index"] = table.groupby("micrograph_name", sort=False).cumcount()
    table = coerce_peak_dtypes(table, source=str(path))
    table.attrs[STD_READ] = std
    return table


#: ``DataFrame.attrs`` key of :func:`read_table`'s result: True when the file's
#: ``correlation_variance`` held the standard deviation (Leopard-EM's) and was squared.
STD_READ = "correlation_variance_was_std"


__all__ = [
    "LEOPARD_DTYPES",
    "PEAK_COLUMNS",
    "PEAK_DTYPES",
    "SEED_DTYPES",
    "STD_READ",
    "coerce_peak_dtypes",
    "empty_peak_table",
    "read_star",
    "read_table",
    "to_star",
    "write_star",
    "write_table",
]
