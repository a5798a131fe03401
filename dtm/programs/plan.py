"""Planning a match run: validated micrographs, sampling, chunk size, fingerprint, attributes.

Everything here runs on the client before any task is submitted or any file is written, so a
bad input stops the run with nothing touched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import dtm
from dtm.config import MatchConfig, MicrographEntry, config_to_dict
from dtm.errors import ConfigError, DtmError, OutputError
from dtm.io.mrc import MrcData, check_compatible, read_micrograph, summarise_notices
from dtm.io.rundir import file_digest
from dtm.physics.aberrations import as_mag_matrix, as_zernikes
from dtm.physics.resample import cropped_size
from dtm.schema import OPTICS_FIELDS
from dtm.search.prepare import Optics
from dtm.search.space import SearchSpace

#: Pixel-correlations (FFT size × correlations) per task: a few seconds on one CPU core.
TARGET_TASK_WORK = 2.5e8
#: A search is cut into at least this many tasks when it has enough orientations.
MIN_TASKS = 32


#: Most orientations in one search (the orientation table alone takes 24 bytes each; a
#: full C1 search at 1.5°/2.5° has 1.6 million).
MAX_ORIENTATIONS = 50_000_000
#: Most relative defocus planes (a full search has 11 to 13).
MAX_DEFOCUS_PLANES = 1000
#: Most correlations of a whole run, over all micrographs (10¹² is about 20 years of one
#: H100 at 1,650 correlations/s).
MAX_CORRELATIONS = 1e12
#: Bytes per map position that a task and the merge tree hold: the statistics (mip,
#: argmax, Σ, Σ²: 28 bytes) of the task and of up to ``split_every`` inputs of a merge.
_STATS_BYTES = 28


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


def _bytes(n_bytes: float) -> str:
    """``1.5 GiB``, ``300 MiB``, ``1000 B``: readable at any size."""
    from dask.utils import format_bytes

    return str(format_bytes(int(n_bytes)))


def check_search_size(config: MatchConfig, n_micrographs: int) -> None:
    """Refuse a search too large to run, from the configuration alone (nothing allocated).

    Raises
    ------
    ConfigError
        One line: how large the search is, the limit, and which key to change.
    """
    grid = "orientation_search_config"
    n_orientations = config.orientation_search_config.estimated_count()
    if n_orientations > MAX_ORIENTATIONS:
        raise ConfigError(
            f"{grid}: about {n_orientations:.3g} orientations, more than the limit of "
            f"{MAX_ORIENTATIONS:,}; increase {grid}.psi_step or theta_step"
        )
    n_defocus = config.defocus_search_config.count()
    if n_defocus > MAX_DEFOCUS_PLANES:
        raise ConfigError(
            f"defocus_search_config: {n_defocus:.3g} defocus planes, more than the limit of "
            f"{MAX_DEFOCUS_PLANES:,}; increase defocus_search_config.defocus_step"
        )
    total = n_orientations * n_defocus * n_micrographs
    if total > MAX_CORRELATIONS:
        raise ConfigError(
            f"search: about {total:.3g} correlations ({n_orientations:.3g} orientations × "
            f"{n_defocus} defocus planes × {n_micrographs} micrographs), more than the limit "
            f"of {MAX_CORRELATIONS:.0e}; increase {grid}.psi_step or theta_step or "
            "defocus_search_config.defocus_step, or search fewer micrographs per run"
        )


def worker_memory(config: MatchConfig, scheduler_address: str | None) -> float | None:
    """Bytes of memory one worker may use, where it is known before the cluster starts:
    ``cluster.memory_limit`` or ``memory``, else this machine's for a local cluster."""
    from dask.utils import parse_bytes
    from distributed.system import MEMORY_LIMIT

    cluster = config.cluster
    given = cluster.memory_limit or cluster.memory
    if given:
        try:
            return float(parse_bytes(given))
        except (ValueError, TypeError):
            return None
    if scheduler_address is None and cluster.kind in ("local", "gpu-local"):
        return float(MEMORY_LIMIT)
    return None


def connected_worker_memory(client: Any) -> float | None:
    """The smallest memory limit of the workers connected to ``client`` (None: none set)."""
    try:
        workers = client.scheduler_info().get("workers", {})
    except Exception:  # an unreachable scheduler fails later, with its own message
        return None
    limits = [float(w.get("memory_limit") or 0) for w in workers.values()]
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else None


def check_disk_space(output_dir: Path, map_shapes: list[tuple[int, int]]) -> None:
    """Refuse a run whose maps (eight float32 maps per micrograph, as ``.mrc`` and in
    ``results.zarr``) would not fit in the free space of ``output_dir``'s file system."""
    import shutil

    needed = sum(2 * 8 * 4 * height * width for height, width in map_shapes)
    existing = Path(output_dir).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if needed > free:
        raise ConfigError(
            f"output_dir {output_dir}: the maps of {len(map_shapes)} micrograph(s) need about "
            f"{_gib(needed)}, more than the {_gib(free)} free there; choose another output_dir "
            "or search fewer micrographs per run"
        )


def check_search_memory(
    config: MatchConfig,
    n_orientations: float,
    fft_shape: tuple[int, int],
    map_shape: tuple[int, int],
    memory: float | None,
) -> None:
    """Refuse a search whose tasks cannot fit in a worker's ``memory`` (bytes; None:
    unknown, not checked) or whose orientation table cannot fit in this machine's."""
    from distributed.system import MEMORY_LIMIT

    n_defocus = config.defocus_search_config.count()
    spectrum = fft_shape[0] * (fft_shape[1] // 2 + 1)
    positions = map_shape[0] * map_shape[1]
    per_task = (
        spectrum * (8 + 4 * n_defocus)  # image spectrum, one filter per defocus plane
        + n_defocus * fft_shape[0] * fft_shape[1] * 4  # one orientation's correlations
        + _STATS_BYTES * positions * (config.cluster.split_every + 1)
    )
    table = 24 * n_orientations
    if memory is not None:
        check_worker_memory(
            per_task, memory, f"{n_defocus} defocus planes of {fft_shape[0]}×{fft_shape[1]} pixels"
        )
    if table > MEMORY_LIMIT:
        raise ConfigError(
            f"orientation_search_config: the table of {n_orientations:.3g} orientations "
            f"needs {_gib(table)}, more than this machine's {_gib(MEMORY_LIMIT)}; increase "
            "orientation_search_config.psi_step or theta_step"
        )


#: Memory of an idle worker process with dtm's task modules imported (Python, numpy,
#: scipy, distributed: about 150 MB measured; rounded up).
WORKER_BASE_BYTES = 256 * 2**20


def check_worker_memory(per_task: float, memory: float, what: str) -> None:
    """Refuse workers whose memory limit cannot hold one task: Dask pauses a worker whose
    process uses more than ``distributed.worker.memory.pause`` (80 %) of its limit, and a
    worker paused for ever makes a run hang.

    Raises
    ------
    ConfigError
        One line naming the task's need, the workers' limit and what to change.
    """
    import dask

    pause = dask.config.get("distributed.worker.memory.pause", 0.8) or 1.0
    needed = (WORKER_BASE_BYTES + per_task) / float(pause)
    if needed > memory:
        raise ConfigError(
            f"cluster.memory_limit: {_bytes(memory)} per worker, but a task needs about "
            f"{_bytes(per_task)} ({what}) on top of the worker process's own "
            f"{_bytes(WORKER_BASE_BYTES)}: more than the {float(pause):.0%} of the limit at "
            f"which Dask pauses a worker; set cluster.memory_limit to at least "
            f"{_bytes(needed)}, or search smaller micrographs (high_resolution_limit) or "
            "fewer defocus planes (defocus_search_config)"
        )


@dataclass
class MicrographPlan:
    """One micrograph of a run and its fate."""

    entry: MicrographEntry
    optics: Optics
    image_shape: tuple[int, int] = (0, 0)
    #: Å per pixel along y and x as searched: after Fourier cropping to an even size per
    #: axis, within about 1/size of the template's pixel size, not equal to it.
    axis_pixel_size: tuple[float, float] | None = None
    status: str = "pending"
    error: str | None = None
    seconds: float | None = None
    #: blake2b of the file's bytes (None: unreadable): resume recomputes a changed file.
    digest: str | None = None
    #: Correlate tasks of this micrograph that this run computed.
    tasks_computed: int = 0

    @property
    def name(self) -> str:
        return str(self.entry.name)


def auto_chunk_size(space: SearchSpace, fft_shape: tuple[int, int], device: str = "cpu") -> int:
    """Orientations per task: a few seconds of work, and at least ``MIN_TASKS`` tasks.

    It depends on the problem only (never on the number of workers), so a resumed run on a
    different cluster cuts the search the same way. A GPU computes ~1000 times faster than
    a CPU core while each task still costs one transfer and merge of its statistics maps
    (28 bytes per position), so its tasks are 1000 times larger.
    """
    work = TARGET_TASK_WORK * (1000 if device == "gpu" else 1)
    per_orientation = fft_shape[0] * fft_shape[1] * space.n_defocus
    by_work = max(1, int(work // per_orientation))
    by_count = max(1, -(-space.n_orientations // MIN_TASKS))
    return min(by_work, by_count)


def micrograph_optics(config: MatchConfig, entry: MicrographEntry) -> Optics:
    group = config.optics_group
    return Optics(
        pixel_size=group.pixel_size,
        voltage=group.voltage,
        spherical_aberration=group.spherical_aberration,
        amplitude_contrast_ratio=group.amplitude_contrast_ratio,
        defocus_u=entry.defocus_u,
        defocus_v=entry.defocus_v,
        astigmatism_angle=entry.astigmatism_angle,
        phase_shift=float(entry.phase_shift or 0.0),
        ctf_B_factor=group.ctf_B_factor,
        even_zernikes=as_zernikes(group.even_zernikes, kind="even"),
        odd_zernikes=as_zernikes(group.odd_zernikes, kind="odd"),
        mag_matrix=as_mag_matrix(group.mag_matrix),
    )


def validate_micrographs(
    config: MatchConfig, template: MrcData, strict: bool, out: TextIO
) -> list[MicrographPlan]:
    """Read and check every micrograph; a bad one fails the run or is skipped."""
    entries = config.micrograph_entries()
    plans, notices = [], []
    pixel_size = config.optics_group.pixel_size
    for entry in entries:
        plan = MicrographPlan(entry, micrograph_optics(config, entry))
        try:
            micrograph = read_micrograph(entry.micrograph_path, pixel_size=pixel_size)
            notices += check_compatible(micrograph, template, pixel_size=pixel_size, strict=strict)
            plan.image_shape = (int(micrograph.data.shape[0]), int(micrograph.data.shape[1]))
            # Only a file that was read whole is hashed (from the page cache, just read); an
            # unreadable one has none, so that once fixed it counts as changed.
            plan.digest = content_digest(entry.micrograph_path)
        except DtmError as exc:
            if strict or len(entries) == 1:
                raise
            plan.status, plan.error = "failed", str(exc)
            print(f"skipped: {exc}", file=out)
        plans.append(plan)
    for line in summarise_notices(notices):
        print(f"notice: {line}", file=out)
    return plans


def content_digest(path: str | Path) -> str | None:
    """A fast hash (blake2b, 128 bits) of a file's bytes; None when it cannot be read.

    Content, not time stamps: a ``touch`` or a copy keeps it, a replaced file changes it.
    """
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    except OSError:
        return None


def fingerprint(
    config: MatchConfig, plans: list[MicrographPlan], chunk_size: int
) -> dict[str, Any]:
    """The parts of a run that determine its maps (compared on ``--resume``)."""
    cfg = config_to_dict(config)
    optics = {k: v for k, v in cfg["optics_group"].items() if k != "label"}
    table = config.table_settings()
    return {
        "template": file_digest(config.template_path),
        "micrographs": {
            p.name: {**p.entry.model_dump(mode="json"), "digest": p.digest} for p in plans
        },
        "optics_group": optics,
        "orientation_search_config": cfg["orientation_search_config"],
        "defocus_search_config": cfg["defocus_search_config"],
        "preprocessing_filters": cfg["preprocessing_filters"],
        "correlation_mode": config.correlation_mode,
        "high_resolution_limit": config.high_resolution_limit,
        "chunk_size": chunk_size,
        "split_every": config.cluster.split_every,
        # Checkpoints hold the table's rows: a resumed run must keep the same cut-off.
        "correlation_table_cutoff": None if table is None else table[0],
    }


def dataset_attrs(
    config: MatchConfig, plan: MicrographPlan, sampling: Sampling, space: SearchSpace, start: str
) -> dict[str, Any]:
    optics = plan.optics
    return {
        "micrograph_name": plan.name,
        "micrograph_path": str(plan.entry.micrograph_path),
        "template_path": str(config.template_path),
        "template_simulation": config.template_record(),
        # With high_resolution_limit, maps and positions are at the cropped pixel size.
        "pixel_size": optics.pixel_size,
        "axis_pixel_size": list(plan.axis_pixel_size or (optics.pixel_size,) * 2),
        "original_pixel_size": config.optics_group.pixel_size,
        "high_resolution_limit": config.high_resolution_limit,
        "template_shape": [sampling.box[0]] * 3,
        "image_shape": list(plan.image_shape),
        "correlation_mode": config.correlation_mode,
        "total_orientations": space.n_orientations,
        "total_defocus": space.n_defocus,
        "total_correlations": space.n_correlations,
        **{name: getattr(optics, name) for name in OPTICS_FIELDS if name != "pixel_size"},
        **aberration_attrs(optics),
        "config": json.dumps(config_to_dict(config)),
        "dtm_version": dtm.__version__,
        "start_time": start,
    }


def aberration_attrs(optics: Optics) -> dict[str, Any]:
    """The Leopard-EM aberrations of ``optics`` that are set, as dataset attributes
    (``even_zernikes``/``odd_zernikes`` dicts, ``mag_matrix`` a list); results without
    them have none."""
    attrs: dict[str, Any] = {}
    for name in ("even_zernikes", "odd_zernikes"):
        value = getattr(optics, name)
        if value is not None:
            attrs[name] = dict(value)
    if optics.mag_matrix is not None:
        attrs["mag_matrix"] = list(optics.mag_matrix)
    return attrs


#: Fewest pixels across a Fourier-cropped template: below it a search finds only blobs.
MIN_CROPPED_BOX = 16


@dataclass(frozen=True)
class Sampling:
    """Pixel size and shapes the search runs at (smaller with ``high_resolution_limit``)."""

    pixel_size: float
    box: tuple[int, int]
    crop_pixel_size: float | None = None

    def image_shape(self, shape: tuple[int, int], pixel_size: float) -> tuple[int, int]:
        if self.crop_pixel_size is None:
            return shape
        return (
            cropped_size(shape[0], pixel_size, self.crop_pixel_size),
            cropped_size(shape[1], pixel_size, self.crop_pixel_size),
        )


def sampling_for(config: MatchConfig, template: MrcData) -> Sampling:
    """Fourier cropping to ``high_resolution_limit``: the template fixes the new pixel size.

    Raises
    ------
    ConfigError
        If the limit would leave the template fewer than :data:`MIN_CROPPED_BOX` pixels wide.
    """
    d = int(template.data.shape[-1])
    pixel_size = config.optics_group.pixel_size
    limit = config.high_resolution_limit
    cropped = d if limit is None else cropped_size(d, pixel_size, limit / 2)
    if cropped == d:
        return Sampling(pixel_size, (d, d))
    if cropped < MIN_CROPPED_BOX:
        raise ConfigError(
            f"high_resolution_limit: {limit:g} Å would leave the {d}-pixel template "
            f"{cropped} pixels wide (at least {MIN_CROPPED_BOX}); choose a finer limit"
        )
    # The cropped template's exact pixel size; micrographs are cropped to match it.
    new_pixel_size = pixel_size * d / cropped
    return Sampling(new_pixel_size, (cropped, cropped), new_pixel_size)


def check_leopard_paths(config: MatchConfig, replace: bool) -> None:
    """Leopard-EM's ``allow_file_overwrite: false`` protects its map paths."""
    result = config.match_template_result
    if result is None or result.allow_file_overwrite or replace:
        return
    paths = [*result.map_paths().values(), result.correlation_table_path]
    existing = [str(path) for path in paths if path is not None and Path(path).exists()]
    if existing:
        raise OutputError(
            f"match_template_result: {existing[0]} exists and allow_file_overwrite is false "
            "(use --overwrite to replace it)"
        )


def resolve_device(config: MatchConfig, device: str | None, out: TextIO) -> str:
    """The array backend: ``--device``, else ``cluster.device``, else Leopard-EM's ``gpu_ids``.

    A Leopard-EM file asks for GPU 0 by default; where no GPU works, dtm runs it on the CPU
    with a notice rather than refusing a file that ran elsewhere.
    """
    if device is not None:
        return device
    if "device" in config.cluster.model_fields_set or config.computational_config is None:
        return config.cluster.device
    wanted = config.computational_config.device
    if wanted == "gpu" and config.computational_config.gpu_indices():
        print(
            "notice: computational_config.gpu_ids: dtm uses every GPU its workers see; "
            "choose GPUs with CUDA_VISIBLE_DEVICES",
            file=out,
        )
    if wanted == "gpu":
        from dtm.runtime.cluster import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason is not None:
            print(
                f"notice: computational_config.gpu_ids asks for a GPU, none works here "
                f"({reason}): running on the CPU",
                file=out,
            )
            return "cpu"
    return wanted
