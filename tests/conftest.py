"""Shared fixtures: an external Dask cluster started from the command line, GPU marker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from dtm.runtime.cluster import gpu_unavailable_reason

#: Seconds allowed for the scheduler to write its file and for workers to connect.
STARTUP_TIMEOUT_S = 60.0
#: Seconds a process gets to exit after SIGTERM before it is killed.
SHUTDOWN_TIMEOUT_S = 10.0

# Processes of an external cluster: one BLAS/OpenMP thread each, as the nanny of a
# LocalCluster sets it, so two workers do not oversubscribe a small CI machine.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _dask_environment() -> dict[str, str]:
    """Environment of the external processes: single-threaded BLAS, and the tests folder
    importable so that functions defined in test modules unpickle there (the scheduler
    unpickles task graphs too) as on LocalCluster workers."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **_WORKER_ENV, "PYTHONPATH": path}


def _dask_command(*args: str) -> list[str]:
    """``dask SUBCOMMAND …`` run by this interpreter (``python -m dask`` is the ``dask`` CLI)."""
    return [sys.executable, "-m", "dask", *args]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of ``proc`` (a nanny and its worker), then SIGKILL it."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, SHUTDOWN_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)  # the group was created by start_new_session=True
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path, n_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n_lines:])
    except OSError:
        return "(no log)"


@dataclass
class CliCluster:
    """A scheduler and workers started as ``dask scheduler`` / ``dask worker`` processes.

    Attributes
    ----------
    address
        The scheduler's ``tcp://127.0.0.1:PORT``.
    scheduler_file
        The JSON file written by ``dask scheduler --scheduler-file``.
    scheduler_proc, worker_procs
        The processes (each the leader of its own process group); a test may stop a worker
        with :meth:`kill_worker` and bring the count back with :meth:`restore_workers`.
    log_dir
        Where ``scheduler.log`` and ``worker-N.log`` are written.
    """

    address: str
    scheduler_file: Path
    scheduler_proc: subprocess.Popen[bytes]
    log_dir: Path
    n_workers: int
    worker_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0  # workers started so far: numbers each one's log and directory

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start one more ``dask worker`` (1 process, 1 thread, 2 GiB) on the scheduler file."""
        index, self.started = self.started, self.started + 1
        log = (self.log_dir / f"worker-{index}.log").open("wb")
        proc = subprocess.Popen(
            _dask_command(
                "worker",
                "--scheduler-file",
                str(self.scheduler_file),
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--memory-limit",
                "2GiB",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--death-timeout",
                "30",
                "--local-directory",
                str(self.log_dir / f"worker-{index}"),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_dask_environment(),
            start_new_session=True,
        )
        log.close()
        self.worker_procs.append(proc)
        return proc

    def kill_worker(self) -> None:
        """SIGKILL a running worker and its nanny at once, as a lost node would vanish."""
        alive = [proc for proc in self.worker_procs if proc.poll() is None]
        assert alive, "no running worker to kill"
        os.killpg(alive[0].pid, signal.SIGKILL)
        alive[0].wait(timeout=SHUTDOWN_TIMEOUT_S)

    def connected_workers(self) -> int:
        """Number of workers the scheduler knows now."""
        import distributed

        with distributed.Client(self.address, timeout=10) as client:
            return len(client.nthreads())

    def wait_for_workers(self, n: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until ``n`` workers are connected; fail with the logs after ``timeout`` s."""
        import distributed

        with distributed.Client(self.address, timeout=10) as client:
            try:
                client.wait_for_workers(n_workers=n, timeout=timeout)
            except TimeoutError:
                logs = "\n".join(
                    f"--- {path.name}\n{_log_tail(path)}" for path in self.log_dir.glob("*.log")
                )
                pytest.fail(f"{len(client.nthreads())}/{n} dask workers after {timeout} s\n{logs}")

    def restore_workers(self) -> None:
        """Replace dead worker processes so that ``n_workers`` are running again."""
        self.worker_procs = [proc for proc in self.worker_procs if proc.poll() is None]
        for _ in range(self.n_workers - len(self.worker_procs)):
            self.start_worker()
        self.wait_for_workers(self.n_workers)

    def close(self) -> None:
        """Stop the workers, then the scheduler."""
        for proc in self.worker_procs:
            _stop(proc)
        _stop(self.scheduler_proc)


def _start_cli_cluster(log_dir: Path, n_workers: int) -> CliCluster:
    scheduler_file = log_dir / "sched.json"
    log = (log_dir / "scheduler.log").open("wb")
    scheduler = subprocess.Popen(
        _dask_command(
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--scheduler-file",
            str(scheduler_file),
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_dask_environment(),
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    address = None
    while address is None:
        if scheduler.poll() is not None or time.monotonic() > deadline:
            _stop(scheduler)
            pytest.fail(f"dask scheduler did not start:\n{_log_tail(log_dir / 'scheduler.log')}")
        try:
            address = json.loads(scheduler_file.read_text())["address"]
        except (OSError, ValueError, KeyError):  # not written yet, or half-written
            time.sleep(0.1)
    cluster = CliCluster(str(address), scheduler_file, scheduler, log_dir, n_workers)
    try:
        for _ in range(n_workers):
            cluster.start_worker()
        cluster.wait_for_workers(n_workers)
    except BaseException:
        cluster.close()
        raise
    return cluster


@pytest.fixture(scope="session", autouse=True)
def _dask_scratch_in_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Workers' scratch space under pytest's temporary directory, not /tmp/dask-scratch-space."""
    import dask

    with dask.config.set({"temporary-directory": str(tmp_path_factory.mktemp("dask-scratch"))}):
        yield


@pytest.fixture(scope="module")
def two_workers() -> Iterator[Client]:
    """A LocalCluster of two single-threaded worker processes, shared by a test module."""
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def dask_cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliCluster]:
    """A real external cluster: ``dask scheduler`` and two ``dask worker`` processes.

    Started once per session, as ``deploy/`` starts them (scheduler file, one single-threaded
    worker process each, 2 GiB memory limit), and torn down at the end.
    """
    cluster = _start_cli_cluster(tmp_path_factory.mktemp("dask-cli-cluster"), n_workers=2)
    try:
        yield cluster
    finally:
        cluster.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA GPU is usable (CI has none; the other skips
    are for tools that CI installs: chromium, mkdocs, hadolint)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
