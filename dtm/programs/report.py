"""``dtm report``: a self-contained HTML page per run, with PNG figures embedded.

For each micrograph: the scaled MIP with the picked particles circled, the survival curve of
the scaled-MIP values against the Gaussian-noise expectation with the threshold marked (the
figure cisTEM and pytom-match-pick draw), and the peak table.

The noise expectation: at a position without a particle, the scaled MIP is the maximum of
``N = total_correlations`` correlations that are (close to) independent standard normals,
so ``P(scaled MIP >= z) = 1 - Φ(z)^N``. The observed survival is the fraction of positions
of the search region whose scaled MIP is ``>= z``. Where the observed curve rises above
the expected one at high ``z`` are particles; a curve shifted as a whole means the noise
model does not hold (e.g. a poorly whitened micrograph).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import log_ndtr

from dtm.config.match import PeaksConfig
from dtm.errors import MissingExtra, OutputError
from dtm.io.atomic import write_atomic
from dtm.io.results import (
    MicrographResults,
    open_micrographs,
    output_directory,
)
from dtm.io.rundir import record_output
from dtm.programs.peaks import (
    map_threshold,
    picking_of,
    read_peaks,
    read_picking,
    search_region,
    threshold_label,
)
from dtm.schema import PEAK_TABLES, REPORT_FILE

try:
    # Figures are built on their own canvas (no pyplot): the global backend of the user's
    # session (a notebook's) is left as it is.
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle
except ModuleNotFoundError as error:  # the viz extra is not installed
    raise MissingExtra(f"dtm report needs {error.name}: pip install 'dtm[viz]'") from None

#: Columns of the peak table shown in the report.
TABLE_COLUMNS = [
    "particle_index",
    "pos_x",
    "pos_y",
    "pos_x_img",
    "pos_y_img",
    "scaled_mip",
    "mip",
    "phi",
    "theta",
    "psi",
    "relative_defocus",
]
#: The MIP figure is drawn from the finest pyramid level at most this many pixels wide.
FIGURE_MAX_PIXELS = 1024
#: Circles around peaks: radius as a fraction of the template box (about the particle's).
CIRCLE_RADIUS_FRACTION = 0.3


def expected_survival(z: np.ndarray, n_correlations: int) -> np.ndarray:
    """``P(max of n_correlations standard normals >= z) = 1 - Φ(z)^N``, stably.

    ``-expm1(N log Φ(z))`` keeps its precision where ``Φ(z)^N`` is within rounding of 1
    (the tail, where particles are found).
    """
    return -np.expm1(float(n_correlations) * log_ndtr(np.asarray(z, dtype=np.float64)))


def survival_curves(
    scaled_mip: np.ndarray, n_correlations: int, z: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed and expected survival of scaled-MIP values.

    Parameters
    ----------
    scaled_mip
        Scaled-MIP values of the search region (any shape; NaN ignored).
    n_correlations
        Correlations per position ``N``.
    z
        Where to evaluate; default 400 points from the smallest to the largest value.

    Returns
    -------
    z, observed, expected : numpy.ndarray
        ``observed[i]`` = fraction of positions with value ``>= z[i]``;
        ``expected[i]`` = ``1 - Φ(z[i])^N``.
    """
    values = np.sort(np.asarray(scaled_mip, dtype=np.float64).ravel())
    values = values[np.isfinite(values)]
    if z is None:
        z = np.linspace(values[0], values[-1], 400)
    z = np.asarray(z, dtype=np.float64)
    at_least = values.size - np.searchsorted(values, z, side="left")
    return z, at_least / values.size, expected_survival(z, n_correlations)


def report_threshold(
    dataset: xr.Dataset, picking: dict[str, Any] | None = None
) -> tuple[float, str]:
    """The threshold of a micrograph's peaks and how it was set: from ``picking`` (the
    contents of the last pick's :data:`dtm.schema.PICKING_FILE`), else from the run's
    configuration."""
    if picking is not None:
        options, cutoffs = picking_of(picking)
        name = str(dataset.attrs.get("micrograph_name"))
        cutoff = cutoffs[name] if name in cutoffs else map_threshold(dataset, options)
        return cutoff, threshold_label([cutoff], options)
    section = json.loads(dataset.attrs.get("config") or "{}").get("peaks") or {}
    options = PeaksConfig.model_validate(section)
    cutoff = map_threshold(dataset, options)
    return cutoff, threshold_label([cutoff], options)


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _overview_level(micrograph: MicrographResults) -> tuple[np.ndarray, int]:
    """The scaled MIP at the finest level at most ``FIGURE_MAX_PIXELS`` wide, its factor."""
    full = micrograph.dataset["scaled_mip"]
    levels = {1: full, **{f: level["scaled_mip"] for f, level in micrograph.pyramid.items()}}
    for factor in sorted(levels):
        if max(levels[factor].shape) <= FIGURE_MAX_PIXELS or factor == max(levels):
            return np.asarray(levels[factor].values), factor
    raise AssertionError("unreachable: the loop returns at the coarsest level")


def mip_figure(micrograph: MicrographResults, peaks: pd.DataFrame, cutoff: float) -> str:
    """PNG (base64) of the scaled MIP with circles around the peaks, map pixel axes."""
    image, factor = _overview_level(micrograph)
    box = int(micrograph.dataset.attrs["template_shape"][-1])
    h, w = image.shape
    figure = Figure(figsize=(6.5, 6.5 * h / w + 0.6))
    axes = figure.subplots()
    finite = image[np.isfinite(image)]
    low = float(np.percentile(finite, 1)) if finite.size else 0.0
    high = max(float(finite.max()) if finite.size else 1.0, cutoff)
    # Pixel (i, j) of level F spans full-resolution pixels [iF, (i+1)F): edges at iF - 0.5.
    shown = axes.imshow(
        image,
        cmap="gray",
        vmin=low,
        vmax=high,
        interpolation="nearest",
        extent=(-0.5, w * factor - 0.5, h * factor - 0.5, -0.5),
    )
    radius = max(CIRCLE_RADIUS_FRACTION * box, 3.0)
    for _, peak in peaks.iterrows():
        axes.add_patch(
            Circle(
                (peak["pos_x"], peak["pos_y"]),
                radius,
                fill=False,
                edgecolor="#ff3b30",
                linewidth=1.2,
            )
        )
        axes.annotate(
            str(int(peak["particle_index"])),
            (peak["pos_x"] + radius, peak["pos_y"]),
            color="#ffcc00",
            fontsize=7,
        )
    axes.set_xlabel("x (map pixel = template box corner)")
    axes.set_ylabel("y (map pixel)")
    note = "" if factor == 1 else f" (max over {factor}×{factor} blocks)"
    axes.set_title(f"{micrograph.name}: scaled MIP, {len(peaks)} peaks{note}", fontsize=10)
    figure.colorbar(shown, ax=axes, shrink=0.8, label="scaled MIP (z)")
    return _png(figure)


def survival_figure(micrograph: MicrographResults, cutoff: float, label: str) -> str:
    """PNG (base64) of observed vs noise-expected survival of the scaled MIP, log axis."""
    region = search_region(micrograph.dataset)["scaled_mip"].values
    n_correlations = int(micrograph.dataset.attrs["total_correlations"])
    n_positions = int(np.isfinite(region).sum())
    z, observed, expected = survival_curves(region, n_correlations)
    z_hi = max(z[-1], cutoff) + 0.5
    z_model = np.linspace(z[0], z_hi, 400)
    figure = Figure(figsize=(6.0, 4.2))
    axes = figure.subplots()
    axes.step(z, observed, where="post", color="#1f77b4", label="observed")
    axes.plot(
        z_model,
        expected_survival(z_model, n_correlations),
        color="#7f7f7f",
        linestyle="--",
        label=f"Gaussian noise: 1 − Φ(z)^N, N = {n_correlations:,}",
    )
    axes.axvline(cutoff, color="#d62728", label=f"threshold {label}")
    axes.set_yscale("log")
    axes.set_ylim(0.5 / max(n_positions, 1), 1.5)
    axes.set_xlim(z[0], z_hi)
    axes.set_xlabel("scaled MIP z")
    axes.set_ylabel(f"fraction of positions ≥ z (of {n_positions:,})")
    axes.set_title(f"{micrograph.name}: survival of the scaled MIP", fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(True, which="major", alpha=0.3)
    return _png(figure)


def _table_html(peaks: pd.DataFrame) -> str:
    if peaks.empty:
        return "<p>No peak above the threshold.</p>"
    shown = peaks[[c for c in TABLE_COLUMNS if c in peaks.columns]]
    return shown.to_html(index=False, float_format=lambda v: f"{v:.2f}", classes="peaks", border=0)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
section { border-top: 1px solid #ccc; padding-top: 1em; margin-top: 2em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
table.peaks { border-collapse: collapse; font-size: 0.85em; }
table.peaks td, table.peaks th { padding: 2px 8px; text-align: right; }
table.peaks tr:nth-child(even) { background: #f3f3f3; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0 1em; }
"""


def _section(
    micrograph: MicrographResults, peaks: pd.DataFrame, picking: dict[str, Any] | None
) -> str:
    attrs = micrograph.dataset.attrs
    cutoff, label = report_threshold(micrograph.dataset, picking)
    facts = {
        "micrograph": attrs.get("micrograph_path", ""),
        "template": attrs.get("template_path", ""),
        "map shape": f"{micrograph.dataset.sizes['y']} × {micrograph.dataset.sizes['x']} "
        f"({attrs.get('correlation_mode', '?')} mode)",
        "correlations per position": f"{int(attrs['total_correlations']):,} "
        f"({attrs.get('total_orientations', '?')} orientations × "
        f"{attrs.get('total_defocus', '?')} defocus)",
        "threshold": label,
        "peaks": str(len(peaks)),
    }
    rows = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()
    )
    mip = mip_figure(micrograph, peaks, cutoff)
    survival = survival_figure(micrograph, cutoff, label)
    return (
        f'<section id="{html.escape(micrograph.name)}"><h2>{html.escape(micrograph.name)}</h2>'
        f"<dl>{rows}</dl><div class='figures'>"
        f'<img alt="scaled MIP" src="data:image/png;base64,{mip}">'
        f'<img alt="survival" src="data:image/png;base64,{survival}"></div>'
        f"<h3>Peaks</h3>{_table_html(peaks)}</section>"
    )


def write_report(
    results_dir: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None
) -> Path:
    """Write the HTML report of a ``dtm match`` run.

    Parameters
    ----------
    results_dir
        Output directory of ``dtm match`` (or its ``results.zarr``): local path or fsspec
        URL.
    out
        HTML file to write; default ``RESULTS_DIR/report.html`` for a local directory,
        ``./report.html`` for a URL.

    Returns
    -------
    Path
        The report written (one file, images embedded, no external resources).
    """
    micrographs = open_micrographs(results_dir)
    peaks, source = read_peaks(results_dir)
    # Without tables read_peaks picked with the default options.
    default = {"options": PeaksConfig().model_dump(mode="json"), "thresholds": {}}
    picking = read_picking(results_dir) if source in PEAK_TABLES else default
    directory = output_directory(results_dir)
    in_output_dir = out is None and "://" not in directory
    if out is None:
        out = Path(directory) / REPORT_FILE if in_output_dir else Path(REPORT_FILE)
    sections = [
        _section(m, peaks[peaks["micrograph_name"] == m.name].reset_index(drop=True), picking)
        for m in micrographs
    ]
    index = "".join(
        f'<li><a href="#{html.escape(m.name)}">{html.escape(m.name)}</a></li>' for m in micrographs
    )
    version = micrographs[0].dataset.attrs.get("dtm_version", "?") if micrographs else "?"
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>dtm report: {html.escape(str(directory))}</title><style>{_STYLE}</style>"
        f"</head><body><h1>dtm report</h1><p>Results: <code>{html.escape(str(directory))}</code>"
        f" · dtm {html.escape(str(version))} · {len(micrographs)} micrograph(s), "
        f"{len(peaks)} peaks (from {html.escape(source)})</p><ul>{index}</ul>"
        + "".join(sections)
        + "</body></html>"
    )
    path = Path(out)

    def write(tmp: str) -> None:
        Path(tmp).write_text(page, encoding="utf-8")

    try:
        write_atomic(path, write)
    except OSError as error:
        raise OutputError(f"{path}: cannot write the report ({error})") from None
    if in_output_dir:  # an output of the run: a later --overwrite removes it with the rest
        record_output(Path(directory), REPORT_FILE)
    return path
