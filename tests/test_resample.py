"""Fourier cropping keeps band-limited content exactly and reports the new pixel size."""

from __future__ import annotations

import numpy as np
import pytest

from dtm.errors import ConfigError
from dtm.physics.resample import cropped_size, fourier_crop


def _waves(shape: tuple[int, ...], pixel_size: float, waves) -> np.ndarray:
    """Sum of cosines ``a cos(2π k·x + φ)``, k in cycles/Å, x in Å (pixel centres)."""
    grids = np.meshgrid(*[np.arange(n) * pixel_size for n in shape], indexing="ij")
    out = np.full(shape, 0.7)  # a mean, which cropping must keep
    for amplitude, k, phase in waves:
        out += amplitude * np.cos(
            2 * np.pi * sum(ki * g for ki, g in zip(k, grids, strict=True)) + phase
        )
    return out


def test_2d_band_limited_image_is_resampled_exactly():
    # 1 Å pixels cropped to 4 Å resolution (2 Å pixels): waves below 1/4 Å⁻¹ survive.
    # Frequencies on both grids' FFT bins (multiples of 1/96 Å⁻¹ and 1/80 Å⁻¹).
    waves = [(1.0, (3 / 96, 7 / 80), 0.3), (0.5, (-20 / 96, 11 / 80), 1.1)]
    image = _waves((96, 80), 1.0, waves)
    cropped, pixel = fourier_crop(image, 1.0, 2.0)
    assert cropped.shape == (48, 40) and cropped.dtype == np.float32
    assert pixel == pytest.approx(2.0)
    np.testing.assert_allclose(cropped, _waves((48, 40), 2.0, waves), atol=2e-5)


def test_3d_volume_and_a_given_pixel_size():
    waves = [(1.0, (2 / 64, -5 / 64, 9 / 64), 0.2)]  # |k| < 1/(2 · 1.6 Å)
    volume = _waves((64, 64, 64), 1.0, waves)
    cropped, pixel = fourier_crop(volume, 1.0, 1.6)
    assert cropped.shape == (40, 40, 40)
    assert pixel == pytest.approx(1.6)
    np.testing.assert_allclose(cropped, _waves((40, 40, 40), 1.6, waves), atol=2e-5)


def test_high_frequencies_are_removed_and_sizes_are_even():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(101, 64))
    cropped, pixel = fourier_crop(image, 1.5, 3.5)
    assert cropped.shape == (44, 28)  # 101 · 1.5 / 3.5 = 43.3 → 44; 64 · 1.5 / 3.5 → 28
    assert pixel == pytest.approx(1.5 * 101 / 44)
    assert cropped.mean() == pytest.approx(image.mean(), abs=1e-5)
    # White noise keeps the share of its variance that lies in the kept band.
    assert cropped.var() == pytest.approx(image.var() * (44 * 28) / (101 * 64), rel=0.1)
    assert cropped_size(64, 1.0, 1.0) == 64 and cropped_size(63, 1.0, 2.0) == 32


def test_bad_pixel_sizes_are_config_errors():
    image = np.zeros((32, 32), np.float32)
    with pytest.raises(ConfigError, match="new pixel size 1 Å is finer than 1.5 Å"):
        fourier_crop(image, 1.5, 1.0)
    with pytest.raises(ConfigError, match="2-D image or 3-D"):
        fourier_crop(np.zeros(8), 1.0, 2.0)
