"""A match run on the cluster: each micrograph's graph, submitted a window at a time.

Micrographs are submitted as the earlier ones finish, enough of them to keep every worker
thread busy, so that a project of thousands of micrographs never holds all their graphs at
once (on the client or on the scheduler) and the first ones finish, and are recorded for
``--resume``, early.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import dask
import distributed
from dask.delayed import Delayed

from dtm.config import MatchConfig
from dtm.errors import DtmError, RunStopped
from dtm.io.atomic import check_inside, remove_output
from dtm.io.correlation_table import table_file
from dtm.io.store import ensure_root_group
from dtm.programs.plan import MicrographPlan, Sampling, dataset_attrs
from dtm.programs.record import write_run_report
from dtm.runtime import tasks
from dtm.runtime.cluster import worker_threads
from dtm.runtime.graph import leaves_to_compute, search_graph
from dtm.runtime.persist import persist
from dtm.runtime.progress import Progress
from dtm.schema import CHECKPOINTS_DIR, RESULTS_STORE, checkpoint_folder, token
from dtm.search.space import SearchSpace

#: Correlate tasks in flight per worker thread: enough queued that no worker waits while a
#: micrograph's last merges and its persist task run.
TASKS_IN_FLIGHT_PER_THREAD = 4


@dataclass(frozen=True)
class Search:
    """What every micrograph of a run shares."""

    config: MatchConfig
    sampling: Sampling
    space: SearchSpace
    chunks: list[tuple[int, int]]
    output_dir: Path
    start: str  # the run's start time, recorded in every dataset
    device: str
    token: str  # in every task key: two runs sharing a scheduler never share a task
    worker_timeout: float | None = None  # seconds without workers before the run stops


def run_search(
    client: distributed.Client,
    search: Search,
    plans: list[MicrographPlan],
    done: set[str],
    out: TextIO,
    strict: bool = False,
) -> int:
    """Search every micrograph still to search, a window of them at a time; record each.

    Micrographs are submitted as the earlier ones finish, enough of them to keep every
    worker thread busy, so that a project of thousands of micrographs never holds all
    their graphs at once (on the client or on the scheduler) and the first ones finish,
    and are recorded for ``--resume``, early. Each micrograph's ``tasks_computed`` counts
    the correlate tasks this run computed for it (not those restored from checkpoints,
    nor those that never ran). Returns the number of micrographs whose maps were written.

    Raises
    ------
    RunStopped
        No task finished for ``cluster.stall_timeout`` seconds (workers paused for memory),
        or no worker was left for ``worker_timeout`` seconds.
    """
    config, space, chunks, output_dir = (
        search.config,
        search.space,
        search.chunks,
        search.output_dir,
    )
    todo = []
    for plan in plans:
        if plan.status == "failed":
            continue
        if plan.name in done:
            plan.status = "done"
        else:
            todo.append(plan)
    if not todo:
        return 0
    total_tasks = len(chunks) * sum(plan.status != "failed" for plan in plans)
    split_every = config.cluster.split_every
    planned = {
        plan.name: leaves_to_compute(len(chunks), split_every, checkpoint_dir(output_dir, plan))
        for plan in todo
    }
    n_tasks = sum(planned.values())
    if len(plans) > 1:
        ensure_root_group(output_dir / RESULTS_STORE)
    if n_tasks < len(chunks) * len(todo):
        print(
            f"resuming: {len(chunks) * len(todo) - n_tasks} of {len(chunks) * len(todo)} "
            "tasks restored from checkpoints",
            file=out,
        )
    # Computed once and held for the whole run: every micrograph's graph refers to them.
    # The orientation table travels once, as a graph literal rather than scattered data,
    # so that Dask can recompute it after losing a worker; distributed's large-graph
    # warning (24 bytes per orientation: 38 MB for a 1.5° search) would only alarm.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        space_node, template_node = client.compute(
            [
                dask.delayed(space, name=f"space-{search.token}", traverse=False),
                dask.delayed(tasks.load_template)(
                    str(config.template_path),
                    search.sampling.crop_pixel_size,
                    config.optics_group.pixel_size,
                    dask_key_name=f"prepare-template-{search.token}",
                ),
            ]
        )
    graph = functools.partial(
        _micrograph_graph,
        search=search,
        space_node=space_node,
        template_node=template_node,
        single=len(plans) == 1,
    )
    waiting = list(reversed(todo))
    plan_of: dict[distributed.Future, MicrographPlan] = {}

    def submit() -> None:
        """Submit micrographs until enough correlate tasks are in flight."""
        wanted = TASKS_IN_FLIGHT_PER_THREAD * max(1, worker_threads(client))
        while waiting and (len(plan_of) < 2 or len(plan_of) * len(chunks) < wanted):
            plan = waiting.pop()
            plan_of[client.compute(graph(plan))] = plan

    def computed(plan: MicrographPlan) -> int:
        """Correlate tasks of ``plan`` computed so far and kept (checkpointed)."""
        left = leaves_to_compute(len(chunks), split_every, checkpoint_dir(output_dir, plan))
        return max(0, planned[plan.name] - left)

    per_task = space.n_correlations / max(len(chunks), 1)
    started = time.perf_counter()
    monitor = Progress(
        client,
        n_tasks,
        per_task,
        stream=out,
        stall_timeout=config.cluster.stall_timeout,
        worker_timeout=search.worker_timeout,
    )
    try:
        with monitor:
            submit()
            while plan_of:
                try:
                    finished = distributed.wait(
                        list(plan_of), timeout=1.0, return_when="FIRST_COMPLETED"
                    ).done
                except TimeoutError:
                    finished = set()
                problem = monitor.problem()
                if problem is not None:
                    raise RunStopped(problem)
                for future in finished:
                    plan = plan_of.pop(future)
                    try:
                        future.result()
                        plan.status, plan.tasks_computed = "done", planned[plan.name]
                    except DtmError as exc:
                        if len(plans) == 1 or strict:
                            raise
                        plan.status, plan.error = "failed", str(exc)
                        plan.tasks_computed = computed(plan)
                        print(f"failed: {plan.name}: {exc}", file=out)
                    plan.seconds = time.perf_counter() - started
                    monitor.touch()
                    write_run_report(output_dir, plans, None, total_tasks)
                    # Only once run.json says the micrograph is done may its checkpoints go.
                    if plan.status == "done":
                        remove_output(checkpoint_dir(output_dir, plan), output_dir)
                    future.release()  # lets the scheduler forget this micrograph's graph
                    submit()
    finally:
        for plan in plan_of.values():  # stopped: what the unfinished ones kept
            plan.tasks_computed = computed(plan)
    with contextlib.suppress(OSError):  # kept while a micrograph still has checkpoints
        (output_dir / CHECKPOINTS_DIR).rmdir()
    return sum(plan.status == "done" for plan in todo)


def checkpoint_dir(output_dir: Path, plan: MicrographPlan) -> Path:
    return check_inside(output_dir / checkpoint_folder(plan.name), output_dir)


def _micrograph_graph(
    plan: MicrographPlan,
    *,
    search: Search,
    space_node: distributed.Future,
    template_node: distributed.Future,
    single: bool,
) -> Delayed:
    """The graph of one micrograph's search, ending in the task that writes its maps."""
    config, sampling, output_dir = search.config, search.sampling, search.output_dir
    tok = token(f"{search.token}/{plan.name}")
    job = tasks.MicrographTask(
        plan.name,
        str(plan.entry.micrograph_path),
        plan.optics,
        sampling.box,
        config.preprocessing_filters.settings(sampling.pixel_size),
        config.correlation_mode,
        sampling.crop_pixel_size,
        config.optics_group.pixel_size,
    )
    image_node = dask.delayed(tasks.load_micrograph)(
        job, search.space.defocus, dask_key_name=f"prepare-{tok}"
    )
    tree = search_graph(
        tok,
        image_node,
        template_node,
        space_node,
        search.chunks,
        split_every=config.cluster.split_every,
        checkpoint_dir=checkpoint_dir(output_dir, plan),
        device=search.device,
        table=config.table_settings(),
    )
    extra = config.match_template_result.map_paths() if config.match_template_result else None
    root: Delayed = dask.delayed(persist)(
        tree,
        space_node,
        output_dir=str(output_dir),
        group=None if single else plan.name,
        prefix="" if single else f"{plan.name}_",
        pixel_size=plan.optics.pixel_size,
        attrs=dataset_attrs(config, plan, sampling, search.space, search.start),
        extra_paths={k: str(v) for k, v in extra.items()} if (extra and single) else None,
        table_path=(
            str(table_file(output_dir, plan.name)) if config.table_settings() is not None else None
        ),
        dask_key_name=f"persist-{tok}",
    )
    return root
