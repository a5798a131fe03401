"""Threshold, peak picking and the results table (SPEC §4).

A peak is a position of the scaled MIP above the cut-off ``z*``. Peaks are taken strongest
first (ties: lower y, then lower x) and each accepted peak suppresses every weaker position
closer than ``min_distance`` pixels (Euclidean): the greedy non-maximum suppression of
cisTEM and Leopard-EM, over all positions above the cut-off.

Per micrograph the peaks become a pandas table with the seed document's columns
(:data:`PEAK_COLUMNS`); across micrographs :func:`peaks_dataframe` builds a dask dataframe
with one partition per micrograph, each partition reading its own zarr group on a worker.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import scipy.special
import xarray as xr
import zarr
from scipy.ndimage import maximum_filter

from dtm.backend import to_numpy
from dtm.errors import ConfigError, InputError
from dtm.io.store import result_groups
from dtm.io.tables import PEAK_COLUMNS, coerce_peak_dtypes, empty_peak_table, write_table

#: ``PEAK_COLUMNS`` is re-exported: the ordered columns of a peak table.
__all__ = [
    "PEAK_COLUMNS",
    "default_min_distance",
    "peaks_dataframe",
    "peaks_table",
    "pick_peaks",
    "repick",
    "threshold",
]

#: Statistic maps of the results dataset copied into the table (map name = column name,
#: except ``defocus`` → ``relative_defocus``).
_MAPS = ["mip", "scaled_mip", "correlation_mean", "correlation_variance", "psi", "theta", "phi"]

#: Table column → key of ``attrs["map_paths"]``.
_MAP_PATH_COLUMNS = {
    "mip_path": "mip",
    "scaled_mip_path": "scaled_mip",
    "psi_path": "psi",
    "theta_path": "theta",
    "phi_path": "phi",
    "defocus_path": "defocus",
    "correlation_average_path": "correlation_mean",
    "correlation_variance_path": "correlation_variance",
}

#: Per-micrograph attributes copied into every row.
_OPTICS = (
    "defocus_u defocus_v astigmatism_angle pixel_size voltage spherical_aberration "
    "amplitude_contrast_ratio phase_shift ctf_B_factor"
).split()

_REQUIRED_ATTRS = (
    "micrograph_name micrograph_path template_path template_shape image_shape "
    "correlation_mode total_correlations"
).split() + _OPTICS

#: Largest number of (peak, offset) pairs handled at once when suppressing neighbourhoods.
_SUPPRESS_BATCH = 1 << 22


def threshold(n_positions: int, n_correlations: int, false_positives: float = 1.0) -> float:
    """Z-score cut-off for an expected number of false positives per micrograph.

    ``z* = sqrt(2) * erfcinv(2 * FP / (N_pos * N))``: under the Gaussian noise model each of
    the ``N_pos * N`` correlations exceeds ``z*`` with probability ``FP / (N_pos * N)``.

    Parameters
    ----------
    n_positions
        Number of valid positions ``N_pos`` (pixels of the map where the template box lies
        inside the micrograph).
    n_correlations
        Correlations per position ``N`` (orientations × defocus planes).
    false_positives
        Expected false positives per micrograph ``FP``, > 0.

    Returns
    -------
    float
        The cut-off ``z*`` (in standard deviations).
    """
    trials = float(n_positions) * float(n_correlations)
    if not (n_positions > 0 and n_correlations > 0):
        raise ConfigError(
            f"threshold: positions ({n_positions}) and correlations ({n_correlations}) "
            "must be positive"
        )
    if not (0 < false_positives < trials):
        raise ConfigError(
            f"false_positives: must be > 0 and below the number of trials {trials:g}, "
            f"got {false_positives}"
        )
    return float(math.sqrt(2.0) * scipy.special.erfcinv(2.0 * false_positives / trials))


def default_min_distance(template_box: int) -> float:
    """Default minimum distance between peaks, in pixels: ``0.15 × template_box``.

    A template box is usually 1.5–2 × the particle's diameter, so the particle spans about
    0.6 of it and ``0.15 × box`` is about half the particle's radius. That is wide enough to
    remove the secondary maxima that a particle's own correlation peak and its near-miss
    orientations raise around it, yet particles at different heights that overlap in
    projection (common in cells, and found by 2DTM) stay separate peaks down to half a
    radius apart. Leopard-EM's fixed 5 px is far smaller for typical 300–500 px boxes.
    """
    if template_box <= 0:
        raise ConfigError(f"template_box: must be a positive number of pixels, got {template_box}")
    return max(1.0, 0.15 * float(template_box))


def _disk_offsets(min_distance: float) -> np.ndarray:
    """``(k, 2)`` offsets ``(dy, dx)`` with ``dy² + dx² < min_distance²``, and ``(0, 0)``."""
    half = max(math.ceil(min_distance) - 1, 0)
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1]
    squared = dy.astype(np.float64) ** 2 + dx.astype(np.float64) ** 2
    # (0, 0) always: an accepted position leaves the candidates even when nothing is suppressed.
    inside = (squared < min_distance**2) | (squared == 0)
    return np.stack([dy[inside], dx[inside]], axis=1)


def _suppress(key: np.ndarray, ys: np.ndarray, xs: np.ndarray, offsets: np.ndarray) -> None:
    """Set ``key`` to 0 at every pixel within the disk ``offsets`` of each ``(ys, xs)``."""
    ny, nx = key.shape
    batch = max(1, _SUPPRESS_BATCH // len(offsets))
    for start in range(0, len(ys), batch):
        yy = (ys[start : start + batch, None] + offsets[None, :, 0]).ravel()
        xx = (xs[start : start + batch, None] + offsets[None, :, 1]).ravel()
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        key[yy[inside], xx[inside]] = 0


def pick_peaks(
    scaled_mip: np.ndarray, cutoff: float, *, min_distance: float, border: int = 0
) -> np.ndarray:
    """Greedy non-maximum suppression of the positions above ``cutoff``.

    Equivalent to: sort the positions above the cut-off by value (descending; ties by y,
    then x), walk the list, accept a position unless an accepted one lies closer than
    ``min_distance``. It runs in rounds instead of a loop over candidates: every position
    that is the strongest remaining one within the square of half-width
    ``ceil(min_distance) - 1`` (which contains its suppression disk) cannot be suppressed by
    anything, so all such positions are accepted at once (one maximum filter) and their
    disks removed; the strongest remaining position is always accepted, so rounds end.

    Parameters
    ----------
    scaled_mip
        ``(ny, nx)`` z-score map (numpy or cupy). NaN never passes the cut-off.
    cutoff
        Positions strictly above it are candidates.
    min_distance
        Suppression radius in pixels (>= 0; distances ``< min_distance`` are suppressed).
    border
        Positions within this many pixels of the map's edges are excluded.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` int64 ``[y, x]`` of the peaks, strongest first.
    """
    values = to_numpy(scaled_mip)
    if values.ndim != 2:
        raise ValueError(f"pick_peaks: expected a 2-D map, got shape {values.shape}")
    if not (min_distance >= 0 and math.isfinite(min_distance)):
        raise ConfigError(f"min_distance: must be >= 0 pixels, got {min_distance}")
    if border < 0:
        raise ConfigError(f"border: must be >= 0 pixels, got {border}")
    ny, nx = values.shape
    inside = np.zeros(values.shape, dtype=bool)
    inside[border : max(ny - border, 0), border : max(nx - border, 0)] = True
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero((values > cutoff) & inside)
    if ys.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    # nonzero lists positions in raster order, so a stable sort breaks ties by (y, x).
    order = np.argsort(-values[ys, xs], kind="stable")
    rank_key = np.empty(ys.size, dtype=np.int64)
    rank_key[order] = np.arange(ys.size, 0, -1)  # unique, > 0, larger = picked first
    key = np.zeros(values.shape, dtype=np.int32 if ys.size < 2**31 - 1 else np.int64)
    key[ys, xs] = rank_key

    offsets = _disk_offsets(min_distance)
    size = 2 * max(math.ceil(min_distance) - 1, 0) + 1
    picked_y, picked_x, picked_key = [], [], []
    while True:
        rows = np.flatnonzero(key.any(axis=1))
        if rows.size == 0:
            break
        cols = np.flatnonzero(key[rows[0] : rows[-1] + 1].any(axis=0))
        # Only the bounding box of the remaining candidates matters (zeros outside it).
        top, left = rows[0], cols[0]
        window = key[top : rows[-1] + 1, left : cols[-1] + 1]
        local_max = maximum_filter(window, size=size, mode="constant", cval=0)
        ay, ax = np.nonzero((window == local_max) & (window > 0))
        picked_key.append(window[ay, ax].copy())
        ay, ax = ay + top, ax + left
        picked_y.append(ay)
        picked_x.append(ax)
        _suppress(key, ay, ax, offsets)
    all_keys = np.concatenate(picked_key)
    strongest_first = np.argsort(-all_keys.astype(np.int64), kind="stable")
    peaks = np.stack([np.concatenate(picked_y), np.concatenate(picked_x)], axis=1)
    return peaks[strongest_first].astype(np.int64)


def _attr(ds: xr.Dataset, name: str) -> Any:
    try:
        return ds.attrs[name]
    except KeyError:
        label = ds.attrs.get("micrograph_name", "results dataset")
        raise InputError(f"{label}: attribute {name!r} missing from the results") from None


def _search_region(ds: xr.Dataset) -> xr.Dataset:
    """The part of the maps where the template box lies inside the micrograph."""
    mode = _attr(ds, "correlation_mode")
    if mode == "valid":
        return ds
    if mode == "same":
        # The zero-padded margin (bottom and right) carries no significance (seed document).
        box_h, box_w = (int(n) for n in _attr(ds, "template_shape")[-2:])
        height, width = (int(n) for n in _attr(ds, "image_shape"))
        return ds.sel(y=slice(None, height - box_h), x=slice(None, width - box_w))
    raise InputError(
        f"{ds.attrs.get('micrograph_name', 'results')}: correlation_mode must be 'valid' or "
        f"'same', got {mode!r}"
    )


def _min_distance_pixels(
    ds: xr.Dataset, min_distance: float | None, min_distance_angstrom: float | None
) -> float:
    if min_distance is not None and min_distance_angstrom is not None:
        raise ConfigError("min_distance: give it in pixels or in Å, not both")
    if min_distance_angstrom is not None:
        return float(min_distance_angstrom) / float(_attr(ds, "pixel_size"))
    if min_distance is not None:
        return float(min_distance)
    return default_min_distance(int(_attr(ds, "template_shape")[-1]))


def peaks_table(
    ds: xr.Dataset,
    *,
    false_positives: float = 1.0,
    z_score_cutoff: float | None = None,
    min_distance: float | None = None,
    min_distance_angstrom: float | None = None,
    border: int = 0,
) -> pd.DataFrame:
    """The peaks of one micrograph's results as a table with the seed's columns.

    Parameters
    ----------
    ds
        Results dataset of one micrograph (docs/architecture.md, "Results dataset"); its
        maps may be lazy, only the scaled MIP is loaded whole.
    false_positives
        Expected false positives per micrograph, sets the cut-off (SPEC §4).
    z_score_cutoff
        Fixed cut-off; overrides ``false_positives``.
    min_distance, min_distance_angstrom
        Suppression radius in pixels or in Å (at most one); default
        :func:`default_min_distance` of the template's box.
    border
        Exclude positions whose template box comes closer than this many pixels to the
        micrograph's edge.

    Returns
    -------
    pandas.DataFrame
        One row per peak, strongest first, columns :data:`PEAK_COLUMNS`. ``pos_x/pos_y``: map
        pixel (template box top-left); ``pos_*_img = pos_* + box // 2``; ``*_angstrom`` =
        ``*_img × pixel_size``; ``relative_defocus`` from the defocus map.
    """
    missing = [name for name in _REQUIRED_ATTRS if name not in ds.attrs]
    missing += [name for name in [*_MAPS, "defocus"] if name not in ds.data_vars]
    if missing:
        label = ds.attrs.get("micrograph_name", "results dataset")
        raise InputError(f"{label}: results lack {', '.join(missing)}")
    region = _search_region(ds)
    if z_score_cutoff is None:
        n_positions = region.sizes["y"] * region.sizes["x"]
        cutoff = threshold(n_positions, int(ds.attrs["total_correlations"]), false_positives)
    else:
        cutoff = float(z_score_cutoff)
    distance = _min_distance_pixels(ds, min_distance, min_distance_angstrom)
    peaks = pick_peaks(region["scaled_mip"].values, cutoff, min_distance=distance, border=border)
    iy, ix = peaks[:, 0], peaks[:, 1]
    at = {"y": xr.DataArray(iy, dims="peak"), "x": xr.DataArray(ix, dims="peak")}
    picked = region[[*_MAPS, "defocus"]].isel(at).compute()

    attrs = ds.attrs
    box_h, box_w = (int(n) for n in attrs["template_shape"][-2:])
    pixel_size = float(attrs["pixel_size"])
    pos_y = region["y"].values[iy].astype(np.int64)
    pos_x = region["x"].values[ix].astype(np.int64)
    n = len(peaks)
    map_paths = attrs.get("map_paths") or {}
    columns: dict[str, Any] = {name: picked[name].values.astype(np.float64) for name in _MAPS}
    columns |= {
        "total_correlations": np.full(n, int(attrs["total_correlations"]), dtype=np.int64),
        "pos_x": pos_x,
        "pos_y": pos_y,
        "pos_x_img": pos_x + box_w // 2,
        "pos_y_img": pos_y + box_h // 2,
        "pos_x_img_angstrom": (pos_x + box_w // 2) * pixel_size,
        "pos_y_img_angstrom": (pos_y + box_h // 2) * pixel_size,
        "relative_defocus": picked["defocus"].values.astype(np.float64),
        **{name: np.full(n, float(attrs[name])) for name in _OPTICS},
        "micrograph_path": [str(attrs["micrograph_path"])] * n,
        "template_path": [str(attrs["template_path"])] * n,
        **{col: [str(map_paths.get(key, ""))] * n for col, key in _MAP_PATH_COLUMNS.items()},
        "micrograph_name": [str(attrs["micrograph_name"])] * n,
        "particle_index": np.arange(n, dtype=np.int64),
    }
    return coerce_peak_dtypes(pd.DataFrame({name: columns[name] for name in PEAK_COLUMNS}))


def _store_url(results: str | os.PathLike[str]) -> str:
    """The ``results.zarr`` store of an output directory, or ``results`` if it is one."""
    store = str(results).rstrip("/")
    return store if store.endswith(".zarr") else f"{store}/results.zarr"


def _group_peaks(group: str | None, store: str, options: dict[str, Any]) -> pd.DataFrame:
    """One partition: open one micrograph's group (on the worker) and pick its peaks.

    The maps are opened without dask chunks: reading the few picked pixels inside this task
    must not become a graph of its own, sent back to the cluster's scheduler.
    """
    ds = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    return peaks_table(ds, **options)


def peaks_dataframe(
    results: str | os.PathLike[str],
    *,
    false_positives: float = 1.0,
    z_score_cutoff: float | None = None,
    min_distance: float | None = None,
    min_distance_angstrom: float | None = None,
    border: int = 0,
) -> dd.DataFrame:
    """Peaks of every micrograph of a results store as a lazy dask dataframe.

    Parameters
    ----------
    results
        An output directory or its ``results.zarr``; a local path or an fsspec URL
        (``file://``, ``memory://``, ``s3://`` ...).
    false_positives, z_score_cutoff, min_distance, min_distance_angstrom, border
        As in :func:`peaks_table`.

    Returns
    -------
    dask.dataframe.DataFrame
        One partition per micrograph (groups in name order), columns :data:`PEAK_COLUMNS`.
        Only the store's group listing is read here; each partition opens its own group.
    """
    store = _store_url(results)
    try:
        groups = result_groups(store)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as error:
        raise InputError(f"{store}: no dtm results store here ({error})") from None
    if not groups:
        raise InputError(f"{store}: the results store holds no micrograph")
    options = {
        "false_positives": false_positives,
        "z_score_cutoff": z_score_cutoff,
        "min_distance": min_distance,
        "min_distance_angstrom": min_distance_angstrom,
        "border": border,
    }
    # Keep pandas' own string dtype (as in peaks_table) rather than dask's pyarrow strings.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(
            _group_peaks,
            groups,
            store=store,
            options=options,
            meta=empty_peak_table(),
            label="peaks",
            enforce_metadata=True,
        )


def repick(
    results_dir: str | os.PathLike[str],
    *,
    false_positives: float | None = None,
    z_score_cutoff: float | None = None,
    min_distance: float | None = None,
    min_distance_angstrom: float | None = None,
    border: int = 0,
    client: Any = None,
) -> pd.DataFrame:
    """Pick peaks again from ``RESULTS_DIR/results.zarr`` (the ``dtm peaks`` command).

    Writes ``peaks.csv``, ``peaks.parquet/`` (partitioned by micrograph) and ``peaks.star``
    in ``results_dir``, all replaced together only once every one is written.

    Parameters
    ----------
    results_dir
        Output directory of ``dtm match``.
    false_positives, z_score_cutoff
        At most one; default ``false_positives = 1``.
    min_distance, min_distance_angstrom, border
        As in :func:`peaks_table`.
    client
        A ``distributed.Client`` to compute on; default: dask's current scheduler.

    Returns
    -------
    pandas.DataFrame
        The new table.
    """
    if false_positives is not None and z_score_cutoff is not None:
        raise ConfigError("give either --false-positives or --z-cutoff, not both")
    directory = Path(results_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: results directory not found")
    if not (directory / "results.zarr").exists():
        raise InputError(f"{directory}: no results.zarr here (run dtm match first)")
    table_graph = peaks_dataframe(
        directory / "results.zarr",
        false_positives=1.0 if false_positives is None else false_positives,
        z_score_cutoff=z_score_cutoff,
        min_distance=min_distance,
        min_distance_angstrom=min_distance_angstrom,
        border=border,
    )
    table = client.compute(table_graph).result() if client is not None else table_graph.compute()
    table = table.reset_index(drop=True)
    write_table(table, directory, "peaks")
    return table
