"""Functions that run as Dask tasks of a search, on the workers.

Each task reads only its arguments and writes only its own files, so Dask may rerun any of
them (after a lost worker, or on resume) and get the same result; the one module-level state
is a per-process cache of GPU copies of the shared inputs, which changes no result. The
last task of a micrograph, which writes its results, is :func:`dtm.runtime.persist.persist`:
kept apart so that workers which only correlate never import xarray and zarr.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dtm.io.atomic import write_atomic
from dtm.io.mrc import read_micrograph, read_template
from dtm.physics.projection import PreparedTemplate, prepare_template
from dtm.physics.resample import fourier_crop
from dtm.runtime.throughput import count_correlations
from dtm.search.kernel import correlate_chunk
from dtm.search.prepare import FilterSettings, ImageInputs, Optics, prepare_image
from dtm.search.space import SearchSpace
from dtm.search.stats import PartialStats, merge_all

#: Per-process copies of shared inputs on the GPU, keyed by the input's identity.
_DEVICE_CACHE: dict[tuple[str, int], tuple[Any, Any]] = {}


@dataclass(frozen=True)
class MicrographTask:
    """What a worker needs to prepare one micrograph."""

    name: str
    path: str
    optics: Optics
    box_shape: tuple[int, int]
    filters: FilterSettings
    mode: str
    #: Fourier-crop the micrograph to this pixel size (Å) first (``high_resolution_limit``).
    crop_pixel_size: float | None = None
    #: Pixel size of the configuration, used whatever the MRC header says.
    fallback_pixel_size: float | None = None


def _to_device(kind: str, value: Any, device: str) -> Any:
    """A GPU copy of a shared input, made once per worker process.

    The cache keeps the host object beside its copy and checks it is the same object, so an
    address reused by a later input can never return the copy of an earlier one.
    """
    if device != "gpu":
        return value
    import cupy  # noqa: PLC0415 (optional dependency, GPU workers only)

    key = (kind, id(value))
    entry = _DEVICE_CACHE.get(key)
    if entry is None or entry[0] is not value:
        if len(_DEVICE_CACHE) > 8:
            _DEVICE_CACHE.clear()
        if isinstance(value, PreparedTemplate):
            copy = replace(
                value,
                spectrum=cupy.asarray(value.spectrum),
                centring_phase=cupy.asarray(value.centring_phase),
            )
        else:
            copy = replace(
                value, spectrum=cupy.asarray(value.spectrum), filters=cupy.asarray(value.filters)
            )
        entry = (value, copy)
        _DEVICE_CACHE[key] = entry
    return entry[1]


def load_template(
    path: str, crop_pixel_size: float | None = None, pixel_size: float | None = None
) -> PreparedTemplate:
    """Read the template (Fourier-cropped to ``crop_pixel_size``) and prepare it for slicing.

    ``pixel_size`` is the configuration's, used whatever the header says (a header that
    differs was noted when the run was planned); without it, the header's.
    """
    template = read_template(path, pixel_size=pixel_size)
    volume = template.data
    if crop_pixel_size is not None:
        original = pixel_size or template.pixel_size
        volume, _ = fourier_crop(volume, original, new_pixel_size=crop_pixel_size)
    return prepare_template(volume)


def load_micrograph(task: MicrographTask, relative_defocus: np.ndarray) -> ImageInputs:
    """Read, whiten and normalise a micrograph; build its filter stack."""
    micrograph = read_micrograph(task.path, pixel_size=task.fallback_pixel_size)
    data = micrograph.data
    if task.crop_pixel_size is not None:
        original = task.fallback_pixel_size or micrograph.pixel_size  # the configuration's
        data, _ = fourier_crop(data, original, new_pixel_size=task.crop_pixel_size)
    return prepare_image(
        data,
        box_shape=task.box_shape,
        optics=task.optics,
        relative_defocus=relative_defocus,
        filters=task.filters,
        mode=task.mode,  # type: ignore[arg-type]
    )


def correlate(
    image: ImageInputs,
    template: PreparedTemplate,
    space: SearchSpace,
    start: int,
    stop: int,
    device: str = "cpu",
    table: tuple[float, int] | None = None,
) -> PartialStats:
    """Partial statistics of orientations ``[start, stop)`` × every defocus plane.

    ``table``: ``(cutoff, max_rows)`` of the correlation table, whose rows then come
    with the statistics (:mod:`dtm.search.table`); ``None``: no table.
    """
    image = _to_device("image", image, device)
    template = _to_device("template", template, device)
    cutoff, max_rows = (None, 0) if table is None else table
    stats = correlate_chunk(
        image,
        template,
        space.euler[start:stop],
        start,
        table_cutoff=cutoff,
        max_table_rows=max_rows,
    ).to_numpy()
    count_correlations((stop - start) * space.n_defocus)
    return stats


def merge(*parts: PartialStats, checkpoint: str | None = None) -> PartialStats:
    """Merge partial statistics in a fixed order; optionally persist the result."""
    merged = merge_all(list(parts))
    if checkpoint is not None:
        write_atomic(Path(checkpoint), merged.save)
    return merged


def load_checkpoint(path: str) -> PartialStats:
    """Partial statistics persisted by an earlier (interrupted) run."""
    return PartialStats.load(path)
