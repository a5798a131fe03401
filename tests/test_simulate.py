"""Tests of the simulator: templates, planted particles, noise, demo data set."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from dtm.errors import ConfigError
from dtm.io.mrc import check_compatible, read_micrograph, read_template
from dtm.physics.orientations import uniform_grid
from dtm.physics.simulate import (
    PlantedParticle,
    random_particles,
    simulate_micrograph,
    simulate_template,
)
from dtm.programs.demo import demo_dataset

BOX = 24
PIXEL = 3.0
# No defocus and no spherical aberration: the CTF is the constant amplitude contrast A,
# so the particle's image is exactly -A * projection (an independent reference).
FLAT_CTF = {"defocus_u": 0.0, "defocus_v": 0.0, "spherical_aberration": 0.0}


@pytest.fixture(scope="module")
def template() -> np.ndarray:
    return simulate_template(BOX, pixel_size=PIXEL, n_atoms=300, seed=3)


def _quiet(template, shape, particles, **kwargs):
    """A micrograph without noise."""
    return simulate_micrograph(
        template,
        shape,
        particles,
        pixel_size=PIXEL,
        noise_sigma=0.0,
        low_frequency_noise=0.0,
        **kwargs,
    )


def test_template_shape_support_and_centre(template):
    assert template.shape == (BOX,) * 3 and template.dtype == np.float32
    assert template.min() >= 0.0 and template.max() > 0.0
    centre_of_mass = np.array(scipy.ndimage.center_of_mass(template))
    np.testing.assert_allclose(centre_of_mass, BOX // 2, atol=0.3)
    z, y, x = np.indices(template.shape) - BOX // 2
    radius = np.sqrt(z**2 + y**2 + x**2)
    # Atoms lie within box/3; their Gaussian tails (σ 0.6 px) add a little.
    outside = template[radius > BOX / 3 + 2.5].sum() / template.sum()
    assert outside < 1e-3


def test_template_is_asymmetric(template):
    """No 180° rotation or mirror maps the molecule onto itself."""
    flat = template.ravel() - template.mean()
    transforms = [
        np.rot90(template, 2, axes=(1, 2)),
        np.rot90(template, 2, axes=(0, 2)),
        np.rot90(template, 2, axes=(0, 1)),
        template[::-1],
        template[:, ::-1],
        template[:, :, ::-1],
    ]
    for moved in transforms:
        other = moved.ravel() - moved.mean()
        assert np.dot(flat, other) / np.dot(flat, flat) < 0.7


def test_template_reproducible_with_seed():
    a = simulate_template(16, pixel_size=2.0, n_atoms=50, seed=1)
    np.testing.assert_array_equal(a, simulate_template(16, pixel_size=2.0, n_atoms=50, seed=1))
    assert not np.allclose(a, simulate_template(16, pixel_size=2.0, n_atoms=50, seed=2))


def test_particle_lands_at_its_box_with_dark_contrast(template):
    """Identity pose, flat CTF: the image is -A * (sum of the volume along z), in its box."""
    particle = PlantedParticle(pos_y=10, pos_x=25, phi=0.0, theta=0.0, psi=0.0)
    amplitude = 0.5
    image = _quiet(template, (64, 80), [particle], amplitude_contrast_ratio=amplitude, **FLAT_CTF)
    expected = -template.astype(np.float64).sum(axis=0)
    box = image[10 : 10 + BOX, 25 : 25 + BOX]
    scale = np.dot(box.ravel(), expected.ravel()) / np.dot(expected.ravel(), expected.ravel())
    assert scale > 0  # same sign as the negated projection: dark particle
    np.testing.assert_allclose(box, scale * expected, atol=1e-3 * np.abs(box).max())
    outside = image.copy()
    outside[10 : 10 + BOX, 25 : 25 + BOX] = 0
    assert np.abs(outside).max() < 1e-3 * np.abs(box).max()
    # Its L2 norm is the signal scale.
    assert np.linalg.norm(image) == pytest.approx(12.0, rel=1e-4)


def test_particle_with_realistic_ctf_is_a_dark_blob_centred_on_its_box(template):
    particle = PlantedParticle(pos_y=30, pos_x=41, phi=40.0, theta=70.0, psi=200.0)
    image = _quiet(
        template,
        (96, 112),
        [particle],
        defocus_u=12000.0,
        defocus_v=11000.0,
        astigmatism_angle=20.0,
        signal_scale=5.0,
    )
    low_pass = scipy.ndimage.gaussian_filter(image.astype(np.float64), 2.5)
    centre = (30 + BOX // 2, 41 + BOX // 2)
    darkest = np.unravel_index(np.argmin(low_pass), low_pass.shape)
    assert np.hypot(darkest[0] - centre[0], darkest[1] - centre[1]) <= 3.0
    window = low_pass[centre[0] - 6 : centre[0] + 7, centre[1] - 6 : centre[1] + 7]
    assert window.mean() < 0.0
    darkness = np.clip(-low_pass, 0.0, None)
    darkness[low_pass > 0.5 * low_pass.min()] = 0.0
    np.testing.assert_allclose(scipy.ndimage.center_of_mass(darkness), centre, atol=1.5)


def test_particles_at_the_edge_are_clipped(template):
    particle = PlantedParticle(pos_y=-8, pos_x=50, phi=0.0, theta=0.0, psi=0.0)
    image = _quiet(template, (40, 64), [particle], amplitude_contrast_ratio=0.5, **FLAT_CTF)
    expected = -template.astype(np.float64).sum(axis=0)[8:, : 64 - 50]
    box = image[: BOX - 8, 50:]
    correlation = np.corrcoef(box.ravel(), expected.ravel())[0, 1]
    assert correlation > 0.999


def test_white_noise_statistics():
    image = simulate_micrograph(
        np.zeros((8, 8, 8), np.float32),
        (256, 256),
        [],
        pixel_size=1.0,
        noise_sigma=2.0,
        low_frequency_noise=0.0,
        seed=5,
    )
    assert image.dtype == np.float32 and image.shape == (256, 256)
    assert abs(image.mean()) < 0.05
    assert image.std() == pytest.approx(2.0, rel=0.02)
    power = np.abs(np.fft.rfft2(image)) ** 2
    k = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.rfftfreq(256)[None, :])
    low, high = power[(k > 0) & (k < 0.1)].mean(), power[k > 0.4].mean()
    assert low / high == pytest.approx(1.0, abs=0.15)  # white: flat spectrum


def test_low_frequency_noise_adds_smooth_power():
    kwargs = {"pixel_size": 1.0, "noise_sigma": 1.0, "seed": 6}
    empty = np.zeros((8, 8, 8), np.float32)
    image = simulate_micrograph(empty, (256, 256), [], low_frequency_noise=1.5, **kwargs)
    assert image.var() == pytest.approx(1.0 + 1.5**2, rel=0.1)
    power = np.abs(np.fft.rfft2(image)) ** 2
    k = np.hypot(np.fft.fftfreq(256)[:, None], np.fft.rfftfreq(256)[None, :])
    assert power[(k > 0) & (k < 0.02)].mean() > 20 * power[k > 0.4].mean()


def test_micrograph_reproducible_with_seed(template):
    particles = [PlantedParticle(5, 6, 10.0, 20.0, 30.0, relative_defocus=200.0)]
    a = simulate_micrograph(template, (48, 48), particles, pixel_size=PIXEL, seed=4)
    b = simulate_micrograph(template, (48, 48), particles, pixel_size=PIXEL, seed=4)
    c = simulate_micrograph(template, (48, 48), particles, pixel_size=PIXEL, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_random_particles_inside_and_apart():
    grid = uniform_grid(psi_step=30.0, theta_step=30.0)
    particles = random_particles(
        12, (200, 300), 32, orientations=grid, defocus_values=(-100.0, 0.0, 100.0), seed=2
    )
    assert len(particles) == 12
    corners = np.array([(p.pos_y, p.pos_x) for p in particles])
    assert corners.min() >= 0
    assert (corners[:, 0] <= 200 - 32).all() and (corners[:, 1] <= 300 - 32).all()
    distances = np.hypot(*(corners[:, None, :] - corners[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distances, np.inf)
    assert distances.min() >= 32
    poses = np.array([(p.phi, p.theta, p.psi) for p in particles])
    on_grid = (np.abs(poses[:, None, :] - grid[None]).max(axis=2) == 0).any(axis=1)
    assert on_grid.all()
    assert {p.relative_defocus for p in particles} <= {-100.0, 0.0, 100.0}
    again = random_particles(
        12, (200, 300), 32, orientations=grid, defocus_values=(-100.0, 0.0, 100.0), seed=2
    )
    assert again == particles


def test_random_particles_random_orientations_and_errors():
    particles = random_particles(50, (2000, 2000), 16, seed=1)
    poses = np.array([(p.phi, p.theta, p.psi) for p in particles])
    assert ((poses[:, [0, 2]] >= 0) & (poses[:, [0, 2]] < 360)).all()
    assert ((poses[:, 1] >= 0) & (poses[:, 1] <= 180)).all()
    assert len(np.unique(poses[:, 1])) == 50
    with pytest.raises(ConfigError, match="cannot place"):
        random_particles(30, (64, 64), 16, seed=0)
    with pytest.raises(ConfigError, match="does not fit"):
        random_particles(1, (64, 64), 80)


def test_demo_dataset_files_and_planted_poses(tmp_path):
    demo = demo_dataset(tmp_path / "demo", seed=0)
    micrograph = read_micrograph(demo["micrograph_path"])
    template = read_template(demo["template_path"])
    check_compatible(micrograph, template, pixel_size=demo["pixel_size"])
    assert micrograph.data.shape == (480, 480) and template.data.shape == (64, 64, 64)
    assert micrograph.pixel_size == pytest.approx(demo["pixel_size"])
    search = demo["search"]
    grid = uniform_grid(psi_step=search["psi_step"], theta_step=search["theta_step"])
    particles = demo["particles"]
    assert len(particles) == len(demo["particle_table"]) == 6
    for particle, row in zip(particles, demo["particle_table"], strict=True):
        pose = np.array([particle.phi, particle.theta, particle.psi])
        assert (np.abs(grid - pose).max(axis=1) == 0).any()
        assert particle.relative_defocus in (-1200.0, 0.0, 1200.0)
        assert row["pos_y_img"] == particle.pos_y + 32 and row["pos_x_img"] == particle.pos_x + 32
        assert 0 <= particle.pos_y <= 480 - 64 and 0 <= particle.pos_x <= 480 - 64
