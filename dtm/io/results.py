"""Read an output directory of ``dtm match`` for viewing: maps, pyramids and peaks.

The directory may be local or remote: any fsspec URL (``s3://bucket/run``, ``file://…``,
``memory://…``) works, since zarr, xarray and fsspec read the store and the tables.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pandas as pd
import xarray as xr
from fsspec.implementations.local import LocalFileSystem

from dtm.io.pyramid import open_pyramid
from dtm.io.store import open_results, output_directory, result_groups, store_url
from dtm.io.tables import read_table
from dtm.schema import PEAK_TABLES


@dataclass(frozen=True)
class MicrographResults:
    """One micrograph of a results store, opened lazily."""

    name: str
    group: str | None
    dataset: xr.Dataset
    #: Downsampling factor → max-pooled ``mip``/``scaled_mip`` (empty for older stores).
    pyramid: dict[int, xr.Dataset]


def open_micrographs(results: str | os.PathLike[str]) -> list[MicrographResults]:
    """Every micrograph of an output directory (or its ``results.zarr``), in group order.

    Parameters
    ----------
    results
        Local path or fsspec URL.
    """
    store = store_url(results)
    datasets = open_results(store)
    groups = result_groups(store)
    if groups == [None]:
        [(name, dataset)] = datasets.items()
        return [MicrographResults(name, None, dataset, open_pyramid(store, None))]
    # Several micrographs: each group is named after its micrograph.
    return [
        MicrographResults(str(group), group, datasets[str(group)], open_pyramid(store, group))
        for group in groups
    ]


def read_peak_table(results: str | os.PathLike[str]) -> tuple[pd.DataFrame, str] | None:
    """The peak table that an output directory holds, and its file name.

    Reads ``peaks.csv`` (else ``peaks.parquet``) of the output directory; None when it has
    neither (:func:`dtm.programs.peaks.read_peaks` then picks peaks from the maps).

    Parameters
    ----------
    results
        Output directory or its ``results.zarr``: local path or fsspec URL.

    Returns
    -------
    pandas.DataFrame
        Columns of :data:`dtm.io.tables.PEAK_COLUMNS`, one row per peak.
    str
        The table's file name.
    """
    directory = output_directory(results)
    fs, root = fsspec.core.url_to_fs(directory)
    for name in PEAK_TABLES:
        path = f"{root.rstrip('/')}/{name}"
        if not fs.exists(path):
            continue
        if isinstance(fs, LocalFileSystem):
            return read_table(path), name
        with tempfile.TemporaryDirectory(prefix="dtm-peaks-") as tmp:
            local = Path(tmp) / name
            fs.get(path, str(local), recursive=fs.isdir(path))
            return read_table(local), name
    return None
