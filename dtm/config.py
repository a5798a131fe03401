"""Configuration of dtm's programs: pydantic models of the YAML files, Leopard-EM compatible.

``dtm match`` and ``dtm refine`` read a YAML file validated by :class:`MatchConfig` and
:class:`RefineConfig`. Every Leopard-EM 1.3 key is declared, so a Leopard-EM file loads
unchanged; unknown keys are errors. Leopard-EM settings that dtm does not use are accepted
and, when set to a value other than their default, reported as one-line *notices* by the
``notices`` property of the loaded configuration (the command line prints them).

Relative paths in a file are resolved against the directory of that file; relative paths in
command-line overrides against the current directory. Every problem raises
:class:`dtm.errors.ConfigError` with one line ``<file>: <dotted.field>: <problem> (got <value>)``.
Field descriptions (attribute docstrings) feed ``model_json_schema`` and the docs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pydantic
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dtm.errors import ConfigError

_SYMMETRY = re.compile(r"^(?:[CD][1-9]\d*|[TOI])$", re.IGNORECASE)
_ONE_GRID, _SEVERAL_GRIDS = "one-grid", "several-grids"  # union tags, hidden from messages


class _Problem(ValueError):
    """A validation problem that names its own field (dotted, relative) and value."""

    def __init__(self, message: str, field: str = "", value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def _show(value: Any) -> str:
    """One-line rendering of a user value for messages; long values other than paths are
    shortened."""
    if isinstance(value, Path):
        return str(value)
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


def _existing_file(path: Path, info: ValidationInfo) -> Path:
    path = _resolve(path, info)
    if not path.is_file():
        raise _Problem("file not found", value=path)
    return path


InputFile = Annotated[Path, AfterValidator(_existing_file)]
OutputPath = Annotated[Path, AfterValidator(_resolve)]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class _Model(BaseModel):
    """Base of all sections: unknown keys are errors; ``leopard_unused`` lists the
    Leopard-EM fields that dtm accepts but ignores (a notice when not at their default)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    leopard_unused: ClassVar[tuple[str, ...]] = ()


def _notices(model: BaseModel, prefix: str = "") -> list[str]:
    """One line per ignored Leopard-EM setting that is not at its default, recursively."""
    lines = []
    for name, field in type(model).model_fields.items():
        value, dotted = getattr(model, name), prefix + name
        if name in getattr(model, "leopard_unused", ()):
            if value != field.get_default(call_default_factory=True):
                lines.append(
                    f"{dotted}: Leopard-EM setting not used by dtm, ignored (got {_show(value)})"
                )
        elif isinstance(value, BaseModel):
            lines += _notices(value, dotted + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    lines += _notices(item, f"{dotted}.{i}.")
    return lines


def _ordered(low: str, high: str, strict: bool = False) -> Any:
    """A field validator for ``high`` checking ``low <= high`` (``<`` when strict)."""

    def check(cls: type, value: float | None, info: ValidationInfo) -> float | None:
        lower = info.data.get(low)
        if value is not None and lower is not None and (value < lower or strict and value == lower):
            raise ValueError(f"must be {'>' if strict else '>='} {low} ({lower})")
        return value

    return field_validator(high)(check)


def _unsupported(what: str) -> Any:
    """A validator rejecting ``enabled: true`` for a Leopard-EM feature that dtm lacks."""

    def check(cls: type, value: bool) -> bool:
        if value:
            raise ValueError(f"{what} is not supported by dtm; set enabled: false")
        return value

    return field_validator("enabled")(check)


def _no_cartesian() -> Any:
    def check(cls: type, value: str) -> str:
        if value == "cartesian":
            raise ValueError("the cartesian grid is not supported by dtm; use uniform or healpix")
        return value

    return field_validator("base_grid_method")(check)


class OpticsGroup(_Model):
    """Microscope optics of the micrographs (Leopard-EM ``optics_group``)."""

    leopard_unused = (
        "chromatic_aberration",
        "mtf_reference",
        "mtf_values",
        "beam_tilt_x",
        "beam_tilt_y",
        "odd_zernikes",
        "even_zernikes",
        "mag_matrix",
    )
    label: str = "default"
    """Name of the optics group (informational)."""
    pixel_size: Positive
    """Pixel size of micrographs and template, Å."""
    voltage: Positive
    """Acceleration voltage, kV."""
    spherical_aberration: NonNegative = 2.7
    """Spherical aberration Cs, mm."""
    amplitude_contrast_ratio: Annotated[float, Field(ge=0, le=1)] = 0.07
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
    """Odd Zernike coefficients (Leopard-EM; unused)."""
    even_zernikes: dict[str, float] | None = None
    """Even Zernike coefficients (Leopard-EM; unused)."""
    mag_matrix: list[float] | None = None
    """Anisotropic magnification matrix, 4 floats (Leopard-EM; unused)."""


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


class DefocusRefinementConfig(DefocusSearchConfig):
    """Relative defocus offsets searched around each particle's defocus in refinement."""

    defocus_min: float = -100.0
    """Lowest relative defocus, Å."""
    defocus_max: float = 100.0
    """Highest relative defocus (inclusive), Å."""
    defocus_step: Positive = 20.0
    """Step between defocus values, Å."""


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
    theta_min: float | None = None
    """Lowest θ, degrees (default 0)."""
    theta_max: float | None = None
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

    def grid(self) -> np.ndarray:
        """Euler angles of the grid, shape ``(n, 3)``, columns ``(phi, theta, psi)``, degrees."""
        from dtm.search.orientations import orientation_grid

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


class WhiteningFilterConfig(_Model):
    """Whitening by the micrograph's radially averaged power spectrum."""

    enabled: bool = True
    """Whiten the micrograph and every projection."""
    num_freq_bins: PositiveInt | None = None
    """Radial shells of the averaged spectrum (default: about one per pixel of radius)."""
    max_freq: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Highest frequency whitened, cycles/pixel; above it the filter is 1."""
    do_power_spectrum: bool = True
    """Average the power spectrum (true) or the amplitude spectrum (false)."""


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

    leopard_unused = ("cuton",)
    enabled: bool = False
    """Must be false: not supported by dtm."""
    cuton: float | None = None
    """Cut-on frequency, cycles/pixel (Leopard-EM; unused)."""
    _check = _unsupported("phase randomization")


class ArbitraryCurveFilterConfig(_Model):
    """Leopard-EM arbitrary-curve filter: not supported, must stay disabled."""

    leopard_unused = ("frequencies", "amplitudes")
    enabled: bool = False
    """Must be false: not supported by dtm."""
    frequencies: list[float] | None = None
    """Curve frequencies, cycles/pixel (Leopard-EM; unused)."""
    amplitudes: list[float] | None = None
    """Curve amplitudes (Leopard-EM; unused)."""
    _check = _unsupported("the arbitrary curve filter")


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


_MAP_FIELDS = {
    "mip": "mip_path",
    "scaled_mip": "scaled_mip_path",
    "correlation_mean": "correlation_average_path",
    "correlation_variance": "correlation_variance_path",
    "psi": "orientation_psi_path",
    "theta": "orientation_theta_path",
    "phi": "orientation_phi_path",
    "defocus": "relative_defocus_path",
}


class MatchTemplateResult(_Model):
    """Leopard-EM output paths: the maps are also written there, besides ``output_dir``."""

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

    def map_paths(self) -> dict[str, Path]:
        """Map name (``mip``, ``scaled_mip``, ``correlation_mean``, ``correlation_variance``,
        ``psi``, ``theta``, ``phi``, ``defocus``) → path, for the paths that are given."""
        paths = {name: getattr(self, field) for name, field in _MAP_FIELDS.items()}
        return {name: path for name, path in paths.items() if path is not None}


class ComputationalConfig(_Model):
    """Leopard-EM compute resources: ``gpu_ids: cpu`` runs on CPUs, any other value on GPUs."""

    leopard_unused = ("backend",)
    gpu_ids: int | list[int] | str | list[str] = [0]
    """GPU index, list of indices, 'cuda:N' (or a list of them), 'all' or 'cpu'."""
    num_cpus: PositiveInt = 1
    """CPU threads (Leopard-EM: streams per GPU)."""
    backend: str | None = None
    """Leopard-EM kernel choice (streamed, batched, zipfft); unused by dtm."""

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _check_gpu_ids(cls, value: Any) -> Any:
        def gpu(item: Any) -> bool:
            if isinstance(item, str):
                return re.fullmatch(r"(cuda:)?\d+", item) is not None
            return isinstance(item, int) and not isinstance(item, bool) and item >= 0

        items = value if isinstance(value, list) else [value]
        if value not in ("all", "cpu") and not (items and all(gpu(i) for i in items)):
            raise ValueError("expected a GPU index >= 0, a list of them, 'cuda:N', 'all' or 'cpu'")
        return value

    @property
    def device(self) -> Literal["cpu", "gpu"]:
        """``cpu`` when ``gpu_ids`` is ``"cpu"``, else ``gpu``."""
        return "cpu" if self.gpu_ids == "cpu" else "gpu"

    def gpu_indices(self) -> list[int] | None:
        """The GPU indices to use; None for all GPUs (``all``) or none (``cpu``)."""
        if self.gpu_ids in ("all", "cpu"):
            return None
        items = self.gpu_ids if isinstance(self.gpu_ids, list) else [self.gpu_ids]
        return [int(str(item).removeprefix("cuda:")) for item in items]


class ClusterConfig(_Model):
    """Where the Dask workers come from, and how the search is cut into tasks."""

    kind: Literal["local", "address", "slurm", "pbs", "kubernetes", "gpu-local"] = "local"
    """local: an embedded LocalCluster; address: an existing scheduler; slurm, pbs:
    dask-jobqueue; kubernetes: dask-kubernetes; gpu-local: a LocalCUDACluster."""
    scheduler_address: str | None = None
    """Scheduler to connect to, e.g. tcp://host:8786 (implies kind address)."""
    n_workers: PositiveInt | None = None
    """Number of workers (local, gpu-local, kubernetes)."""
    threads_per_worker: PositiveInt | None = None
    """Threads per worker."""
    memory_limit: str | None = None
    """Memory limit per worker, e.g. '8GB'."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Array backend of the workers: numpy (cpu) or cupy (gpu)."""
    chunk_size: PositiveInt | None = None
    """Orientations per task; null chooses automatically."""
    split_every: Annotated[int, Field(ge=2)] = 8
    """Partial results merged by one reduction task."""
    dashboard_address: str = ":8787"
    """Dashboard address of a cluster that dtm starts."""
    queue: str | None = None
    """Batch queue or partition (slurm, pbs)."""
    account: str | None = None
    """Account or project charged (slurm, pbs)."""
    walltime: str | None = None
    """Wall time of one job, e.g. '02:00:00' (slurm, pbs)."""
    cores: PositiveInt | None = None
    """Cores per job (slurm, pbs)."""
    memory: str | None = None
    """Memory per job, e.g. '64GB' (slurm, pbs)."""
    processes: PositiveInt | None = None
    """Worker processes per job (slurm, pbs)."""
    gpus_per_job: Annotated[int, Field(ge=0)] | None = None
    """GPUs per job (slurm, pbs)."""
    n_jobs: PositiveInt | None = None
    """Jobs to start (slurm, pbs)."""
    adapt_minimum: Annotated[int, Field(ge=0)] | None = None
    """Adaptive scaling: fewest jobs (slurm, pbs)."""
    adapt_maximum: PositiveInt | None = None
    """Adaptive scaling: most jobs (slurm, pbs)."""
    job_extra_directives: list[str] = []
    """Extra scheduler directives, e.g. '--gres=gpu:1' (slurm, pbs)."""
    local_directory: str | None = None
    """Scratch directory of the workers."""
    name: str | None = None
    """Cluster name (kubernetes)."""
    image: str | None = None
    """Container image of the workers (kubernetes)."""
    resources: dict[str, Any] | None = None
    """Worker resources, e.g. {limits: {cpu: '2', memory: 8G}} (kubernetes)."""
    namespace: str | None = None
    """Namespace (kubernetes)."""
    _check_adapt = _ordered("adapt_minimum", "adapt_maximum")

    @model_validator(mode="after")
    def _address_rule(self) -> ClusterConfig:
        if self.scheduler_address and self.kind == "local":
            self.kind = "address"
        elif self.scheduler_address and self.kind != "address":
            raise _Problem("scheduler_address needs kind address", "kind", self.kind)
        elif self.kind == "address" and not self.scheduler_address:
            raise _Problem("required with kind address", "scheduler_address")
        return self


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


class MicrographEntry(_Model):
    """One micrograph with its CTF fit."""

    micrograph_path: InputFile
    """Micrograph .mrc."""
    defocus_u: float
    """Defocus along the major axis, Å, underfocus positive."""
    defocus_v: float
    """Defocus along the minor axis, Å."""
    astigmatism_angle: float = 0.0
    """Astigmatism angle, degrees."""
    phase_shift: float | None = None
    """Phase shift, degrees (default: optics_group.phase_shift)."""
    name: str | None = None
    """Name of the micrograph in the results (default: the file name without extension)."""

    @model_validator(mode="after")
    def _default_name(self) -> MicrographEntry:
        if not self.name:
            self.name = self.micrograph_path.stem
        return self


def _duplicate_name(entries: list[MicrographEntry]) -> tuple[int, int] | None:
    """Indices (first, second) of the first repeated name, or None."""
    seen: dict[str | None, int] = {}
    for i, entry in enumerate(entries):
        if entry.name in seen:
            return seen[entry.name], i
        seen[entry.name] = i
    return None


_TABLE_COLUMNS = {
    "micrograph_path": ("micrograph_path", "rlnmicrographname", "micrograph", "path", "filename"),
    "defocus_u": ("defocus_u", "rlndefocusu", "defocus_1", "defocusu"),
    "defocus_v": ("defocus_v", "rlndefocusv", "defocus_2", "defocusv"),
    "astigmatism_angle": ("astigmatism_angle", "rlndefocusangle", "defocus_angle", "astigmatism"),
    "phase_shift": ("phase_shift", "rlnphaseshift"),
    "name": ("name", "micrograph_name"),
}


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() != ".star":
        # sep=None sniffs comma, tab or spaces; text keeps names such as "001" intact
        return pd.read_csv(path, sep=None, engine="python", dtype=str)
    import starfile

    blocks = starfile.read(path, always_dict=True)
    tables = [block for block in blocks.values() if isinstance(block, pd.DataFrame)]
    if isinstance(blocks.get("micrographs"), pd.DataFrame):
        return blocks["micrographs"]
    with_names = [table for table in tables if "rlnMicrographName" in table.columns]
    return (with_names or tables or [pd.DataFrame()])[0]


def load_micrograph_table(path: str | Path) -> list[MicrographEntry]:
    """Read a table of micrographs and their CTF fits.

    Parameters
    ----------
    path
        CSV with columns ``micrograph_path``, ``defocus_u``, ``defocus_v`` (Å) and
        ``astigmatism_angle`` (degrees), optional ``phase_shift`` (degrees) and ``name``;
        or RELION STAR with ``rlnMicrographName``, ``rlnDefocusU``, ``rlnDefocusV``,
        ``rlnDefocusAngle``, optional ``rlnPhaseShift`` (block ``data_micrographs``, else the
        first block naming micrographs). Column names are case-insensitive; relative
        micrograph paths are resolved against the table's directory.

    Returns
    -------
    list[MicrographEntry]
        One entry per row, in table order.

    Raises
    ------
    ConfigError
        Unreadable or empty table, a missing column, a micrograph not found, duplicate names.
    """
    path = Path(path)
    try:
        frame = _read_table(path)
    except Exception as exc:  # any parser failure is the user's file
        raise ConfigError(f"{path}: cannot read the table: {exc}".replace("\n", " ")) from None
    by_lower_name = {str(column).lower(): column for column in frame.columns}
    columns = {}
    for name, aliases in _TABLE_COLUMNS.items():
        found = [by_lower_name[alias] for alias in aliases if alias in by_lower_name]
        if found:
            columns[name] = found[0]
        elif name not in ("phase_shift", "name"):
            raise ConfigError(f"{path}: missing column {name} (or {', '.join(aliases[1:])})")
    if frame.empty:
        raise ConfigError(f"{path}: the micrograph table has no rows")
    entries = []
    for row, record in enumerate(frame.to_dict("records"), start=1):
        data = {
            name: str(record[column]) if name in ("micrograph_path", "name") else record[column]
            for name, column in columns.items()
            if not pd.isna(record[column])
        }
        try:
            entries.append(MicrographEntry.model_validate(data, context={"base_dir": path.parent}))
        except pydantic.ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{path}: row {row}")) from None
    duplicate = _duplicate_name(entries)
    if duplicate:
        first, second = duplicate
        raise ConfigError(
            f"{path}: rows {first + 1} and {second + 1}: duplicate micrograph "
            f"name (got {entries[second].name!r})"
        )
    return entries


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
    output_dir: OutputPath = Path("dtm-out")
    """Directory of the results (results.zarr, maps/, peak tables)."""
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
            entries = [
                MicrographEntry.model_validate(
                    {
                        "micrograph_path": self.micrograph_path,
                        "defocus_u": optics.defocus_u,
                        "defocus_v": optics.defocus_v,
                        "astigmatism_angle": optics.astigmatism_angle,
                    }
                )
            ]
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
    """Local orientation offsets: within ± the coarse steps, in fine steps (degrees)."""

    enabled: bool = True
    """Refine orientations; false keeps those of the search."""
    phi_step_coarse: Positive = 2.5
    """φ step of the global search, degrees."""
    phi_step_fine: Positive = 0.25
    """φ step of the refinement, degrees."""
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
    output_path: OutputPath = Path("refined.csv")
    """Refined results table (.csv or .parquet)."""
    cluster: ClusterConfig = ClusterConfig()
    """Dask cluster."""

    @property
    def notices(self) -> list[str]:
        """One line per accepted but ignored setting (Leopard-EM keys that dtm does not use)."""
        return _notices(self)


_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "model_type": "expected a section (a mapping of settings)",
    "model_attributes_type": "expected a section (a mapping of settings)",
    "path_type": "expected a file path",
}


def format_validation_error(err: pydantic.ValidationError, source: str) -> str:
    """One line ``<source>: <dotted.field>: <problem> (got <value>)`` describing the first
    problem of ``err``, with the number of further problems."""
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"] if part not in (_ONE_GRID, _SEVERAL_GRIDS)]
        cause = problem.get("ctx", {}).get("error")
        message, value, show_value = problem["msg"], problem.get("input"), True
        if isinstance(cause, _Problem):
            loc += [part for part in cause.field.split(".") if part]
            message, value, show_value = str(cause), cause.value, cause.value is not None
        elif problem["type"] in _PLAIN_MESSAGES:
            message = _PLAIN_MESSAGES[problem["type"]]
        elif problem["type"] == "missing":
            message, show_value = "required setting missing", False
        where = f"{source}: {'.'.join(loc)}: " if loc else f"{source}: "
        got = f" (got {_show(value)})" if show_value else ""
        lines.append(where + message.removeprefix("Value error, ") + got)
    more = len(lines) - 1
    return lines[0] + (f" [and {more} more problem{'s' * (more > 1)}]" if more else "")


_PATH_KEYS = frozenset(
    {
        "micrograph_path",
        "micrograph_table",
        "template_volume_path",
        "output_dir",
        "output_path",
        "df_path",
        *_MAP_FIELDS.values(),
    }
)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {exc.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings (got {_show(data)})"
        )
    return data


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in ``data``; relative paths become absolute against the cwd."""
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"command line: {key}: {section} is not a section (got {_show(child)})"
                )
            node = child
        if leaf in _PATH_KEYS and isinstance(value, str | Path):
            value = str(Path(value).absolute())
        node[leaf] = value


def _load(model: type[Any], path: str | Path, overrides: dict[str, Any] | None) -> Any:
    path, overrides = Path(path), overrides or {}
    data = _read_yaml(path)
    _apply_overrides(data, overrides)
    try:
        return model.model_validate(data, context={"base_dir": path.parent.absolute()})
    except pydantic.ValidationError as err:
        line = format_validation_error(err, str(path)).removeprefix(f"{path}: ")
        field = line.split(":")[0]
        overridden = any(field == key or field.startswith(key + ".") for key in overrides)
        raise ConfigError(f"{'command line' if overridden else path}: {line}") from None


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


def load_refine_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RefineConfig:
    """Load and validate a ``dtm refine`` (or Leopard-EM ``refine_template``) YAML file.

    Parameters, returns and errors as :func:`load_match_config`.
    """
    config: RefineConfig = _load(RefineConfig, path, overrides)
    return config


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The configuration as JSON-safe builtins (paths as strings), defaults included."""
    data: dict[str, Any] = config.model_dump(mode="json")
    return data


def config_hash(config: BaseModel, keys: list[str] | None = None) -> str:
    """SHA-256 (hex) of the configuration's JSON, or of its top-level ``keys`` only."""
    data = config_to_dict(config)
    if keys is not None:
        data = {key: data.get(key) for key in keys}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
