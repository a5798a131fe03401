"""Per-micrograph inputs shared by every task of a search.

``prepare_image`` whitens, band-passes and normalises a micrograph
(conventions.md#normalisation), takes its spectrum at the FFT size of the correlation, and
builds the filter stack (CTF × whitening × band-pass) that every projection is multiplied
by, one plane per relative defocus. The result is computed once per micrograph and shared
by all of its tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import scipy.fft

from dtm.backend import get_fft, get_xp
from dtm.physics.aberrations import (
    MagMatrix,
    Zernikes,
    as_mag_matrix,
    as_zernikes,
    slice_transform,
)
from dtm.physics.ctf import ctf_2d
from dtm.physics.filters import (
    bandpass_filter,
    fourier_dropout_mask,
    radial_power_spectrum,
    whitening_filter,
)
from dtm.schema import ABERRATION_FIELDS

CorrelationMode = Literal["valid", "same"]


@dataclass(frozen=True)
class Optics:
    """Microscope and CTF parameters of one micrograph (units as in conventions.md#ctf)."""

    pixel_size: float  # Å
    voltage: float  # kV
    spherical_aberration: float  # mm
    amplitude_contrast_ratio: float
    defocus_u: float  # Å
    defocus_v: float  # Å
    astigmatism_angle: float  # degrees
    phase_shift: float = 0.0  # degrees
    ctf_B_factor: float = 0.0  # Å²  # noqa: N815 (the field's established name)
    # Leopard-EM's optional terms (dtm.physics.aberrations); None: the plain CTF.
    even_zernikes: Zernikes | None = None
    odd_zernikes: Zernikes | None = None
    mag_matrix: MagMatrix | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Optics:
        """From a table row or a results dataset's attributes, which name the fields alike
        (the aberrations as dicts, lists or their JSON text; absent or empty: none)."""
        numbers = {
            f.name: float(values[f.name]) for f in fields(cls) if f.name not in ABERRATION_FIELDS
        }
        return cls(
            **numbers,
            even_zernikes=as_zernikes(values.get("even_zernikes"), kind="even"),
            odd_zernikes=as_zernikes(values.get("odd_zernikes"), kind="odd"),
            mag_matrix=as_mag_matrix(values.get("mag_matrix")),
        )

    def slice_transform(self) -> np.ndarray | None:
        """``(3, 3)`` matrix that rotations are multiplied by (``R @ M``) to cut the
        magnified template's slices (:func:`dtm.physics.aberrations.slice_transform`)."""
        return slice_transform(self.mag_matrix)

    def ctf(self, shape: tuple[int, int], relative_defocus: np.ndarray, xp: Any = np) -> Any:
        """CTF planes ``(n_defocus, ny, nx // 2 + 1)`` on the rfft grid of ``shape``."""
        return ctf_2d(
            shape,
            pixel_size=self.pixel_size,
            voltage=self.voltage,
            spherical_aberration=self.spherical_aberration,
            amplitude_contrast_ratio=self.amplitude_contrast_ratio,
            defocus_u=self.defocus_u,
            defocus_v=self.defocus_v,
            astigmatism_angle=self.astigmatism_angle,
            phase_shift=self.phase_shift,
            b_factor=self.ctf_B_factor,
            relative_defocus=relative_defocus,
            even_zernikes=self.even_zernikes,
            odd_zernikes=self.odd_zernikes,
            mag_matrix=self.mag_matrix,
            xp=xp,
        )


@dataclass(frozen=True)
class FilterSettings:
    """Whitening and band-pass applied to micrograph and projections alike; Fourier dropout
    applied to the projections only."""

    whitening: bool = True
    whitening_max_freq: float = 0.5  # cycles/pixel
    whitening_bins: int | None = None
    low_resolution: float | None = None  # Å, band-pass low cut-off
    high_resolution: float | None = None  # Å, band-pass high cut-off
    bandpass_falloff: float | None = None  # cycles/pixel
    dropout_fraction: float = 0.0  # Leopard-EM's random Fourier dropout (0: none)
    dropout_seed: int = 0


@dataclass(frozen=True)
class ImageInputs:
    """Everything a correlation task needs from one micrograph.

    Attributes
    ----------
    spectrum : array
        ``(Fy, Fx // 2 + 1)`` complex64, rfft2 of the normalised micrograph zero-padded
        along its bottom and right edges to ``fft_shape``.
    filters : array
        ``(n_defocus, h, w // 2 + 1)`` float32 (complex64 with odd Zernike aberrations),
        CTF × whitening × band-pass on the rfft grid of the template box, zero at the origin.
    image_shape, box_shape, fft_shape, out_shape : tuple of int
        ``(H, W)``, ``(h, w)``, ``(Fy, Fx)`` and the map shape of the correlation mode.
    slice_transform : numpy.ndarray or None
        ``(3, 3)``: the projections are cut with ``R @ slice_transform`` (anisotropic
        magnification, :meth:`Optics.slice_transform`); None: with ``R``.
    """

    spectrum: Any
    filters: Any
    image_shape: tuple[int, int]
    box_shape: tuple[int, int]
    fft_shape: tuple[int, int]
    out_shape: tuple[int, int]
    mode: CorrelationMode = "valid"
    slice_transform: np.ndarray | None = None


def output_shape(
    image_shape: tuple[int, int], box_shape: tuple[int, int], mode: CorrelationMode
) -> tuple[int, int]:
    """Map shape: ``(H - h + 1, W - w + 1)`` for ``valid``, ``(H, W)`` for ``same``."""
    (H, W), (h, w) = image_shape, box_shape
    if mode == "valid":
        return (H - h + 1, W - w + 1)
    if mode == "same":
        return (H, W)
    raise ValueError(f"correlation_mode: must be 'valid' or 'same' (got {mode!r})")


def fft_shape_for(
    image_shape: tuple[int, int], box_shape: tuple[int, int], mode: CorrelationMode
) -> tuple[int, int]:
    """Smallest fast FFT size without wrap-around into the positions of the map.

    ``valid`` positions never reach past the image, so the image size suffices; ``same``
    positions need ``H + h - 1`` rows (conventions.md#cross-correlation).
    """
    (H, W), (h, w) = image_shape, box_shape
    if mode == "same":
        H, W = H + h - 1, W + w - 1
    return (scipy.fft.next_fast_len(H, real=True), scipy.fft.next_fast_len(W, real=True))


def image_filter(
    shape: tuple[int, int],
    settings: FilterSettings,
    pixel_size: float,
    profile: tuple[np.ndarray, np.ndarray] | None,
    xp: Any,
) -> Any:
    """Whitening × band-pass on the rfft grid of ``shape`` (ones when both are off)."""
    result = xp.ones((shape[0], shape[1] // 2 + 1), dtype=np.float32)
    if profile is not None:
        k, power = profile
        result = result * whitening_filter(
            k, power, shape, max_freq=settings.whitening_max_freq, xp=xp
        )
    if settings.low_resolution is not None or settings.high_resolution is not None:
        result = result * bandpass_filter(
            shape,
            pixel_size=pixel_size,
            low_resolution=settings.low_resolution,
            high_resolution=settings.high_resolution,
            falloff=settings.bandpass_falloff,
            xp=xp,
        )
    return result


def filter_micrograph(
    micrograph: Any, *, pixel_size: float, filters: FilterSettings
) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """The micrograph whitened, band-passed and normalised for correlation.

    Parameters
    ----------
    micrograph : array
        ``(H, W)`` image (numpy or cupy; the result lives on the same device).
    pixel_size : float
        Å per pixel.
    filters : FilterSettings
        Whitening and band-pass settings.

    Returns
    -------
    filtered : array
        ``(H, W)`` float32, mean 0 and pixel variance ``1 / (H·W)``
        (conventions.md#normalisation).
    profile : tuple of numpy.ndarray or None
        The radial power spectrum ``(k, power)`` that the whitening used (None without).
    """
    xp = get_xp(micrograph)
    fft = get_fft(xp)
    image = xp.asarray(micrograph, dtype=np.float32)
    shape = (int(image.shape[0]), int(image.shape[1]))
    profile = None
    if filters.whitening:
        k, power = radial_power_spectrum(image, n_bins=filters.whitening_bins)
        profile = (np.asarray(k), np.asarray(power))
    spectrum = fft.rfft2(image)
    spectrum *= image_filter(shape, filters, pixel_size, profile, xp)
    spectrum[0, 0] = 0
    filtered = fft.irfft2(spectrum, s=shape)
    # Pixel variance 1/(H*W) makes each correlation with a unit-variance projection ~N(0, 1).
    filtered *= 1.0 / (float(filtered.std()) * np.sqrt(shape[0] * shape[1]))
    return filtered.astype(np.float32, copy=False), profile


def projection_filters(
    box_shape: tuple[int, int],
    optics: Optics,
    relative_defocus: np.ndarray,
    filters: FilterSettings,
    profile: tuple[np.ndarray, np.ndarray] | None,
    xp: Any = np,
) -> Any:
    """``(n_defocus, h, w // 2 + 1)`` float32 (complex64 with odd aberrations): CTF ×
    whitening × band-pass (× Fourier dropout mask) of every defocus plane on the projections'
    rfft grid, zero at the origin; ``profile`` as returned by :func:`filter_micrograph`."""
    ctf = optics.ctf(box_shape, relative_defocus, xp=xp)
    whitening_bandpass = image_filter(box_shape, filters, optics.pixel_size, profile, xp)
    if filters.dropout_fraction > 0:
        mask = fourier_dropout_mask(box_shape, filters.dropout_fraction, filters.dropout_seed, xp)
        whitening_bandpass = whitening_bandpass * mask
    return filter_stack(ctf, whitening_bandpass)


def filter_stack(ctf: Any, whitening_bandpass: Any) -> Any:
    """``ctf × whitening_bandpass`` per plane, zero at the origin: float32, or complex64 for
    a complex CTF (odd aberrations)."""
    xp = get_xp(ctf)
    dtype = np.complex64 if xp.iscomplexobj(ctf) else np.float32
    stack = (ctf * whitening_bandpass[None]).astype(dtype)
    stack[:, 0, 0] = 0
    return stack


def prepare_image(
    micrograph: Any,
    *,
    box_shape: tuple[int, int],
    optics: Optics,
    relative_defocus: np.ndarray,
    filters: FilterSettings = FilterSettings(),  # noqa: B008 (frozen, immutable default)
    mode: CorrelationMode = "valid",
) -> ImageInputs:
    """Filter and normalise a micrograph and build its projection filters
    (conventions.md#normalisation).

    Parameters
    ----------
    micrograph : array
        ``(H, W)`` float32 image (numpy or cupy; the result lives on the same device).
    box_shape : tuple of int
        ``(h, w)`` of the template's projections.
    optics : Optics
        CTF parameters of this micrograph.
    relative_defocus : numpy.ndarray
        ``(n_defocus,)`` relative defocus values in Å, in search order.
    filters : FilterSettings
        Whitening and band-pass settings.
    mode : {"valid", "same"}
        Correlation mode, which fixes the map and FFT shapes.
    """
    xp = get_xp(micrograph)
    filtered, profile = filter_micrograph(micrograph, pixel_size=optics.pixel_size, filters=filters)
    shape = (int(filtered.shape[0]), int(filtered.shape[1]))
    fft_shape = fft_shape_for(shape, box_shape, mode)
    padded_spectrum = get_fft(xp).rfft2(filtered, s=fft_shape).astype(np.complex64)
    stack = projection_filters(box_shape, optics, relative_defocus, filters, profile, xp)
    return ImageInputs(
        spectrum=padded_spectrum,
        filters=stack,
        image_shape=shape,
        box_shape=box_shape,
        fft_shape=fft_shape,
        out_shape=output_shape(shape, box_shape, mode),
        mode=mode,
        slice_transform=optics.slice_transform(),
    )
