"""What a ``dtm match`` run records of itself: ``run.json`` (each micrograph's fate, the
versions), and, when it stops on a failure, one line of what happened and what was saved,
with the traceback and Dask's log lines in ``dtm-error.log``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import dtm
from dtm.errors import DtmError, RunStopped
from dtm.io.runlog import captured_logs
from dtm.io.store import write_json
from dtm.programs.plan import MicrographPlan
from dtm.schema import CHECKPOINTS_DIR, LOG_FILE, RUN_FILE


def versions() -> dict[str, str]:
    """Versions of dtm and the libraries that determine its results."""
    import dask  # noqa: PLC0415 (only for the report)
    import distributed  # noqa: PLC0415
    import mrcfile
    import numpy as np  # noqa: PLC0415
    import pandas
    import scipy
    import xarray as xr  # noqa: PLC0415
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


def write_run_report(
    output_dir: Path,
    plans: list[MicrographPlan],
    wall: float | None,
    tasks_total: int | None = None,
    stopped: str | None = None,
) -> None:
    """``run.json``: per micrograph status, timing, error and the content digest it was
    searched with; the correlate tasks this invocation computed (only those that ran and
    whose results were kept) and the run's total; versions. ``stopped``: why a run ended
    before its end (it can be resumed)."""
    write_json(
        output_dir / RUN_FILE,
        {
            "finished": wall is not None,
            "stopped": stopped,
            "wall_seconds": wall,
            "tasks_computed": sum(p.tasks_computed for p in plans),
            "tasks_total": tasks_total,
            "failed": sorted(p.name for p in plans if p.status == "failed"),
            "versions": versions(),
            "micrographs": {
                p.name: {
                    "path": str(p.entry.micrograph_path),
                    "status": p.status,
                    "seconds": p.seconds,
                    "error": p.error,
                    "digest": p.digest,
                    "tasks_computed": p.tasks_computed,
                }
                for p in plans
            },
        },
    )


def saved(output_dir: Path, plans: list[MicrographPlan], total_tasks: int, stopped: str) -> str:
    """Record what a stopped run saved in ``run.json`` (if the disk lets it); one line."""
    with contextlib.suppress(OSError, DtmError):
        write_run_report(output_dir, plans, None, total_tasks, stopped=stopped)
    n_done = sum(plan.status == "done" for plan in plans)
    n_failed = sum(plan.status == "failed" for plan in plans)
    try:
        groups = len(list((output_dir / CHECKPOINTS_DIR).rglob("group-*.npz")))
    except OSError:
        groups = 0
    parts = [f"{n_done} of {len(plans)} micrograph(s) done"]
    if n_failed:
        parts.append(f"{n_failed} failed")
    if groups:
        parts.append(f"{groups} group(s) of tasks checkpointed")
    return f"saved in {output_dir}: {', '.join(parts)}"


def stopped_run(
    exc: BaseException,
    output_dir: Path,
    plans: list[MicrographPlan],
    total_tasks: int,
    scheduler_address: str | None,
) -> RunStopped:
    """A failure that stopped a run, as one line; its traceback goes to the log file."""
    what = _what_failed(exc, scheduler_address)
    log: str | None = None
    # In output_dir; where it cannot be written (a full disk), in the temporary folder.
    fallback = Path(tempfile.gettempdir()) / f"dtm-error-{os.getpid()}.log"
    for path in (output_dir / LOG_FILE, fallback):
        try:
            with open(path, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {what}\n")
                f.write("".join(traceback.format_exception(exc)))
                for line in captured_logs():
                    f.write(line + "\n")
        except OSError:
            continue
        log = str(path)
        break
    saved_line = saved(output_dir, plans, total_tasks, what)
    return RunStopped(what, saved_line, log)


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in an exception's chain."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno is not None:
            return item
        item = item.__cause__ or item.__context__
    return None


def _what_failed(exc: BaseException, scheduler_address: str | None) -> str:
    """What happened, in words a user acts on."""
    import asyncio
    import errno

    from distributed.comm import CommClosedError

    if isinstance(exc, RunStopped):
        return exc.what
    error = _os_error(exc)
    if error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" ({error.filename})" if error.filename else ""
        return f"the output disk is full{where}; free space, or choose another output_dir"
    if error is not None and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" {error.filename}" if error.filename else ""
        return f"cannot write{where} any more ({error.strerror})"
    if isinstance(exc, concurrent.futures.CancelledError | asyncio.CancelledError):
        return "lost the connection to the dask scheduler (it stopped or is unreachable)"
    if isinstance(exc, CommClosedError | OSError | TimeoutError):
        return f"lost the connection to the dask scheduler ({type(exc).__name__})"
    if type(exc).__name__ == "KilledWorker":
        return (
            "a task killed every worker that ran it (most often: out of memory); give the "
            "workers more memory (cluster.memory_limit)"
        )
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected failure: {type(exc).__name__}" + (f": {text}" if text else "")
