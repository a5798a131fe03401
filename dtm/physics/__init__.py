"""Physics of 2DTM: rotations, CTF, filters and projections (``docs/conventions.md``)."""

from dtm.physics.ctf import ctf_2d, electron_wavelength
from dtm.physics.filters import (
    bandpass_filter,
    frequency_grid,
    radial_power_spectrum,
    whitening_filter,
)
from dtm.physics.projection import (
    PreparedTemplate,
    extract_central_slices,
    prepare_template,
    project_real_space,
)
from dtm.physics.rotations import compose, euler_to_matrix, geodesic_angle, matrix_to_euler

__all__ = [
    "PreparedTemplate",
    "bandpass_filter",
    "compose",
    "ctf_2d",
    "electron_wavelength",
    "euler_to_matrix",
    "extract_central_slices",
    "frequency_grid",
    "geodesic_angle",
    "matrix_to_euler",
    "prepare_template",
    "project_real_space",
    "radial_power_spectrum",
    "whitening_filter",
]
