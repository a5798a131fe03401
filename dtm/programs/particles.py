"""ParticleStack: boxes of the micrograph around each particle of a results table.

A box of size ``(by, bx)`` is centred on the particle's template window: its index
``(by // 2, bx // 2)`` is the micrograph pixel ``(pos_y_img, pos_x_img)`` (the centre of a
box of size n is ``n // 2``, conventions.md#arrays-and-positions), so its top-left pixel is
``(pos_y_img - by // 2, pos_x_img - bx // 2)``. Where a box leaves the micrograph it is
padded (``constant``, ``reflect`` or ``edge``, as in :func:`numpy.pad`).

For refinement, the statistic windows hold the global search's correlation mean and
variance at every template position inside the box: with a template box ``(h, w)`` a
valid-mode correlation of the box has ``(by - h + 1, bx - w + 1)`` positions, position
``(j, i)`` being map pixel ``(top + j, left + i)``; the window's centre
``((by - h + 1) // 2, ...)`` is the particle's own ``(pos_y, pos_x)`` when ``by - h`` is even.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import xarray as xr

from dtm.errors import ConfigError, InputError
from dtm.io.mrc import pixel_sizes_differ, read_micrograph

PadMode = Literal["constant", "reflect", "edge"]
_PAD_MODES = ("constant", "reflect", "edge")


@dataclass
class ParticleStack:
    """Boxes around particles, with their table.

    Attributes
    ----------
    images
        ``(n, by, bx)`` float32 boxes, row ``k`` for row ``k`` of ``table``.
    table
        The particle table (index reset), with a boolean ``box_inside`` column.
    box_size
        ``(by, bx)`` in pixels.
    box_inside
        ``(n,)`` bool: whether the box lies entirely inside its micrograph (no padding).
    correlation_mean, correlation_variance
        ``(n, by - h + 1, bx - w + 1)`` float32 statistic windows, or None when not asked
        for. Positions outside the map are padded like the images, except ``constant``
        which pads with NaN (no statistics there).
    template_box
        ``(h, w)`` used for the statistic windows, or None.
    """

    images: np.ndarray
    table: pd.DataFrame
    box_size: tuple[int, int]
    box_inside: np.ndarray
    correlation_mean: np.ndarray | None = None
    correlation_variance: np.ndarray | None = None
    template_box: tuple[int, int] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to_xarray(self) -> xr.Dataset:
        """The stack as a dataset: ``images`` with dims ``(particle, y, x)``.

        The statistic windows, when present, have dims ``(particle, stat_y, stat_x)``;
        ``micrograph_name``, ``particle_index`` and ``box_inside`` are coordinates along
        ``particle``.
        """
        n = len(self)
        coords: dict[str, tuple[str, np.ndarray] | np.ndarray] = {
            "particle": np.arange(n),
            "box_inside": ("particle", self.box_inside),
        }
        for name in ("micrograph_name", "particle_index"):
            if name in self.table:
                coords[name] = ("particle", self.table[name].to_numpy())
        data = {"images": (("particle", "y", "x"), self.images)}
        for name in ("correlation_mean", "correlation_variance"):
            window = getattr(self, name)
            if window is not None:
                data[name] = (("particle", "stat_y", "stat_x"), window)
        return xr.Dataset(data, coords=coords, attrs={"box_size": list(self.box_size)})


def extract_boxes(
    image: np.ndarray,
    top: np.ndarray,
    left: np.ndarray,
    shape: tuple[int, int],
    pad_mode: str,
    constant: float,
) -> np.ndarray:
    """``(n, *shape)`` windows of ``image`` with top-left corners ``(top, left)``, padded."""
    height, width = shape
    if top.size == 0:
        return np.empty((0, height, width), dtype=np.float32)
    before_y = max(0, -int(top.min()))
    before_x = max(0, -int(left.min()))
    after_y = max(0, int(top.max()) + height - image.shape[0])
    after_x = max(0, int(left.max()) + width - image.shape[1])
    pad = ((before_y, after_y), (before_x, after_x))
    if pad_mode == "constant":
        padded = np.pad(image, pad, mode="constant", constant_values=constant)
    else:
        padded = np.pad(image, pad, mode=pad_mode)  # type: ignore[call-overload]
    rows = (top + before_y)[:, None, None] + np.arange(height)[None, :, None]
    cols = (left + before_x)[:, None, None] + np.arange(width)[None, None, :]
    return np.asarray(padded[rows, cols], dtype=np.float32)


def _centres(table: pd.DataFrame, positions: str) -> tuple[np.ndarray, np.ndarray]:
    """Particle centres ``(y, x)`` in micrograph pixels."""
    refined = {"refined_pos_y_img", "refined_pos_x_img"} <= set(table.columns)
    if positions == "auto":
        positions = "refined" if refined else "original"
    if positions == "refined":
        if not refined:
            raise InputError("particle table: positions='refined' but refined_pos_*_img are absent")
        names = ("refined_pos_y_img", "refined_pos_x_img")
    elif positions == "original":
        names = ("pos_y_img", "pos_x_img")
    else:
        raise ConfigError(f"positions: must be 'auto', 'refined' or 'original', got {positions!r}")
    missing = [name for name in names if name not in table]
    if missing:
        raise InputError(f"particle table: missing column(s) {', '.join(missing)}")
    return table[names[0]].to_numpy(dtype=np.int64), table[names[1]].to_numpy(dtype=np.int64)


def _pair(value: tuple[int, int] | int, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ConfigError(f"{name}: expected two positive pixel counts, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def extract_particles(
    table: pd.DataFrame,
    box_size: tuple[int, int] | int,
    *,
    template_box: tuple[int, int] | int | None = None,
    pad_mode: PadMode = "constant",
    pad_value: float = 0.0,
    positions: Literal["auto", "refined", "original"] = "auto",
    with_statistics: bool = False,
) -> ParticleStack:
    """Cut a box around every particle of a table (one or many micrographs).

    Each micrograph is read once (``micrograph_path``), and so is each statistic map.

    Parameters
    ----------
    table
        Particle table with ``micrograph_path`` and the centre columns (``pos_*_img``, or
        ``refined_pos_*_img``); for statistics also ``correlation_average_path`` and
        ``correlation_variance_path`` (`.mrc` maps indexed by template top-left).
    box_size
        ``(by, bx)`` of the boxes in pixels (an int for a square).
    template_box
        ``(h, w)`` of the template; needed for the statistic windows.
    pad_mode
        How to fill box pixels outside the micrograph: ``constant`` (``pad_value``),
        ``reflect`` (mirror without repeating the edge) or ``edge`` (repeat the edge).
    pad_value
        Fill value for ``constant``.
    positions
        ``auto``: refined centres when the table has them, else the search's.
    with_statistics
        Also cut the correlation mean/variance windows (see the module docstring).

    Returns
    -------
    ParticleStack
    """
    box = _pair(box_size, "box_size")
    if pad_mode not in _PAD_MODES:
        raise ConfigError(f"pad_mode: must be one of {', '.join(_PAD_MODES)}, got {pad_mode!r}")
    if "micrograph_path" not in table:
        raise InputError("particle table: missing column micrograph_path")
    template = None if template_box is None else _pair(template_box, "template_box")
    if with_statistics and template is None:
        raise ConfigError("template_box: needed to cut the statistic windows")
    table = table.reset_index(drop=True)
    centre_y, centre_x = _centres(table, positions)
    top, left = centre_y - box[0] // 2, centre_x - box[1] // 2

    n = len(table)
    images = np.empty((n, *box), dtype=np.float32)
    inside = np.zeros(n, dtype=bool)
    windows: dict[str, np.ndarray] = {}
    sources = {"correlation_mean": "correlation_average_path"}
    sources["correlation_variance"] = "correlation_variance_path"
    if with_statistics and template is not None:
        window_shape = (box[0] - template[0] + 1, box[1] - template[1] + 1)
        if min(window_shape) <= 0:
            raise ConfigError(f"box_size {box}: must be at least the template box {template}")
        windows = {name: np.empty((n, *window_shape), dtype=np.float32) for name in sources}
    stat_pad = np.nan if pad_mode == "constant" else pad_value
    for path, rows in table.groupby("micrograph_path", sort=False).indices.items():
        # Only the pixels matter here; the table's pixel size stands in for a header without.
        pixel_size = float(table["pixel_size"].iloc[rows[0]]) if "pixel_size" in table else 1.0
        micrograph = read_micrograph(path, pixel_size=pixel_size)
        if pixel_sizes_differ(micrograph.pixel_size, pixel_size):
            raise InputError(
                f"{path}: pixel size {micrograph.pixel_size:g} Å, but the particle table's "
                f"positions are at {pixel_size:g} Å (a search with high_resolution_limit?)"
            )
        image = micrograph.data
        images[rows] = extract_boxes(image, top[rows], left[rows], box, pad_mode, pad_value)
        inside[rows] = (
            (top[rows] >= 0)
            & (left[rows] >= 0)
            & (top[rows] + box[0] <= image.shape[0])
            & (left[rows] + box[1] <= image.shape[1])
        )
        for name, column in sources.items():
            if name in windows:
                map_path = str(table[column].iloc[rows[0]]) if column in table else ""
                if not map_path:
                    raise InputError(f"particle table: no {column} for micrograph {path}")
                stat_map = read_micrograph(map_path, pixel_size=pixel_size).data
                shape = windows[name].shape[1:]
                cut = extract_boxes(stat_map, top[rows], left[rows], shape, pad_mode, stat_pad)
                windows[name][rows] = cut
    out_table = table.assign(box_inside=inside)
    return ParticleStack(
        images=images,
        table=out_table,
        box_size=box,
        box_inside=inside,
        correlation_mean=windows.get("correlation_mean"),
        correlation_variance=windows.get("correlation_variance"),
        template_box=template,
    )
