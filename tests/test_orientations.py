"""Tests of the orientation grids (conventions.md#search-grids)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dtm.errors import ConfigError
from dtm.physics.orientations import (
    healpix_grid,
    healpix_pix2ang,
    local_grid,
    orientation_grid,
    symmetry_ranges,
    uniform_grid,
)


def _unit_vectors(phi_deg: np.ndarray, theta_deg: np.ndarray) -> np.ndarray:
    """Viewing directions R·z of (phi, theta): (sin θ cos φ, sin θ sin φ, cos θ)."""
    phi, theta = np.radians(phi_deg), np.radians(theta_deg)
    return np.column_stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)]
    )


def _angle_between_rotations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic angles (degrees) between every rotation of ``a`` (n,3,3) and ``b`` (m,3,3)."""
    trace = np.einsum("nij,mij->nm", a, b)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


@pytest.mark.parametrize(
    ("psi_step", "theta_step", "n_directions", "n_psi"),
    [(1.5, 2.5, 6600, 240), (15.0, 15.0, 184, 24), (90.0, 90.0, 6, 4)],
)
def test_uniform_grid_counts_match_spec(psi_step, theta_step, n_directions, n_psi):
    grid = uniform_grid(psi_step=psi_step, theta_step=theta_step)
    assert grid.shape == (n_directions * n_psi, 3)
    assert grid.dtype == np.float64
    directions = np.unique(grid[:, :2], axis=0)
    assert len(directions) == n_directions


def test_uniform_grid_order_psi_fastest_then_phi_then_theta():
    grid = uniform_grid(psi_step=15.0, theta_step=15.0)
    n_psi = 24
    psi = grid[:, 2].reshape(-1, n_psi)
    np.testing.assert_allclose(psi, np.broadcast_to(15.0 * np.arange(n_psi), psi.shape))
    directions = grid[::n_psi, :2]
    # Every block of n_psi rows shares one direction.
    np.testing.assert_array_equal(
        grid[:, :2].reshape(-1, n_psi, 2), directions[:, None, :].repeat(n_psi, 1)
    )
    # Directions sorted by theta, then phi.
    order = np.lexsort((directions[:, 0], directions[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(directions)))


def test_uniform_grid_rings_follow_the_formula():
    grid = uniform_grid(psi_step=90.0, theta_step=2.5)
    directions = grid[::4, :2]
    thetas, counts = np.unique(directions[:, 1], return_counts=True)
    np.testing.assert_allclose(thetas, 2.5 * np.arange(73))
    assert counts[0] == 1 and counts[-1] == 1  # a single phi at each pole
    # theta = 90: n_phi = round(360 / 2.5) = 144, evenly spaced from 0.
    equator = np.sort(directions[directions[:, 1] == 90.0, 0])
    np.testing.assert_allclose(equator, 2.5 * np.arange(144))
    # theta = 30: round(360 * sin 30° / 2.5) = 72.
    assert counts[12] == 72


def test_uniform_grid_ranges_are_honoured():
    grid = uniform_grid(
        psi_step=10.0,
        theta_step=10.0,
        phi_min=20.0,
        phi_max=140.0,
        theta_min=30.0,
        theta_max=60.0,
        psi_min=-30.0,
        psi_max=30.0,
    )
    assert grid[:, 0].min() == 20.0 and grid[:, 0].max() < 140.0
    np.testing.assert_allclose(np.unique(grid[:, 1]), [30.0, 40.0, 50.0, 60.0])
    np.testing.assert_allclose(np.unique(grid[:, 2]), np.arange(-30.0, 30.0, 10.0))


@pytest.mark.parametrize(
    ("symmetry", "expected"),
    [
        ("C1", (360.0, 180.0)),
        ("c7", (360.0 / 7, 180.0)),
        ("D2", (180.0, 90.0)),
        ("T", (180.0, 54.7356)),
        ("o", (90.0, 54.7356)),
        ("I", (180.0, 31.7)),
    ],
)
def test_symmetry_ranges_table(symmetry, expected):
    assert symmetry_ranges(symmetry) == pytest.approx(expected)


@pytest.mark.parametrize("symmetry", ["X3", "C0", "C", "T2", "", "D-1", "C1.5"])
def test_bad_symmetry_is_a_config_error_naming_it(symmetry):
    with pytest.raises(ConfigError, match="symmetry"):
        symmetry_ranges(symmetry)


def test_orientation_grid_symmetry_and_override():
    c2 = orientation_grid(psi_step=30.0, theta_step=15.0, symmetry="C2")
    assert c2[:, 0].max() < 180.0 and c2[:, 1].max() == 180.0
    d2 = orientation_grid(psi_step=30.0, theta_step=15.0, symmetry="D2")
    assert d2[:, 1].max() == 90.0
    # Explicit ranges override the symmetry's.
    wide = orientation_grid(psi_step=30.0, theta_step=15.0, symmetry="D2", theta_max=180.0)
    assert wide[:, 1].max() == 180.0
    np.testing.assert_array_equal(
        orientation_grid(psi_step=15.0, theta_step=15.0),
        uniform_grid(psi_step=15.0, theta_step=15.0),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"psi_step": 0.0, "theta_step": 10.0},
        {"psi_step": 10.0, "theta_step": -1.0},
        {"psi_step": 10.0, "theta_step": 10.0, "base_grid_method": "cartesian"},
        {"psi_step": 10.0, "theta_step": 10.0, "phi_min": 90.0, "phi_max": 10.0},
        {"psi_step": 10.0, "theta_step": 10.0, "theta_max": 200.0},
        {"psi_step": 10.0, "theta_step": 10.0, "psi_min": 5.0, "psi_max": 5.0},
    ],
)
def test_orientation_grid_rejects_bad_configuration(kwargs):
    with pytest.raises(ConfigError):
        orientation_grid(**kwargs)


@pytest.mark.parametrize("nside", [1, 2, 3, 4, 7, 16, 23, 64, 100])
def test_healpix_pixel_centres_equal_healpy(nside):
    import healpy  # a test dependency (pyproject's "test" extra): the reference

    theta, phi = healpix_pix2ang(nside)
    reference = healpy.pix2ang(nside, np.arange(healpy.nside2npix(nside)))
    np.testing.assert_array_equal(theta, reference[0])
    np.testing.assert_array_equal(phi, reference[1])


def test_healpix_grid_is_roughly_uniform_and_covers_the_sphere():
    step = 10.0
    grid = healpix_grid(psi_step=90.0, theta_step=step)
    n_psi = 4
    np.testing.assert_allclose(grid[:n_psi, 2], [0.0, 90.0, 180.0, 270.0])
    directions = grid[::n_psi, :2]
    order = np.lexsort((directions[:, 0], directions[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(directions)))
    vectors = _unit_vectors(directions[:, 0], directions[:, 1])
    angles = np.degrees(np.arccos(np.clip(vectors @ vectors.T, -1.0, 1.0)))
    np.fill_diagonal(angles, np.inf)
    nearest = angles.min(axis=1)
    assert nearest.mean() <= step
    assert nearest.max() / nearest.min() < 1.6  # equal-area pixels: no clustering at the poles
    # Coverage: every random direction lies within one step of a grid direction.
    rng = np.random.default_rng(1)
    probes = rng.normal(size=(3000, 3))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    gaps = np.degrees(np.arccos(np.clip(probes @ vectors.T, -1.0, 1.0))).min(axis=1)
    assert gaps.max() < step


def test_healpix_grid_respects_symmetry_ranges():
    grid = orientation_grid(
        psi_step=90.0, theta_step=10.0, symmetry="D3", base_grid_method="healpix"
    )
    assert grid[:, 0].max() < 120.0 and grid[:, 1].max() <= 90.0
    full = healpix_grid(psi_step=90.0, theta_step=10.0)
    # The D3 asymmetric unit is 1/6 of the sphere.
    assert len(grid) / len(full) == pytest.approx(1 / 6, abs=0.03)


def test_local_grid_starts_with_identity_and_is_made_of_rotations():
    offsets = local_grid(
        theta_step_coarse=6.0, theta_step_fine=1.5, psi_step_coarse=6.0, psi_step_fine=1.5
    )
    assert offsets.dtype == np.float64 and offsets.shape[1:] == (3, 3)
    np.testing.assert_allclose(offsets[0], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(
        offsets @ offsets.transpose(0, 2, 1), np.eye(3)[None].repeat(len(offsets), 0), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(offsets), 1.0, atol=1e-12)
    # Offsets stay within the coarse range: tilt <= 6° and in-plane turn <= 6° → angle <= 12°.
    assert _angle_between_rotations(offsets, np.eye(3)[None]).max() <= 12.0 + 1e-9


def test_local_grid_covers_all_rotations_within_the_coarse_step():
    coarse, fine = 6.0, 1.5
    offsets = local_grid(
        theta_step_coarse=coarse, theta_step_fine=fine, psi_step_coarse=coarse, psi_step_fine=fine
    )
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(1500, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.radians(coarse) * rng.random(1500) ** (1 / 3)  # uniform in the ball
    angles[:300] = np.radians(coarse)  # and the boundary, the hardest case
    targets = Rotation.from_rotvec(axes * angles[:, None]).as_matrix()
    nearest = _angle_between_rotations(targets, offsets).min(axis=1)
    assert nearest.max() <= fine
