"""ZYZ Euler angles, composition and geodesic distance (conventions.md#orientations)."""

from __future__ import annotations

import numpy as np
import pytest

from dtm.errors import InputError
from dtm.physics import compose, euler_to_matrix, geodesic_angle, matrix_to_euler


def rz(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def ry(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])


def test_matches_explicit_product_of_elementary_rotations() -> None:
    rng = np.random.default_rng(1)
    eulers = rng.uniform([0, 0, 0], [360, 180, 360], size=(20, 3))
    expected = np.stack([rz(p) @ ry(t) @ rz(s) for p, t, s in eulers])
    np.testing.assert_allclose(euler_to_matrix(eulers), expected, atol=1e-14)


def test_active_right_handed_convention() -> None:
    # phi = 90 turns the x axis onto the y axis (active, counter-clockwise about z).
    np.testing.assert_allclose(euler_to_matrix([90, 0, 0]) @ [1, 0, 0], [0, 1, 0], atol=1e-15)
    # theta = 90 turns the z axis onto the x axis (right-handed rotation about y).
    np.testing.assert_allclose(euler_to_matrix([0, 90, 0]) @ [0, 0, 1], [1, 0, 0], atol=1e-15)


def test_shape_broadcast_and_dtype() -> None:
    eulers = np.zeros((4, 5, 3), dtype=np.float32)
    matrices = euler_to_matrix(eulers)
    assert matrices.shape == (4, 5, 3, 3)
    assert matrices.dtype == np.float64
    assert matrix_to_euler(matrices).shape == (4, 5, 3)


def test_round_trip_generic_angles() -> None:
    rng = np.random.default_rng(2)
    eulers = rng.uniform([0, 0.5, 0], [360, 179.5, 360], size=(200, 3))
    back = matrix_to_euler(euler_to_matrix(eulers))
    np.testing.assert_allclose(back, eulers, atol=1e-9)
    assert np.all((back[:, [0, 2]] >= 0) & (back[:, [0, 2]] < 360))


def test_output_ranges_for_negative_and_large_angles() -> None:
    back = matrix_to_euler(euler_to_matrix([[-30.0, 45.0, 400.0], [725.0, -45.0, -1e-13]]))
    # theta = -45 is the same rotation as (phi + 180, 45, psi + 180).
    np.testing.assert_allclose(back, [[330.0, 45.0, 40.0], [185.0, 45.0, 180.0]], atol=1e-9)
    assert np.all((back[:, [0, 2]] >= 0) & (back[:, [0, 2]] < 360))


@pytest.mark.parametrize(
    ("euler", "expected"),
    [
        ((30.0, 0.0, 40.0), (0.0, 0.0, 70.0)),  # theta = 0: R = Rz(phi + psi)
        ((300.0, 0.0, 100.0), (0.0, 0.0, 40.0)),
        ((30.0, 180.0, 40.0), (0.0, 180.0, 10.0)),  # theta = 180: R = Rz(phi - psi) Ry(180)
        ((0.0, 180.0, 250.0), (0.0, 180.0, 250.0)),
    ],
)
def test_gimbal_lock_puts_in_plane_rotation_into_psi(euler, expected) -> None:
    matrix = euler_to_matrix(euler)
    back = matrix_to_euler(matrix)
    np.testing.assert_allclose(back, expected, atol=1e-9)
    assert back[1] in (0.0, 180.0)  # exactly on the pole
    np.testing.assert_allclose(euler_to_matrix(back), matrix, atol=1e-12)


def test_compose_is_matrix_product_and_adds_angles_about_one_axis() -> None:
    a = euler_to_matrix([20.0, 0.0, 0.0])
    b = euler_to_matrix([0.0, 0.0, 35.0])
    np.testing.assert_allclose(compose(a, b), rz(55.0), atol=1e-14)
    rng = np.random.default_rng(3)
    many = euler_to_matrix(rng.uniform(0, 180, size=(6, 3)))
    np.testing.assert_allclose(compose(many, a), np.einsum("nij,jk->nik", many, a), atol=1e-14)
    # Intrinsic ZYZ is the composition of its elementary rotations.
    np.testing.assert_allclose(
        compose(compose(rz(10), ry(20)), rz(30)), euler_to_matrix([10, 20, 30]), atol=1e-14
    )


@pytest.mark.parametrize("angle", [0.0, 1e-6, 0.5, 30.0, 90.0, 179.0, 180.0])
def test_geodesic_angle_known_values(angle: float) -> None:
    rng = np.random.default_rng(4)
    base = euler_to_matrix(rng.uniform(0, 180, size=3))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    # Rodrigues' formula: a rotation by `angle` about `axis`.
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(angle)
    offset = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k
    assert geodesic_angle(base, base @ offset) == pytest.approx(angle, abs=1e-9)
    assert geodesic_angle(base @ offset, base) == pytest.approx(angle, abs=1e-9)


def test_geodesic_angle_broadcasts_and_survives_rounding() -> None:
    identity = np.eye(3)
    rotations = euler_to_matrix([[0, 0, 10], [0, 20, 0], [0, 0, 0]])
    np.testing.assert_allclose(geodesic_angle(identity, rotations), [10, 20, 0], atol=1e-12)
    noisy = identity * (1 + 1e-9)  # trace slightly above 3
    assert np.isfinite(geodesic_angle(identity, noisy))
    assert geodesic_angle(identity, noisy) < 1e-6


def test_bad_shapes_raise_input_error() -> None:
    with pytest.raises(InputError, match="euler"):
        euler_to_matrix([1.0, 2.0])
    with pytest.raises(InputError, match=r"\(\.\.\., 3, 3\)"):
        matrix_to_euler(np.eye(2))
