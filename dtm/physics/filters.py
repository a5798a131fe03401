"""Frequency grids, whitening and band-pass filters on the rfft grid.

All filters are real ``float32`` arrays of shape ``(ny, nx // 2 + 1)``: the rfft grid of an
``(ny, nx)`` real image, with frequencies in cycles/pixel (``docs/architecture.md``).
Because frequencies are in cycles/pixel, a radial profile measured on the micrograph grid
can be evaluated on the template grid too (same pixel size).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from dtm.backend import get_fft, get_xp, to_numpy
from dtm.errors import ConfigError, InputError

#: Default width (cycles/pixel) of the cosine edge of :func:`bandpass_filter`.
DEFAULT_BANDPASS_FALLOFF = 0.02


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(int(n) for n in shape) < 1:
        raise InputError(f"image shape must be two positive integers (ny, nx), got {shape}")
    return int(shape[0]), int(shape[1])


def frequency_grid(shape: tuple[int, int], xp: ModuleType = np) -> tuple[Any, Any]:
    """Spatial frequencies of the rfft grid of an ``(ny, nx)`` real image.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the real-space image.
    xp : module
        Array module of the result (numpy or cupy).

    Returns
    -------
    ky : array, shape (ny, 1), float64
        ``fftfreq(ny)`` in cycles/pixel.
    kx : array, shape (1, nx // 2 + 1), float64
        ``rfftfreq(nx)`` in cycles/pixel. ``ky`` and ``kx`` broadcast to
        ``(ny, nx // 2 + 1)``; the direction angle of a frequency is ``atan2(ky, kx)``.
    """
    ny, nx = _check_shape(shape)
    ky = xp.fft.fftfreq(ny)[:, None]
    kx = xp.fft.rfftfreq(nx)[None, :]
    return ky, kx


def _radius_grid(shape: tuple[int, int], xp: ModuleType) -> Any:
    """``|k|`` (cycles/pixel) on the rfft grid of ``shape``, float64."""
    ky, kx = frequency_grid(shape, xp)
    return xp.sqrt(ky**2 + kx**2)


def radial_power_spectrum(image: Any, n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotationally averaged power spectrum of a 2-D image.

    Parameters
    ----------
    image : array, shape (H, W), real (numpy or cupy)
    n_bins : int, optional
        Number of shells of equal width in ``|k|`` from 0 to the corner frequency
        ``sqrt(0.5² + 0.5²)``. Default ``max(H, W) // 2``.

    Returns
    -------
    k : numpy.ndarray, shape (n_bins,), float64
        Shell centres in cycles/pixel.
    power : numpy.ndarray, shape (n_bins,), float64
        Mean ``|X(k)|²`` over the rfft coefficients in each shell, the zero frequency
        excluded. Shells holding no coefficient get the value of their nearest non-empty
        neighbours (linear interpolation).
    """
    xp = get_xp(image)
    if image.ndim != 2:
        raise InputError(f"power spectrum needs a 2-D image, got shape {image.shape}")
    shape = (int(image.shape[0]), int(image.shape[1]))
    if n_bins is None:
        n_bins = max(max(shape) // 2, 1)
    if n_bins < 1:
        raise ConfigError(f"num_freq_bins must be a positive integer, got {n_bins}")
    spectrum = get_fft(xp).rfft2(image.astype(xp.float32))
    power_2d = (
        spectrum.real.astype(xp.float64) ** 2 + spectrum.imag.astype(xp.float64) ** 2
    ).ravel()
    radius = _radius_grid(shape, xp).ravel()
    k_max = float(np.hypot(0.5, 0.5))
    edges = np.linspace(0.0, k_max, n_bins + 1)
    bins = xp.clip(xp.floor(radius / (k_max / n_bins)).astype(xp.int64), 0, n_bins - 1)
    weights = xp.ones_like(power_2d)
    weights[0] = 0.0  # the zero frequency is excluded (it is the image mean)
    counts = to_numpy(xp.bincount(bins, weights=weights, minlength=n_bins))
    sums = to_numpy(xp.bincount(bins, weights=power_2d * weights, minlength=n_bins))
    centres = 0.5 * (edges[:-1] + edges[1:])
    filled = counts > 0
    if not filled.any():
        raise InputError(f"image of shape {shape} has no non-zero frequency")
    power = np.zeros(n_bins, dtype=np.float64)
    power[filled] = sums[filled] / counts[filled]
    power[~filled] = np.interp(centres[~filled], centres[filled], power[filled])
    return centres, power


def whitening_filter(
    k: ArrayLike,
    power: ArrayLike,
    shape: tuple[int, int],
    *,
    max_freq: float = 0.5,
    xp: ModuleType = np,
) -> Any:
    """Whitening filter ``W(|k|) = 1 / sqrt(power(|k|))`` on the rfft grid of ``shape``.

    Parameters
    ----------
    k, power : array_like, shape (n_bins,)
        A radial power spectrum (see :func:`radial_power_spectrum`): shell centres in
        cycles/pixel and mean power per shell.
    shape : (int, int)
        ``(ny, nx)`` of the real image whose rfft grid the filter is evaluated on (the
        micrograph or the template box).
    max_freq : float
        Cycles/pixel (Leopard-EM's ``max_freq``). ``W`` is interpolated linearly in ``|k|``
        and scaled so that its maximum over ``|k| <= max_freq`` is 1; above ``max_freq`` it
        keeps its value at ``max_freq``. (Leopard-EM sets it to 1 there; a jump to 1 makes
        the corners of the spectrum louder than the whitened band, which biases the
        normalisation (conventions.md#normalisation), so dtm continues the filter instead.)
    xp : module
        Array module of the result.

    Returns
    -------
    array, shape (ny, nx // 2 + 1), float32
    """
    k_np = np.asarray(k, dtype=np.float64)
    power_np = np.asarray(power, dtype=np.float64)
    if k_np.ndim != 1 or k_np.shape != power_np.shape:
        raise InputError(f"whitening: k and power must be 1-D of one length, got {k_np.shape}")
    if not max_freq > 0:
        raise ConfigError(f"whitening_filter.max_freq must be > 0 cycles/pixel, got {max_freq}")
    # Shells without power (a blank region of the spectrum) carry no information: leave them
    # out of the interpolation instead of dividing by zero.
    usable = np.isfinite(power_np) & (power_np > 0)
    if not usable.any():
        raise InputError("whitening: the power spectrum is zero everywhere (blank image?)")
    radius = _radius_grid(_check_shape(shape), xp)
    amplitude = 1.0 / np.sqrt(power_np[usable])
    # cupy.interp takes 1-D points only.
    filt = xp.interp(radius.ravel(), xp.asarray(k_np[usable]), xp.asarray(amplitude)).reshape(
        radius.shape
    )
    inside = radius <= max_freq
    peak = float(xp.max(xp.where(inside, filt, 0.0))) if bool(inside.any()) else 1.0
    edge = float(
        xp.interp(xp.asarray([max_freq]), xp.asarray(k_np[usable]), xp.asarray(amplitude))[0]
    )
    filt = xp.where(inside, filt, edge) / peak
    return filt.astype(xp.float32)


def _cosine_step(x: Any, xp: ModuleType) -> Any:
    """0 for x <= -1/2, 1 for x >= 1/2, a raised cosine in between."""
    t = xp.clip(x + 0.5, 0.0, 1.0)
    return 0.5 - 0.5 * xp.cos(np.pi * t)


def bandpass_filter(
    shape: tuple[int, int],
    *,
    pixel_size: float,
    low_resolution: float | None = None,
    high_resolution: float | None = None,
    falloff: float | None = None,
    xp: ModuleType = np,
) -> Any:
    """Band-pass filter with raised-cosine edges on the rfft grid of ``shape``.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the real image.
    pixel_size : float
        Å per pixel.
    low_resolution : float, optional
        Å; spatial frequencies below ``pixel_size / low_resolution`` cycles/pixel are
        removed (high-pass). None: no low cut-off.
    high_resolution : float, optional
        Å; frequencies above ``pixel_size / high_resolution`` cycles/pixel are removed
        (low-pass). None: no high cut-off.
    falloff : float, optional
        Width in cycles/pixel of each cosine edge, centred on its cut-off: the filter is
        0.5 at a cut-off frequency and reaches 0 / 1 at ``cut-off ± falloff / 2``. 0 gives a
        hard edge (1 inside ``[k_low, k_high]``). Default :data:`DEFAULT_BANDPASS_FALLOFF`.
    xp : module
        Array module of the result.

    Returns
    -------
    array, shape (ny, nx // 2 + 1), float32, values in [0, 1]
    """
    if not pixel_size > 0:
        raise ConfigError(f"pixel_size must be > 0 Å, got {pixel_size}")
    for name, value in (("low_resolution", low_resolution), ("high_resolution", high_resolution)):
        if value is not None and not value > 0:
            raise ConfigError(f"bandpass {name} must be > 0 Å or None, got {value}")
    if low_resolution is not None and high_resolution is not None:
        if high_resolution >= low_resolution:
            raise ConfigError(
                f"bandpass high_resolution ({high_resolution} Å) must be finer (smaller) than "
                f"low_resolution ({low_resolution} Å)"
            )
    width = DEFAULT_BANDPASS_FALLOFF if falloff is None else float(falloff)
    if width < 0:
        raise ConfigError(f"bandpass falloff must be >= 0 cycles/pixel, got {falloff}")
    radius = _radius_grid(_check_shape(shape), xp)
    filt = xp.ones_like(radius)
    if low_resolution is not None:
        k_low = pixel_size / low_resolution
        high_pass = (radius >= k_low) if width == 0 else _cosine_step((radius - k_low) / width, xp)
        filt = filt * high_pass
    if high_resolution is not None:
        k_high = pixel_size / high_resolution
        low_pass = (radius <= k_high) if width == 0 else _cosine_step((k_high - radius) / width, xp)
        filt = filt * low_pass
    return filt.astype(xp.float32)


def fourier_dropout_mask(
    shape: tuple[int, int], fraction: float, seed: int, xp: ModuleType = np
) -> Any:
    """Leopard-EM's random Fourier dropout mask on the rfft grid of ``shape``.

    Each coefficient is kept (1) when a uniform draw exceeds ``fraction`` and dropped (0)
    otherwise. The draws are those of ``torch.rand`` on the CPU after
    ``torch.Generator().manual_seed(seed)``, which Leopard-EM 1.3 uses
    (``RandomFourierDropoutConfig.calculate_dropout_mask``): a Mersenne Twister (MT19937)
    seeded with the seed's low 32 bits, one 32-bit output per coefficient in row-major
    order, of which the low 24 bits make a float32 in [0, 1). So the same seed drops the
    same coefficients as Leopard-EM, bit for bit, without torch.

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the real-space projection; the mask is ``(ny, nx // 2 + 1)``.
    fraction : float
        Probability that a coefficient is dropped, 0 to < 1.
    seed : int
        Leopard-EM's ``random_fourier_dropout.seed`` (-2⁶³ to 2⁶⁴ - 1).
    xp : module
        Array module of the result (numpy or cupy).

    Returns
    -------
    array
        ``(ny, nx // 2 + 1)`` float32 of 0 and 1.
    """
    ny, nx = _check_shape(shape)
    # RandomState seeds its MT19937 as torch's CPU generator does (init_genrand).
    state: Any = np.random.RandomState(int(seed) & 0xFFFFFFFF).get_state(legacy=False)
    generator = np.random.MT19937()
    generator.state = state
    raw = generator.random_raw(ny * (nx // 2 + 1)).astype(np.uint32)
    draws = (raw & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
    # torch compares a float32 tensor with a Python float in float32.
    mask = (draws > np.float32(fraction)).astype(np.float32).reshape(ny, nx // 2 + 1)
    return xp.asarray(mask)
