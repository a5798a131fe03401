"""Zernike aberrations and anisotropic magnification in Leopard-EM's conventions
(conventions.md#aberrations), against Leopard-EM's own values and an independent
reimplementation of the published formulas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.ndimage

from dtm.errors import ConfigError
from dtm.physics import ctf_2d
from dtm.physics.aberrations import (
    as_mag_matrix,
    as_zernikes,
    mag_matrix_text,
    slice_transform,
    zernikes_text,
)
from dtm.physics.projection import extract_central_slices, prepare_template, project_real_space
from dtm.physics.rotations import euler_to_matrix
from dtm.physics.simulate import simulate_template

REFERENCE = json.loads((Path(__file__).parent / "data" / "leopard_ctf_reference.json").read_text())


def _reference_kwargs() -> dict[str, Any]:
    optics = REFERENCE["optics"]
    return {
        "pixel_size": optics["pixel_size"],
        "voltage": optics["voltage"],
        "spherical_aberration": optics["spherical_aberration"],
        "amplitude_contrast_ratio": optics["amplitude_contrast_ratio"],
        "defocus_u": REFERENCE["defocus_u"],
        "defocus_v": REFERENCE["defocus_v"],
        "astigmatism_angle": optics["astigmatism_angle"],
        "phase_shift": optics["phase_shift"],
        "b_factor": optics["ctf_B_factor"],
        "relative_defocus": REFERENCE["relative_defocus"],
    }


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_ctf_equals_leopard_em_values(case: str) -> None:
    """Values computed once by Leopard-EM 1.3.0 / torch-ctf 0.6.0 (provenance in the file)."""
    values = REFERENCE["cases"][case]
    expected = np.array(values["real"]) + 1j * np.array(values["imag"])
    ctf = ctf_2d(
        tuple(REFERENCE["shape"]),
        **_reference_kwargs(),
        even_zernikes=values["even_zernikes"],
        odd_zernikes=values["odd_zernikes"],
        mag_matrix=values["mag_matrix"],
    )
    assert ctf.shape == expected.shape
    assert np.iscomplexobj(ctf) == (values["odd_zernikes"] is not None)
    # float32 in both; the phases reach ~100 rad at Nyquist here.
    np.testing.assert_allclose(ctf, expected, atol=1e-4)


def _independent_ctf(shape: tuple[int, int], p: dict[str, Any]) -> np.ndarray:
    """The published formulas written out point by point in float64 (torch-ctf's order of
    operations: magnify the frequency, then astigmatism by projection on its axis, then the
    Zernike terms; B-factor on the unmagnified frequency)."""
    ny, nx = shape
    wavelength = 12.2642598 / np.sqrt(p["voltage"] * 1e3 * (1 + 0.97847573e-6 * p["voltage"] * 1e3))
    a = np.array(p["mag_matrix"], dtype=float).reshape(2, 2)
    fourier = np.linalg.inv(a).T  # acts on (ky, kx)
    out = np.zeros((ny, nx // 2 + 1), dtype=complex)
    for iy in range(ny):
        for ix in range(nx // 2 + 1):
            k = np.array([(iy if iy < (ny + 1) // 2 else iy - ny) / ny, ix / nx]) / p["pixel_size"]
            ky, kx = fourier @ k
            rho = np.hypot(ky, kx)
            theta = np.arctan2(ky, kx)
            axis = np.array([np.sin(np.radians(p["angle"])), np.cos(np.radians(p["angle"]))])
            along = 0.0 if rho == 0 else np.dot([ky, kx], axis) / rho
            half = (p["du"] - p["dv"]) / 2
            defocus = (p["du"] + p["dv"]) / 2 - half + 2 * half * along**2
            chi = (
                -np.pi * wavelength * defocus * rho**2
                + np.pi / 2 * p["cs"] * 1e7 * wavelength**3 * rho**4
                - np.radians(p["phase_shift"])
                - np.arctan(p["ac"] / np.sqrt(1 - p["ac"] ** 2))
                + p["Z42c"] * rho**4 * np.cos(2 * theta)
                + p["Z44s"] * rho**4 * np.sin(4 * theta)
                + p["Z60"] * rho**6
            )
            odd = p["Z31s"] * rho**3 * np.sin(theta) + p["Z33c"] * rho**3 * np.cos(3 * theta)
            envelope = np.exp(-p["B"] * float(np.sum(k**2)) / 4)
            out[iy, ix] = -np.sin(chi) * np.exp(1j * odd) * envelope
    return out


def test_ctf_equals_an_independent_reimplementation() -> None:
    p = {
        "voltage": 200.0,
        "cs": 1.4,
        "ac": 0.1,
        "phase_shift": -25.0,
        "B": 80.0,
        "pixel_size": 0.9,
        "du": 9000.0,
        "dv": 8200.0,
        "angle": -70.0,
        "mag_matrix": [0.98, -0.03, 0.02, 1.015],
        "Z42c": 40.0,
        "Z44s": -25.0,
        "Z60": 90.0,
        "Z31s": 12.0,
        "Z33c": -7.0,
    }
    shape = (12, 15)
    ctf = ctf_2d(
        shape,
        pixel_size=p["pixel_size"],
        voltage=p["voltage"],
        spherical_aberration=p["cs"],
        amplitude_contrast_ratio=p["ac"],
        defocus_u=p["du"],
        defocus_v=p["dv"],
        astigmatism_angle=p["angle"],
        phase_shift=p["phase_shift"],
        b_factor=p["B"],
        even_zernikes=json.dumps({"Z42c": p["Z42c"], "Z44s": p["Z44s"], "Z60": p["Z60"]}),
        odd_zernikes={"Z31s": p["Z31s"], "Z33c": p["Z33c"]},
        mag_matrix=p["mag_matrix"],
    )[0]
    np.testing.assert_allclose(ctf, _independent_ctf(shape, p), atol=2e-5)


PLAIN: dict[str, Any] = {
    "pixel_size": 1.1,
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 15000.0,
    "defocus_v": 14000.0,
    "astigmatism_angle": 40.0,
    "b_factor": 0.0,
    "relative_defocus": [-300.0, 0.0, 300.0],
}


def test_zero_coefficients_and_identity_magnification_give_the_plain_ctf() -> None:
    plain = ctf_2d((40, 36), **PLAIN)
    zero = ctf_2d(
        (40, 36),
        **PLAIN,
        even_zernikes={"Z44c": 0.0, "Z60": 0.0},
        odd_zernikes={"Z31c": 0.0},
        mag_matrix=[1.0, 0.0, 0.0, 1.0],
    )
    assert plain.dtype == np.float32 and zero.dtype == np.complex64
    np.testing.assert_allclose(zero.real, plain, atol=1e-6)
    np.testing.assert_array_equal(zero.imag, 0.0)
    # Absent in every spelling a table or configuration uses: exactly the plain CTF.
    for none in (None, "", float("nan")):
        same = ctf_2d((40, 36), **PLAIN, even_zernikes=none, odd_zernikes=none, mag_matrix=none)
        np.testing.assert_array_equal(same, plain)


def test_odd_terms_only_shift_the_phase_antisymmetrically() -> None:
    shape = (32, 32)
    plain = ctf_2d(shape, **PLAIN)[1]
    coma = ctf_2d(shape, **PLAIN, odd_zernikes={"Z31c": 300.0, "Z33s": -150.0})[1]
    assert np.iscomplexobj(coma)
    np.testing.assert_allclose(np.abs(coma), np.abs(plain), atol=1e-6)
    # Hermitian as the spectrum of a real image must be: on the kx = 0 column (both signs
    # of ky on the rfft grid) the value at -k is the conjugate of that at k.
    ky = np.fft.fftfreq(shape[0])
    for i in range(1, shape[0] // 2):
        j = int(np.flatnonzero(np.isclose(ky, -ky[i]))[0])
        np.testing.assert_allclose(coma[j, 0], np.conj(coma[i, 0]), atol=1e-6)
    # The phase is odd in k, with a non-zero value: the odd term is really there.
    phase = np.angle(coma * np.sign(plain))
    assert np.abs(phase).max() > 0.5


def test_isotropic_magnification_is_a_pixel_size_change() -> None:
    """k' = k / s: the CTF of pixel size p magnified by s is the CTF of pixel size p·s."""
    scaled = ctf_2d((30, 30), **PLAIN, mag_matrix=[1.05, 0.0, 0.0, 1.05])
    pixel = {**PLAIN, "pixel_size": PLAIN["pixel_size"] * 1.05}
    np.testing.assert_allclose(scaled, ctf_2d((30, 30), **pixel), atol=2e-5)


def test_magnified_central_slice_is_the_projection_resampled_at_a_r() -> None:
    """Leopard-EM's meaning of mag_matrix for the template: the image p(A·r), r = (y, x)
    from the box centre. dtm cuts the slice at (A⁻¹)ᵀ k; the reference resamples the
    real-space projection."""
    box = 48
    volume = simulate_template(box, pixel_size=2.0, n_atoms=600, seed=3)
    a = np.array([[1.06, 0.04], [-0.03, 0.95]])
    rotation = euler_to_matrix(np.array([[30.0, 70.0, 200.0]]))
    template = prepare_template(volume, oversampling=2)
    projection = project_real_space(volume, rotation[0])
    centre = np.array([box // 2, box // 2], dtype=float)
    expected = scipy.ndimage.affine_transform(projection, a, offset=centre - a @ centre, order=3)
    inner = (slice(8, -8), slice(8, -8))

    def error(matrix: np.ndarray | None) -> float:
        """Relative error of the slice cut for ``matrix`` against the reference."""
        transform = None if matrix is None else slice_transform(tuple(matrix.ravel()))
        rotations = rotation if transform is None else rotation @ transform
        image = np.fft.irfft2(extract_central_slices(template, rotations)[0], s=(box, box))
        residual = image[inner] - expected[inner]
        return float(np.linalg.norm(residual) / np.linalg.norm(expected[inner]))

    assert error(a) < 0.02
    # Not the unmagnified projection, nor the other readings of the four numbers.
    for other in (None, a.T, np.linalg.inv(a)):
        assert error(other) > 4 * error(a)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"odd_zernikes": {"Z44c": 1.0}}, "odd_zernikes: unknown coefficient 'Z44c'"),
        ({"even_zernikes": {"Z31c": 1.0}}, "even_zernikes: unknown coefficient 'Z31c'"),
        ({"even_zernikes": {"Z60": float("inf")}}, "even_zernikes.Z60: must be a finite"),
        ({"even_zernikes": "{not json"}, "even_zernikes: not a JSON object"),
        ({"mag_matrix": [1.0, 0.0, 1.0]}, "mag_matrix: expected four finite numbers"),
        ({"mag_matrix": [1.0, 2.0, 0.5, 1.0]}, "mag_matrix: singular matrix"),
    ],
)
def test_bad_aberrations_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ctf_2d((8, 8), **PLAIN, **kwargs)


def test_text_forms_read_by_leopard_em_and_by_dtm() -> None:
    zernikes = as_zernikes({"Z33s": -1.5, "Z31c": 2.0}, kind="odd")
    text = zernikes_text(zernikes)
    # Leopard-EM's reader: json.loads into a dict (utils/ctf_utils.py).
    assert json.loads(text) == {"Z31c": 2.0, "Z33s": -1.5}
    assert " " not in text  # one STAR token
    assert as_zernikes(text, kind="odd") == zernikes
    mag = as_mag_matrix([1.01, 0.002, -0.003, 0.99])
    text = mag_matrix_text(mag)
    # Leopard-EM's reader: strip("[]").split(",") into floats.
    assert [float(x) for x in text.strip("[]").split(",")] == [1.01, 0.002, -0.003, 0.99]
    # What Leopard-EM writes (str of a Python list; json.dumps of a dict) reads back.
    assert as_mag_matrix(str([1.01, 0.002, -0.003, 0.99])) == mag
    assert as_zernikes('{"Z31c": 2.0, "Z33s": -1.5}', kind="odd") == zernikes
    assert zernikes_text(None) == "" and mag_matrix_text(None) == ""
