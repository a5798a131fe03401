"""Projections of a 3-D template: the Fourier-slice projector and a real-space reference.

Convention (``conventions.md#projection-and-contrast``): ``P(x, y) = ∫ V(R · (x, y, z)ᵀ) dz``
with coordinates relative to the box centre ``d // 2``; volumes are indexed ``[z, y, x]``.
By the Fourier slice theorem the 2-D spectrum of ``P`` is ``F_V(R · (kx, ky, 0)ᵀ)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage

from dtm.backend import get_fft, get_xp
from dtm.errors import InputError

#: Default zero-padding factor of the template before its 3-D FFT. Measured by
#: ``benchmarks/projection_accuracy.py`` (see :func:`prepare_template`): 1 keeps a 512³
#: template at 1 GiB and is accurate when the molecule stays within ~0.3 d of the centre.
DEFAULT_OVERSAMPLING = 1

# Output coefficients interpolated per block: bounds the temporaries (~100 bytes each, so
# ~100 MiB) of extract_central_slices whatever the number of orientations asked for.
_POINTS_PER_BLOCK = 1 << 20


@dataclass(frozen=True, eq=False)
class PreparedTemplate:
    """A template's 3-D spectrum, ready for central-slice extraction.

    Attributes
    ----------
    spectrum : array, shape (D, D, D), complex64 (numpy or cupy)
        ``fftn`` of the zero-padded volume (``D = box_size * oversampling``) whose centre
        voxel was moved to index 0 (``ifftshift``): frequency index ``q`` (cycles per ``D``
        voxels, ``[qz, qy, qx]``) lies at ``q mod D``, which is how the slicer indexes it.
    box_size : int
        ``d``, the edge of the original cubic template.
    oversampling : int
        Zero-padding factor.
    centring_phase : array, shape (d, d // 2 + 1), complex64
        ``exp(-2πi (kx + ky) (d // 2))``: moves the projection's centre from pixel 0 to
        ``(d // 2, d // 2)`` after ``irfft2``.
    gridding_correction : bool
        Whether the volume was divided by the trilinear kernel's apodisation before the FFT.
    """

    spectrum: Any
    box_size: int
    oversampling: int
    centring_phase: Any
    gridding_correction: bool


def _sinc2_apodisation(size: int, xp: Any) -> Any:
    """Real-space profile ``sinc²(x / size)`` of a unit-spaced linear interpolation kernel."""
    x = (xp.arange(size) - size // 2) / size
    return xp.sinc(x) ** 2


def prepare_template(
    volume: Any,
    *,
    oversampling: int = DEFAULT_OVERSAMPLING,
    gridding_correction: bool = True,
) -> PreparedTemplate:
    """FFT a template once so that any number of central slices can be cut from it.

    Parameters
    ----------
    volume : array, shape (d, d, d), real (numpy or cupy)
        Template density indexed ``[z, y, x]``, the molecule centred at voxel ``d // 2``.
    oversampling : int
        Zero-padding factor (1 or 2 in practice). The spectrum takes
        ``8 (oversampling d)³`` bytes: 1 GiB for a 512³ template at 1, 8 GiB at 2.
    gridding_correction : bool
        Divide the (padded) volume by ``sinc²`` along each axis before the FFT, the
        real-space apodisation of trilinear interpolation in Fourier space.

    Notes
    -----
    Accuracy against :func:`project_real_space` (Pearson r after a low-pass at 2/3
    Nyquist, d = 32…128, oblique orientations; ``benchmarks/projection_accuracy.py``):
    molecule within 0.3 d of the centre: oversampling 1 ≥ 0.996 with the gridding
    correction (≥ 0.994 without; the correction also restores the ~15 % amplitude loss of
    trilinear interpolation), oversampling 2 ≥ 0.9998. A tightly boxed molecule (0.45 d)
    aliases at oversampling 1 (r ≈ 0.96-0.98): use oversampling 2 (r ≥ 0.998) or pad the
    template.

    Returns
    -------
    PreparedTemplate
        On the array module of ``volume``.
    """
    xp = get_xp(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"template volume must be cubic (d, d, d), got shape {volume.shape}")
    if int(oversampling) != oversampling or oversampling < 1:
        raise InputError(f"oversampling must be a positive integer, got {oversampling}")
    fft = get_fft(xp)
    box = int(volume.shape[0])
    padded_size = box * int(oversampling)
    padded = xp.zeros((padded_size,) * 3, dtype=xp.float32)
    start = padded_size // 2 - box // 2  # keeps the centre voxel at index padded_size // 2
    padded[start : start + box, start : start + box, start : start + box] = volume
    if gridding_correction:
        profile = _sinc2_apodisation(padded_size, xp).astype(xp.float32)
        # One axis at a time: no second volume-sized temporary.
        padded /= profile[:, None, None]
        padded /= profile[None, :, None]
        padded /= profile[None, None, :]
    spectrum = fft.fftn(fft.ifftshift(padded)).astype(xp.complex64, copy=False)
    del padded

    ky = xp.fft.fftfreq(box)[:, None]
    kx = xp.fft.rfftfreq(box)[None, :]
    centring_phase = xp.exp(-2j * np.pi * (kx + ky) * (box // 2)).astype(xp.complex64)
    return PreparedTemplate(
        spectrum=spectrum,
        box_size=box,
        oversampling=int(oversampling),
        centring_phase=centring_phase,
        gridding_correction=bool(gridding_correction),
    )


def _slice_block(template: PreparedTemplate, rotations: Any, kx: Any, ky: Any) -> Any:
    """Trilinear interpolation of the spectrum on the rotated planes of a block of rotations."""
    xp = get_xp(template.spectrum)
    size = template.spectrum.shape[0]
    flat = template.spectrum.ravel()
    index_dtype = xp.int32 if size**3 < 2**31 else xp.int64
    # Sample coordinates in frequency-index units of the padded grid: q = D · R · (kx, ky, 0).
    r = rotations.astype(xp.float32) * np.float32(size)
    coords = [r[:, axis, 0, None, None] * kx + r[:, axis, 1, None, None] * ky for axis in range(3)]
    # Everything outside the cube |q_i| <= D/2 is left at zero (no periodic aliases).
    half = np.float32(size / 2)
    inside = (xp.abs(coords[0]) <= half) & (xp.abs(coords[1]) <= half) & (xp.abs(coords[2]) <= half)
    lower, upper, frac = [], [], []
    for q in coords:  # axis order x, y, z
        floor = xp.floor(q)
        frac.append(q - floor)
        base = floor.astype(index_dtype)
        lower.append(base % size)
        upper.append((base + 1) % size)
    strides = (1, size, size * size)  # flat index = (iz · D + iy) · D + ix
    result = xp.zeros(coords[0].shape, dtype=xp.complex64)
    for corner in range(8):
        bits = [(corner >> axis) & 1 for axis in range(3)]
        index = sum(
            (upper[axis] if bits[axis] else lower[axis]) * strides[axis] for axis in range(3)
        )
        weight = xp.ones_like(frac[0])
        for axis in range(3):
            weight = weight * (frac[axis] if bits[axis] else 1 - frac[axis])
        result += weight * xp.take(flat, index)
    return xp.where(inside, result, 0) * template.centring_phase


def extract_central_slices(template: PreparedTemplate, rotations: Any) -> Any:
    """Spectra of the template's projections at many orientations (Fourier slice theorem).

    Parameters
    ----------
    template : PreparedTemplate
        From :func:`prepare_template`.
    rotations : array, shape (n, 3, 3)
        Rotation matrices (:func:`dtm.physics.rotations.euler_to_matrix`).

    Returns
    -------
    array, shape (n, d, d // 2 + 1), complex64 (array module of ``template.spectrum``)
        rfft-layout spectra: ``irfft2(out, s=(d, d))`` is the projection
        ``P(x, y) = ∫ V(R · (x, y, z)) dz`` with its centre at ``(d // 2, d // 2)``.
        Frequencies whose rotated position leaves the template's Nyquist cube are 0.
    """
    xp = get_xp(template.spectrum)
    rot = xp.asarray(rotations)
    if rot.ndim != 3 or rot.shape[1:] != (3, 3):
        raise InputError(f"rotations must have shape (n, 3, 3), got {rot.shape}")
    box = template.box_size
    ky = xp.fft.fftfreq(box).astype(xp.float32)[None, :, None]
    kx = xp.fft.rfftfreq(box).astype(xp.float32)[None, None, :]
    n = rot.shape[0]
    out = xp.empty((n, box, box // 2 + 1), dtype=xp.complex64)
    per_block = max(1, _POINTS_PER_BLOCK // (box * (box // 2 + 1)))
    for start in range(0, n, per_block):  # blocks of orientations bound the temporaries
        stop = min(n, start + per_block)
        out[start:stop] = _slice_block(template, rot[start:stop], kx, ky)
    return out


def project_real_space(volume: np.ndarray, rotation: np.ndarray, order: int = 3) -> np.ndarray:
    """Reference projector: sample ``V`` at ``R · (x, y, z)`` and sum over ``z``.

    Parameters
    ----------
    volume : numpy.ndarray, shape (d, d, d)
        Density indexed ``[z, y, x]``, centre voxel ``d // 2``.
    rotation : numpy.ndarray, shape (3, 3)
        Rotation matrix acting on ``(x, y, z)``.
    order : int
        Spline order of :func:`scipy.ndimage.map_coordinates` (values outside the box: 0).

    Returns
    -------
    numpy.ndarray, shape (d, d), float32
        ``P[y, x]``, centre pixel ``(d // 2, d // 2)``.
    """
    volume = np.asarray(volume)
    rotation = np.asarray(rotation, dtype=np.float64)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"template volume must be cubic (d, d, d), got shape {volume.shape}")
    if rotation.shape != (3, 3):
        raise InputError(f"rotation must have shape (3, 3), got {rotation.shape}")
    box = volume.shape[0]
    axis = np.arange(box, dtype=np.float64) - box // 2
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    sample = [rotation[i, 0] * x + rotation[i, 1] * y + rotation[i, 2] * z for i in range(3)]
    coordinates = np.stack([sample[2], sample[1], sample[0]]) + box // 2  # [z, y, x] order
    values = scipy.ndimage.map_coordinates(
        volume.astype(np.float64), coordinates, order=order, mode="constant", cval=0.0
    )
    return values.sum(axis=0).astype(np.float32)
