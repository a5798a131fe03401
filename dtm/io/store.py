"""Persistence of search results: the zarr store and the `.mrc` maps (and where everything
lies in an output directory).

Layout of an output directory::

    results.zarr/            xarray dataset (one micrograph) or one group per micrograph
    maps/[NAME_]mip.mrc ...  the eight maps as MRC files with the voxel size set
    checkpoints/TOKEN/*.npz  merged partial statistics of finished subtrees (while running)
    job.json                 every parameter of the run, to trace and resume it
    run.json                 per-micrograph status, timings and versions
    peaks.csv, .parquet/, .star   the peak tables, and peaks.json: how they were picked

Everything is written to a temporary name and renamed into place, so a crash never leaves a
half-written result that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from dtm.errors import InputError
from dtm.io.atomic import check_inside, replace_atomic, temporary_name, write_atomic
from dtm.io.mrc import write_map
from dtm.io.pyramid import PYRAMID_MAPS, write_pyramid
from dtm.schema import MRC_NAMES, RESULTS_STORE

#: Chunking of the full-resolution maps in zarr, for browsing.
BROWSE_CHUNK = 512


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically."""

    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)

    write_atomic(path, dump)


def axis_pixel_size(attrs: dict[str, Any], pixel_size: float) -> tuple[float, float]:
    """Å per pixel along y and x of the micrograph as searched: ``attrs["axis_pixel_size"]``
    (a Fourier-cropped micrograph's own), else ``pixel_size`` (results written before it)."""
    along_y, along_x = attrs.get("axis_pixel_size") or (pixel_size, pixel_size)
    return float(along_y), float(along_x)


def build_dataset(
    maps: dict[str, np.ndarray], *, pixel_size: float, attrs: dict[str, Any]
) -> xr.Dataset:
    """An xarray dataset of statistics maps with pixel and Å coordinates.

    Parameters
    ----------
    maps : dict of str to numpy.ndarray
        ``(Hm, Wm)`` float32 maps.
    pixel_size : float
        Å per pixel.
    attrs : dict
        JSON-serialisable attributes (see docs/architecture.md); an ``axis_pixel_size``
        ``[y, x]`` there (a Fourier-cropped micrograph's own) sets the Å coordinates.
    """
    hm, wm = next(iter(maps.values())).shape
    y = np.arange(hm, dtype=np.int64)
    x = np.arange(wm, dtype=np.int64)
    along_y, along_x = axis_pixel_size(attrs, pixel_size)
    return xr.Dataset(
        {name: (("y", "x"), data) for name, data in maps.items()},
        coords={
            "y": y,
            "x": x,
            "y_angstrom": ("y", y * along_y),
            "x_angstrom": ("x", x * along_x),
        },
        attrs=attrs,
    )


def ensure_root_group(store: Path) -> None:
    """Create the store's root group unless it exists.

    A run of several micrographs makes it before submitting their tasks; a persist task
    that still races another to create it (two processes on a shared store) finds it made
    by the other, which is what it wanted.
    """
    if (store / "zarr.json").exists():
        return
    with contextlib.suppress(zarr.errors.ContainsGroupError):
        zarr.open_group(str(store), mode="a")


def write_dataset(
    dataset: xr.Dataset, store: Path, group: str | None = None, *, pyramid: bool = True
) -> None:
    """Write a dataset to ``store`` (at its root, or as ``group``) so it appears whole.

    The dataset is written beside its destination and renamed into place. With
    ``pyramid``, max-pooled levels of its ``scaled_mip`` and ``mip`` go into its
    ``pyramid/`` subgroup before the rename (:mod:`dtm.io.pyramid`).
    """
    chunks = {
        "y": min(BROWSE_CHUNK, dataset.sizes["y"]),
        "x": min(BROWSE_CHUNK, dataset.sizes["x"]),
    }
    encoding = {name: {"chunks": (chunks["y"], chunks["x"])} for name in dataset.data_vars}
    final = store if group is None else store / group
    check_inside(final, store)  # a group name such as ../x never leaves the store
    final.parent.mkdir(parents=True, exist_ok=True)
    if group is not None:
        ensure_root_group(store)

    def write(tmp: str) -> None:
        dataset.to_zarr(tmp, mode="w", consolidated=False, encoding=encoding)
        maps = {name: dataset[name].values for name in PYRAMID_MAPS if name in dataset}
        if pyramid and maps:
            write_pyramid(Path(tmp), None, maps)

    # Written outside the store (same file system) so that a half-written group is never
    # listed as a micrograph of the store; the old group stays until the new one is whole.
    replace_atomic(final, write, temporary=temporary_name(store.parent / f"{store.name}-{group}"))


def export_maps(
    maps: dict[str, np.ndarray],
    directory: Path,
    *,
    pixel_size: float,
    prefix: str = "",
    extra_paths: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write each map as ``directory/PREFIX + MRC_NAMES[name]`` (and to ``extra_paths``).

    Returns
    -------
    dict of str to str
        Map name → path of its `.mrc` file in ``directory``.
    """
    paths = {}
    for name, data in maps.items():
        path = check_inside(directory / f"{prefix}{MRC_NAMES[name]}", directory)
        write_map(path, data, pixel_size=pixel_size)
        paths[name] = str(path)
        if extra_paths and extra_paths.get(name):
            # The user named this path (Leopard-EM's match_template_result): its own root.
            write_map(Path(extra_paths[name]), data, pixel_size=pixel_size)
    return paths


def result_groups(store: str | Path) -> list[str | None]:
    """Groups of a results store: ``[None]`` for a single dataset at the root."""
    root = zarr.open_group(str(store), mode="r")
    if "mip" in root.array_keys():
        return [None]
    names = sorted(str(name) for name in root.group_keys())
    groups: list[str | None] = [name for name in names if not name.startswith(".")]
    return groups


def store_url(results: str | os.PathLike[str]) -> str:
    """The ``results.zarr`` store of an output directory, or ``results`` if it is one
    (local path or fsspec URL)."""
    store = str(results).rstrip("/")
    return store if store.endswith(".zarr") else f"{store}/{RESULTS_STORE}"


def output_directory(results: str | os.PathLike[str]) -> str:
    """The output directory of a results store or of an output directory itself."""
    store = store_url(results)
    return store.rsplit("/", 1)[0] if "/" in store else "."


def open_results(path: str | os.PathLike[str]) -> dict[str, xr.Dataset]:
    """Open a results store lazily: ``{micrograph_name: Dataset}``.

    Parameters
    ----------
    path : str or Path
        An output directory, or its ``results.zarr`` (local path or fsspec URL).
    """
    store = store_url(path)
    try:
        groups = result_groups(store)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise InputError(f"{store}: no dtm results store here ({exc})") from None
    datasets = {}
    for group in groups:
        ds = xr.open_zarr(store, group=group, consolidated=False)
        datasets[str(ds.attrs.get("micrograph_name", group))] = ds
    return datasets
