"""The job file (``job.json``): every parameter of a run, to trace it and to resume it.

A run records its fingerprint — the parts of the configuration and inputs that determine the
maps — together with the resolved chunking. ``--resume`` refuses a run whose fingerprint
differs and names what changed; ``--overwrite`` replaces the earlier results; without either,
an output directory holding results is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dtm
from dtm.errors import ConfigError, OutputError
from dtm.io.atomic import remove_output
from dtm.io.store import write_json
from dtm.schema import (
    CHECKPOINTS_DIR,
    JOB_FILE,
    LOCK_FILE,
    LOG_FILE,
    MAPS_DIR,
    MRC_NAMES,
    PEAK_FILES,
    PICKING_FILE,
    REPORT_FILE,
    RESULTS_STORE,
    RUN_FILE,
    TABLE_DIR,
    checkpoint_folder,
)

#: Files of an output directory that every dtm match run writes (besides each micrograph's
#: maps, results group and checkpoints: :func:`run_outputs`).
FIXED_OUTPUTS = (JOB_FILE, RUN_FILE, *PEAK_FILES, PICKING_FILE, TABLE_DIR, LOG_FILE)
#: Folders of an output directory that dtm creates for the outputs inside them.
OUTPUT_FOLDERS = (RESULTS_STORE, MAPS_DIR, CHECKPOINTS_DIR)


def run_outputs(names: list[str]) -> list[str]:
    """Every path (relative to ``output_dir``) that a match run of these micrograph names
    writes: recorded in ``job.json`` so that ``--overwrite`` removes exactly these."""
    outputs = list(FIXED_OUTPUTS)
    single = len(names) == 1
    outputs += [RESULTS_STORE] if single else [f"{RESULTS_STORE}/zarr.json"]
    for name in names:
        outputs += micrograph_outputs(name, single)
        outputs.append(checkpoint_folder(name))
    return outputs


def micrograph_outputs(name: str, single: bool) -> list[str]:
    """The maps and results group of one micrograph of a run of several (``single``: its
    maps only; the results group is then all of ``results.zarr``)."""
    prefix = "" if single else f"{name}_"
    outputs = [f"{MAPS_DIR}/{prefix}{file}" for file in MRC_NAMES.values()]
    return outputs if single else [*outputs, f"{RESULTS_STORE}/{name}"]


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
    return (output_dir / JOB_FILE).exists() or (output_dir / RESULTS_STORE).exists()


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
        earlier = previous.get("fingerprint", {})
        # Each micrograph's own inputs may change: resume recomputes that micrograph.
        changed = changed_keys(
            {k: v for k, v in earlier.items() if k != "micrographs"},
            {k: v for k, v in fingerprint.items() if k != "micrographs"},
        )
        names = list(earlier.get("micrographs") or {})
        new_names = list(fingerprint.get("micrographs") or {})
        if sorted(names) != sorted(new_names):
            added = [n for n in new_names if n not in names]
            removed = [n for n in names if n not in new_names]
            parts = ([f"added {', '.join(added[:5])}"] if added else []) + (
                [f"removed {', '.join(removed[:5])}"] if removed else []
            )
            changed.append(f"micrographs ({'; '.join(parts)})")
        if changed:
            raise ConfigError(
                f"--resume: the configuration differs from the run in {output_dir}: "
                f"{', '.join(changed)} changed (use --overwrite to start again)"
            )
    check_writable(output_dir)
    return previous


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory that is ``/`` or the home directory, or that is (or holds
    as one of dtm's outputs) a symbolic link: checked before any cluster starts.

    Raises
    ------
    OutputError
        One line naming the path.
    """
    absolute = Path(os.path.abspath(output_dir))
    home = Path(os.path.expanduser("~"))
    for refused, what in (
        (Path(absolute.anchor), "the root directory"),
        (home, "your home directory"),
    ):
        if absolute == refused or os.path.realpath(absolute) == os.path.realpath(refused):
            raise OutputError(
                f"output_dir {output_dir}: is {what}; choose a directory for this run's results"
            )
    candidates = [absolute, absolute / LOCK_FILE]
    candidates += [absolute / name for name in (*FIXED_OUTPUTS, *OUTPUT_FOLDERS, REPORT_FILE)]
    for folder in OUTPUT_FOLDERS:
        if (absolute / folder).is_dir() and not (absolute / folder).is_symlink():
            candidates += sorted((absolute / folder).iterdir())
    for path in candidates:
        if path.is_symlink():
            try:
                target = f"to {os.path.realpath(path, strict=True)}"
            except (OSError, RuntimeError) as exc:
                loop = isinstance(exc, RuntimeError) or exc.errno == errno.ELOOP
                target = "a loop" if loop else f"dangling, to {os.readlink(path)}"
            where = "output_dir" if path == absolute else "output"
            raise OutputError(
                f"{where} {path}: is a symbolic link ({target}); dtm writes only real "
                "files and directories: remove the link or name its target"
            )


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (``fcntl.flock``) on ``output_dir`` for a run.

    The directory is created if needed (and removed again if the run leaves it empty). The
    lock dies with the process, so a killed run never leaves a stale lock behind.

    Raises
    ------
    OutputError
        Another process holds the lock: another ``dtm match`` runs on this directory.
    """
    output_dir = Path(output_dir)
    check_writable(output_dir)
    created = []
    for folder in reversed([output_dir, *output_dir.parents]):
        if not folder.exists():
            created.append(folder)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output_dir {output_dir}: cannot create it ({exc.strerror})") from None
    path = output_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_created(created)
            raise OutputError(
                f"output_dir {output_dir}: another dtm match is running on it (it holds "
                f"{path}); wait for it to finish or choose another output_dir"
            ) from None
        # The holder before us may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else sees; take the one at the path.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding the lock: see the inode check above
        os.close(fd)
        _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    """Remove the directories a failed run created, if it left them empty."""
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _protected(inputs: list[Path]) -> set[Path]:
    """The real paths of the inputs and of every folder above them: removing or replacing
    any of these would remove or replace an input."""
    protected: set[Path] = set()
    for item in inputs:
        real = Path(os.path.realpath(item))
        protected.update([real, *real.parents])
    return protected


def check_inputs_not_outputs(output_dir: Path, outputs: list[str], inputs: list[Path]) -> None:
    """Refuse a run whose outputs would replace one of its inputs."""
    protected = _protected(inputs)
    for relative in outputs:
        if Path(os.path.realpath(output_dir / relative)) in protected:
            output = Path(os.path.realpath(output_dir / relative))
            item = next(i for i in inputs if output in _protected([i]))
            raise OutputError(
                f"{item}: an input of this run lies where it writes {relative} in "
                f"output_dir {output_dir}; move it or choose another output_dir"
            )


def recorded_outputs(job: dict[str, Any] | None) -> list[str]:
    """The outputs an earlier run recorded in its ``job.json`` (for a job file written
    before dtm recorded them: the outputs its micrographs' names imply)."""
    if not job:
        return []
    outputs = job.get("outputs")
    if isinstance(outputs, list):
        return [str(item) for item in outputs]
    names = list((job.get("fingerprint") or {}).get("micrographs") or {})
    return run_outputs([str(name) for name in names]) if names else list(FIXED_OUTPUTS)


def clear_outputs(output_dir: Path, job: dict[str, Any] | None, inputs: list[Path]) -> None:
    """Remove the files an earlier run recorded as its outputs (``--overwrite``), and
    nothing else: files it did not write survive, and an input of this run is never
    removed (nor a folder holding one). Folders left empty go too."""
    protected = _protected(inputs)
    for relative in recorded_outputs(job):
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            continue  # a damaged or hand-edited job file: never leave output_dir
        path = output_dir / relative
        if Path(os.path.realpath(path)) in protected:
            continue
        if path.exists() or path.is_symlink():
            remove_output(path, output_dir)
    for folder in OUTPUT_FOLDERS:
        with contextlib.suppress(OSError):
            (output_dir / folder).rmdir()


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


def write_job(
    output_dir: Path,
    config: dict[str, Any],
    fingerprint: dict[str, Any],
    outputs: list[str],
) -> None:
    """Record every parameter and the version of this run, and the outputs it will write
    (paths relative to ``output_dir``, recorded before they are written)."""
    write_json(
        output_dir / JOB_FILE,
        {
            "dtm_version": dtm.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,
            "fingerprint": fingerprint,
            "outputs": sorted(set(outputs)),
        },
    )


def record_output(output_dir: Path, relative: str) -> None:
    """Add one output to ``job.json`` of ``output_dir`` (if there is one), for a file that
    a later command (``dtm report``) writes there."""
    try:
        job = read_job(output_dir)
    except OutputError:
        return
    if job is None or relative in job.get("outputs", []):
        return
    job["outputs"] = sorted({*recorded_outputs(job), relative})
    write_json(output_dir / JOB_FILE, job)


def changed_micrographs(earlier: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, str]:
    """Micrograph name → what changed since the earlier run's fingerprint (its file's
    content, its CTF values, its path), for the micrographs whose own inputs changed."""
    before = earlier.get("micrographs") or {}
    changes = {}
    for name, entry in (fingerprint.get("micrographs") or {}).items():
        keys = changed_keys(before.get(name) or {}, entry)
        if keys:
            changes[name] = ", ".join("file content" if k == "digest" else k for k in keys)
    return changes


def recorded_statuses(output_dir: Path) -> dict[str, str]:
    """Micrograph name → its status in ``run.json`` (an unreadable report: none)."""
    try:
        report = json.loads((output_dir / RUN_FILE).read_text())
        return {
            str(name): str(item.get("status"))
            for name, item in report.get("micrographs", {}).items()
        }
    except (OSError, ValueError, AttributeError):
        return {}


def completed_micrographs(output_dir: Path, digests: dict[str, str | None]) -> set[str]:
    """Micrographs that ``run.json`` records as done from a file with the content they
    have now (``digests``: name → :func:`dtm.programs.plan.content_digest`); an unreadable report:
    none."""
    path = output_dir / RUN_FILE
    try:
        report = json.loads(path.read_text())
        return {
            name
            for name, item in report.get("micrographs", {}).items()
            if item.get("status") == "done"
            and item.get("digest") is not None
            and item.get("digest") == digests.get(name)
        }
    except (OSError, ValueError, AttributeError):
        # Missing or damaged: resume then recomputes from the checkpoints, never guesses.
        return set()
