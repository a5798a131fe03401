"""Fourier cropping: resample an image or volume to a coarser pixel size (a resolution limit).

A search that only needs resolution ``r`` (Å) can run at pixel size ``r / 2`` (Nyquist at
``r``), as cisTEM does: keeping only the spectrum's band ``|k| < 1 / r`` shrinks every FFT by
``(2 p / r)²`` in 2-D. Cropping is exact for band-limited content: a sum of sinusoids below
the new Nyquist frequency comes out sampled on the coarser grid with the same values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtm.backend import get_fft, get_xp
from dtm.errors import ConfigError


def cropped_size(size: int, pixel_size: float, new_pixel_size: float) -> int:
    """Even number of pixels nearest ``size * pixel_size / new_pixel_size`` (≤ ``size``)."""
    target = size * pixel_size / new_pixel_size
    even = max(2, 2 * int(round(target / 2)))
    return min(size, even)


def fourier_crop(image: Any, pixel_size: float, new_pixel_size: float) -> tuple[Any, float]:
    """Crop the spectrum of a 2-D image or 3-D volume to a band, keeping real-space values.

    Parameters
    ----------
    image : array
        ``(H, W)`` or ``(d, d, d)`` real array (numpy or cupy), pixel size ``pixel_size``.
    pixel_size : float
        Å per pixel of ``image``.
    new_pixel_size : float
        Å per pixel wanted, ``>= pixel_size``: keeps resolutions down to
        ``2 * new_pixel_size``. Rounded so that each new edge is an even number of pixels.

    Returns
    -------
    cropped : array
        float32, each edge ``n' = even(n * pixel_size / new_pixel_size)`` (an edge already
        at most that size is kept); pixel values on the same scale as ``image`` (the mean is
        preserved).
    new_pixel_size : float
        Achieved Å per pixel along the first axis, ``pixel_size * n / n'`` (other axes
        differ from it by less than ``1 / n'`` relative when the edges are not proportional).

    Raises
    ------
    ConfigError
        If ``new_pixel_size`` is finer than ``pixel_size``, or the array is not 2-D or 3-D.
    """
    if not new_pixel_size >= pixel_size:
        raise ConfigError(
            f"fourier_crop: new pixel size {new_pixel_size:g} Å is finer than {pixel_size:g} Å"
        )
    xp = get_xp(image)
    fft = get_fft(xp)
    data = xp.asarray(image, dtype=np.float32)
    if data.ndim not in (2, 3):
        raise ConfigError(f"fourier_crop: expected a 2-D image or 3-D volume, got {data.shape}")
    shape = tuple(int(n) for n in data.shape)
    new_shape = tuple(cropped_size(n, pixel_size, new_pixel_size) for n in shape)
    if new_shape == shape:
        return data, float(pixel_size)
    spectrum = fft.rfftn(data)
    # Keep |q| < n'/2 along the full axes (both signs) and q <= n'/2 along the half axis.
    index = [
        xp.concatenate([xp.arange(m // 2), xp.arange(n - m // 2, n)])
        for n, m in zip(shape[:-1], new_shape[:-1], strict=True)
    ]
    for axis, keep in enumerate(index):
        spectrum = xp.take(spectrum, keep, axis=axis)
    spectrum = spectrum[..., : new_shape[-1] // 2 + 1]
    # numpy's inverse divides by the number of samples: rescale so the values, not the
    # sums, are preserved. A Python float keeps the transform in single precision.
    scale = float(np.prod(new_shape) / np.prod(shape))
    cropped = fft.irfftn(spectrum * scale, s=new_shape).astype(np.float32, copy=False)
    return cropped, float(pixel_size * shape[0] / new_shape[0])
