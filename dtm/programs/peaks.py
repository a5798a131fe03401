"""The results table of the peaks (conventions.md#threshold, #peaks).

Per micrograph the peaks picked by :mod:`dtm.search.picking` become a pandas table with the seed
document's columns (:data:`PEAK_COLUMNS`); across micrographs :func:`peaks_dataframe` builds
a dask dataframe with one partition per micrograph, each partition reading its own zarr
group on a worker. :func:`repick` writes the tables of an output directory.
"""

from __future__ import annotations

import functools
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

from dtm.config.match import PeaksConfig
from dtm.errors import DtmError, InputError
from dtm.io.mrc import read_template
from dtm.io.results import read_peak_table
from dtm.io.store import (
    axis_pixel_size,
    open_results,
    output_directory,
    result_groups,
    store_url,
    write_json,
)
from dtm.io.tables import PEAK_COLUMNS, coerce_peak_dtypes, empty_peak_table, write_table
from dtm.physics.aberrations import as_mag_matrix, as_zernikes, mag_matrix_text, zernikes_text
from dtm.physics.footprint import template_radius
from dtm.programs.search_model import search_model
from dtm.schema import (
    JOB_FILE,
    MAP_NAMES,
    OPTICS_FIELDS,
    PEAKS_STEM,
    PICKING_FILE,
    RESULTS_STORE,
)
from dtm.search.detection import metric_map
from dtm.search.metrics import gev_cutoff
from dtm.search.picking import default_min_distance, pick_peaks, threshold
from dtm.search.side_maxima import explained_peaks

#: Re-exported: ``PEAK_COLUMNS`` (the columns of a peak table) and the picking functions.
__all__ = [
    "PEAK_COLUMNS",
    "PICKING_FILE",
    "default_min_distance",
    "map_threshold",
    "min_distance_pixels",
    "peaks_dataframe",
    "peaks_table",
    "pick_peaks",
    "picking_of",
    "read_picking",
    "repick",
    "search_region",
    "map_thresholds",
    "threshold",
    "threshold_label",
    "threshold_summary",
]

#: Statistic maps of the results dataset copied into the table (map name = column name,
#: except ``defocus`` → ``relative_defocus``).
_MAPS = [name for name in MAP_NAMES if name != "defocus"]

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

_REQUIRED_ATTRS = (
    "micrograph_name micrograph_path template_path template_shape image_shape "
    "correlation_mode total_correlations"
).split() + list(OPTICS_FIELDS)


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


@functools.lru_cache(maxsize=8)
def _radius_of(path: str) -> float | None:
    """:func:`dtm.physics.footprint.template_radius` of a template file, its pixels; None if it
    cannot be read."""
    try:
        template = read_template(path, pixel_size=1.0)
    except DtmError:
        return None
    return template_radius(template.data)


def min_distance_pixels(ds: xr.Dataset, picking: PeaksConfig) -> float:
    """Suppression radius of one micrograph's peaks, pixels of its maps.

    ``min_distance_pixels`` or ``min_distance_angstrom`` when given; else the radius of the
    template's density (:func:`dtm.physics.footprint.template_radius`, at the maps' pixel size);
    else, when the template file cannot be read, :func:`default_min_distance` of its box.
    """
    if picking.min_distance_angstrom is not None:
        return float(picking.min_distance_angstrom) / float(_attr(ds, "pixel_size"))
    if picking.min_distance_pixels is not None:
        return float(picking.min_distance_pixels)
    radius = _radius_of(str(_attr(ds, "template_path")))
    if radius is None:
        return default_min_distance(int(_attr(ds, "template_shape")[-1]))
    # The file's pixels → the maps' (larger after high_resolution_limit).
    pixel_size = float(_attr(ds, "pixel_size"))
    return radius * float(ds.attrs.get("original_pixel_size", pixel_size)) / pixel_size


def _distinct(
    ds: xr.Dataset, picked: xr.Dataset, strength: np.ndarray, cutoff: float
) -> np.ndarray:
    """:func:`dtm.search.side_maxima.explained_peaks` of the picks (all kept when the micrograph
    or the template file cannot be read)."""
    model = search_model(ds.attrs)
    if model is None:
        return np.ones(picked.sizes["peak"], dtype=bool)
    positions = np.stack([picked["y"].values, picked["x"].values], axis=1)
    euler = np.stack([picked[name].values for name in ("phi", "theta", "psi")], axis=1)
    defocus = picked["defocus"].values.astype(np.float64)
    return explained_peaks(model, strength, positions, euler, defocus, cutoff)


def map_threshold(ds: xr.Dataset, picking: PeaksConfig | None = None) -> float:
    """The cut-off of one micrograph's picking metric (conventions.md#threshold).

    ``detection_z``, ``scaled_mip``, ``mip``: ``z_score_cutoff`` when given, else
    :func:`threshold` for ``false_positives`` over the positions of the search region and
    the dataset's ``total_correlations`` (metadata only). ``pvalue``: ``p_value_cutoff``.
    ``gev``: :func:`dtm.search.metrics.gev_cutoff` of the search region's scaled MIP.
    """
    picking = picking or PeaksConfig()
    if picking.metric == "pvalue":
        return float(picking.p_value_cutoff)
    region = search_region(ds)
    if picking.metric == "gev":
        values = np.asarray(region["scaled_mip"].values, dtype=np.float64)
        return gev_cutoff(values, false_positives=picking.false_positives)
    if picking.z_score_cutoff is not None:
        return float(picking.z_score_cutoff)
    n_positions = region.sizes["y"] * region.sizes["x"]
    return threshold(n_positions, int(_attr(ds, "total_correlations")), picking.false_positives)


def threshold_label(cutoffs: list[float], picking: PeaksConfig | None = None) -> str:
    """``z* = 7.41 (1 false positive per micrograph)`` for a person: the metric's cut-off
    (named unless it is the default ``detection_z``), a range when the micrographs' cut-offs
    differ, ``(fixed)`` when it was given rather than derived."""
    picking = picking or PeaksConfig()
    low, high = f"{min(cutoffs):.2f}", f"{max(cutoffs):.2f}"
    span = low if low == high else f"{low}–{high}"
    symbol = "-ln p*" if picking.metric == "pvalue" else "z*"
    if picking.metric != PeaksConfig().metric:
        symbol += f" of {picking.metric}"
    if picking.metric == "pvalue" or picking.z_score_cutoff is not None:
        return f"{symbol} = {span} (fixed)"
    fp = picking.false_positives
    return f"{symbol} = {span} ({fp:g} false positive{'s' * (fp != 1)} per micrograph)"


def map_thresholds(
    results: str | os.PathLike[str], picking: PeaksConfig | None = None
) -> dict[str, float]:
    """``{micrograph_name: cut-off}`` of a results store, as :func:`repick` applies them."""
    return {name: map_threshold(ds, picking) for name, ds in open_results(results).items()}


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


def picking_of(settings: dict[str, Any]) -> tuple[PeaksConfig, dict[str, float]]:
    """The options and the cut-offs per micrograph of a :data:`PICKING_FILE`'s contents
    (:func:`read_picking`); files written before metrics existed picked the scaled MIP."""
    if "options" in settings:
        return PeaksConfig.model_validate(settings["options"]), dict(settings["thresholds"])
    fixed = settings.get("z_score_cutoff")
    old = PeaksConfig(
        metric="scaled_mip",
        false_positives=settings.get("false_positives") or 1.0,
        z_score_cutoff=fixed,
    )
    return old, dict(settings.get("z_thresholds") or {})


def threshold_summary(results: str | os.PathLike[str]) -> str:
    """:func:`threshold_label` of the cut-offs that the last pick of ``results`` applied.

    Raises
    ------
    InputError
        No peaks were picked there yet (or before :data:`PICKING_FILE` existed).
    """
    settings = read_picking(results)
    if settings is None:
        raise InputError(f"{results}: no {PICKING_FILE} (pick the peaks with dtm peaks)")
    picking, cutoffs = picking_of(settings)
    return threshold_label(list(cutoffs.values()), picking)


#: The default z picking, whose threshold the ``detection_z`` column uses with other metrics.
_Z_ONLY = PeaksConfig()


def _region_maps(region: xr.Dataset) -> dict[str, np.ndarray]:
    names = ("mip", "scaled_mip", "correlation_mean", "correlation_variance")
    return {name: np.asarray(region[name].values) for name in names}


def peaks_table(
    ds: xr.Dataset, picking: PeaksConfig | None = None, *, cutoff: float | None = None
) -> pd.DataFrame:
    """The peaks of one micrograph's results as a table with the seed's columns.

    Parameters
    ----------
    ds
        Results dataset of one micrograph (docs/architecture.md, "Results dataset"); its
        maps may be lazy: the four statistics maps are loaded whole.
    picking
        Metric, threshold, minimum distance and border (default :class:`PeaksConfig`: the
        detection statistic, one false positive per micrograph, the template's radius).
    cutoff
        The metric's cut-off when already known (:func:`map_threshold`, which a ``gev``
        metric spends a fit on); default: computed here.

    Returns
    -------
    pandas.DataFrame
        One row per peak, strongest first by the metric, columns :data:`PEAK_COLUMNS`.
        ``pos_x/pos_y``: map pixel (template box top-left); ``pos_*_img = pos_* + box // 2``;
        ``*_angstrom`` = ``*_img`` × the micrograph's pixel size along that axis
        (``axis_pixel_size``, which after Fourier cropping differs slightly from
        ``pixel_size``); ``relative_defocus`` from the defocus map; ``detection_z`` the
        detection statistic at the peak whatever the metric.
    """
    picking = picking or PeaksConfig()
    missing = [name for name in _REQUIRED_ATTRS if name not in ds.attrs]
    missing += [name for name in list(MAP_NAMES) if name not in ds.data_vars]
    if missing:
        label = ds.attrs.get("micrograph_name", "results dataset")
        raise InputError(f"{label}: results lack {', '.join(missing)}")
    region = search_region(ds)
    if cutoff is None:
        cutoff = map_threshold(ds, picking)
    box_h, box_w = (int(n) for n in _attr(ds, "template_shape")[-2:])
    box = (box_h, box_w)
    maps = _region_maps(region)
    values = metric_map(maps, picking.metric, box, cutoff)
    # The detection statistic's own cut-off, for its column when another metric picks.
    z_cutoff = cutoff if picking.metric == "detection_z" else map_threshold(ds, _Z_ONLY)
    z = (
        values
        if picking.metric == "detection_z"
        else metric_map(maps, "detection_z", box, z_cutoff)
    )
    peaks = pick_peaks(
        values,
        cutoff,
        min_distance=min_distance_pixels(ds, picking),
        border=picking.border_pixels,
    )
    iy, ix = peaks[:, 0], peaks[:, 1]
    at = {"y": xr.DataArray(iy, dims="peak"), "x": xr.DataArray(ix, dims="peak")}
    picked = region[list(MAP_NAMES)].isel(at).compute()
    neg_log_p = values if picking.metric == "pvalue" else metric_map(maps, "pvalue", box, cutoff)
    if picking.merge_side_maxima and len(iy) > 1:
        distinct = _distinct(ds, picked, z[iy, ix], z_cutoff)
        picked, iy, ix = picked.isel(peak=distinct), iy[distinct], ix[distinct]

    attrs = ds.attrs
    pixel_size = float(attrs["pixel_size"])
    along_y, along_x = axis_pixel_size(attrs, pixel_size)
    pos_y = region["y"].values[iy].astype(np.int64)
    pos_x = region["x"].values[ix].astype(np.int64)
    n = len(iy)
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
        **{name: np.full(n, float(attrs[name])) for name in OPTICS_FIELDS},
        "micrograph_path": [str(attrs["micrograph_path"])] * n,
        "template_path": [str(attrs["template_path"])] * n,
        **{col: [str(map_paths.get(key, ""))] * n for col, key in _MAP_PATH_COLUMNS.items()},
        "micrograph_name": [str(attrs["micrograph_name"])] * n,
        "particle_index": np.arange(n, dtype=np.int64),
        "micrograph_pixel_size": np.full(
            n, float(attrs.get("original_pixel_size", pixel_size)), dtype=np.float64
        ),
        "detection_z": z[iy, ix].astype(np.float64),
        "neg_log_pvalue": neg_log_p[iy, ix].astype(np.float64),
        **leopard_columns(attrs, n),
    }
    return coerce_peak_dtypes(pd.DataFrame({name: columns[name] for name in PEAK_COLUMNS}))


def leopard_columns(attrs: dict[str, Any], n: int) -> dict[str, Any]:
    """The columns Leopard-EM's ``ParticleStack`` requires besides the seed's, for ``n`` rows
    of one micrograph: ``refined_pixel_size`` (the pixel size the search used, as Leopard-EM
    writes it before any refinement) and the CTF's aberrations and magnification as
    Leopard-EM reads them (compact JSON text; empty when none)."""
    even = zernikes_text(as_zernikes(attrs.get("even_zernikes"), kind="even"))
    odd = zernikes_text(as_zernikes(attrs.get("odd_zernikes"), kind="odd"))
    return {
        "refined_pixel_size": np.full(n, float(attrs["pixel_size"])),
        "even_zernikes": [even] * n,
        "odd_zernikes": [odd] * n,
        "mag_matrix": [mag_matrix_text(as_mag_matrix(attrs.get("mag_matrix")))] * n,
    }


def _group_peaks(
    group: str | None, store: str, picking: PeaksConfig, cutoffs: dict[str, float]
) -> pd.DataFrame:
    """One partition: open one micrograph's group (on the worker) and pick its peaks.

    The maps are opened without dask chunks: reading the few picked pixels inside this task
    must not become a graph of its own, sent back to the cluster's scheduler.
    """
    ds = xr.open_zarr(store, group=group, consolidated=False, chunks=None)
    return peaks_table(ds, picking, cutoff=cutoffs.get(str(ds.attrs.get("micrograph_name"))))


def peaks_dataframe(
    results: str | os.PathLike[str],
    picking: PeaksConfig | None = None,
    *,
    cutoffs: dict[str, float] | None = None,
) -> dd.DataFrame:
    """Peaks of every micrograph of a results store as a lazy dask dataframe.

    Parameters
    ----------
    results
        An output directory or its ``results.zarr``; a local path or an fsspec URL
        (``file://``, ``memory://``, ``s3://`` ...).
    picking
        As in :func:`peaks_table`.
    cutoffs
        ``{micrograph_name: cut-off}`` already computed (:func:`map_thresholds`); the
        micrographs not in it compute their own.

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
    # Keep pandas' own string dtype (as in peaks_table) rather than dask's pyarrow strings.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(
            _group_peaks,
            groups,
            store=store,
            picking=picking or PeaksConfig(),
            cutoffs=cutoffs or {},
            meta=empty_peak_table(),
            label="peaks",
            enforce_metadata=True,
        )


def read_peaks(results: str | os.PathLike[str]) -> tuple[pd.DataFrame, str]:
    """:func:`dtm.io.results.read_peak_table` of an output directory (local path or fsspec
    URL); where it holds no table, the peaks picked now from its maps with the default
    threshold (one false positive per micrograph), with a note saying so instead of a file
    name."""
    found = read_peak_table(results)
    if found is not None:
        return found
    table = peaks_dataframe(results).compute().reset_index(drop=True)
    return table, "picked now (no peak table in the results directory; default picking)"


def repick(
    results_dir: str | os.PathLike[str],
    picking: PeaksConfig | None = None,
    *,
    client: Any = None,
) -> pd.DataFrame:
    """Pick peaks again from ``RESULTS_DIR/results.zarr`` (the ``dtm peaks`` command).

    Writes ``peaks.csv``, ``peaks.parquet/`` (partitioned by micrograph) and ``peaks.star``
    in ``results_dir``, all replaced together only once every one is written, then
    :data:`PICKING_FILE` with the options used, the cut-off applied to each micrograph (what
    ``dtm report`` shows as the threshold) and each one's minimum distance.

    Parameters
    ----------
    results_dir
        Output directory of ``dtm match``.
    picking
        As in :func:`peaks_table`.
    client
        A ``distributed.Client`` to compute on; default: dask's current scheduler.

    Returns
    -------
    pandas.DataFrame
        The new table.
    """
    picking = picking or PeaksConfig()
    directory = Path(results_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: results directory not found")
    if not (directory / RESULTS_STORE).exists():
        if (directory / JOB_FILE).exists():
            raise InputError(
                f"{directory}: its search has not finished (continue it with "
                "dtm match CONFIG --resume)"
            )
        raise InputError(f"{directory}: no results.zarr here (run dtm match first)")
    datasets = open_results(directory)
    cutoffs = {name: map_threshold(ds, picking) for name, ds in datasets.items()}
    table_graph = peaks_dataframe(directory / RESULTS_STORE, picking, cutoffs=cutoffs)
    table = client.compute(table_graph).result() if client is not None else table_graph.compute()
    table = table.reset_index(drop=True)
    write_table(table, directory, PEAKS_STEM)
    settings = {
        "options": picking.model_dump(mode="json"),
        "thresholds": cutoffs,
        "min_distances_pixels": {
            name: min_distance_pixels(ds, picking) for name, ds in datasets.items()
        },
    }
    write_json(directory / PICKING_FILE, settings)
    return table
