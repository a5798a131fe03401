"""Leopard-EM's files as dtm reads them: its table columns and its statistics convention.

Leopard-EM 1.3 names its standard-deviation map and column ``correlation_variance`` (its
``correlation_sum_and_squared_sum_to_mean_and_variance`` returns ``sqrt(max(var, 0))``, and
its ``scaled_mip`` is ``(mip - mean) / that``). dtm's ``correlation_variance`` is the
variance. Its CSV tables carry no version to tell them apart, so the statistics themselves
do: in a table or map of either tool ``scaled_mip = (mip - mean) / s`` holds, with
``s = correlation_variance`` for Leopard-EM and ``s = sqrt(correlation_variance)`` for dtm.
:func:`holds_std` decides which, and the readers here square a standard deviation into
the variance; where the two readings agree (a value of 1), the choice changes nothing.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

#: The columns that Leopard-EM 1.3's ``ParticleStack`` requires of a table
#: (``leopard_em.pydantic_models.formats.MATCH_TEMPLATE_DF_COLUMN_ORDER``, 1.3.0), in its order.
PARTICLE_STACK_COLUMNS = [
    "particle_index",
    "mip",
    "scaled_mip",
    "correlation_mean",
    "correlation_variance",
    "total_correlations",
    "pos_x",
    "pos_y",
    "pos_x_img",
    "pos_y_img",
    "pos_x_img_angstrom",
    "pos_y_img_angstrom",
    "phi",
    "theta",
    "psi",
    "relative_defocus",
    "defocus_u",
    "defocus_v",
    "astigmatism_angle",
    "pixel_size",
    "refined_pixel_size",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast_ratio",
    "phase_shift",
    "ctf_B_factor",
    "even_zernikes",
    "odd_zernikes",
    "mag_matrix",
    "micrograph_path",
    "template_path",
    "mip_path",
    "scaled_mip_path",
    "psi_path",
    "theta_path",
    "phi_path",
    "defocus_path",
    "correlation_average_path",
    "correlation_variance_path",
]

#: Table column → dtm map name, for the eight map paths of a row.
MAP_PATH_COLUMNS = {
    "mip_path": "mip",
    "scaled_mip_path": "scaled_mip",
    "psi_path": "psi",
    "theta_path": "theta",
    "phi_path": "phi",
    "defocus_path": "defocus",
    "correlation_average_path": "correlation_mean",
    "correlation_variance_path": "correlation_variance",
}

#: ``match_template_result`` field of a Leopard-EM configuration → dtm map name.
RESULT_MAP_FIELDS = {
    "mip_path": "mip",
    "scaled_mip_path": "scaled_mip",
    "orientation_psi_path": "psi",
    "orientation_theta_path": "theta",
    "orientation_phi_path": "phi",
    "relative_defocus_path": "defocus",
    "correlation_average_path": "correlation_mean",
    "correlation_variance_path": "correlation_variance",
}

#: Largest median relative disagreement with ``scaled_mip`` still taken as evidence
#: (the statistics are float32: a true relation holds to ~1e-6).
_EVIDENCE = 1e-3

#: Positions a decision looks at, at most.
_SAMPLE = 100_000

_PANDAS_INDEX = re.compile(r"^Unnamed: \d+$")


def holds_std(
    mip: np.ndarray, scaled_mip: np.ndarray, mean: np.ndarray, statistic: np.ndarray
) -> bool:
    """Whether ``statistic`` (a ``correlation_variance``) holds the standard deviation.

    Parameters
    ----------
    mip, scaled_mip, mean, statistic
        Values at the same positions (any shape, NaN ignored): a table's columns or maps
        (judged at most at :data:`_SAMPLE` evenly spaced positions).

    Returns
    -------
    bool
        True when ``scaled_mip = (mip - mean) / statistic`` explains the values (to 0.1 %,
        median) better than ``(mip - mean) / sqrt(statistic)``; False otherwise, and when
        nothing can tell (no usable value).
    """
    flat = [np.asarray(a).ravel() for a in (mip, scaled_mip, mean, statistic)]
    step = max(1, flat[0].size // _SAMPLE)  # a whole K3 map would take gigabytes in float64
    mip_, scaled, mean_, stat = (np.asarray(a[::step], dtype=np.float64) for a in flat)
    usable = np.isfinite(mip_ + scaled + mean_ + stat) & (stat > 0) & (np.abs(scaled) > 1e-6)
    if not usable.any():
        return False
    excess, scaled, stat = (mip_ - mean_)[usable], scaled[usable], stat[usable]
    as_std = float(np.median(np.abs(excess / stat - scaled) / np.abs(scaled)))
    as_variance = float(np.median(np.abs(excess / np.sqrt(stat) - scaled) / np.abs(scaled)))
    return as_std < as_variance and as_std < _EVIDENCE


def variance_column(table: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The table with ``correlation_variance`` as the variance (squared when it held the
    standard deviation, :func:`holds_std`), and whether it was squared."""
    needed = ("mip", "scaled_mip", "correlation_mean", "correlation_variance")
    if table.empty or not all(name in table for name in needed):
        return table, False
    columns = [pd.to_numeric(table[name], errors="coerce").to_numpy() for name in needed]
    if not holds_std(*columns):
        return table, False
    out = table.copy()
    out["correlation_variance"] = columns[3].astype(np.float64) ** 2
    return out, True


def variance_map(
    statistic: np.ndarray, mean: np.ndarray, table: pd.DataFrame
) -> tuple[np.ndarray, bool]:
    """A ``correlation_variance`` map as the variance, and whether it was squared.

    The map is judged at the particles of ``table`` (their ``pos_y``, ``pos_x`` in the maps
    and their ``mip``, ``scaled_mip`` values, which came from the same search).
    """
    y = pd.to_numeric(table["pos_y"], errors="coerce").to_numpy()
    x = pd.to_numeric(table["pos_x"], errors="coerce").to_numpy()
    inside = (y >= 0) & (x >= 0) & (y < statistic.shape[0]) & (x < statistic.shape[1])
    yi, xi = y[inside].astype(np.int64), x[inside].astype(np.int64)
    std = holds_std(
        pd.to_numeric(table["mip"], errors="coerce").to_numpy()[inside],
        pd.to_numeric(table["scaled_mip"], errors="coerce").to_numpy()[inside],
        mean[yi, xi],
        statistic[yi, xi],
    )
    if not std:
        return statistic, False
    return np.square(statistic, dtype=np.float32), True


def drop_pandas_index(table: pd.DataFrame) -> pd.DataFrame:
    """Without the unnamed first column that ``DataFrame.to_csv(index=True)`` writes (as
    Leopard-EM's programs do), which pandas reads back as ``Unnamed: 0``."""
    unnamed = [name for name in table.columns if _PANDAS_INDEX.match(str(name))]
    return table.drop(columns=unnamed)


__all__ = [
    "MAP_PATH_COLUMNS",
    "PARTICLE_STACK_COLUMNS",
    "RESULT_MAP_FIELDS",
    "drop_pandas_index",
    "holds_std",
    "variance_column",
    "variance_map",
]
