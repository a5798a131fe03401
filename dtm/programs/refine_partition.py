"""One partition of refine-template: the particles of one micrograph.

The micrograph is read once, whitened, band-passed and normalised with
:func:`dtm.search.prepare.filter_micrograph` exactly as the match search does it (pixel variance
``1/(H·W)`` of the whole micrograph), and the boxes are cut from the filtered image, so the
correlations are on the match's scale. Projection filters are CTF (at each particle's
relative defocus + offsets) × the same whitening × band-pass as the match's. The match's
correlation mean and variance maps give each candidate's z-score (a standard-deviation map
written by Leopard-EM under that name is recognised and squared: :mod:`dtm.io.leopard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dtm.config import PreprocessingFilters
from dtm.errors import InputError
from dtm.io import leopard
from dtm.io.mrc import pixel_sizes_differ, read_micrograph
from dtm.io.store import open_results
from dtm.physics.aberrations import magnified_rotations
from dtm.physics.orientations import local_grid
from dtm.physics.projection import PreparedTemplate
from dtm.physics.rotations import compose, euler_to_matrix, matrix_to_euler
from dtm.programs.particles import extract_boxes
from dtm.search.local import BATCH_BYTES, search_particle, search_window
from dtm.search.prepare import (
    FilterSettings,
    Optics,
    filter_micrograph,
    filter_stack,
    image_filter,
    projection_filters,
)

#: Columns appended by refine-template → dtype (the order of docs/outputs.md, then the box flag).
REFINED_DTYPES: dict[str, str] = {
    "refined_mip": "float64",
    "refined_scaled_mip": "float64",
    "refined_pos_x": "int64",
    "refined_pos_y": "int64",
    "refined_pos_x_img": "int64",
    "refined_pos_y_img": "int64",
    "refined_pos_x_img_angstrom": "float64",
    "refined_pos_y_img_angstrom": "float64",
    "refined_psi": "float64",
    "refined_theta": "float64",
    "refined_phi": "float64",
    "refined_relative_defocus": "float64",
    "refined_box_inside": "bool",
}

#: Starting value of a refinement → the refined column that replaces it on a second run.
START_COLUMNS: dict[str, str] = {
    "pos_y": "refined_pos_y",
    "pos_x": "refined_pos_x",
    "phi": "refined_phi",
    "theta": "refined_theta",
    "psi": "refined_psi",
    "relative_defocus": "refined_relative_defocus",
}


@dataclass(frozen=True)
class RefineSettings:
    """The local search, the same for every particle (built from the refine config).

    Attributes
    ----------
    box_size : tuple of int
        ``(by, bx)`` of the extracted boxes, pixels.
    radius : tuple of int
        Position search ``(ry, rx)``, ± pixels.
    orientation_steps : tuple of float or None
        ``(theta_coarse, theta_fine, psi_coarse, psi_fine)`` of
        :func:`dtm.physics.orientations.local_grid` in degrees; None keeps the orientation.
    defocus_offsets : numpy.ndarray
        Relative defocus offsets from each particle's starting value, Å.
    filters : PreprocessingFilters
        Whitening and band-pass, as in the match search.
    global_filtering : bool
        Filter the whole micrograph and cut the boxes (the match's scale); false filters and
        normalises each box on its own.
    batch_bytes : int
        Memory bound of one FFT batch.
    """

    box_size: tuple[int, int]
    radius: tuple[int, int]
    orientation_steps: tuple[float, float, float, float] | None
    defocus_offsets: np.ndarray
    filters: PreprocessingFilters
    global_filtering: bool = True
    batch_bytes: int = BATCH_BYTES

    def offsets(self) -> np.ndarray:
        """Rotation offsets ``(m, 3, 3)``, the identity first."""
        if self.orientation_steps is None:
            return np.eye(3)[None]
        theta_coarse, theta_fine, psi_coarse, psi_fine = self.orientation_steps
        return local_grid(
            theta_step_coarse=theta_coarse,
            theta_step_fine=theta_fine,
            psi_step_coarse=psi_coarse,
            psi_step_fine=psi_fine,
        )


def start_columns(table: pd.DataFrame) -> dict[str, str]:
    """Where each particle's starting values come from: the refined columns when the table
    has all of them (a refined table is refined further), else the search's."""
    refined = all(name in table for name in START_COLUMNS.values())
    return {
        name: (refined_name if refined else name) for name, refined_name in START_COLUMNS.items()
    }


def _filtered_micrograph(
    image: np.ndarray, box: tuple[int, int], optics: Optics, filters: FilterSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The micrograph filtered and normalised exactly as the match search does it, and the
    whitening × band-pass of its projections on the template's rfft grid."""
    filtered, profile = filter_micrograph(image, pixel_size=optics.pixel_size, filters=filters)
    return filtered, image_filter(box, filters, optics.pixel_size, profile, np)


def _statistics_maps(
    row: pd.Series, expected: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The match search's correlation mean and variance maps of one micrograph.

    From the ``.mrc`` files of the table, or else the ``results.zarr`` store beside them
    (``OUTPUT_DIR/maps/*.mrc`` and ``OUTPUT_DIR/results.zarr``).
    """
    label = str(row["micrograph_path"])
    paths = [str(row["correlation_average_path"]), str(row["correlation_variance_path"])]
    if all(p and Path(p).is_file() for p in paths):
        pixel_size = float(row["pixel_size"])
        maps = [read_micrograph(p, pixel_size=pixel_size).data for p in paths]
        source = paths[0]
    else:
        maps, source = _statistics_from_store(row, paths)
    shape = tuple(int(n) for n in maps[0].shape)
    if shape not in expected or maps[1].shape != maps[0].shape:
        raise InputError(
            f"{source}: statistics map shape {shape} does not fit micrograph {label} with this "
            f"template (expected {' or '.join(map(str, expected))}): template mismatch?"
        )
    return maps[0], maps[1]


def _statistics_from_store(row: pd.Series, paths: list[str]) -> tuple[list[np.ndarray], str]:
    candidates = []
    for path in paths:
        if path:
            candidates += [Path(path).parent.parent, Path(path).parent]
    for directory in candidates:
        store = directory / "results.zarr"
        if store.exists():
            results = open_results(store)
            name = str(row.get("micrograph_name", ""))
            ds = results.get(name) if len(results) > 1 else next(iter(results.values()))
            if ds is not None:
                maps = [ds[n].values for n in ("correlation_mean", "correlation_variance")]
                return [np.asarray(m, dtype=np.float32) for m in maps], str(store)
    raise InputError(
        f"{row['micrograph_path']}: correlation mean/variance maps not found "
        f"(correlation_average_path {paths[0]!r}, no results.zarr beside it)"
    )


def _filtered_box(
    raw: np.ndarray,
    box: tuple[int, int],
    optics: Optics,
    filters: FilterSettings,
    relative: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """A box filtered and normalised on its own (``apply_global_filtering: false``), and
    the projection filters of every defocus offset."""
    filtered, profile = filter_micrograph(raw, pixel_size=optics.pixel_size, filters=filters)
    return filtered, projection_filters(box, optics, relative, filters, profile)


def refine_partition(
    part: pd.DataFrame, template: PreparedTemplate, settings: RefineSettings
) -> pd.DataFrame:
    """Refine the particles of one micrograph (one dask partition).

    The micrograph is read and filtered once; each particle is then searched over every
    rotation offset × defocus offset × position of its window (:func:`search_particle`).

    Parameters
    ----------
    part : pandas.DataFrame
        Rows of one micrograph of a peak table (seed columns; the refined ones are used as
        the starting values when all are present).
    template : PreparedTemplate
        The template of the search, prepared once per worker.
    settings : RefineSettings
        The local search.

    Returns
    -------
    pandas.DataFrame
        ``part`` (same index) without earlier refined columns, with :data:`REFINED_DTYPES`
        appended.
    """
    kept = part.drop(columns=[name for name in REFINED_DTYPES if name in part])
    n = len(part)
    out = {name: np.zeros(n, dtype=dtype) for name, dtype in REFINED_DTYPES.items()}
    if n == 0:
        return kept.assign(**out)
    first = part.iloc[0]
    optics = Optics.from_mapping(first)
    pixel_size = optics.pixel_size
    micrograph = read_micrograph(str(first["micrograph_path"]), pixel_size=pixel_size)
    image = micrograph.data
    height, width = (int(s) for s in image.shape)
    h = w = template.box_size
    if pixel_sizes_differ(micrograph.pixel_size, pixel_size):
        raise InputError(
            f"micrograph {micrograph.path}: pixel size {micrograph.pixel_size} Å differs from "
            f"the table's {pixel_size} Å"
        )
    if h > height or w > width:
        raise InputError(f"micrograph {micrograph.path}: smaller than the {h} px template")
    mean_map, variance_map = _statistics_maps(
        first, [(height - h + 1, width - w + 1), (height, width)]
    )
    # Leopard-EM's "correlation_variance" map holds the standard deviation.
    variance_map, _ = leopard.variance_map(variance_map, mean_map, part)

    source = start_columns(part)
    pos_y = part[source["pos_y"]].to_numpy(dtype=np.int64)
    pos_x = part[source["pos_x"]].to_numpy(dtype=np.int64)
    euler = part[[source["phi"], source["theta"], source["psi"]]].to_numpy(dtype=np.float64)
    start_defocus = part[source["relative_defocus"]].to_numpy(dtype=np.float64)
    by, bx = settings.box_size
    top, left = pos_y + h // 2 - by // 2, pos_x + w // 2 - bx // 2
    window = search_window((by, bx), (h, w), settings.radius)
    window_shape = (window[0].stop - window[0].start, window[1].stop - window[1].start)
    stats = [
        extract_boxes(
            m, top + window[0].start, left + window[1].start, window_shape, "constant", np.nan
        )
        for m in (mean_map, variance_map)
    ]
    filters = settings.filters.settings(pixel_size)
    if settings.global_filtering:
        filtered, box_filter = _filtered_micrograph(image, (h, w), optics, filters)
        # Padded with 0, the filtered micrograph's mean.
        boxes = extract_boxes(filtered, top, left, (by, bx), "constant", 0.0)
    else:
        boxes = extract_boxes(image, top, left, (by, bx), "reflect", 0.0)
    offsets = settings.offsets()
    magnification = optics.slice_transform()
    starts = euler_to_matrix(euler).reshape(n, 3, 3)
    for k in range(n):
        relative = start_defocus[k] + settings.defocus_offsets
        if settings.global_filtering:
            stack = filter_stack(optics.ctf((h, w), relative), box_filter)
            box, norm_shape = boxes[k], (height, width)
        else:
            box, stack = _filtered_box(boxes[k], (h, w), optics, filters, relative)
            norm_shape = (by, bx)
        rotations = compose(starts[k], offsets)
        fit = search_particle(
            box,
            template,
            magnified_rotations(rotations, magnification),
            stack,
            norm_shape,
            stats[0][k],
            stats[1][k],
            window,
            batch_bytes=settings.batch_bytes,
        )
        found = np.isfinite(fit.scaled_mip)
        phi, theta, psi = matrix_to_euler(rotations[fit.orientation]) if found else euler[k]
        y = top[k] + fit.dy if found else pos_y[k]
        x = left[k] + fit.dx if found else pos_x[k]
        values = {
            "refined_mip": fit.mip,
            "refined_scaled_mip": fit.scaled_mip if found else np.nan,
            "refined_pos_x": x,
            "refined_pos_y": y,
            "refined_pos_x_img": x + w // 2,
            "refined_pos_y_img": y + h // 2,
            "refined_pos_x_img_angstrom": (x + w // 2) * pixel_size,
            "refined_pos_y_img_angstrom": (y + h // 2) * pixel_size,
            "refined_psi": psi,
            "refined_theta": theta,
            "refined_phi": phi,
            "refined_relative_defocus": relative[fit.defocus] if found else start_defocus[k],
        }
        for name, value in values.items():
            out[name][k] = value
    out["refined_box_inside"] = (
        (top >= 0) & (left >= 0) & (top + by <= height) & (left + bx <= width)
    )
    return kept.assign(**out)
