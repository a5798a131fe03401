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
    PositiveInt,
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
from dtm.config.template import TemplateSimulation
from dtm.errors import ConfigError


class MatchTemplateResult(_Model):
    """Leopard-EM output paths: the maps are also written there, besides ``output_dir``."""

    leopard_unused = {
        "total_defocus": "a count Leopard-EM records after a run",
        "total_orientations": "a count Leopard-EM records after a run",
        "total_projections": "a count Leopard-EM records after a run",
        "hdf5_path": "dtm writes results.zarr and maps/*.mrc in output_dir, not Leopard-EM's "
        "HDF5 results file",
        "compress": "an option of Leopard-EM's HDF5 results file, which dtm does not write",
    }
    leopard_in_memory = frozenset(
        {
            "mip",
            "scaled_mip",
            "correlation_average",
            "correlation_variance",
            "orientation_psi",
            "orientation_theta",
            "orientation_phi",
            "relative_defocus",
            "match_template_peaks",
            "correlation_table",
        }
    )
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
    correlation_table_path: OutputPath | None = None
    """Also write the correlation table here, as one parquet file (Leopard-EM writes HDF5);
    turns the table on (see correlation_table)."""
    leopard_em_version: str | None = None
    """The Leopard-EM version that wrote the file (Leopard-EM 1.3 records it); marks the file
    as Leopard-EM's, whose relative paths are resolved as Leopard-EM does."""
    hdf5_path: OutputPath | None = None
    """Leopard-EM 1.3's single HDF5 results file, instead of the eight .mrc paths; not
    written by dtm (its results are in output_dir)."""
    compress: bool = True
    """Compression of Leopard-EM's HDF5 results file (unused)."""
    total_defocus: int = 0
    """Written by Leopard-EM after a run; ignored."""
    total_orientations: int = 0
    """Written by Leopard-EM after a run; ignored."""
    total_projections: int = 0
    """Written by Leopard-EM after a run; ignored."""

    def map_paths(self) -> dict[str, Path]:
        """Map name (``mip``, ``scaled_mip``, ``correlation_mean``, ``correlation_variance``,
        ``psi``, ``theta``, ``phi``, ``defocus``) → path, for the paths that are given."""
        paths = {name: getattr(self, field) for name, field in _MAP_FIELDS.items()}
        return {name: path for name, path in paths.items() if path is not None}


class CorrelationTableConfig(_Model):
    """Every (position, orientation, defocus) whose correlation exceeds a cut-off, written as
    OUTPUT_DIR/correlation_table.parquet (see the correlation table in Output formats)."""

    enabled: bool = False
    """Keep the table (off by default: no cost); match_template_result.correlation_table_path
    also turns it on."""
    cutoff: Positive = 5.5
    """Correlations strictly above this value are kept (Leopard-EM's threshold, 5.5); the
    correlations are ~N(0, 1) in noise, so each map position contributes ~1.9e-8 × N rows
    of noise at 5.5."""
    max_rows_per_task: PositiveInt = 1_000_000
    """More rows than this from one search task stop that micrograph with an error naming
    cutoff (20 bytes a row; a micrograph's rows are held in memory until written)."""


class PeaksConfig(_Model):
    """Threshold and peak picking (the ``peaks:`` section and ``dtm peaks``)."""

    metric: Literal["detection_z", "scaled_mip", "mip", "pvalue", "gev"] = "detection_z"
    """What is thresholded and suppressed: detection_z (the MIP against the correlation
    statistics of the background around it; does not saturate at strong particles),
    scaled_mip (the z-score of the seed), mip (the raw MIP), pvalue (Leopard-EM 1.3's
    anisotropic-Gaussian -ln p of (MIP, z-score)) or gev (the z-score with a cut-off from a
    fitted extreme-value distribution)."""
    false_positives: Positive = 1.0
    """Expected false positives per micrograph; sets the threshold (z metrics and gev)."""
    z_score_cutoff: float | None = None
    """Fixed threshold of detection_z, scaled_mip or mip, instead of false_positives."""
    p_value_cutoff: Positive = 8.0
    """Threshold of the pvalue metric, as -ln p (Leopard-EM's default 8)."""
    min_distance_pixels: Positive | None = None
    """Minimum distance between peaks, pixels (default: the template's radius)."""
    min_distance_angstrom: Positive | None = None
    """Minimum distance between peaks, Å (instead of pixels)."""
    merge_side_maxima: bool = True
    """Drop a peak that the stronger particles near it explain: what is left of its
    correlation once theirs is accounted for no longer passes the threshold."""
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
        if self.z_score_cutoff is not None and self.metric in ("pvalue", "gev"):
            raise _Problem(
                f"not used by metric {self.metric} (use p_value_cutoff or false_positives)",
                "z_score_cutoff",
                self.z_score_cutoff,
            )
        return self


class MatchConfig(_Model):
    """The ``dtm match`` configuration (a Leopard-EM ``match_template`` file also loads)."""

    leopard_in_memory = frozenset({"micrograph", "template_volume"})

    micrograph_path: InputFile | None = None
    """One micrograph .mrc, with the CTF of optics_group (one of the three sources)."""
    micrographs: list[MicrographEntry] | None = None
    """Several micrographs, each with its CTF fit (one of the three sources)."""
    micrograph_table: InputFile | None = None
    """CSV or RELION STAR table of micrographs and CTF fits (one of the three sources)."""
    template_volume_path: InputFile | None = None
    """Template .mrc: a cubic volume with the micrographs' pixel size (or template_model_path)."""
    template_model_path: InputFile | None = None
    """Atomic model (PDB or mmCIF) to make the template from instead: simulated at the
    micrographs' pixel size and voltage into OUTPUT_DIR/template.mrc (see From a model)."""
    template_box: PositiveInt | None = None
    """Box of the template simulated from template_model_path, voxels (default: the model's
    diameter plus 20 Å, even)."""
    template_simulation: TemplateSimulation = TemplateSimulation()
    """How the template is simulated from template_model_path (B-factors, filters)."""
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
    correlation_table: CorrelationTableConfig = CorrelationTableConfig()
    """The correlation table: every correlation above a cut-off (off by default)."""
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
        self._one_template()
        if self.micrograph_path is not None:
            for key in ("defocus_u", "defocus_v"):
                if getattr(self.optics_group, key) is None:
                    raise _Problem("required with micrograph_path", f"optics_group.{key}")
        duplicate = _duplicate_name(self.micrographs or [])
        if duplicate and self.micrographs:
            name = self.micrographs[duplicate[1]].name
            raise _Problem("duplicate micrograph name", f"micrographs.{duplicate[1]}.name", name)
        table, result = self.correlation_table, self.match_template_result
        leopard_table = result is not None and result.correlation_table_path is not None
        if leopard_table and "enabled" in table.model_fields_set and not table.enabled:
            raise _Problem(
                "false, but match_template_result.correlation_table_path asks for the table",
                "correlation_table.enabled",
                False,
            )
        limit, nyquist = self.high_resolution_limit, 2 * self.optics_group.pixel_size
        if limit is not None and limit < nyquist:
            raise _Problem(
                f"must be >= 2 × pixel_size ({nyquist:g} Å)", "high_resolution_limit", limit
            )
        return self

    def _one_template(self) -> None:
        """Exactly one of template_volume_path and template_model_path; the simulation's
        settings only with a model."""
        volume, model = self.template_volume_path, self.template_model_path
        if volume is None and model is None:
            raise _Problem(
                "required: give template_volume_path or template_model_path",
                "template_volume_path",
            )
        if volume is not None and model is not None:
            raise _Problem(
                "give template_volume_path or template_model_path, not both",
                "template_model_path",
                model,
            )
        if model is None:
            if self.template_box is not None:
                raise _Problem("only with template_model_path", "template_box", self.template_box)
            if self.template_simulation != TemplateSimulation():
                raise _Problem("only with template_model_path", "template_simulation")

    @property
    def template_path(self) -> Path:
        """The template volume a search reads: template_volume_path, which a run sets to the
        simulated template when the configuration names template_model_path."""
        if self.template_volume_path is None:
            raise ConfigError("template_model_path: the template has not been simulated yet")
        return self.template_volume_path

    def template_record(self) -> dict[str, Any] | None:
        """What the template was simulated from and how (dataset attributes); None for a
        template_volume_path."""
        if self.template_model_path is None:
            return None
        return {
            "model_path": str(self.template_model_path),
            "box": self.template_box,
            "pixel_size": self.optics_group.pixel_size,
            "voltage": self.optics_group.voltage,
            **self.template_simulation.record(),
        }

    def table_settings(self) -> tuple[float, int] | None:
        """``(cutoff, max_rows_per_task)`` when the correlation table is kept, else None."""
        table, result = self.correlation_table, self.match_template_result
        if table.enabled or (result is not None and result.correlation_table_path is not None):
            return table.cutoff, table.max_rows_per_task
        return None

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
        """One line per accepted but ignored setting (Leopard-EM keys that dtm does not use),
        and where relative paths were resolved from when that was a choice."""
        lines = [*self._load_notices, *_notices(self)]
        result = self.match_template_result
        table = None if result is None else result.correlation_table_path
        if table is not None and table.suffix.lower() in (".h5", ".hdf5"):
            lines.append(
                "match_template_result.correlation_table_path: written as dtm's parquet "
                f"correlation table, not the HDF5 file of Leopard-EM 1.3 (got {table})"
            )
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
        The YAML file; relative paths inside are resolved against its directory (a
        Leopard-EM file's: see :func:`dtm.config.paths.relative_base`).
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
    config: MatchConfig = _load(MatchConfig, "match", path, overrides)
    config.micrograph_entries()  # read and check a micrograph table now, not mid-run
    return config
