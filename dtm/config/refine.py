"""The ``dtm refine`` configuration and its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from dtm.config.base import (
    InputFile,
    OutputPath,
    Positive,
    PositiveInt,
    _load,
    _Model,
    _no_cartesian,
    _notices,
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


class ParticleStackConfig(_Model):
    """The particles to refine: a results table of ``dtm match``, and the box around each."""

    leopard_unused = ("original_template_size",)
    df_path: InputFile
    """Results table of dtm match (CSV, parquet or STAR)."""
    extracted_box_size: tuple[PositiveInt, PositiveInt]
    """Box (height, width) cut around each particle, pixels (template box + margin)."""
    original_template_size: tuple[int, int] | None = None
    """Template box, pixels (Leopard-EM; dtm reads it from the template)."""


class PixelSizeRefinementConfig(_Model):
    """Leopard-EM pixel-size refinement: not supported, must stay disabled."""

    leopard_unused = ("pixel_size_min", "pixel_size_max", "pixel_size_step")
    enabled: bool = False
    """Must be false: not supported by dtm."""
    pixel_size_min: float = 0.0
    """Relative pixel size, Å (Leopard-EM; unused)."""
    pixel_size_max: float = 0.0
    """Relative pixel size, Å (Leopard-EM; unused)."""
    pixel_size_step: float = 0.0
    """Pixel size step, Å (Leopard-EM; unused)."""
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

    leopard_unused = (
        "movie_path",
        "deformation_field_path",
        "particle_shifts_path",
        "pre_exposure",
        "fluence_per_frame",
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

    @property
    def notices(self) -> list[str]:
        """One line per accepted but ignored setting (Leopard-EM keys that dtm does not use)."""
        return _notices(self)


def load_refine_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RefineConfig:
    """Load and validate a ``dtm refine`` (or Leopard-EM ``refine_template``) YAML file.

    Parameters, returns and errors as :func:`load_match_config`.
    """
    config: RefineConfig = _load(RefineConfig, path, overrides)
    return config
