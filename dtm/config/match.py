"""The ``dtm match`` configuration and its loader."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, model_validator

from dtm.config.base import (
    _MAP_FIELDS,
    InputFile,
    OutputPath,
    Positive,
    _load,
    _Model,
    _notices,
    _Problem,
    _show,
    format_validation_error,
)
from dtm.config.compute import ClusterConfig, ComputationalConfig
from dtm.config.filters import PreprocessingFilters
from dtm.config.micrographs import MicrographEntry, _duplicate_name, load_micrograph_table
from dtm.config.search import (
    DefocusSearchConfig,
    OpticsGroup,
    OrientationConfig,
    OrientationSearchConfig,
)
from dtm.errors import ConfigError


class MatchTemplateResult(_Model):
    """Leopard-EM output paths: the maps are also written there, besides ``output_dir``."""

    leopard_unused = ("total_defocus", "total_orientations", "total_projections")
    allow_file_overwrite: bool = False
    """Replace existing files at these paths."""
    mip_path: OutputPath | None = None
    """MIP map, .mrc."""
    scaled_mip_path: OutputPath | None = None
    """Scaled MIP (z-score) map, .mrc."""
    correlation_average_path: OutputPath | None = None
    """Correlation mean map, .mrc."""
    correlation_variance_path: OutputPath | None = None
    """Correlation variance map, .mrc (Leopard-EM writes the standard deviation here)."""
    orientation_psi_path: OutputPath | None = None
    """ψ map, degrees, .mrc."""
    orientation_theta_path: OutputPath | None = None
    """θ map, degrees, .mrc."""
    orientation_phi_path: OutputPath | None = None
    """φ map, degrees, .mrc."""
    relative_defocus_path: OutputPath | None = None
    """Relative defocus map, Å, .mrc."""
    total_defocus: int | None = None
    """Written by older Leopard-EM versions after a run; ignored."""
    total_orientations: int | None = None
    """Written by older Leopard-EM versions after a run; ignored."""
    total_projections: int | None = None
    """Written by older Leopard-EM versions after a run; ignored."""

    def map_paths(self) -> dict[str, Path]:
        """Map name (``mip``, ``scaled_mip``, ``correlation_mean``, ``correlation_variance``,
        ``psi``, ``theta``, ``phi``, ``defocus``) → path, for the paths that are given."""
        paths = {name: getattr(self, field) for name, field in _MAP_FIELDS.items()}
        return {name: path for name, path in paths.items() if path is not None}


class PeaksConfig(_Model):
    """Threshold and peak picking on the scaled MIP."""

    false_positives: Positive = 1.0
    """Expected false positives per micrograph; sets the z-score threshold."""
    z_score_cutoff: float | None = None
    """Fixed z-score threshold, instead of the one from false_positives."""
    min_distance_pixels: Positive | None = None
    """Minimum distance between peaks, pixels (default from the template size)."""
    min_distance_angstrom: Positive | None = None
    """Minimum distance between peaks, Å (instead of pixels)."""
    border_pixels: Annotated[int, Field(ge=0)] = 0
    """Ignore peaks closer than this to the edge of the map, pixels."""

    @model_validator(mode="after")
    def _one_distance(self) -> PeaksConfig:
        if self.min_distance_pixels is not None and self.min_distance_angstrom is not None:
            raise _Problem(
                "give min_distance_pixels or min_distance_angstrom, not both",
                "min_distance_angstrom",
                self.min_distance_angstrom,
            )
        return self


class MatchConfig(_Model):
    """The ``dtm match`` configuration (a Leopard-EM ``match_template`` file also loads)."""

    micrograph_path: InputFile | None = None
    """One micrograph .mrc, with the CTF of optics_group (one of the three sources)."""
    micrographs: list[MicrographEntry] | None = None
    """Several micrographs, each with its CTF fit (one of the three sources)."""
    micrograph_table: InputFile | None = None
    """CSV or RELION STAR table of micrographs and CTF fits (one of the three sources)."""
    template_volume_path: InputFile
    """Template .mrc: a cubic volume with the micrographs' pixel size."""
    output_dir: OutputPath = Field(Path("dtm-out"), validate_default=True)
    """Directory of the results (results.zarr, maps/, peak tables); relative paths, the
    default included, are relative to the configuration file."""
    optics_group: OpticsGroup
    """Microscope optics."""
    defocus_search_config: DefocusSearchConfig = DefocusSearchConfig()
    """Relative defocus planes."""
    orientation_search_config: OrientationConfig = OrientationSearchConfig()
    """Orientation grid, or {orientation_configs: [...]} for several grids."""
    preprocessing_filters: PreprocessingFilters = PreprocessingFilters()
    """Whitening and band-pass."""
    correlation_mode: Literal["valid", "same"] = "valid"
    """valid: maps of (H-h+1, W-w+1) positions; same: (H, W), zero-padded micrograph."""
    high_resolution_limit: Positive | None = None
    """Fourier-crop micrographs and template to this resolution, Å (>= 2 × pixel_size)."""
    peaks: PeaksConfig = PeaksConfig()
    """Threshold and peak picking."""
    cluster: ClusterConfig = ClusterConfig()
    """Dask cluster and task sizes."""
    match_template_result: MatchTemplateResult | None = None
    """Leopard-EM output paths; the maps are also exported there."""
    computational_config: ComputationalConfig | None = None
    """Leopard-EM compute resources (gpu_ids: cpu → CPU workers, else GPU workers)."""

    @model_validator(mode="after")
    def _sources(self) -> MatchConfig:
        sources = ("micrograph_path", "micrographs", "micrograph_table")
        given = [source for source in sources if getattr(self, source) is not None]
        if not given:
            raise _Problem(
                "required: give micrograph_path, micrographs or micrograph_table", "micrograph_path"
            )
        if len(given) > 1:
            raise _Problem(f"give only one of {', '.join(sources)}", given[1], given)
        if self.micrograph_path is not None:
            for key in ("defocus_u", "defocus_v"):
                if getattr(self.optics_group, key) is None:
                    raise _Problem("required with micrograph_path", f"optics_group.{key}")
        duplicate = _duplicate_name(self.micrographs or [])
        if duplicate and self.micrographs:
            name = self.micrographs[duplicate[1]].name
            raise _Problem("duplicate micrograph name", f"micrographs.{duplicate[1]}.name", name)
        limit, nyquist = self.high_resolution_limit, 2 * self.optics_group.pixel_size
        if limit is not None and limit < nyquist:
            raise _Problem(
                f"must be >= 2 × pixel_size ({nyquist:g} Å)", "high_resolution_limit", limit
            )
        return self

    def micrograph_entries(self) -> list[MicrographEntry]:
        """The micrographs to search with their CTF values, ``phase_shift`` filled in.

        ``micrograph_path`` gives one entry with the optics group's defocus; ``micrographs``
        its list; ``micrograph_table`` the rows read by :func:`load_micrograph_table`.
        """
        optics = self.optics_group
        if self.micrograph_path is not None:
            try:
                entry = MicrographEntry.model_validate(
                    {
                        "micrograph_path": self.micrograph_path,
                        "defocus_u": optics.defocus_u,
                        "defocus_v": optics.defocus_v,
                        "astigmatism_angle": optics.astigmatism_angle,
                    }
                )
            except pydantic.ValidationError as err:
                line = format_validation_error(err, f"micrograph_path {self.micrograph_path}")
                raise ConfigError(line.replace(": name: ", ": ", 1)) from None
            entries = [entry]
        elif self.micrographs is not None:
            entries = self.micrographs
        else:
            assert self.micrograph_table is not None
            entries = load_micrograph_table(self.micrograph_table)
        return [
            entry.model_copy(update={"phase_shift": optics.phase_shift})
            if entry.phase_shift is None
            else entry
            for entry in entries
        ]

    @property
    def notices(self) -> list[str]:
        """One line per accepted but ignored setting (Leopard-EM keys that dtm does not use)."""
        lines = _notices(self)
        if self.micrograph_path is None:
            for key in ("defocus_u", "defocus_v"):
                value = getattr(self.optics_group, key)
                if value is not None:
                    lines.append(
                        f"optics_group.{key}: ignored, the per-micrograph defocus is "
                        f"used (got {_show(value)})"
                    )
        return lines


def load_match_config(path: str | Path, overrides: dict[str, Any] | None = None) -> MatchConfig:
    """Load and validate a ``dtm match`` (or Leopard-EM ``match_template``) YAML file.

    Parameters
    ----------
    path
        The YAML file; relative paths inside are resolved against its directory.
    overrides
        Dotted keys from the command line, e.g. ``{"cluster.scheduler_address":
        "tcp://host:8786", "output_dir": "out"}``, replacing the file's values.

    Returns
    -------
    MatchConfig
        The validated configuration; ``config.notices`` lists ignored Leopard-EM settings.

    Raises
    ------
    ConfigError
        One line naming the file (or ``command line``), the dotted field and the problem;
        also for a missing file, bad YAML and a bad micrograph table.
    """
    config: MatchConfig = _load(MatchConfig, path, overrides)
    config.micrograph_entries()  # read and check a micrograph table now, not mid-run
    return config
