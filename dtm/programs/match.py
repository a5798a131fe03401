"""The match-template program: plan a search, run it on Dask, persist and pick peaks.

``match_template`` validates every input before anything is written, then builds one graph
for all micrographs (their tasks interleave on the cluster), runs it with a progress bar,
writes each micrograph's maps as soon as its tree is complete, and finally picks peaks into
one table over all micrographs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import distributed
import xarray as xr

from dtm.config import MatchConfig, config_to_dict, load_match_config
from dtm.errors import DtmError, InputError, Interrupted
from dtm.io.atomic import remove_output
from dtm.io.correlation_table import count_rows, export_correlation_table, table_files
from dtm.io.mrc import read_template
from dtm.io.rundir import (
    changed_micrographs,
    check_inputs_not_outputs,
    check_output_dir,
    clear_outputs,
    completed_micrographs,
    micrograph_outputs,
    output_lock,
    prepare_output,
    read_job,
    recorded_outputs,
    recorded_statuses,
    run_outputs,
    write_job,
)
from dtm.io.store import open_results
from dtm.programs.plan import (
    MicrographPlan,
    auto_chunk_size,
    check_disk_space,
    check_leopard_paths,
    check_search_memory,
    check_search_size,
    connected_worker_memory,
    fingerprint,
    resolve_device,
    sampling_for,
    validate_micrographs,
    worker_memory,
)
from dtm.programs.record import saved, stopped_run, write_run_report
from dtm.programs.submit import Search, checkpoint_dir, run_search
from dtm.programs.template import search_template
from dtm.runtime.cluster import QUEUED_KINDS, WORKER_TIMEOUT_S, resolve_kind, session
from dtm.runtime.progress import format_duration
from dtm.schema import PEAK_TABLES, TABLE_DIR, token
from dtm.search.prepare import fft_shape_for
from dtm.search.space import SearchSpace


@dataclass
class MatchOutcome:
    """What a ``dtm match`` run did: its output directory and each micrograph's fate."""

    output_dir: Path
    plans: list[MicrographPlan]

    @property
    def failed(self) -> list[MicrographPlan]:
        """The micrographs that could not be searched (their ``error`` says why)."""
        return [plan for plan in self.plans if plan.status == "failed"]


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
        single micrograph, else one per micrograph name (micrographs that failed are
        missing: ``run.json`` lists them).

    Raises
    ------
    DtmError
        A bad input or configuration (nothing was run).
    RunStopped
        The cluster or the output disk failed mid-run (scheduler or workers lost, disk
        full, no progress): what happened and what was saved; ``resume=True`` continues.
    """
    outcome = run_match(
        config,
        client,
        resume=resume,
        overwrite=overwrite,
        strict=strict,
        scheduler_address=scheduler_address,
        n_workers=n_workers,
        device=device,
        out=out,
    )
    results = open_results(outcome.output_dir)
    return next(iter(results.values())) if len(outcome.plans) == 1 else results


def run_match(
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
) -> MatchOutcome:
    """:func:`match_template` without opening the results: what the ``dtm match`` command
    runs (its exit status comes from the outcome)."""
    out = sys.stdout if out is None else out
    if not isinstance(config, MatchConfig):
        config = load_match_config(config)
    start = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    output_dir = Path(config.output_dir)
    check_search_size(config, len(config.micrograph_entries()))
    config = search_template(config, resume=resume, overwrite=overwrite, out=out, client=client)
    template = read_template(config.template_path, pixel_size=config.optics_group.pixel_size)
    plans = validate_micrographs(config, template, strict, out)
    valid = [p for p in plans if p.status != "failed"]
    if not valid:
        first = next(plan.error for plan in plans if plan.error)
        raise InputError(f"no micrograph could be read (the first: {first})")
    sampling = sampling_for(config, template)
    for plan in valid:
        cropped = sampling.image_shape(plan.image_shape, plan.optics.pixel_size)
        plan.axis_pixel_size = (
            plan.optics.pixel_size * plan.image_shape[0] / cropped[0],
            plan.optics.pixel_size * plan.image_shape[1] / cropped[1],
        )
        plan.image_shape = cropped
        plan.optics = replace(plan.optics, pixel_size=sampling.pixel_size)
    fft_shape = fft_shape_for(valid[0].image_shape, sampling.box, config.correlation_mode)
    largest = max(valid, key=lambda plan: plan.image_shape[0] * plan.image_shape[1])
    check_memory = functools.partial(
        check_search_memory,
        config,
        config.orientation_search_config.estimated_count(),
        fft_shape_for(largest.image_shape, sampling.box, config.correlation_mode),
        largest.image_shape,
    )
    check_memory(worker_memory(config, scheduler_address))
    check_disk_space(output_dir, [plan.image_shape for plan in valid])
    space = SearchSpace(
        euler=config.orientation_search_config.grid(),
        defocus=config.defocus_search_config.values(),
    )
    run_device = resolve_device(config, device, out)
    earlier = read_job(output_dir) if resume else None
    # A resumed run keeps the earlier automatic chunking, whatever cluster it now runs on.
    chunk_size = (
        config.cluster.chunk_size
        or (earlier or {}).get("fingerprint", {}).get("chunk_size")
        or auto_chunk_size(space, fft_shape, run_device)
    )
    run_fingerprint = fingerprint(config, plans, chunk_size)
    outputs = run_outputs([plan.name for plan in plans])
    inputs = run_inputs(config, plans)
    check_output_dir(output_dir)
    chunks = space.chunks(chunk_size)
    with output_lock(output_dir):
        previous = prepare_output(output_dir, run_fingerprint, resume=resume, overwrite=overwrite)
        check_leopard_paths(config, overwrite or resume)
        leopard = config.match_template_result.map_paths() if config.match_template_result else {}
        check_inputs_not_outputs(output_dir, outputs + [str(p) for p in leopard.values()], inputs)
        earlier_job = None
        if overwrite:
            # A damaged job file records nothing: its run's files are then only replaced.
            with contextlib.suppress(DtmError):
                earlier_job = read_job(output_dir)
        changed: dict[str, str] = {}
        done: set[str] = set()
        if previous is not None:
            changed = changed_micrographs(previous.get("fingerprint") or {}, run_fingerprint)
            digests = {plan.name: plan.digest for plan in plans}
            done = completed_micrographs(output_dir, digests) - set(changed)
        n_skipped = len(plans) - len(valid)
        skipped = f" ({n_skipped} skipped)" if n_skipped else ""
        per_micrograph = f" ({len(chunks):,} per micrograph)" if len(valid) > 1 else ""
        print(
            f"search: {space.n_orientations:,} orientations × {space.n_defocus} defocus planes "
            f"= {space.n_correlations:,} correlations per micrograph; {len(valid)} "
            f"micrograph(s){skipped}; {len(chunks) * len(valid):,} tasks{per_micrograph} of "
            f"≤ {chunk_size:,} orientations each",
            file=out,
        )
        if previous is not None:
            _say_what_resumes(output_dir, plans, done, changed, out)
        if sampling.crop_pixel_size is not None:
            print(
                f"high_resolution_limit {config.high_resolution_limit:g} Å: searching at "
                f"{sampling.pixel_size:.4g} Å/pixel, template box {sampling.box[0]}",
                file=out,
            )
        total_tasks = len(chunks) * len(valid)
        try:
            with session(
                client,
                config.cluster,
                out=out,
                scheduler_address=scheduler_address,
                n_workers=n_workers,
                device=run_device,
            ) as client:
                check_memory(connected_worker_memory(client))  # the workers' own limits
                # Only now, with valid inputs and a cluster, may the earlier results go.
                if overwrite:
                    clear_outputs(output_dir, earlier_job, inputs)
                # The checkpoints and maps of a micrograph whose inputs changed are stale:
                # they go before job.json records the new inputs (a changed micrograph that
                # now fails must not keep the maps, and peaks, of its former content).
                for plan in plans:
                    if plan.name in changed:
                        remove_output(checkpoint_dir(output_dir, plan), output_dir)
                        if len(plans) > 1:
                            for relative in micrograph_outputs(plan.name, single=False):
                                remove_output(output_dir / relative, output_dir)
                # Outputs are recorded before they are written: --overwrite removes them.
                earlier_outputs = recorded_outputs(previous) if previous is not None else []
                write_job(
                    output_dir, config_to_dict(config), run_fingerprint, earlier_outputs + outputs
                )
                run_token = token(
                    f"{output_dir.resolve()}|{json.dumps(run_fingerprint, sort_keys=True)}"
                )
                search = Search(
                    config,
                    sampling,
                    space,
                    chunks,
                    output_dir,
                    start,
                    run_device,
                    run_token,
                    _worker_timeout(config, scheduler_address, run_device),
                )
                n_searched = run_search(client, search, plans, done, out, strict)
                if config.table_settings() is not None:
                    _report_table(config, output_dir, out)
                # A resumed run that had nothing left to search keeps the peaks picked
                # earlier (perhaps re-picked with `dtm peaks`).
                if n_searched or not (output_dir / PEAK_TABLES[0]).exists():
                    _write_peaks(config, output_dir, out)
                else:
                    print(
                        "peaks: peaks.csv kept (nothing was searched; re-pick with dtm peaks)",
                        file=out,
                    )
            wall = time.perf_counter() - t0
            write_run_report(output_dir, plans, wall, total_tasks)
        except DtmError:
            raise
        except KeyboardInterrupt as exc:
            summary = saved(output_dir, plans, total_tasks, "interrupted")
            raise Interrupted(summary) from exc
        except BaseException as exc:  # noqa: BLE001 (every failure: one line, and a log)
            raise stopped_run(exc, output_dir, plans, total_tasks, scheduler_address) from None
    tasks_run = sum(plan.tasks_computed for plan in plans)
    # Only the correlations computed by this run: restored checkpoints cost nothing.
    computed = tasks_run * space.n_correlations / len(chunks)
    speed = (
        f"{computed / wall:,.0f} correlations/s overall"
        if tasks_run
        else ("every task restored from checkpoints" if n_searched else "nothing left to search")
    )
    print(
        f"finished in {format_duration(wall)} ({speed}); "
        f"results in {output_dir}/ (results.zarr, maps/, peaks.csv, run.json)",
        file=out,
    )
    failed = [p for p in plans if p.status == "failed"]
    if failed:
        print(f"{len(failed)} micrograph(s) failed: see {output_dir / 'run.json'}", file=out)
    return MatchOutcome(output_dir, plans)


def _say_what_resumes(
    output_dir: Path,
    plans: list[MicrographPlan],
    done: set[str],
    changed: dict[str, str],
    out: TextIO,
) -> None:
    """One line: which micrographs a resumed run searches again, and why."""
    statuses = recorded_statuses(output_dir)
    reasons = []
    for plan in plans:
        if plan.name in done or plan.status == "failed":
            continue
        if plan.name in changed:
            reasons.append(f"{plan.name} (changed: {changed[plan.name]})")
        elif statuses.get(plan.name) == "failed":
            reasons.append(f"{plan.name} (failed before)")
        elif statuses.get(plan.name) == "done":
            reasons.append(f"{plan.name} (its maps were not recorded with this content)")
        else:
            reasons.append(f"{plan.name} (not finished)")
    if reasons:
        more = f", and {len(reasons) - 10} more" if len(reasons) > 10 else ""
        shown = ", ".join(reasons[:10]) + more
        print(f"resuming: {len(done)} micrograph(s) done; searching {shown}", file=out)
    else:
        print(f"resuming: all {len(done)} micrograph(s) done", file=out)


def _worker_timeout(
    config: MatchConfig, scheduler_address: str | None, device: str
) -> float | None:
    """Seconds without any worker after which a run stops (None: it waits, for workers
    that are batch jobs or pods)."""
    if config.cluster.worker_timeout is not None:
        return float(config.cluster.worker_timeout)
    kind = resolve_kind(config.cluster, scheduler_address, device)
    return None if kind in QUEUED_KINDS else WORKER_TIMEOUT_S


def run_inputs(config: MatchConfig, plans: list[MicrographPlan]) -> list[Path]:
    """The files a run reads: never replaced or removed by it."""
    inputs = [Path(config.template_path)]
    inputs += [Path(plan.entry.micrograph_path) for plan in plans]
    if config.micrograph_table is not None:
        inputs.append(Path(config.micrograph_table))
    if config.source_path is not None:
        inputs.append(config.source_path)
    return inputs


def _report_table(config: MatchConfig, output_dir: Path, out: TextIO) -> None:
    """Print the correlation table's size; copy it to Leopard-EM's path if one is given."""
    settings = config.table_settings()
    assert settings is not None
    files = table_files(output_dir)
    if not files:
        return
    rows = sum(count_rows(f) for f in files)
    print(
        f"correlation table: {rows:,} correlations above {settings[0]:g} in "
        f"{output_dir / TABLE_DIR}/",
        file=out,
    )
    result = config.match_template_result
    if result is not None and result.correlation_table_path is not None:
        export_correlation_table(output_dir, result.correlation_table_path)
        print(f"correlation table: also written to {result.correlation_table_path}", file=out)


def _write_peaks(config: MatchConfig, output_dir: Path, out: TextIO) -> None:
    """Pick peaks in every micrograph's maps and write one table over all of them."""
    from dtm.programs.peaks import repick, threshold_summary

    # Distances in Å are converted with each dataset's own pixel size (cropped or not).
    table = repick(output_dir, config.peaks)
    print(f"peaks: {len(table)} above {threshold_summary(output_dir)}", file=out)
