"""Results stores with the contract of docs/architecture.md, synthesised in milliseconds.

The scaled MIP is pure Gaussian noise of a search with ``n_correlations`` correlations per
position (each value is the maximum of that many standard normals, drawn exactly by
inverting ``Φ(z)^N``), plus planted peaks of known height and position. Peak tables are
then picked by the real ``dtm.programs.peaks.repick``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.special import ndtri

from dtm.io.store import build_dataset, write_dataset
from dtm.programs.peaks import repick

BOX = 24
PIXEL_SIZE = 2.0
N_CORRELATIONS = 1000
#: (y, x, scaled MIP) of the planted particles, far above the ~5.5 threshold.
PLANTED = ((40, 50), (150, 200), (210, 80))
PEAK_HEIGHT = 9.0


def noise_scaled_mip(
    shape: tuple[int, int], n_correlations: int, rng: np.random.Generator
) -> np.ndarray:
    """Maximum of ``n_correlations`` standard normals at each position."""
    u = rng.uniform(size=shape)
    return ndtri(u ** (1.0 / n_correlations)).astype(np.float32)


def synthetic_dataset(
    name: str, shape: tuple[int, int] = (240, 260), seed: int = 0, pyramid: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The maps and attributes of one micrograph's results."""
    rng = np.random.default_rng(seed)
    scaled = noise_scaled_mip(shape, N_CORRELATIONS, rng)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for y, x in PLANTED:
        blob = PEAK_HEIGHT * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 2.0)
        scaled = np.maximum(scaled, blob.astype(np.float32))
    mean = rng.normal(0.0, 0.01, shape).astype(np.float32)
    variance = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    maps = {
        "mip": scaled * np.sqrt(variance) + mean,
        "scaled_mip": scaled,
        "correlation_mean": mean,
        "correlation_variance": variance,
        "phi": rng.uniform(0, 360, shape).astype(np.float32),
        "theta": rng.uniform(0, 180, shape).astype(np.float32),
        "psi": rng.uniform(0, 360, shape).astype(np.float32),
        "defocus": rng.choice([-600.0, 0.0, 600.0], shape).astype(np.float32),
    }
    attrs: dict[str, object] = {
        "micrograph_name": name,
        "micrograph_path": f"/data/{name}.mrc",
        "template_path": "/data/template.mrc",
        "pixel_size": PIXEL_SIZE,
        "template_shape": [BOX, BOX, BOX],
        "image_shape": [shape[0] + BOX - 1, shape[1] + BOX - 1],
        "correlation_mode": "valid",
        "total_orientations": N_CORRELATIONS // 2,
        "total_defocus": 2,
        "total_correlations": N_CORRELATIONS,
        "defocus_u": 10000.0,
        "defocus_v": 9500.0,
        "astigmatism_angle": 30.0,
        "voltage": 300.0,
        "spherical_aberration": 2.7,
        "amplitude_contrast_ratio": 0.07,
        "phase_shift": 0.0,
        "ctf_B_factor": 0.0,
        "map_paths": {},
        "config": json.dumps({"peaks": {"false_positives": 1.0, "z_score_cutoff": None}}),
        "dtm_version": "test",
        "start_time": "2026-01-01T00:00:00+0000",
        "end_time": "2026-01-01T00:00:01+0000",
    }
    return maps, attrs


def write_results(
    directory: Path,
    names: tuple[str, ...] = ("micrograph",),
    shape: tuple[int, int] = (240, 260),
    pyramid: bool = True,
) -> Path:
    """An output directory with ``results.zarr`` and the peak tables; returns it."""
    store = directory / "results.zarr"
    for index, name in enumerate(names):
        maps, attrs = synthetic_dataset(name, shape, seed=index)
        dataset = build_dataset(maps, pixel_size=PIXEL_SIZE, attrs=attrs)
        write_dataset(dataset, store, None if len(names) == 1 else name, pyramid=pyramid)
    repick(directory)
    return directory
