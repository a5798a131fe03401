"""The match-template program: plan a search, run it on Dask, persist and pick peaks.

``match_template`` validates every input before anything is written, then builds one graph
for all micrographs (their tasks interleave on the cluster), runs it with a progress bar,
writes each micrograph's maps as soon as its tree is complete, and finally picks peaks into
one table over all micrographs.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import dask
import distributed
import numpy as np
import xarray as xr

import dtm
from dtm.cluster import session
from dtm.config import MatchConfig, MicrographEntry, config_to_dict, load_match_config
from dtm.errors import DtmError, InputError, OutputError
from dtm.io.mrc import MrcData, check_compatible, read_micrograph, read_template
from dtm.io.store import open_results, write_json
from dtm.jobfile import clear_outputs, file_digest, prepare_output, write_job
from dtm.physics.resample import cropped_size
from dtm.progress import Progress, format_duration
from dtm.search import tasks
from dtm.search.graph import search_graph, token
from dtm.search.prepare import Optics, fft_shape_for
from dtm.search.space import SearchSpace

#: Pixel-correlations (FFT size × correlations) per task: a few seconds on one CPU core.
TARGET_TASK_WORK = 2.5e8
#: A search is cut into at least this many tasks when it has enough orientations.
MIN_TASKS = 32


@dataclass
class MicrographPlan:
    """One micrograph of a run and its fate."""

    entry: MicrographEntry
    optics: Optics
    image_shape: tuple[int, int] = (0, 0)
    status: str = "pending"
    error: str | None = None
    seconds: float | None = None

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


def _optics(config: MatchConfig, entry: MicrographEntry) -> Optics:
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
    )


def _validate_micrographs(
    config: MatchConfig, template: MrcData, strict: bool, out: TextIO
) -> list[MicrographPlan]:
    """Read and check every micrograph; a bad one fails the run or is skipped."""
    entries = config.micrograph_entries()
    plans = []
    for entry in entries:
        plan = MicrographPlan(entry, _optics(config, entry))
        try:
            micrograph = read_micrograph(entry.micrograph_path)
            check_compatible(micrograph, template, pixel_size=config.optics_group.pixel_size)
            plan.image_shape = (int(micrograph.data.shape[0]), int(micrograph.data.shape[1]))
        except DtmError as exc:
            if strict or len(entries) == 1:
                raise
            plan.status, plan.error = "failed", str(exc)
            print(f"skipped: {exc}", file=out)
        plans.append(plan)
    return plans


def _fingerprint(
    config: MatchConfig, plans: list[MicrographPlan], chunk_size: int
) -> dict[str, Any]:
    """The parts of a run that determine its maps (compared on ``--resume``)."""
    cfg = config_to_dict(config)
    optics = {k: v for k, v in cfg["optics_group"].items() if k != "label"}
    return {
        "template": file_digest(config.template_volume_path),
        "micrographs": {
            p.name: {**p.entry.model_dump(mode="json"), "status_ok": p.status != "failed"}
            for p in plans
        },
        "optics_group": optics,
        "orientation_search_config": cfg["orientation_search_config"],
        "defocus_search_config": cfg["defocus_search_config"],
        "preprocessing_filters": cfg["preprocessing_filters"],
        "correlation_mode": config.correlation_mode,
        "high_resolution_limit": config.high_resolution_limit,
        "chunk_size": chunk_size,
        "split_every": config.cluster.split_every,
    }


def _attrs(
    config: MatchConfig, plan: MicrographPlan, sampling: Sampling, space: SearchSpace, start: str
) -> dict[str, Any]:
    optics = plan.optics
    return {
        "micrograph_name": plan.name,
        "micrograph_path": str(plan.entry.micrograph_path),
        "template_path": str(config.template_volume_path),
        # With high_resolution_limit, maps and positions are at the cropped pixel size.
        "pixel_size": optics.pixel_size,
        "original_pixel_size": config.optics_group.pixel_size,
        "high_resolution_limit": config.high_resolution_limit,
        "template_shape": [sampling.box[0]] * 3,
        "image_shape": list(plan.image_shape),
        "correlation_mode": config.correlation_mode,
        "total_orientations": space.n_orientations,
        "total_defocus": space.n_defocus,
        "total_correlations": space.n_correlations,
        "defocus_u": optics.defocus_u,
        "defocus_v": optics.defocus_v,
        "astigmatism_angle": optics.astigmatism_angle,
        "voltage": optics.voltage,
        "spherical_aberration": optics.spherical_aberration,
        "amplitude_contrast_ratio": optics.amplitude_contrast_ratio,
        "phase_shift": optics.phase_shift,
        "ctf_B_factor": optics.ctf_B_factor,
        "config": json.dumps(config_to_dict(config)),
        "dtm_version": dtm.__version__,
        "start_time": start,
    }


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


def _sampling(config: MatchConfig, template: MrcData) -> Sampling:
    """Fourier cropping to ``high_resolution_limit``: the template fixes the new pixel size."""
    d = int(template.data.shape[-1])
    pixel_size = config.optics_group.pixel_size
    limit = config.high_resolution_limit
    cropped = d if limit is None else cropped_size(d, pixel_size, limit / 2)
    if cropped == d:
        return Sampling(pixel_size, (d, d))
    # The cropped template's exact pixel size; micrographs are cropped to match it.
    new_pixel_size = pixel_size * d / cropped
    return Sampling(new_pixel_size, (cropped, cropped), new_pixel_size)


def _check_leopard_paths(config: MatchConfig, replace: bool) -> None:
    """Leopard-EM's ``allow_file_overwrite: false`` protects its map paths."""
    result = config.match_template_result
    if result is None or result.allow_file_overwrite or replace:
        return
    existing = [str(path) for path in result.map_paths().values() if Path(path).exists()]
    if existing:
        raise OutputError(
            f"match_template_result: {existing[0]} exists and allow_file_overwrite is false "
            "(use --overwrite to replace it)"
        )


def _resolve_device(config: MatchConfig, device: str | None, out: TextIO) -> str:
    """The array backend: ``--device``, else ``cluster.device``, else Leopard-EM's ``gpu_ids``.

    A Leopard-EM file asks for GPU 0 by default; where no GPU works, dtm runs it on the CPU
    with a notice rather than refusing a file that ran elsewhere.
    """
    if device is not None:
        return device
    if "device" in config.cluster.model_fields_set or config.computational_config is None:
        return config.cluster.device
    wanted = config.computational_config.device
    if wanted == "gpu":
        from dtm.cluster import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason is not None:
            print(
                f"notice: computational_config.gpu_ids asks for a GPU, none works here "
                f"({reason}): running on the CPU",
                file=out,
            )
            return "cpu"
    return wanted


def _versions() -> dict[str, str]:
    import mrcfile
    import pandas
    import scipy
    import zarr

    modules = {
        "dtm": dtm,
        "numpy": np,
        "scipy": scipy,
        "dask": dask,
        "distributed": distributed,
        "xarray": xr,
        "zarr": zarr,
        "pandas": pandas,
        "mrcfile": mrcfile,
    }
    return {name: str(getattr(mod, "__version__", "?")) for name, mod in modules.items()}


def match_template(
    config: MatchConfig | str | Path,
    client: distributed.Client | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    device: str | None = None,
    out: TextIO | None = None,
) -> xr.Dataset | dict[str, xr.Dataset]:
    """Run a 2DTM search of one or many micrographs on a Dask cluster.

    Parameters
    ----------
    config : MatchConfig or path
        Validated configuration, or the path of its YAML file.
    client : distributed.Client, optional
        Client of a running cluster; by default the configuration's ``cluster`` section (an
        embedded ``LocalCluster`` unless it says otherwise) is started and closed here.
    resume, overwrite : bool
        Continue an interrupted run in ``output_dir`` / replace its results.
    strict : bool
        Fail on the first bad micrograph instead of skipping it.
    scheduler_address, n_workers, device
        Overrides of the ``cluster`` section (command-line options).
    out : file, optional
        Where the summary and progress lines are printed (default: standard output).

    Returns
    -------
    xarray.Dataset or dict of str to xarray.Dataset
        The results (lazily opened from ``output_dir/results.zarr``): one dataset for a
        single micrograph, else one per micrograph name.
    """
    out = sys.stdout if out is None else out
    if not isinstance(config, MatchConfig):
        config = load_match_config(config)
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    output_dir = Path(config.output_dir)
    template = read_template(config.template_volume_path)
    plans = _validate_micrographs(config, template, strict, out)
    space = SearchSpace(
        euler=config.orientation_search_config.grid(),
        defocus=config.defocus_search_config.values(),
    )
    valid = [p for p in plans if p.status != "failed"]
    if not valid:
        raise InputError("no micrograph could be read: see the lines above")
    sampling = _sampling(config, template)
    for plan in valid:
        plan.image_shape = sampling.image_shape(plan.image_shape, plan.optics.pixel_size)
        plan.optics = replace(plan.optics, pixel_size=sampling.pixel_size)
    fft_shape = fft_shape_for(valid[0].image_shape, sampling.box, config.correlation_mode)
    run_device = _resolve_device(config, device, out)
    chunk_size = config.cluster.chunk_size or auto_chunk_size(space, fft_shape, run_device)
    fingerprint = _fingerprint(config, plans, chunk_size)
    previous = prepare_output(output_dir, fingerprint, resume=resume, overwrite=overwrite)
    _check_leopard_paths(config, overwrite or resume)
    done = _completed_from_report(output_dir) if previous is not None else set()

    chunks = space.chunks(chunk_size)
    print(
        f"search: {space.n_orientations:,} orientations × {space.n_defocus} defocus planes = "
        f"{space.n_correlations:,} correlations per micrograph; {len(plans)} micrograph(s); "
        f"{len(chunks)} tasks of ≤ {chunk_size} orientations each",
        file=out,
    )
    if sampling.crop_pixel_size is not None:
        print(
            f"high_resolution_limit {config.high_resolution_limit:g} Å: searching at "
            f"{sampling.pixel_size:.4g} Å/pixel, template box {sampling.box[0]}",
            file=out,
        )
    with session(
        client,
        config.cluster,
        out=out,
        scheduler_address=scheduler_address,
        n_workers=n_workers,
        device=run_device,
    ) as client:
        # Only now, with valid inputs and a cluster, may the earlier results go.
        if overwrite:
            clear_outputs(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_job(output_dir, config_to_dict(config), fingerprint)
        tasks_run = _run(
            client, config, plans, sampling, space, chunks, done, output_dir, start, run_device, out
        )
        _write_peaks(config, output_dir, out)
    wall = time.perf_counter() - t0
    n_searched = sum(1 for p in plans if p.status == "done")
    rate = n_searched * space.n_correlations / wall if wall > 0 else 0.0
    _write_report(output_dir, plans, wall, (tasks_run, len(chunks) * len(valid)))
    print(
        f"finished in {format_duration(wall)} ({rate:,.0f} correlations/s overall); "
        f"results in {output_dir}/ (results.zarr, maps/, peaks.csv, run.json)",
        file=out,
    )
    failed = [p for p in plans if p.status == "failed"]
    if failed:
        print(f"{len(failed)} micrograph(s) skipped: see {output_dir / 'run.json'}", file=out)
    results = open_results(output_dir)
    return next(iter(results.values())) if len(plans) == 1 else results


def _completed_from_report(output_dir: Path) -> set[str]:
    path = output_dir / "run.json"
    if not path.exists():
        return set()
    report = json.loads(path.read_text())
    return {
        name for name, item in report.get("micrographs", {}).items() if item["status"] == "done"
    }


def _run(
    client: distributed.Client,
    config: MatchConfig,
    plans: list[MicrographPlan],
    sampling: Sampling,
    space: SearchSpace,
    chunks: list[tuple[int, int]],
    done: set[str],
    output_dir: Path,
    start: str,
    device: str,
    out: TextIO,
) -> int:
    """Build one graph for every micrograph still to search, run it, record each outcome."""
    single = len(plans) == 1
    template_node = dask.delayed(tasks.load_template)(
        str(config.template_volume_path),
        sampling.crop_pixel_size,
        dask_key_name="prepare-template",
    )
    [space_future] = client.scatter([space], broadcast=False, hash=False)
    filters = config.preprocessing_filters.settings(sampling.pixel_size)
    roots, n_tasks, todo = [], 0, []
    for plan in plans:
        if plan.status == "failed":
            continue
        if plan.name in done:
            plan.status = "done"
            continue
        tok = token(plan.name)
        job = tasks.MicrographTask(
            plan.name,
            str(plan.entry.micrograph_path),
            plan.optics,
            sampling.box,
            filters,
            config.correlation_mode,
            sampling.crop_pixel_size,
        )
        image_node = dask.delayed(tasks.load_micrograph)(
            job, space.defocus, dask_key_name=f"prepare-{tok}"
        )
        tree, n_leaves = search_graph(
            plan.name,
            image_node,
            template_node,
            space_future,
            chunks,
            split_every=config.cluster.split_every,
            checkpoint_dir=output_dir / "checkpoints" / tok,
            device=device,
        )
        extra = config.match_template_result.map_paths() if config.match_template_result else None
        root = dask.delayed(tasks.persist)(
            tree,
            space_future,
            output_dir=str(output_dir),
            group=None if single else plan.name,
            prefix="" if single else f"{plan.name}_",
            pixel_size=plan.optics.pixel_size,
            attrs=_attrs(config, plan, sampling, space, start),
            extra_paths={k: str(v) for k, v in extra.items()} if (extra and single) else None,
            dask_key_name=f"persist-{tok}",
        )
        roots.append(root)
        todo.append(plan)
        n_tasks += n_leaves
    if not roots:
        return 0
    per_task = space.n_correlations / max(len(chunks), 1)
    if n_tasks < len(chunks) * len(todo):
        print(
            f"resuming: {len(chunks) * len(todo) - n_tasks} of {len(chunks) * len(todo)} "
            "tasks restored from checkpoints",
            file=out,
        )
    futures = client.compute(roots)
    plan_of = {future.key: plan for future, plan in zip(futures, todo, strict=True)}
    started = time.perf_counter()
    with Progress(client, n_tasks, per_task, stream=out):
        for future in distributed.as_completed(futures):
            plan = plan_of[future.key]
            try:
                future.result()
                plan.status = "done"
                shutil.rmtree(output_dir / "checkpoints" / token(plan.name), ignore_errors=True)
            except DtmError as exc:
                if len(plans) == 1:
                    raise
                plan.status, plan.error = "failed", str(exc)
            plan.seconds = time.perf_counter() - started
            _write_report(output_dir, plans, None)
    return n_tasks


def _write_peaks(config: MatchConfig, output_dir: Path, out: TextIO) -> None:
    """Pick peaks in every micrograph's maps and write one table over all of them."""
    from dtm.peaks import repick

    peaks = config.peaks
    table = repick(
        output_dir,
        false_positives=peaks.false_positives,
        z_score_cutoff=peaks.z_score_cutoff,
        min_distance=_min_distance_pixels(config),
        border=peaks.border_pixels,
    )
    print(f"peaks: {len(table)} above threshold", file=out)


def _min_distance_pixels(config: MatchConfig) -> float | None:
    peaks = config.peaks
    if peaks.min_distance_angstrom is not None:
        return peaks.min_distance_angstrom / config.optics_group.pixel_size
    return peaks.min_distance_pixels


def _write_report(
    output_dir: Path,
    plans: list[MicrographPlan],
    wall: float | None,
    tasks: tuple[int, int] | None = None,
) -> None:
    """``run.json``: per micrograph status, timing and error; versions."""
    write_json(
        output_dir / "run.json",
        {
            "finished": wall is not None,
            "wall_seconds": wall,
            # Correlate tasks computed by this invocation / in the whole search.
            "tasks_computed": None if tasks is None else tasks[0],
            "tasks_total": None if tasks is None else tasks[1],
            "versions": _versions(),
            "micrographs": {
                p.name: {
                    "path": str(p.entry.micrograph_path),
                    "status": p.status,
                    "seconds": p.seconds,
                    "error": p.error,
                }
                for p in plans
            },
        },
    )
