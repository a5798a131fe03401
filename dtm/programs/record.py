"""The run report (``run.json``) of a ``dtm match`` run: each micrograph's fate, versions."""

from __future__ import annotations

from pathlib import Path

import dtm
from dtm.io.store import write_json
from dtm.programs.plan import MicrographPlan


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
        output_dir / "run.json",
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
