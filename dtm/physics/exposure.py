"""Filters of a simulated template: radiation damage and the detector (ttsim3d's options).

All filters are real ``float64`` arrays on the rfft grid of an ``(n, n, n)`` volume (``kz =
fftfreq(n)``, ``ky = fftfreq(n)``, ``kx = rfftfreq(n)``, cycles/pixel), to multiply its
spectrum by.

- :func:`dose_filter`: the mean attenuation over an exposure from ``start`` to ``end``
  (e⁻/Å²) of the signal at each frequency, with the critical exposure that Grant &
  Grigorieff (2015, eLife 4:e06980) fitted, ``N_e(k) = 0.245 k^−1.665 + 2.81`` e⁻/Å² (k in
  Å⁻¹): ``∫ exp(−N / 2N_e) dN`` from ``start`` to ``end``, divided by ``end`` — the
  normalisation of ttsim3d (torch-fourier-filter's ``cumulative_dose_filter_3d``), which is
  ``(end − start) / end`` at k = 0. It does not depend on the voltage (as ttsim3d's).
- :func:`curve_filter`: a detector curve (MTF or DQE) of ``|k|`` in cycles/pixel,
  interpolated linearly and held at its end values beyond its range (as ttsim3d's MTF).
"""

from __future__ import annotations

import numpy as np

#: Grant & Grigorieff (2015): critical exposure ``a k^b + c`` (e⁻/Å², k in Å⁻¹).
CRITICAL_EXPOSURE = (0.245, -1.665, 2.81)


def frequency_radius(box: int) -> np.ndarray:
    """``|k|`` (cycles/pixel) on the rfft grid of an ``(n, n, n)`` volume, float64
    ``(n, n, n // 2 + 1)``."""
    kz = np.fft.fftfreq(box)[:, None, None]
    ky = np.fft.fftfreq(box)[None, :, None]
    kx = np.fft.rfftfreq(box)[None, None, :]
    return np.asarray(np.sqrt(kz**2 + ky**2 + kx**2))


def dose_filter(box: int, pixel_size: float, start: float, end: float) -> np.ndarray:
    """The cumulative dose filter of an exposure from ``start`` to ``end`` e⁻/Å² (``end > 0``).

    Parameters
    ----------
    box
        Edge ``n`` of the volume.
    pixel_size
        Å per voxel.
    start, end
        Exposure before and after, e⁻/Å², ``0 <= start < end``.

    Returns
    -------
    numpy.ndarray
        ``(n, n, n // 2 + 1)`` float64 in ``[0, 1]``.
    """
    a, b, c = CRITICAL_EXPOSURE
    k = frequency_radius(box) / pixel_size
    with np.errstate(divide="ignore", invalid="ignore"):  # k = 0: inf × 0, set below
        critical = a * np.power(k, b) + c
        values = 2 * critical * (np.exp(-start / (2 * critical)) - np.exp(-end / (2 * critical)))
    values[0, 0, 0] = end - start  # the limit at k = 0
    return np.asarray(values / end)


def curve_filter(box: int, frequencies: np.ndarray, values: np.ndarray) -> np.ndarray:
    """A detector curve on the rfft grid: ``values`` at ``frequencies`` (cycles/pixel,
    increasing), interpolated linearly in ``|k|``; ``(n, n, n // 2 + 1)`` float64."""
    return np.interp(frequency_radius(box), frequencies, values)
