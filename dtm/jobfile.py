"""The job file (``job.json``): every parameter of a run, to trace it and to resume it.

A run records its fingerprint — the parts of the configuration and inputs that determine the
maps — together with the resolved chunking. ``--resume`` refuses a run whose fingerprint
differs and names what changed; ``--overwrite`` replaces the earlier results; without either,
an output directory holding results is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dtm
from dtm.errors import ConfigError, OutputError
from dtm.io.store import write_json

if TYPE_CHECKING:
    from dtm.plan import MicrographPlan

JOB_FILE = "job.json"
#: Files and folders of an output directory that belong to a dtm match run.
RUN_OUTPUTS = (
    "results.zarr",
    "maps",
    "checkpoints",
    JOB_FILE,
    "run.json",
    "peaks.csv",
    "peaks.parquet",
    "peaks.star",
    "peaks.json",
    "correlation_table.parquet",
    "report.html",  # dtm report's default, made from the results above
)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (to notice a changed template or micrograph)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable(output_dir: Path, field: str = "output_dir") -> None:
    """Raise :class:`OutputError` unless ``output_dir`` exists writable or can be created.

    Nothing is created here: a run that fails later must not leave an empty directory.
    ``field`` names the setting in the message.
    """
    existing = output_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{field} {output_dir}: not writable ({existing} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dtm-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{field} {output_dir}: not writable ({exc.strerror})") from None


def has_results(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds (part of) an earlier run."""
    return (output_dir / JOB_FILE).exists() or (output_dir / "results.zarr").exists()


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dictionaries."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def prepare_output(
    output_dir: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> dict[str, Any] | None:
    """Check the output directory against the run's flags; returns the earlier job if resuming.

    Raises
    ------
    OutputError
        Results exist and neither ``resume`` nor ``overwrite`` was given, or the directory
        is not writable.
    ConfigError
        ``resume`` of a run whose fingerprint differs (the message names what changed).
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one")
    exists = has_results(output_dir)
    if exists and not (resume or overwrite):
        raise OutputError(
            f"output_dir {output_dir}: holds results of an earlier run; "
            "use --resume to continue it or --overwrite to replace it"
        )
    previous = read_job(output_dir) if (exists and resume) else None
    if previous is not None:
        changed = changed_keys(previous.get("fingerprint", {}), fingerprint)
        if changed:
            raise ConfigError(
                f"--resume: the configuration differs from the run in {output_dir}: "
                f"{', '.join(changed)} changed (use --overwrite to start again)"
            )
    check_writable(output_dir)
    return previous


def clear_outputs(output_dir: Path) -> None:
    """Remove the files of an earlier run (``--overwrite``), and nothing else."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def read_job(output_dir: Path) -> dict[str, Any] | None:
    """The job file of an earlier run in ``output_dir``, if there is one."""
    path = output_dir / JOB_FILE
    if not path.exists():
        return None
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path}: unreadable job file ({exc}); use --overwrite") from None
    if not isinstance(job, dict):
        raise OutputError(f"{path}: not a dtm job file; use --overwrite")
    return job


def write_job(output_dir: Path, config: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Record every parameter and the version of this run."""
    write_json(
        output_dir / JOB_FILE,
        {
            "dtm_version": dtm.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,
            "fingerprint": fingerprint,
        },
    )


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


def completed_micrographs(output_dir: Path) -> set[str]:
    """Micrographs that ``run.json`` records as done (an unreadable report: none)."""
    path = output_dir / "run.json"
    try:
        report = json.loads(path.read_text())
        return {
            name
            for name, item in report.get("micrographs", {}).items()
            if item.get("status") == "done"
        }
    except (OSError, ValueError, AttributeError):
        # Missing or damaged: resume then recomputes from the checkpoints, never guesses.
        return set()


def write_run_report(
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
            "versions": versions(),
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
