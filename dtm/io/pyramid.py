"""Multiscale pyramid of the MIP maps in ``results.zarr``, for quick views of big maps.

Beside a micrograph's full-resolution dataset, ``pyramid/F`` holds ``mip`` and
``scaled_mip`` reduced by ``F × F`` blocks for ``F = 2, 4, 8, …`` until the longer side of
the coarsest level is at most :data:`PYRAMID_MIN_SIZE` pixels::

    results.zarr/[GROUP/]mip, scaled_mip, …     full resolution (chunks 512 × 512)
    results.zarr/[GROUP/]pyramid/2/mip, …        2 × 2 blocks
    results.zarr/[GROUP/]pyramid/4/mip, …        4 × 4 blocks …

Each level is an xarray dataset (``xarray.open_zarr(store, group="[GROUP/]pyramid/F")``)
whose coordinates ``y``, ``x`` are the full-resolution pixel of each block's top-left
corner, so level pixel ``(i, j)`` covers full-resolution pixels ``[i F, (i + 1) F) ×
[j F, (j + 1) F)``. The ``pyramid`` group's ``multiscales`` attribute lists the levels, in
the spirit of OME-Zarr.

Blocks are **max**-pooled, not averaged: a particle is a peak a few pixels wide in a MIP
map, and averaging would dilute it into the noise at coarse levels (a 3-pixel peak loses
~90 % of its height in 8 × 8 means), while the block maximum keeps it exactly as high as at
full resolution, so the pyramid shows every peak that could pass the threshold. The
background looks brighter than at full resolution (the maximum of many noise values):
coarse levels are for finding things, full resolution for judging them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

#: Maps of the results dataset that get a pyramid.
PYRAMID_MAPS = ("scaled_mip", "mip")
#: The coarsest level's longer side is at most this many pixels.
PYRAMID_MIN_SIZE = 256
#: Zarr chunk side of the pyramid levels (as the full-resolution maps).
PYRAMID_CHUNK = 512
#: Name of the pyramid group inside a micrograph's group.
PYRAMID_GROUP = "pyramid"


def pyramid_factors(shape: tuple[int, int], min_size: int = PYRAMID_MIN_SIZE) -> list[int]:
    """Downsampling factors ``[2, 4, …]`` for a ``(height, width)`` map.

    Halves until the longer side of the coarsest level is at most ``min_size`` pixels;
    at least one level (factor 2) for any map larger than one pixel.
    """
    longest = max(int(n) for n in shape)
    factors: list[int] = []
    factor = 2
    while longest > 1:
        factors.append(factor)
        if math.ceil(longest / factor) <= min_size:
            break
        factor *= 2
    return factors


def max_pool(data: np.ndarray, factor: int) -> np.ndarray:
    """Maximum over ``factor × factor`` blocks of a 2-D map.

    Parameters
    ----------
    data
        ``(h, w)`` map.
    factor
        Block side in pixels (>= 1).

    Returns
    -------
    numpy.ndarray
        ``(ceil(h / factor), ceil(w / factor))``; blocks at the bottom and right edges are
        partial. NaN is ignored unless a block holds nothing else.
    """
    h, w = data.shape
    out_h, out_w = -(-h // factor), -(-w // factor)
    padded = np.full((out_h * factor, out_w * factor), np.nan, dtype=data.dtype)
    padded[:h, :w] = data
    blocks = padded.reshape(out_h, factor, out_w, factor)
    # fmax skips NaN (padding, and NaN margins of a map) where nanmax would warn on them.
    return np.fmax.reduce(np.fmax.reduce(blocks, axis=3), axis=1)


def pyramid_path(group: str | None) -> str:
    """Zarr path of the pyramid group of a micrograph (``None``: dataset at the root)."""
    return PYRAMID_GROUP if group is None else f"{group}/{PYRAMID_GROUP}"


def write_pyramid(
    store: Path,
    group: str | None,
    maps: dict[str, np.ndarray],
    *,
    factors: list[int] | None = None,
) -> list[int]:
    """Write max-pooled levels of ``maps`` as ``[group/]pyramid/F`` in a local zarr store.

    Parameters
    ----------
    store
        Local zarr store (directory) holding, or about to hold, the full dataset.
    group
        Group of the micrograph's dataset, ``None`` for the store's root.
    maps
        Map name → ``(h, w)`` full-resolution map (usually :data:`PYRAMID_MAPS`).
    factors
        Downsampling factors; default :func:`pyramid_factors` of the maps' shape.

    Returns
    -------
    list of int
        The factors written.
    """
    shape = next(iter(maps.values())).shape
    factors = pyramid_factors(shape) if factors is None else sorted(factors)
    base = pyramid_path(group)
    previous, previous_factor = dict(maps), 1
    for factor in factors:
        if factor % previous_factor:
            previous, previous_factor = dict(maps), 1
        # Nested blocks: the max over 2F-blocks is the max over 2 × 2 blocks of level F.
        step = factor // previous_factor
        levels = {name: max_pool(np.asarray(data), step) for name, data in previous.items()}
        previous, previous_factor = levels, factor
        h, w = next(iter(levels.values())).shape
        level = xr.Dataset(
            {name: (("y", "x"), data.astype(np.float32)) for name, data in levels.items()},
            coords={
                "y": np.arange(h, dtype=np.int64) * factor,
                "x": np.arange(w, dtype=np.int64) * factor,
            },
            attrs={
                "downsample_factor": factor,
                "reduction": "max",
                "full_shape": [int(shape[0]), int(shape[1])],
            },
        )
        chunks = (min(PYRAMID_CHUNK, h), min(PYRAMID_CHUNK, w))
        level.to_zarr(
            str(store),
            group=f"{base}/{factor}",
            mode="w",
            consolidated=False,
            encoding={name: {"chunks": chunks} for name in level.data_vars},
        )
    pyramid = zarr.open_group(str(store), path=base, mode="a")
    pyramid.attrs["multiscales"] = [
        {
            "version": "dtm-1",
            "reduction": "max",
            "maps": sorted(maps),
            "datasets": [{"path": str(f), "downsample_factor": f} for f in factors],
        }
    ]
    return factors


def open_pyramid(store: str | Path, group: str | None) -> dict[int, xr.Dataset]:
    """The pyramid levels of a micrograph, lazily: ``{factor: Dataset}``.

    Parameters
    ----------
    store
        A ``results.zarr`` store: local path or fsspec URL.
    group
        The micrograph's group (``None`` for a dataset at the root).

    Returns
    -------
    dict of int to xarray.Dataset
        Factor → level, finest first; empty if the store has no pyramid (older results).
    """
    try:
        pyramid = zarr.open_group(str(store), path=pyramid_path(group), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}
    multiscales: Any = pyramid.attrs.get("multiscales", [{"datasets": []}])
    [spec] = multiscales
    paths = {int(item["downsample_factor"]): str(item["path"]) for item in spec["datasets"]}
    return {
        factor: xr.open_zarr(str(store), group=f"{pyramid_path(group)}/{path}", consolidated=False)
        for factor, path in sorted(paths.items())
    }
