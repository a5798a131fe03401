"""``dtm demo``: simulate a micrograph with known particles and run the whole pipeline.

The demo writes a simulated micrograph (six copies of the bundled atomic model's template,
or of a synthetic blob's) and a configuration file that a user can copy, runs ``dtm match``
on an embedded cluster — which makes the template from the model — and compares the picked
peaks with the planted particles: position and orientation errors per particle.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import yaml

from dtm.config import load_match_config
from dtm.errors import OutputError
from dtm.io.atomic import remove_output, write_atomic
from dtm.io.mrc import write_map
from dtm.physics.orientations import uniform_grid
from dtm.physics.rotations import euler_to_matrix, geodesic_angle
from dtm.physics.simulate import random_particles, simulate_micrograph, simulate_template
from dtm.programs.match import match_template


def demo_dataset(
    directory: str | Path,
    *,
    seed: int = 0,
    micrograph_shape: tuple[int, int] = (480, 480),
    box_size: int = 64,
    pixel_size: float = 3.0,
    n_particles: int = 6,
    n_atoms: int = 4000,
    signal_scale: float = 18.0,
    low_frequency_noise: float = 5.0,
    template: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a small simulated data set for ``dtm demo``: ``micrograph.mrc``, ``template.mrc``.

    Particles (about 130 Å across in a 192 Å box: a molecule this size has projections that
    differ enough between orientations for the scaled MIP to single it out, where a small
    compact one raises the correlation variance at its own position as much as its MIP) are
    planted at orientations of the 15°/15° uniform grid and at relative defocus -1200, 0 or
    1200 Å (planes far enough apart to be told apart at 3 Å/pixel), so a search with that
    grid and ``defocus_min=-1200, defocus_max=1200, defocus_step=1200`` finds them exactly.

    Parameters
    ----------
    directory
        Output directory (created if missing).
    seed
        Random seed of template, positions and noise.
    micrograph_shape, box_size, pixel_size, n_particles, n_atoms, signal_scale, low_frequency_noise
        Size of the data set; see :func:`simulate_template` and :func:`simulate_micrograph`.
    template
        The template to plant instead of :func:`simulate_template`'s (``box_size`` and
        ``n_atoms`` are then unused), at ``pixel_size``.

    Returns
    -------
    dict
        ``micrograph_path``, ``template_path`` (Path), ``pixel_size`` (Å), ``optics`` (dict of
        :func:`simulate_micrograph` optics keywords), ``search`` (``psi_step``,
        ``theta_step``, ``defocus_min``, ``defocus_max``, ``defocus_step``), ``particles``
        (list of :class:`PlantedParticle`) and ``particle_table`` (list of dicts, one per
        particle, with ``pos_y``, ``pos_x``, ``pos_y_img``, ``pos_x_img`` and the angles).
    """
    directory = Path(directory)
    search = {
        "psi_step": 15.0,
        "theta_step": 15.0,
        "defocus_min": -1200.0,
        "defocus_max": 1200.0,
        "defocus_step": 1200.0,
    }
    optics = {
        "voltage": 300.0,
        "spherical_aberration": 2.7,
        "amplitude_contrast_ratio": 0.07,
        "defocus_u": 10000.0,
        "defocus_v": 9500.0,
        "astigmatism_angle": 30.0,
        "phase_shift": 0.0,
        "b_factor": 0.0,
    }
    if template is None:
        template = simulate_template(box_size, pixel_size=pixel_size, n_atoms=n_atoms, seed=seed)
    box_size = template.shape[0]
    grid = uniform_grid(psi_step=search["psi_step"], theta_step=search["theta_step"])
    particles = random_particles(
        n_particles,
        micrograph_shape,
        box_size,
        orientations=grid,
        defocus_values=(-1200.0, 0.0, 1200.0),
        min_separation=1.5 * box_size,
        seed=seed + 1,
    )
    micrograph = simulate_micrograph(
        template,
        micrograph_shape,
        particles,
        pixel_size=pixel_size,
        signal_scale=signal_scale,
        low_frequency_noise=low_frequency_noise,
        seed=seed + 2,
        **optics,
    )
    micrograph_path = directory / "micrograph.mrc"
    template_path = directory / "template.mrc"
    write_map(micrograph_path, micrograph, pixel_size=pixel_size)
    write_map(template_path, template, pixel_size=pixel_size)
    table = [
        {**asdict(p), "pos_y_img": p.pos_y + box_size // 2, "pos_x_img": p.pos_x + box_size // 2}
        for p in particles
    ]
    return {
        "micrograph_path": micrograph_path,
        "template_path": template_path,
        "pixel_size": pixel_size,
        "optics": optics,
        "search": search,
        "particles": particles,
        "particle_table": table,
    }


def demo_config(data: dict[str, Any], output_dir: Path, base: Path) -> dict[str, Any]:
    """The match configuration of the demo data set (plain YAML-ready dict).

    Paths are written relative to ``base``, the directory of the configuration file, as the
    configuration loader reads them.
    """
    optics, search = data["optics"], data["search"]

    def relative(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), Path(base).resolve())

    if "model_path" in data:  # the search makes its template from the model
        template = {
            "template_model_path": relative(data["model_path"]),
            "template_box": data["box_size"],
        }
    else:
        template = {"template_volume_path": relative(data["template_path"])}
    return {
        "micrograph_path": relative(data["micrograph_path"]),
        **template,
        "output_dir": relative(output_dir),
        "optics_group": {
            "label": "demo",
            "pixel_size": data["pixel_size"],
            "voltage": optics["voltage"],
            "spherical_aberration": optics["spherical_aberration"],
            "amplitude_contrast_ratio": optics["amplitude_contrast_ratio"],
            "phase_shift": optics["phase_shift"],
            "defocus_u": optics["defocus_u"],
            "defocus_v": optics["defocus_v"],
            "astigmatism_angle": optics["astigmatism_angle"],
            "ctf_B_factor": optics["b_factor"],
        },
        "defocus_search_config": {
            "enabled": True,
            "defocus_min": search["defocus_min"],
            "defocus_max": search["defocus_max"],
            "defocus_step": search["defocus_step"],
        },
        "orientation_search_config": {
            "psi_step": search["psi_step"],
            "theta_step": search["theta_step"],
            "symmetry": "C1",
        },
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "correlation_mode": "valid",
        "peaks": {"false_positives": 1.0},
    }


def compare_with_planted(peaks: pd.DataFrame, planted: list[dict[str, Any]]) -> pd.DataFrame:
    """Match each planted particle to the nearest peak (within 2 pixels) and its errors.

    Returns
    -------
    pandas.DataFrame
        One row per planted particle: ``found``, ``position_error`` (pixels),
        ``angle_error`` (degrees, geodesic) and ``defocus_error`` (Å).
    """
    rows = []
    for particle in planted:
        row = {
            "pos_y": particle["pos_y"],
            "pos_x": particle["pos_x"],
            "found": False,
            "position_error": np.nan,
            "angle_error": np.nan,
            "defocus_error": np.nan,
        }
        if len(peaks):
            distance = np.hypot(
                peaks["pos_y"] - particle["pos_y"], peaks["pos_x"] - particle["pos_x"]
            )
            best = int(np.argmin(distance))
            if distance.iloc[best] <= 2:
                peak = peaks.iloc[best]
                truth = euler_to_matrix([particle["phi"], particle["theta"], particle["psi"]])
                found = euler_to_matrix([peak["phi"], peak["theta"], peak["psi"]])
                row.update(
                    found=True,
                    position_error=float(distance.iloc[best]),
                    angle_error=float(geodesic_angle(truth, found)),
                    defocus_error=float(peak["relative_defocus"] - particle["relative_defocus"]),
                )
        rows.append(row)
    return pd.DataFrame(rows)


#: Marks a directory written by ``dtm demo``, which a later demo may replace.
DEMO_MARKER = ".dtm-demo"


def claim_directory(out: Path) -> bool:
    """Make ``out`` the demo's directory; ``True`` when it holds an earlier demo.

    A demo writes into a new or empty directory, or replaces an earlier demo's (marked by
    ``DEMO_MARKER``, or a ``config.yaml`` whose optics group is labelled ``demo``).

    Raises
    ------
    OutputError
        If ``out`` is a file, or a directory that holds other files.
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: not a directory")
    earlier = out.is_dir() and any(out.iterdir())
    if earlier and not ((out / DEMO_MARKER).exists() or _demo_config_in(out)):
        raise OutputError(
            f"--out {out}: holds other files; dtm demo writes into a new or empty directory, "
            "or replaces an earlier demo"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(
        out / DEMO_MARKER,
        lambda tmp: _write_text(tmp, "written by dtm demo: a later dtm demo replaces it\n"),
        root=out,
    )
    return earlier


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def _write_bytes(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def _demo_config_in(out: Path) -> bool:
    """Whether ``out/config.yaml`` is a demo's (directories of demos before the marker)."""
    try:
        config = yaml.safe_load((out / "config.yaml").read_text())
        return bool(config["optics_group"]["label"] == "demo")
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return False


#: The bundled model of ``dtm demo`` (``dtm/data/README.md``).
DEMO_MODEL = "7ddo.pdb.gz"


def _model_dataset(directory: Path) -> dict[str, Any]:
    """The demo's data set with the bundled model's template as its particles."""
    from importlib.resources import files  # noqa: PLC0415

    from dtm.programs.template import simulate_template  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / DEMO_MODEL
    source = files("dtm").joinpath("data", DEMO_MODEL).read_bytes()
    write_atomic(model_path, lambda tmp: _write_bytes(tmp, source), root=directory)
    pixel_size = 3.0
    template, _ = simulate_template(model_path, pixel_size=pixel_size)
    data = demo_dataset(directory, pixel_size=pixel_size, template=template)
    return {**data, "model_path": model_path, "box_size": template.shape[0]}


def run_demo(
    out: Path,
    *,
    n_workers: int | None = None,
    scheduler_address: str | None = None,
    stream: TextIO | None = None,
    model: bool = True,
) -> pd.DataFrame:
    """Simulate, search, pick peaks and report how many planted particles were found.

    With ``model`` (the default), the particles are the bundled atomic model (PDB 7DDO,
    copied to ``data/``) and the search names the model (``template_model_path``): model →
    template → search → peaks. Otherwise (``dtm demo --synthetic``) they are a synthetic
    blob and the search reads its template."""
    stream = sys.stdout if stream is None else stream
    out = Path(out)
    if claim_directory(out):
        print(f"demo: replacing the earlier demo in {out}", file=stream)
        # Maps and peaks of the earlier data must not survive beside the new data.
        remove_output(out / "results", out)
    data = _model_dataset(out / "data") if model else demo_dataset(out / "data")
    config_path = out / "config.yaml"
    config_text = yaml.safe_dump(demo_config(data, out / "results", base=out), sort_keys=False)
    write_atomic(config_path, lambda tmp: _write_text(tmp, config_text), root=out)
    print(
        f"demo: {len(data['particles'])} particles planted in {data['micrograph_path']}; "
        f"configuration in {config_path}",
        file=stream,
    )
    config = load_match_config(config_path)
    match_template(
        config,
        scheduler_address=scheduler_address,
        n_workers=n_workers,
        out=stream,
    )
    peaks = pd.read_csv(out / "results" / "peaks.csv")
    report = compare_with_planted(peaks, data["particle_table"])
    print(report.to_string(index=False, float_format=lambda v: f"{v:.2f}"), file=stream)
    print(
        f"demo: found {int(report['found'].sum())} of {len(report)} planted particles "
        f"({len(peaks)} peaks above threshold)",
        file=stream,
    )
    return report
