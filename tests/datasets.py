"""Small simulated data sets and configurations shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dtm.io.mrc import write_map
from dtm.physics.orientations import uniform_grid
from dtm.physics.simulate import random_particles, simulate_micrograph, simulate_template

PIXEL_SIZE = 3.0
BOX = 64
#: A coarse grid keeps the searches of the tests to a few seconds.
PSI_STEP = 30.0
THETA_STEP = 30.0
DEFOCUS = (-1200.0, 0.0, 1200.0)
OPTICS = {
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 10000.0,
    "defocus_v": 9500.0,
    "astigmatism_angle": 30.0,
    "phase_shift": 0.0,
}


def write_dataset(
    directory: Path,
    *,
    shape: tuple[int, int] = (320, 320),
    n_particles: int = 5,
    seed: int = 0,
    name: str = "micrograph",
) -> dict[str, Any]:
    """Write ``NAME.mrc`` (with planted particles) and ``template.mrc`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    template_path = directory / "template.mrc"
    template = simulate_template(BOX, pixel_size=PIXEL_SIZE, n_atoms=4000, seed=1)
    if not template_path.exists():
        write_map(template_path, template, pixel_size=PIXEL_SIZE)
    grid = uniform_grid(psi_step=PSI_STEP, theta_step=THETA_STEP)
    particles = random_particles(
        n_particles,
        shape,
        BOX,
        orientations=grid,
        defocus_values=DEFOCUS,
        min_separation=1.2 * BOX,
        seed=seed,
    )
    micrograph = simulate_micrograph(
        template,
        shape,
        particles,
        pixel_size=PIXEL_SIZE,
        signal_scale=18.0,
        low_frequency_noise=5.0,
        seed=seed + 100,
        b_factor=0.0,
        **OPTICS,
    )
    micrograph_path = directory / f"{name}.mrc"
    write_map(micrograph_path, micrograph, pixel_size=PIXEL_SIZE)
    return {
        "micrograph_path": micrograph_path,
        "template_path": template_path,
        "particles": particles,
    }


def match_config(
    micrograph_path: Path | None,
    template_path: Path,
    output_dir: Path,
    **extra: Any,
) -> dict[str, Any]:
    """A dtm match configuration (dict) for a data set of :func:`write_dataset`."""
    config: dict[str, Any] = {
        "template_volume_path": str(template_path),
        "output_dir": str(output_dir),
        "optics_group": {"label": "test", "pixel_size": PIXEL_SIZE, "ctf_B_factor": 0.0, **OPTICS},
        "defocus_search_config": {
            "defocus_min": DEFOCUS[0],
            "defocus_max": DEFOCUS[-1],
            "defocus_step": DEFOCUS[1] - DEFOCUS[0],
        },
        "orientation_search_config": {"psi_step": PSI_STEP, "theta_step": THETA_STEP},
        "cluster": {"chunk_size": 40},
    }
    if micrograph_path is not None:
        config["micrograph_path"] = str(micrograph_path)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
