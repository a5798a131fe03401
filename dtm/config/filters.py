"""Filters applied to the micrograph and every projection (whitening, band-pass)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PrivateAttr, model_validator

from dtm.config.base import (
    NonNegative,
    Positive,
    PositiveInt,
    _Model,
    _ordered,
    _Problem,
    _unsupported,
)
from dtm.search.prepare import FilterSettings


class WhiteningFilterConfig(_Model):
    """Whitening by the micrograph's radially averaged power spectrum."""

    leopard_unused = {"do_power_spectrum": "dtm always averages the power spectrum"}
    enabled: bool = True
    """Whiten the micrograph and every projection."""
    num_freq_bins: PositiveInt | None = None
    """Radial shells of the averaged spectrum (default: about one per pixel of radius)."""
    max_freq: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Highest frequency whitened, cycles/pixel; above it the filter keeps its value there."""
    do_power_spectrum: bool = True
    """Leopard-EM: average the power (true) or amplitude (false) spectrum; dtm always
    averages the power spectrum (conventions.md#filters)."""


class BandpassFilterConfig(_Model):
    """Band-pass with smooth cosine edges; cut-offs in cycles/pixel (Leopard-EM) or in Å."""

    enabled: bool = False
    """Apply the band-pass to the micrograph and every projection."""
    low_freq_cutoff: NonNegative | None = None
    """Low cut-off, cycles/pixel (0 or null: none)."""
    high_freq_cutoff: Positive | None = None
    """High cut-off, cycles/pixel (null: none)."""
    falloff: NonNegative | None = None
    """Width of the cosine edges, cycles/pixel."""
    low_resolution_angstrom: Positive | None = None
    """Low cut-off as a resolution, Å (instead of low_freq_cutoff)."""
    high_resolution_angstrom: Positive | None = None
    """High cut-off as a resolution, Å (instead of high_freq_cutoff)."""
    _check_freq = _ordered("low_freq_cutoff", "high_freq_cutoff", strict=True)

    @model_validator(mode="after")
    def _one_unit_per_side(self) -> BandpassFilterConfig:
        for freq, res in (
            ("low_freq_cutoff", "low_resolution_angstrom"),
            ("high_freq_cutoff", "high_resolution_angstrom"),
        ):
            if getattr(self, freq) is not None and getattr(self, res) is not None:
                raise _Problem(f"give {freq} or {res}, not both", res, getattr(self, res))
        low, high = self.low_resolution_angstrom, self.high_resolution_angstrom
        if low is not None and high is not None and low <= high:
            raise _Problem(
                f"must be < low_resolution_angstrom ({low})", "high_resolution_angstrom", high
            )
        return self

    def cutoffs_angstrom(self, pixel_size: float) -> tuple[float | None, float | None]:
        """The (low, high) cut-offs as resolutions in Å, ``pixel_size / frequency``;
        None where there is no cut-off on that side (also for a frequency of 0)."""

        def resolution(freq: float | None, res: float | None) -> float | None:
            return res if freq is None else (pixel_size / freq if freq > 0 else None)

        return (
            resolution(self.low_freq_cutoff, self.low_resolution_angstrom),
            resolution(self.high_freq_cutoff, self.high_resolution_angstrom),
        )


class PhaseRandomizationFilterConfig(_Model):
    """Leopard-EM phase randomisation: not supported, must stay disabled."""

    leopard_unused = {"cuton": "phase randomisation is off"}
    enabled: bool = False
    """Must be false: not supported by dtm."""
    cuton: float | None = None
    """Cut-on frequency, cycles/pixel (Leopard-EM; unused)."""
    _check = _unsupported("phase randomization")


class ArbitraryCurveFilterConfig(_Model):
    """Leopard-EM arbitrary-curve filter: not supported, must stay disabled."""

    leopard_unused = {
        "frequencies": "the arbitrary curve filter is off",
        "amplitudes": "the arbitrary curve filter is off",
    }
    enabled: bool = False
    """Must be false: not supported by dtm."""
    frequencies: list[float] | None = None
    """Curve frequencies, cycles/pixel (Leopard-EM; unused)."""
    amplitudes: list[float] | None = None
    """Curve amplitudes (Leopard-EM; unused)."""
    _check = _unsupported("the arbitrary curve filter")


class RandomFourierDropoutConfig(_Model):
    """Leopard-EM 1.3's random Fourier dropout: a fixed random set of the projections'
    Fourier coefficients is set to zero in the search (not in the micrograph, not in
    refinement). The set comes from ``seed`` and is the one Leopard-EM drops
    (conventions.md#filters)."""

    enabled: bool = False
    """Drop the coefficients in the search."""
    dropout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Fraction of the coefficients dropped, each independently (0 to < 1)."""
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
    """Seed of the random choice (required, as in Leopard-EM): the same seed drops the same
    coefficients in every run, in dtm and in Leopard-EM."""


class PreprocessingFilters(_Model):
    """Filters applied to the micrograph and to every projection."""

    whitening_filter: WhiteningFilterConfig = WhiteningFilterConfig()
    """Spectral whitening."""
    bandpass_filter: BandpassFilterConfig = BandpassFilterConfig()
    """Band-pass."""
    phase_randomization_filter: PhaseRandomizationFilterConfig = PhaseRandomizationFilterConfig()
    """Leopard-EM phase randomisation (unsupported)."""
    arbitrary_curve_filter: ArbitraryCurveFilterConfig = ArbitraryCurveFilterConfig()
    """Leopard-EM arbitrary-curve filter (unsupported)."""
    random_fourier_dropout: RandomFourierDropoutConfig = RandomFourierDropoutConfig(seed=0)
    """Leopard-EM 1.3 random Fourier dropout of the projections (search only)."""
    # False in refinement, which Leopard-EM runs without the dropout.
    _apply_dropout: bool = PrivateAttr(True)

    def settings(self, pixel_size: float) -> FilterSettings:
        """The search kernel's filter settings (band-pass cut-offs converted to Å; the
        dropout only where it applies)."""
        low, high = (None, None)
        dropout = self.random_fourier_dropout
        if not self._apply_dropout:
            dropout = RandomFourierDropoutConfig(seed=0)
        if self.bandpass_filter.enabled:
            low, high = self.bandpass_filter.cutoffs_angstrom(pixel_size)
        return FilterSettings(
            whitening=self.whitening_filter.enabled,
            whitening_max_freq=self.whitening_filter.max_freq,
            whitening_bins=self.whitening_filter.num_freq_bins,
            low_resolution=low,
            high_resolution=high,
            bandpass_falloff=self.bandpass_filter.falloff,
            dropout_fraction=dropout.dropout_fraction if dropout.enabled else 0.0,
            dropout_seed=dropout.seed,
        )
