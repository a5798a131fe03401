"""Rotations: ZYZ Euler angles and rotation matrices.

Convention (``conventions.md#orientations``): angles in degrees, ``(phi, theta, psi)``,
intrinsic ZYZ, ``R = Rz(phi) @ Ry(theta) @ Rz(psi)``, right-handed and active, acting on
column vectors ``(x, y, z)``. ``psi`` is the in-plane angle. All functions broadcast over
leading axes and work in float64 on NumPy arrays (orientation grids are small next to the
images).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from dtm.errors import InputError

# Below this sin(theta) the decomposition is degenerate (gimbal lock): only phi + psi
# (theta = 0) or phi - psi (theta = 180) is defined. sin(deg2rad(180)) is 1.2e-16, so the
# threshold must sit well above float64 rounding but far below any grid step.
_GIMBAL_SIN_THETA = 1e-10


def _as_euler(euler: ArrayLike) -> np.ndarray:
    angles = np.asarray(euler, dtype=np.float64)
    if angles.ndim == 0 or angles.shape[-1] != 3:
        raise InputError(
            f"euler angles must have shape (..., 3) (phi, theta, psi), got {angles.shape}"
        )
    return angles


def _as_matrix(matrix: ArrayLike, name: str = "rotation matrix") -> np.ndarray:
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim < 2 or array.shape[-2:] != (3, 3):
        raise InputError(f"{name} must have shape (..., 3, 3), got {array.shape}")
    return array


def euler_to_matrix(euler: ArrayLike) -> np.ndarray:
    """Rotation matrices from ZYZ Euler angles.

    Parameters
    ----------
    euler : array_like, shape (..., 3)
        Columns ``(phi, theta, psi)`` in degrees.

    Returns
    -------
    numpy.ndarray, shape (..., 3, 3), float64
        ``Rz(phi) @ Ry(theta) @ Rz(psi)``, acting on column vectors ``(x, y, z)``.
    """
    angles = np.deg2rad(_as_euler(euler))
    cphi, sphi = np.cos(angles[..., 0]), np.sin(angles[..., 0])
    ctheta, stheta = np.cos(angles[..., 1]), np.sin(angles[..., 1])
    cpsi, spsi = np.cos(angles[..., 2]), np.sin(angles[..., 2])
    matrix = np.empty(angles.shape[:-1] + (3, 3), dtype=np.float64)
    matrix[..., 0, 0] = cphi * ctheta * cpsi - sphi * spsi
    matrix[..., 0, 1] = -cphi * ctheta * spsi - sphi * cpsi
    matrix[..., 0, 2] = cphi * stheta
    matrix[..., 1, 0] = sphi * ctheta * cpsi + cphi * spsi
    matrix[..., 1, 1] = -sphi * ctheta * spsi + cphi * cpsi
    matrix[..., 1, 2] = sphi * stheta
    matrix[..., 2, 0] = -stheta * cpsi
    matrix[..., 2, 1] = stheta * spsi
    matrix[..., 2, 2] = ctheta
    return matrix


def _wrap_degrees(angle: np.ndarray) -> np.ndarray:
    """Map degrees into [0, 360); ``np.mod`` alone returns 360.0 for tiny negative inputs."""
    wrapped = np.mod(angle, 360.0)
    return np.where(wrapped >= 360.0, wrapped - 360.0, wrapped)


def matrix_to_euler(matrix: ArrayLike) -> np.ndarray:
    """ZYZ Euler angles of rotation matrices.

    Parameters
    ----------
    matrix : array_like, shape (..., 3, 3)
        Rotation matrices (orthonormal, determinant +1).

    Returns
    -------
    numpy.ndarray, shape (..., 3), float64
        ``(phi, theta, psi)`` in degrees with ``phi, psi`` in [0, 360) and ``theta`` in
        [0, 180].

    Notes
    -----
    At gimbal lock (``sin(theta) < 1e-10``) only ``phi + psi`` (theta = 0) or ``phi - psi``
    (theta = 180) is defined. Then ``phi = 0``, ``theta`` is exactly 0 or 180, and all the
    in-plane rotation goes into ``psi`` -- the same choice as the uniform orientation grid,
    which has a single ``phi`` at each pole.
    """
    r = _as_matrix(matrix)
    sin_theta = np.hypot(r[..., 0, 2], r[..., 1, 2])
    theta = np.rad2deg(np.arctan2(sin_theta, r[..., 2, 2]))
    phi = np.rad2deg(np.arctan2(r[..., 1, 2], r[..., 0, 2]))
    psi = np.rad2deg(np.arctan2(r[..., 2, 1], -r[..., 2, 0]))

    locked = sin_theta < _GIMBAL_SIN_THETA
    north = locked & (r[..., 2, 2] > 0)
    south = locked & (r[..., 2, 2] <= 0)
    # theta = 0: R = Rz(phi + psi); theta = 180: R = Rz(phi - psi) @ Ry(180).
    psi_north = np.rad2deg(np.arctan2(r[..., 1, 0], r[..., 0, 0]))
    psi_south = np.rad2deg(np.arctan2(r[..., 0, 1], -r[..., 0, 0]))
    phi = np.where(locked, 0.0, phi)
    theta = np.where(north, 0.0, np.where(south, 180.0, theta))
    psi = np.where(north, psi_north, np.where(south, psi_south, psi))
    return np.stack([_wrap_degrees(phi), theta, _wrap_degrees(psi)], axis=-1)


def compose(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Composition ``a @ b`` of rotation matrices (``b`` applied first), broadcasting.

    Parameters
    ----------
    a, b : array_like, shape (..., 3, 3)

    Returns
    -------
    numpy.ndarray, shape (broadcast ..., 3, 3), float64
    """
    return np.matmul(_as_matrix(a, "a"), _as_matrix(b, "b"))


def geodesic_angle(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Angle of the rotation ``a^T @ b`` (the geodesic distance on SO(3)), broadcasting.

    Parameters
    ----------
    a, b : array_like, shape (..., 3, 3)

    Returns
    -------
    numpy.ndarray, shape (broadcast ...), float64
        Angles in degrees, in [0, 180].

    Notes
    -----
    Uses ``atan2(|vee(M - M^T)| / 2, (trace M - 1) / 2)`` rather than ``arccos`` of the trace,
    which loses half the digits near 0 and 180 degrees and fails on slightly
    non-orthonormal input; the cosine is clipped to [-1, 1] as well.
    """
    m = np.matmul(np.swapaxes(_as_matrix(a, "a"), -1, -2), _as_matrix(b, "b"))
    cos_angle = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    axis = np.stack(
        [m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]],
        axis=-1,
    )
    sin_angle = np.clip(np.linalg.norm(axis, axis=-1) / 2.0, 0.0, 1.0)
    return np.rad2deg(np.arctan2(sin_angle, cos_angle))
