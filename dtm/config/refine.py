"""The ``dtm refine`` configuration and its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from dtm.config.base import (
    InputFile,
    OutputPath,
    Positive,
    PositiveInt,
    _load,
    _Model,
    _no_cartesian,
    _notices,
    _Problem,
    _show,
    _unsupported,
)
from dtm.config.compute import ClusterConfig, ComputationalConfig
from dtm.config.filters import PreprocessingFilters
from dtm.config.search import DefocusSearchConfig


class DefocusRefinementConfig(DefocusSearchConfig):
    """Relative defocus offsets searched around each particle's defocus in refinement."""

    defocus_min: float = -100.0
    """Lowest relative defocus, Å."""
    defocus_max: float = 100.0
    """Highest relative defocus (inclusive), Å."""
    defocus_step: Positive = 20.0
    """Step between defocus values, Å."""


_STACK_STATE = "Leopard-EM's record of how it processed its image stack in memory; dtm cuts "
_STACK_STATE += "and filters the boxes itself"
_HDF5_STACK = "an option of Leopard-EM's HDF5 particle stack, which dtm does not read"


class ParticleStackConfig(_Model):
    """The particles to refine: a results table of ``dtm match``, and the box around each."""

    leopard_unused = {
        "original_template_size": "dtm reads the template box from the template",
        "global_whitening_applied": _STACK_STATE,
        "local_whitening_applied": _STACK_STATE,
        "global_normalization_applied": _STACK_STATE,
        "local_normalization_applied": _STACK_STATE,
        "hdf5_path": "dtm reads the particles from df_path",
        "allow_file_overwrite": _HDF5_STACK,
        "image_stack_stored": _HDF5_STACK,
        "local_stats_stored": _HDF5_STACK,
    }
    leopard_in_memory = frozenset(
        {
            "image_stack",
            "local_stats",
            "local_stats_correlation_average",
            "local_stats_correlation_variance",
        }
    )
    df_path: InputFile
    """Results table of dtm match (CSV, parquet or STAR)."""
    extracted_box_size: tuple[PositiveInt, PositiveInt]
    """Box (height, width) cut around each particle, pixels (template box + margin)."""
    original_template_size: tuple[int, int] | None = None
    """Template box, pixels (Leopard-EM; dtm reads it from the template)."""
    leopard_em_version: str | None = None
    """The Leopard-EM version that wrote the file (Leopard-EM 1.3 records it); marks the file
    as Leopard-EM's, whose relative paths are resolved as Leopard-EM does."""
    global_whitening_applied: bool = False
    """Leopard-EM's record of its in-memory image stack (unused)."""
    local_whitening_applied: bool = False
    """Leopard-EM's record of its in-memory image stack (unused)."""
    global_normalization_applied: bool = False
    """Leopard-EM's record of its in-memory image stack (unused)."""
    local_normalization_applied: bool = False
    """Leopard-EM's record of its in-memory image stack (unused)."""
    hdf5_path: str | None = None
    """Leopard-EM 1.3's HDF5 particle stack, instead of df_path: not read by dtm (give
    df_path, the particles' table)."""
    allow_file_overwrite: bool = False
    """Of Leopard-EM's HDF5 particle stack (unused)."""
    image_stack_stored: bool = False
    """Of Leopard-EM's HDF5 particle stack (unused)."""
    local_stats_stored: bool = False
    """Of Leopard-EM's HDF5 particle stack (unused)."""

    @model_validator(mode="before")
    @classmethod
    def _no_hdf5_stack(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("hdf5_path") and not data.get("df_path"):
            raise _Problem(
                "dtm does not read Leopard-EM's HDF5 particle stacks; give df_path, the "
                "particles' CSV table",
                "hdf5_path",
                data["hdf5_path"],
            )
        return data


class PixelSizeRefinementConfig(_Model):
    """Leopard-EM pixel-size refinement: not supported, must stay disabled."""

    leopard_unused = dict.fromkeys(
        ("pixel_size_min", "pixel_size_max", "pixel_size_step", "skip_enforce_zero"),
        "pixel size refinement is off",
    )
    enabled: bool = False
    """Must be false: not supported by dtm."""
    pixel_size_min: float = 0.0
    """Relative pixel size, Å (Leopard-EM; unused)."""
    pixel_size_max: float = 0.0
    """Relative pixel size, Å (Leopard-EM; unused)."""
    pixel_size_step: float = 0.0
    """Pixel size step, Å (Leopard-EM; unused)."""
    skip_enforce_zero: bool = False
    """Do not insert the relative pixel size 0 (Leopard-EM; unused)."""
    _check = _unsupported("pixel size refinement")


class OrientationRefinementConfig(_Model):
    """Local orientation offsets: within ± the coarse steps, in fine steps (degrees).

    The viewing direction is tilted up to ``theta_step_coarse`` towards every azimuth, in
    azimuth steps that follow from ``theta_step_fine``; the φ steps are therefore not used.
    """

    leopard_unused = ("phi_step_coarse", "phi_step_fine")
    enabled: bool = True
    """Refine orientations; false keeps those of the search."""
    phi_step_coarse: Positive = 2.5
    """φ step of the global search, degrees (Leopard-EM; unused: azimuths follow θ)."""
    phi_step_fine: Positive = 0.25
    """φ step of the refinement, degrees (Leopard-EM; unused: azimuths follow θ)."""
    theta_step_coarse: Positive = 2.5
    """θ step of the global search, degrees."""
    theta_step_fine: Positive = 0.25
    """θ step of the refinement, degrees."""
    psi_step_coarse: Positive = 1.5
    """ψ step of the global search, degrees."""
    psi_step_fine: Positive = 0.1
    """ψ step of the refinement, degrees."""
    base_grid_method: Literal["uniform", "healpix", "basic", "cartesian"] = "uniform"
    """Leopard-EM grid method; dtm builds one local grid (cartesian is refused)."""
    _check_grid = _no_cartesian()


class MovieConfig(_Model):
    """Leopard-EM per-frame (movie) refinement: not supported, must stay disabled."""

    leopard_unused = dict.fromkeys(
        (
            "movie_path",
            "deformation_field_path",
            "particle_shifts_path",
            "pre_exposure",
            "fluence_per_frame",
        ),
        "movie refinement is off",
    )
    enabled: bool = False
    """Must be false: not supported by dtm."""
    movie_path: str = ""
    """Movie file (Leopard-EM; unused)."""
    deformation_field_path: str = ""
    """Deformation field (Leopard-EM; unused)."""
    particle_shifts_path: str = ""
    """Particle shifts (Leopard-EM; unused)."""
    pre_exposure: float = 0.0
    """Exposure before the first frame, e⁻/Å² (Leopard-EM; unused)."""
    fluence_per_frame: float = 1.0
    """Exposure per frame, e⁻/Å² (Leopard-EM; unused)."""
    _check = _unsupported("movie refinement")


class RefineConfig(_Model):
    """The ``dtm refine`` configuration (a Leopard-EM ``refine_template`` file also loads)."""

    leopard_in_memory = frozenset({"template_volume"})

    template_volume_path: InputFile
    """Template .mrc (the one of the search)."""
    particle_stack: ParticleStackConfig
    """Particles to refine."""
    defocus_refinement_config: DefocusRefinementConfig = DefocusRefinementConfig()
    """Relative defocus offsets."""
    pixel_size_refinement_config: PixelSizeRefinementConfig = PixelSizeRefinementConfig()
    """Leopard-EM pixel-size refinement (unsupported)."""
    orientation_refinement_config: OrientationRefinementConfig = OrientationRefinementConfig()
    """Local orientation offsets."""
    position_search_pixels: Annotated[int, Field(ge=0)] | None = None
    """Position search, ± pixels (default: the margin of the extracted box)."""
    preprocessing_filters: PreprocessingFilters = PreprocessingFilters()
    """Whitening and band-pass."""
    computational_config: ComputationalConfig | None = None
    """Leopard-EM compute resources."""
    movie_config: MovieConfig = MovieConfig()
    """Leopard-EM movie refinement (unsupported)."""
    apply_global_filtering: bool = True
    """Filter each whole micrograph, then cut the boxes (false: filter each box)."""
    output_path: OutputPath = Field(Path("refined.csv"), validate_default=True)
    """Refined results table (.csv or .parquet)."""
    cluster: ClusterConfig = ClusterConfig()
    """Dask cluster."""

    @model_validator(mode="after")
    def _search_filters_only(self) -> RefineConfig:
        # Leopard-EM drops Fourier coefficients of the projections in match_template only.
        self.preprocessing_filters._apply_dropout = False
        return self

    @property
    def notices(self) -> list[str]:
        """One line per accepted but ignored setting (Leopard-EM keys that dtm does not use),
        and where relative paths were resolved from when that was a choice."""
        lines = [*self._load_notices, *_notices(self)]
        dropout = self.preprocessing_filters.random_fourier_dropout
        if dropout.enabled:
            lines.append(
                "preprocessing_filters.random_fourier_dropout: accepted, has no effect in dtm "
                "refine (Leopard-EM applies it in match_template only; got "
                f"{_show(dropout.model_dump())})"
            )
        return lines


def load_refine_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RefineConfig:
    """Load and validate a ``dtm refine`` (or Leopard-EM ``refine_template``) YAML file.

    Parameters, returns and errors as :func:`load_match_config`.
    """
    config: RefineConfig = _load(RefineConfig, "refine", path, overrides)
    return config
