"""Optics, relative defocus planes and orientation grids of the search."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from dtm.config.base import (
    _ONE_GRID,
    _SEVERAL_GRIDS,
    NonNegative,
    Positive,
    _Model,
    _no_cartesian,
    _ordered,
    _Problem,
)
from dtm.errors import ConfigError
from dtm.physics.aberrations import as_mag_matrix, as_zernikes
from dtm.physics.orientations import orientation_grid, symmetry_ranges

_SYMMETRY = re.compile(r"^(?:[CD][1-9]\d*|[TOI])$", re.IGNORECASE)


class OpticsGroup(_Model):
    """Microscope optics of the micrographs (Leopard-EM ``optics_group``)."""

    leopard_unused = (
        "chromatic_aberration",
        "mtf_reference",
        "mtf_values",
        "beam_tilt_x",
        "beam_tilt_y",
        "zernike_moments",
        "odd_zernike",
        "even_zernike",
    )
    label: str = "default"
    """Name of the optics group (informational)."""
    pixel_size: Positive
    """Pixel size of micrographs and template, Å."""
    voltage: Positive
    """Acceleration voltage, kV."""
    spherical_aberration: NonNegative = 2.7
    """Spherical aberration Cs, mm."""
    amplitude_contrast_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.07
    """Amplitude contrast ratio A (fraction)."""
    phase_shift: float = 0.0
    """Phase-plate phase shift, degrees."""
    defocus_u: float | None = None
    """Defocus along the major axis, Å, underfocus positive. Required with micrograph_path;
    with micrographs or micrograph_table the per-micrograph values are used instead."""
    defocus_v: float | None = None
    """Defocus along the minor axis, Å, underfocus positive (see defocus_u)."""
    astigmatism_angle: float = 0.0
    """Angle of the major defocus axis from the x axis, counter-clockwise, degrees."""
    ctf_B_factor: float = 0.0
    """B-factor of the CTF envelope exp(-B k²/4), Å²."""
    chromatic_aberration: float = 0.0
    """Chromatic aberration Cc, mm (Leopard-EM; unused)."""
    mtf_reference: str | None = None
    """MTF file (Leopard-EM; unused)."""
    mtf_values: list[float] | None = None
    """MTF values (Leopard-EM; unused)."""
    beam_tilt_x: float | None = None
    """Beam tilt x, mrad (Leopard-EM; unused)."""
    beam_tilt_y: float | None = None
    """Beam tilt y, mrad (Leopard-EM; unused)."""
    odd_zernikes: dict[str, float] | None = None
    """Odd Zernike coefficients of the CTF, radians per Å⁻ⁿ: Z31c, Z31s (axial coma, beam
    tilt), Z33c, Z33s (trefoil); makes the CTF complex (Leopard-EM's meaning)."""
    even_zernikes: dict[str, float] | None = None
    """Even Zernike coefficients of the CTF's phase, radians per Å⁻ⁿ: Z42c, Z42s, Z44c,
    Z44s, Z60 (Leopard-EM's meaning)."""
    mag_matrix: list[float] | None = None
    """Anisotropic magnification: the real-space matrix [[a0, a1], [a2, a3]] on (y, x) as
    four numbers [a0, a1, a2, a3]; CTF and projections at (A⁻¹)ᵀ k (Leopard-EM's meaning)."""
    zernike_moments: Any = None
    """Zernike aberration moments (older Leopard-EM files; unused)."""
    odd_zernike: Any = None
    """Odd Zernike coefficients (older Leopard-EM files; unused)."""
    even_zernike: Any = None
    """Even Zernike coefficients (older Leopard-EM files; unused)."""

    @field_validator("odd_zernikes", "even_zernikes", "mag_matrix")
    @classmethod
    def _aberration(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            if info.field_name == "mag_matrix":
                as_mag_matrix(value)
            else:
                as_zernikes(value, kind=str(info.field_name).split("_")[0])
        except ConfigError as error:  # "field: problem" → the problem (pydantic names it)
            raise ValueError(str(error).split(": ", 1)[-1]) from None
        return value


class DefocusSearchConfig(_Model):
    """Relative defocus planes searched around each micrograph's defocus."""

    enabled: bool = True
    """Search several defocus planes; false searches only the relative defocus 0."""
    defocus_min: float = -1000.0
    """Lowest relative defocus, Å."""
    defocus_max: float = 1000.0
    """Highest relative defocus (inclusive), Å."""
    defocus_step: Positive = 200.0
    """Step between defocus planes, Å."""
    skip_enforce_zero: bool = False
    """Do not insert the relative defocus 0 when it is not on the grid."""
    _check_range = _ordered("defocus_min", "defocus_max")

    def count(self) -> int:
        """Number of planes :meth:`values` gives, computed without making them."""
        if not self.enabled:
            return 1
        span = (self.defocus_max - self.defocus_min) / self.defocus_step
        return int(math.floor(span + 1e-6)) + 2  # at most one inserted 0

    def values(self) -> np.ndarray:
        """Relative defocus values, Å, ascending, shape ``(n_defocus,)``, float64.

        From ``defocus_min`` to ``defocus_max`` inclusive (within 10⁻⁶ step) in steps of
        ``defocus_step``; 0 is inserted when it is not on the grid unless
        ``skip_enforce_zero``; ``[0.0]`` when disabled.
        """
        if not self.enabled:
            return np.zeros(1)
        span = (self.defocus_max - self.defocus_min) / self.defocus_step
        values = self.defocus_min + self.defocus_step * np.arange(int(np.floor(span + 1e-6)) + 1)
        on_zero = np.abs(values) < 1e-6 * self.defocus_step
        values[on_zero] = 0.0  # exact 0, not a rounding residue, so results show 0.0
        if not self.skip_enforce_zero and not on_zero.any():
            values = np.sort(np.append(values, 0.0))
        return values


class OrientationSearchConfig(_Model):
    """One orientation grid: steps, and explicit angle ranges or a symmetry group."""

    psi_step: Positive = 1.5
    """In-plane (ψ) step, degrees."""
    theta_step: Positive = 2.5
    """Out-of-plane (θ) step, degrees; φ steps are θ-step / sin θ."""
    phi_min: float | None = None
    """Lowest φ, degrees (default 0)."""
    phi_max: float | None = None
    """Highest φ, degrees (default from the symmetry, 360 for C1)."""
    theta_min: Annotated[float, Field(ge=0, le=180)] | None = None
    """Lowest θ, degrees (default 0)."""
    theta_max: Annotated[float, Field(ge=0, le=180)] | None = None
    """Highest θ (inclusive), degrees (default from the symmetry, 180 for C1)."""
    psi_min: float | None = None
    """Lowest ψ, degrees (default 0)."""
    psi_max: float | None = None
    """Upper bound of ψ (excluded), degrees (default 360)."""
    base_grid_method: Literal["uniform", "healpix", "cartesian"] = "uniform"
    """Direction grid: uniform (as cisTEM and Leopard-EM) or healpix; cartesian is refused."""
    symmetry: str = "C1"
    """Template symmetry: Cn, Dn, T, O or I (case-insensitive; null means C1). It restricts
    φ and θ; explicit angle ranges are allowed only with C1."""
    _check_phi = _ordered("phi_min", "phi_max")
    _check_theta = _ordered("theta_min", "theta_max")
    _check_psi = _ordered("psi_min", "psi_max", strict=True)
    _check_grid = _no_cartesian()

    @field_validator("symmetry", mode="before")
    @classmethod
    def _parse_symmetry(cls, value: Any) -> Any:
        if value is None:  # Leopard-EM: no symmetry, explicit ranges
            return "C1"
        if not isinstance(value, str) or not _SYMMETRY.match(value.strip()):
            raise ValueError("unknown symmetry; expected Cn, Dn, T, O or I")
        return value.strip().upper()

    @model_validator(mode="after")
    def _ranges_or_symmetry(self) -> OrientationSearchConfig:
        names = ("phi_min", "phi_max", "theta_min", "theta_max", "psi_min", "psi_max")
        given = [name for name in names if getattr(self, name) is not None]
        if given and self.symmetry != "C1":
            raise _Problem(
                f"give angle ranges ({', '.join(given)}) or a symmetry, not both",
                "symmetry",
                self.symmetry,
            )
        return self

    def estimated_count(self) -> float:
        """About how many orientations :meth:`grid` gives (within a few percent for fine
        grids, never far below), computed without making them: the directions cover the
        solid angle of the φ and θ ranges at one per θ-step² (plus one per θ ring)."""
        phi_limit, theta_limit = symmetry_ranges(self.symmetry)
        phi = (self.phi_max if self.phi_max is not None else phi_limit) - (self.phi_min or 0.0)
        theta_min = self.theta_min or 0.0
        theta_max = self.theta_max if self.theta_max is not None else theta_limit
        psi = (self.psi_max if self.psi_max is not None else 360.0) - (self.psi_min or 0.0)
        step = math.radians(self.theta_step)
        area = math.radians(max(phi, 0.0)) * (
            math.cos(math.radians(theta_min)) - math.cos(math.radians(theta_max))
        )
        rings = (theta_max - theta_min) / self.theta_step + 1
        directions = area / step**2 * (1.2 if self.base_grid_method == "healpix" else 1.0)
        return (directions + rings) * math.ceil(max(psi, 0.0) / self.psi_step)

    def grid(self) -> np.ndarray:
        """Euler angles of the grid, shape ``(n, 3)``, columns ``(phi, theta, psi)``, degrees."""
        ranges = {
            name: getattr(self, name)
            for name in ("phi_min", "phi_max", "theta_min", "theta_max", "psi_min", "psi_max")
        }
        grid: np.ndarray = orientation_grid(
            psi_step=self.psi_step,
            theta_step=self.theta_step,
            symmetry=self.symmetry,
            base_grid_method=self.base_grid_method,
            **ranges,
        )
        return grid


class MultipleOrientationConfig(_Model):
    """Several orientation grids searched together (Leopard-EM ``orientation_configs``)."""

    orientation_configs: Annotated[list[OrientationSearchConfig], Field(min_length=1)]
    """The grids; their orientations are concatenated in this order."""

    def estimated_count(self) -> float:
        """About how many orientations :meth:`grid` gives, without making them."""
        return sum(config.estimated_count() for config in self.orientation_configs)

    def grid(self) -> np.ndarray:
        """Concatenated Euler angles of all grids, shape ``(n, 3)``, degrees."""
        return np.concatenate([config.grid() for config in self.orientation_configs])


def _grid_kind(value: Any) -> str:
    several = isinstance(value, MultipleOrientationConfig) or (
        isinstance(value, dict) and "orientation_configs" in value
    )
    return _SEVERAL_GRIDS if several else _ONE_GRID


OrientationConfig = Annotated[
    Annotated[OrientationSearchConfig, Tag(_ONE_GRID)]
    | Annotated[MultipleOrientationConfig, Tag(_SEVERAL_GRIDS)],
    Discriminator(_grid_kind),
]
