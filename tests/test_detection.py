"""The detection statistic, the template's radius and the side-maximum test.

Unit checks against direct computations, then planted particles at realistic strength
(ideal matched-filter SNR 10-12, orientations off the search grid, a smooth background),
searched with a 10° grid: the default picking finds them and little else, where the scaled
MIP loses them; and two particles overlapping in projection at different heights stay two.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from datasets import OPTICS
from distributed import Client

from dtm.config.match import PeaksConfig
from dtm.io.mrc import write_map
from dtm.physics.footprint import template_radius
from dtm.physics.orientations import uniform_grid
from dtm.physics.projection import prepare_template
from dtm.physics.simulate import (
    PlantedParticle,
    random_particles,
    simulate_micrograph,
    simulate_template,
)
from dtm.programs.match import match_template
from dtm.programs.peaks import peaks_table
from dtm.search.detection import background_statistics, detection_z
from dtm.search.prepare import FilterSettings, Optics, filter_micrograph
from dtm.search.side_maxima import SearchModel, explained_peaks


def test_background_statistics_pool_the_correlations_of_the_background():
    rng = np.random.default_rng(0)
    mean = rng.normal(0.2, 0.3, size=(60, 80))
    variance = rng.uniform(0.5, 1.5, size=(60, 80))
    # The whole map in one window: the pooled moments of every position, computed directly.
    level, pooled = background_statistics(mean, variance, (20, 20))
    assert np.allclose(level, mean.mean())
    assert np.allclose(pooled, (variance + mean**2).mean() - mean.mean() ** 2)
    # Positions left out of the background do not count.
    background = np.ones(mean.shape, dtype=bool)
    background[:30] = False
    level, pooled = background_statistics(mean, variance, (20, 20), background)
    lower = mean[30:], variance[30:]
    assert np.allclose(level, lower[0].mean())
    assert np.allclose(pooled, (lower[1] + lower[0] ** 2).mean() - lower[0].mean() ** 2)


def test_background_statistics_follow_a_gradient_locally():
    ny, nx = 40, 400
    mean = np.tile(np.linspace(0.0, 2.0, nx), (ny, 1))
    level, _ = background_statistics(mean, np.ones((ny, nx)), (8, 8))  # window 40 x 40
    assert abs(level[20, 200] - mean[20, 200]) < 1e-9  # linear: the local average is exact
    assert level[20, 10] < 0.2 and level[20, 390] > 1.8


def test_detection_z_does_not_saturate_where_the_particle_inflates_the_variance():
    rng = np.random.default_rng(1)
    shape, box = (120, 120), (16, 16)
    mean = rng.normal(0.0, 0.05, size=shape)
    variance = np.full(shape, 1.0)
    mip = rng.normal(3.0, 0.3, size=shape)
    # A particle: its own correlations with neighbouring poses raise mean and variance.
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    footprint = (yy - 60) ** 2 + (xx - 60) ** 2 < 12**2
    mean[footprint] += 0.8
    variance[footprint] *= 3.0
    mip[60, 60] = 11.0
    scaled = (mip - mean) / np.sqrt(variance)
    assert scaled[60, 60] < 6.0  # the scaled MIP has saturated under a z* of 6
    z = detection_z(mip, mean, variance, box, cutoff=6.0)
    assert z[60, 60] > 10.0
    # In the background it is the MIP in units of the background's spread.
    assert abs(float(np.median(z[:30])) - 3.0) < 0.2


@pytest.mark.parametrize(("box", "radius"), [(48, 15.0), (64, 20.0), (300, 100.0)])
def test_template_radius_of_a_ball(box, radius):
    grid = np.indices((box, box, box)) - box // 2
    distance = np.sqrt((grid.astype(np.float64) ** 2).sum(axis=0))
    ball = (distance <= radius).astype(np.float32)
    # 99 % of a uniform ball lies within 0.9967 of its radius; binning makes large boxes coarse.
    tolerance = 1.0 + math.ceil(box / 128)
    assert abs(template_radius(ball) - radius) <= tolerance
    assert template_radius(ball + 0.001 * ball.max()) == template_radius(ball)  # faint haze


def test_template_radius_refuses_a_volume_without_density():
    from dtm.errors import ConfigError

    with pytest.raises(ConfigError, match="no positive density"):
        template_radius(-np.ones((8, 8, 8), dtype=np.float32))


def _model(template: np.ndarray, micrograph: np.ndarray) -> SearchModel:
    optics = Optics(pixel_size=3.0, **OPTICS)
    filtered, profile = filter_micrograph(micrograph, pixel_size=3.0, filters=FilterSettings())
    shape = (int(filtered.shape[0]), int(filtered.shape[1]))
    return SearchModel(prepare_template(template), optics, FilterSettings(), profile, shape)


def test_a_copy_of_the_stronger_peak_is_explained_and_a_distant_one_is_not():
    template = simulate_template(32, pixel_size=3.0, n_atoms=1500, seed=4)
    rng = np.random.default_rng(3)
    model = _model(template, rng.normal(size=(128, 128)).astype(np.float32))
    euler = np.array([[10.0, 40.0, 70.0]] * 3)
    defocus = np.zeros(3)
    positions = np.array([[40, 40], [41, 40], [40, 90]])  # the same pose 1 px off; far away
    strength = np.array([12.0, 11.0, 7.0])
    keep = explained_peaks(model, strength, positions, euler, defocus, cutoff=6.0)
    assert keep.tolist() == [True, False, True]
    # A second peak stronger than the first explains stays: it has signal of its own.
    strong = np.array([12.0, 19.0, 7.0])
    assert explained_peaks(model, strong, positions, euler, defocus, 6.0).tolist() == [True] * 3


# --- planted particles, searched end to end -------------------------------------------------


def _search(
    directory: Path,
    micrographs: dict[str, np.ndarray],
    template: np.ndarray,
    client: Client,
    *,
    step: float,
    defocus: dict[str, float] | None = None,
) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    write_map(directory / "template.mrc", template, pixel_size=3.0)
    entries = []
    for name, image in micrographs.items():
        write_map(directory / f"{name}.mrc", image, pixel_size=3.0)
        entries.append(
            {
                "micrograph_path": f"{name}.mrc",
                "name": name,
                "defocus_u": 10000.0,
                "defocus_v": 9500.0,
                "astigmatism_angle": 30.0,
            }
        )
    config = {
        "micrographs": entries,
        "template_volume_path": "template.mrc",
        "output_dir": "out",
        "optics_group": {
            "label": "test",
            "pixel_size": 3.0,
            "voltage": 300.0,
            "spherical_aberration": 2.7,
            "amplitude_contrast_ratio": 0.07,
        },
        "defocus_search_config": defocus or {"enabled": False},
        "orientation_search_config": {"psi_step": step, "theta_step": step},
    }
    (directory / "match.yaml").write_text(yaml.safe_dump(config))
    return match_template(directory / "match.yaml", client=client)


def _score(table, particles, box: int, tolerance: float = 3.0) -> tuple[int, int]:
    """(true picks, other picks): each pick matched to an unmatched particle within
    ``tolerance`` pixels, strongest first."""
    free = [(p.pos_y, p.pos_x) for p in particles]
    hits = 0
    for y, x in zip(table["pos_y"], table["pos_x"], strict=True):
        distance = [math.hypot(y - a, x - b) for a, b in free]
        if distance and min(distance) <= tolerance:
            free.pop(int(np.argmin(distance)))
            hits += 1
    return hits, len(table) - hits


@pytest.mark.slow
def test_particles_of_ordinary_strength_are_found(tmp_path, two_workers):
    box = 48
    template = simulate_template(box, pixel_size=3.0, n_atoms=3000, seed=11)
    micrographs, planted = {}, {}
    for k, snr in enumerate((10.0, 11.0, 12.0)):
        # Orientations uniformly random: off the 10° grid searched.
        particles = random_particles(5, (288, 288), box, min_separation=1.1 * box, seed=20 + k)
        micrographs[f"m{k}"] = simulate_micrograph(
            template,
            (288, 288),
            particles,
            pixel_size=3.0,
            signal_scale=snr,
            low_frequency_noise=1.0,
            seed=30 + k,
            **OPTICS,
        )
        planted[f"m{k}"] = particles
    results = _search(tmp_path, micrographs, template, two_workers, step=10.0)
    found = other = found_scaled = 0
    for name, particles in planted.items():
        hits, false = _score(peaks_table(results[name]), particles, box)
        found, other = found + hits, other + false
        scaled = peaks_table(results[name], PeaksConfig(metric="scaled_mip"))
        found_scaled += _score(scaled, particles, box)[0]
    print(f"default: {found}/15 found, {other} other picks; scaled MIP: {found_scaled}/15")
    # 14 and 3 when written: bounds one particle and one pick wide of that, since 15
    # particles measure a rate only coarsely (benchmarks/detection.py measures the target of
    # >= 90 % and <= 1 false pick per micrograph on 144 particles and 45 micrographs).
    assert found >= 13
    assert other <= 4
    assert found_scaled <= 5  # the scaled MIP saturates at these particles


@pytest.mark.slow
def test_overlapping_particles_at_different_heights_stay_two(tmp_path, two_workers):
    box = 64
    template = simulate_template(box, pixel_size=3.0, n_atoms=4000, seed=1)
    radius = template_radius(template)
    # Centres 1.3 radii apart: their projections overlap; 2,400 Å apart in height.
    distance = int(round(1.3 * radius))
    first, second = uniform_grid(psi_step=15.0, theta_step=15.0)[[700, 2900]]  # on the grid
    particles = [
        PlantedParticle(60, 60, *first, relative_defocus=-1200.0),
        PlantedParticle(60, 60 + distance, *second, relative_defocus=1200.0),
    ]
    image = simulate_micrograph(
        template,
        (192, 192),
        particles,
        pixel_size=3.0,
        signal_scale=18.0,
        low_frequency_noise=1.0,
        seed=5,
        **OPTICS,
    )
    defocus = {"defocus_min": -1200.0, "defocus_max": 1200.0, "defocus_step": 1200.0}
    ds = _search(tmp_path, {"pair": image}, template, two_workers, step=15.0, defocus=defocus)
    table = peaks_table(ds)
    for p in particles:
        at = table[(abs(table.pos_y - p.pos_y) <= 1) & (abs(table.pos_x - p.pos_x) <= 1)]
        assert len(at) == 1, f"particle at {p.pos_y, p.pos_x} not picked once"
        assert at["relative_defocus"].iloc[0] == p.relative_defocus
