"""The results table of the peaks (conventions.md#threshold, #peaks).

Per micrograph the peaks picked by :mod:`dtm.picking` become a pandas table with the seed
document's columns (:data:`PEAK_COLUMNS`); across micrographs :func:`peaks_dataframe` builds
a dask dataframe with one partition per micrograph, each partition reading its own zarr
group on a worker. :func:`repick` writes the tables of an output directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import xarray as xr
import zarr

from dtm.errors import ConfigError, InputError
from dtm.io.store import (
    axis_pixel_size,
    open_results,
    output_directory,
    result_groups,
    store_url,
    write_json,
)
from dtm.io.tables import PEAK_COLUMNS, coerce_peak_dtypes, empty_peak_table, write_table
from dtm.picking import default_min_distance, pick_peaks, threshold

#: Re-exported: ``PEAK_COLUMNS`` (the columns of a peak table) and the picking functions.
__all__ = [
    "PEAK_COLUMNS",
    "PICKING_FILE",
    "default_min_distance",
    "map_threshold",
    "peaks_dataframe",
    "peaks_table",
    "pick_peaks",
    "read_picking",
    "repick",
    "search_region",
    "map_thresholds",
    "threshold",
    "threshold_label",
    "threshold_summary",
]

#: Beside the peak tables: the settings that picked them (``dtm peaks`` may change them).
PICKING_FILE = "peaks.json"

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


def _attr(ds: xr.Dataset, name: str) -> Any:
    try:
        return ds.attrs[name]
    except KeyError:
        label = ds.attrs.get("micrograph_name", "results dataset")
        raise InputError(f"{label}: attribute {name!r} missing from the results") from None


def search_region(ds: xr.Dataset) -> xr.Dataset:
    """The part of the maps where the template box lies inside the micrograph."""
    mode = _attr(ds, "correlation_mode")
    if mode == "valid":
        return ds
    if mode == "same":
        # The zero-padded margin (bottom and right) carries no significance (docs/outputs.md).
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


def map_threshold(
    ds: xr.Dataset, *, false_positives: float = 1.0, z_score_cutoff: float | None = None
) -> float:
    """The z-score cut-off ``z*`` of one micrograph's results (conventions.md#threshold).

    ``z_score_cutoff`` when given, else :func:`threshold` for ``false_positives`` over the
    positions of the search region and the dataset's ``total_correlations``. Reads only
    metadata.
    """
    if z_score_cutoff is not None:
        return float(z_score_cutoff)
    region = search_region(ds)
    n_positions = region.sizes["y"] * region.sizes["x"]
    return threshold(n_positions, int(_attr(ds, "total_correlations")), false_positives)


def threshold_label(cutoffs: list[float], false_positives: float | None) -> str:
    """``z* = 7.41 (1 false positive per micrograph)`` for a person; a range when the
    micrographs' cut-offs differ; ``(fixed)`` when ``false_positives`` is None."""
    low, high = f"{min(cutoffs):.2f}", f"{max(cutoffs):.2f}"
    span = low if low == high else f"{low}–{high}"
    if false_positives is None:
        return f"z* = {span} (fixed)"
    plural = "s" * (false_positives != 1)
    return f"z* = {span} ({false_positives:g} false positive{plural} per micrograph)"


def map_thresholds(
    results: str | os.PathLike[str],
    *,
    false_positives: float | None = None,
    z_score_cutoff: float | None = None,
) -> dict[str, float]:
    """``{micrograph_name: z*}`` of a results store, as :func:`repick` applies them (same
    defaults). Reads only metadata."""
    fp = 1.0 if false_positives is None else float(false_positives)
    return {
        name: map_threshold(ds, false_positives=fp, z_score_cutoff=z_score_cutoff)
        for name, ds in open_results(results).items()
    }


def read_picking(results: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What :func:`repick` wrote to :data:`PICKING_FILE`: the options and each micrograph's
    z*; None for results written before the file existed.

    Raises
    ------
    InputError
        The file is not a JSON object.
    """
    fs, root = fsspec.core.url_to_fs(output_directory(results))
    path = f"{root.rstrip('/')}/{PICKING_FILE}"
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "r") as file:
            settings = json.load(file)
    except ValueError as error:
        raise InputError(f"{path}: unreadable picking settings ({error})") from None
    if not isinstance(settings, dict):
        raise InputError(f"{path}: unreadable picking settings (not a JSON object)")
    return settings


def threshold_summary(results: str | os.PathLike[str]) -> str:
    """:func:`threshold_label` of the z* that the last pick of ``results`` applied.

    Raises
    ------
    InputError
        No peaks were picked there yet (or before :data:`PICKING_FILE` existed).
    """
    picking = read_picking(results)
    if picking is None:
        raise InputError(f"{results}: no {PICKING_FILE} (pick the peaks with dtm peaks)")
    return threshold_label(list(picking["z_thresholds"].values()), picking["false_positives"])


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
        Expected false positives per micrograph, sets the cut-off (conventions.md#threshold).
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
        ``*_img`` × the micrograph's pixel size along that axis (``axis_pixel_size``, which
        after Fourier cropping differs slightly from ``pixel_size``); ``relative_defocus``
        from the defocus map.
    """
    missing = [name for name in _REQUIRED_ATTRS if name not in ds.attrs]
    missing += [name for name in [*_MAPS, "defocus"] if name not in ds.data_vars]
    if missing:
        label = ds.attrs.get("micrograph_name", "results dataset")
        raise InputError(f"{label}: results lack {', '.join(missing)}")
    region = search_region(ds)
    cutoff = map_threshold(ds, false_positives=false_positives, z_score_cutoff=z_score_cutoff)
    distance = _min_distance_pixels(ds, min_distance, min_distance_angstrom)
    peaks = pick_peaks(region["scaled_mip"].values, cutoff, min_distance=distance, border=border)
    iy, ix = peaks[:, 0], peaks[:, 1]
    at = {"y": xr.DataArray(iy, dims="peak"), "x": xr.DataArray(ix, dims="peak")}
    picked = region[[*_MAPS, "defocus"]].isel(at).compute()

    attrs = ds.attrs
    box_h, box_w = (int(n) for n in attrs["template_shape"][-2:])
    pixel_size = float(attrs["pixel_size"])
    along_y, along_x = axis_pixel_size(attrs, pixel_size)
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
        "pos_x_img_angstrom": (pos_x + box_w // 2) * along_x,
        "pos_y_img_angstrom": (pos_y + box_h // 2) * along_y,
        "relative_defocus": picked["defocus"].values.astype(np.float64),
        **{name: np.full(n, float(attrs[name])) for name in _OPTICS},
        "micrograph_path": [str(attrs["micrograph_path"])] * n,
        "template_path": [str(attrs["template_path"])] * n,
        **{col: [str(map_paths.get(key, ""))] * n for col, key in _MAP_PATH_COLUMNS.items()},
        "micrograph_name": [str(attrs["micrograph_name"])] * n,
        "particle_index": np.arange(n, dtype=np.int64),
        "micrograph_pixel_size": np.full(
            n, float(attrs.get("original_pixel_size", pixel_size)), dtype=np.float64
        ),
    }
    return coerce_peak_dtypes(pd.DataFrame({name: columns[name] for name in PEAK_COLUMNS}))


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
    store = store_url(results)
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
    in ``results_dir``, all replaced together only once every one is written, then
    :data:`PICKING_FILE` with the options used and the z* applied to each micrograph (what
    ``dtm report`` shows as the threshold).

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
        if (directory / "job.json").exists():
            raise InputError(
                f"{directory}: its search has not finished (continue it with "
                "dtm match CONFIG --resume)"
            )
        raise InputError(f"{directory}: no results.zarr here (run dtm match first)")
    if z_score_cutoff is None and false_positives is None:
        false_positives = 1.0
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
    settings = {
        "false_positives": false_positives,
        "z_score_cutoff": z_score_cutoff,
        "min_distance_pixels": min_distance,
        "min_distance_angstrom": min_distance_angstrom,
        "border_pixels": border,
        "z_thresholds": map_thresholds(
            directory, false_positives=false_positives, z_score_cutoff=z_score_cutoff
        ),
    }
    write_json(directory / PICKING_FILE, settings)
    return table
