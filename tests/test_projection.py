"""Projection convention (conventions.md#projection-and-contrast) and the Fourier-slice
projector's accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from dtm.errors import InputError
from dtm.physics import (
    euler_to_matrix,
    extract_central_slices,
    prepare_template,
    project_real_space,
)
from dtm.physics import projection as projection_module


def blob_volume(box: int, x: float, y: float, z: float, sigma: float = 1.2) -> np.ndarray:
    """A Gaussian blob at (x, y, z) relative to the centre voxel box // 2, indexed [z, y, x]."""
    axis = np.arange(box) - box // 2
    gz = np.exp(-((axis - z) ** 2) / (2 * sigma**2))
    gy = np.exp(-((axis - y) ** 2) / (2 * sigma**2))
    gx = np.exp(-((axis - x) ** 2) / (2 * sigma**2))
    return (gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)


def pseudo_molecule(box: int, seed: int = 0) -> np.ndarray:
    """Random sharp Gaussian 'atoms' inside a sphere of radius 0.3 box."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((box,) * 3, dtype=np.float32)
    for _ in range(3 * box):
        direction = rng.normal(size=3)
        x, y, z = direction / np.linalg.norm(direction) * 0.3 * box * rng.uniform() ** (1 / 3)
        volume += blob_volume(box, x, y, z, sigma=1.0)
    return volume


def fourier_projection(volume: np.ndarray, eulers: np.ndarray, **kwargs) -> np.ndarray:
    template = prepare_template(volume, **kwargs)
    slices = extract_central_slices(template, euler_to_matrix(eulers))
    return scipy.fft.irfft2(slices, s=volume.shape[1:])


def lowpass_correlation(a: np.ndarray, b: np.ndarray, cutoff: float = 1 / 3) -> float:
    ky = np.fft.fftfreq(a.shape[0])[:, None]
    kx = np.fft.rfftfreq(a.shape[1])[None, :]
    keep = (np.hypot(ky, kx) <= cutoff) & ((ky != 0) | (kx != 0))
    ra = scipy.fft.irfft2(scipy.fft.rfft2(a) * keep, s=a.shape)
    rb = scipy.fft.irfft2(scipy.fft.rfft2(b) * keep, s=b.shape)
    return float(np.sum(ra * rb) / np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))


def peak_yx(image: np.ndarray) -> tuple[int, int]:
    iy, ix = np.unravel_index(np.argmax(image), image.shape)
    return int(iy), int(ix)


# (euler, blob position (x, y, z), expected projected blob position (x, y)): the blob at r0
# appears where R · (x, y, z) = r0, i.e. at the (x, y) of R^T · r0.
CONVENTION_CASES = [
    ((0.0, 0.0, 0.0), (5, 0, 0), (5, 0)),
    ((90.0, 0.0, 0.0), (5, 0, 0), (0, -5)),  # Rz(90)^T (5, 0, 0) = (0, -5, 0)
    ((0.0, 0.0, 90.0), (0, 4, 0), (4, 0)),  # Rz(90)^T (0, 4, 0) = (4, 0, 0)
    ((0.0, 90.0, 0.0), (0, 0, 5), (-5, 0)),  # Ry(90)^T (0, 0, 5) = (-5, 0, 0)
    ((0.0, 90.0, 0.0), (5, 0, 0), (0, 0)),  # Ry(90)^T (5, 0, 0) = (0, 0, 5): along the beam
    ((90.0, 90.0, 0.0), (0, 3, -6), (6, 0)),  # Ry(-90) Rz(-90) (0, 3, -6) = (6, 0, 3)
]


def _expected_xy(
    euler: tuple[float, float, float], r0: tuple[int, int, int]
) -> tuple[float, float]:
    moved = euler_to_matrix(euler).T @ np.asarray(r0, dtype=float)
    return moved[0], moved[1]


@pytest.mark.parametrize(("euler", "blob", "expected"), CONVENTION_CASES)
def test_blob_lands_where_the_convention_says(euler, blob, expected) -> None:
    box, centre = 24, 12
    volume = blob_volume(box, *blob)
    np.testing.assert_allclose(_expected_xy(euler, blob), expected, atol=1e-12)
    for image in (
        project_real_space(volume, euler_to_matrix(euler)),
        fourier_projection(volume, np.array([euler]))[0],
    ):
        assert peak_yx(image) == (centre + expected[1], centre + expected[0])


def test_identity_is_the_sum_along_z() -> None:
    volume = pseudo_molecule(20, seed=3)
    expected = volume.sum(axis=0)
    np.testing.assert_allclose(
        project_real_space(volume, np.eye(3)), expected, rtol=1e-5, atol=1e-4
    )
    exact = fourier_projection(volume, np.zeros((1, 3)), gridding_correction=False)[0]
    np.testing.assert_allclose(exact, expected, atol=1e-4 * expected.max())
    for oversampling in (1, 2):
        corrected = fourier_projection(volume, np.zeros((1, 3)), oversampling=oversampling)[0]
        assert lowpass_correlation(corrected, expected) > 0.99


@pytest.mark.parametrize("oversampling", [1, 2])
def test_fourier_slice_matches_real_space_projection(oversampling: int) -> None:
    box = 32
    volume = pseudo_molecule(box, seed=1)
    eulers = np.array([[30, 40, 50], [123, 77, 211], [45, 54.7356, 45], [200, 135, 300]])
    projections = fourier_projection(volume, eulers, oversampling=oversampling)
    for euler, projection in zip(eulers, projections, strict=True):
        reference = project_real_space(volume, euler_to_matrix(euler))
        threshold = 0.99 if oversampling == 1 else 0.999
        assert lowpass_correlation(projection, reference) >= threshold, euler
        # Same scale, not just the same shape (DC excluded: the search zeroes it).
        assert np.std(projection) == pytest.approx(np.std(reference), rel=0.03)


def test_odd_box_keeps_the_centre_at_d_over_2() -> None:
    box = 25
    volume = blob_volume(box, 4, -3, 2)
    image = fourier_projection(volume, np.zeros((1, 3)))[0]
    assert image.shape == (25, 25)
    assert peak_yx(image) == (12 - 3, 12 + 4)


def test_output_layout_dtype_and_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    volume = pseudo_molecule(16, seed=2)
    template = prepare_template(volume)
    assert template.spectrum.dtype == np.complex64 and template.box_size == 16
    rotations = euler_to_matrix(np.random.default_rng(0).uniform(0, 180, size=(7, 3)))
    whole = extract_central_slices(template, rotations)
    assert whole.shape == (7, 16, 9) and whole.dtype == np.complex64
    monkeypatch.setattr(projection_module, "_POINTS_PER_BLOCK", 2 * 16 * 9)
    np.testing.assert_array_equal(extract_central_slices(template, rotations), whole)


def test_bad_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="cubic"):
        prepare_template(np.zeros((8, 8, 9), dtype=np.float32))
    with pytest.raises(InputError, match="oversampling"):
        prepare_template(np.zeros((8, 8, 8), dtype=np.float32), oversampling=0)
    template = prepare_template(np.zeros((8, 8, 8), dtype=np.float32))
    with pytest.raises(InputError, match=r"\(n, 3, 3\)"):
        extract_central_slices(template, np.eye(3))
