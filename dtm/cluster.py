"""Get a Dask client for a search: embedded, external or deployed clusters.

:func:`connect` turns the ``cluster:`` section of a configuration (and the command-line
overrides) into a :class:`distributed.Client`, and closes whatever it started on exit:

``local`` (default)
    an embedded :class:`distributed.LocalCluster` of worker *processes*, sized to the machine
    (:func:`default_local_workers`).
``address``
    a running ``dask scheduler`` (``tcp://host:8786``, or the path of its ``--scheduler-file``).
``slurm`` / ``pbs``
    workers submitted as batch jobs by ``dask-jobqueue`` (extra ``dtm[slurm]`` / ``dtm[pbs]``).
``kubernetes``
    a ``DaskCluster`` created through the ``dask-kubernetes`` operator (``dtm[kubernetes]``).
``gpu-local``
    a ``dask-cuda`` :class:`LocalCUDACluster`, one worker per GPU (``dtm[gpu]``); also chosen
    by ``device: gpu`` with the default kind.

Optional dependencies are imported only when their kind is chosen.

Threads: each worker process runs ``threads_per_worker`` tasks at once. Worker processes
started by ``distributed`` (nannies) set ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` to 1 (``distributed.nanny.pre-spawn-environ``), so BLAS does not
oversubscribe the cores; the search kernel passes ``workers=`` to :mod:`scipy.fft`
explicitly rather than relying on a global default. Hence the default of one
single-threaded worker per core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    import distributed

    from dtm.config import ClusterConfig

#: Seconds to wait for a scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 10.0

#: Extra that provides the optional dependency of each deployment kind.
_EXTRAS = {
    "slurm": ("dask_jobqueue", "dask-jobqueue", "slurm"),
    "pbs": ("dask_jobqueue", "dask-jobqueue", "pbs"),
    "kubernetes": ("dask_kubernetes.operator", "dask-kubernetes", "kubernetes"),
    "gpu-local": ("dask_cuda", "dask-cuda", "gpu"),
}


def available_cpus() -> int:
    """Number of CPU cores this process may run on (affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_local_workers() -> tuple[int, int]:
    """Default size of the embedded cluster: ``(n_workers, threads_per_worker)``.

    One single-threaded worker process per available core: the kernel's FFTs release the
    GIL but processes avoid any contention in the pure-Python parts.
    """
    return available_cpus(), 1


def _get(cluster: ClusterConfig | None, name: str, default: Any = None) -> Any:
    value = getattr(cluster, name, default) if cluster is not None else default
    return default if value is None else value


def _import_extra(kind: str) -> Any:
    module, package, extra = _EXTRAS[kind]
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ClusterError(
            f"kind {kind} needs {package}: pip install 'dtm[{extra}]' ({error})"
        ) from None


def resolve_kind(
    cluster: ClusterConfig | None = None,
    scheduler_address: str | None = None,
    device: str | None = None,
) -> str:
    """The deployment kind after the command-line overrides.

    An address (from the command line or the config) means ``address``; ``device: gpu`` with
    the default ``local`` kind means ``gpu-local``.
    """
    if scheduler_address or _get(cluster, "scheduler_address"):
        return "address"
    kind = str(_get(cluster, "kind", "local"))
    if kind == "local" and (device or _get(cluster, "device", "cpu")) == "gpu":
        return "gpu-local"
    return kind


def dashboard_link(client: distributed.Client) -> str:
    """URL of the scheduler's dashboard (``…/status``), or ``""`` when it has none."""
    try:
        return str(client.dashboard_link or "")
    except (KeyError, AttributeError):  # scheduler started without the dashboard service
        return ""


def worker_count(client: distributed.Client) -> int:
    """Number of workers connected to the scheduler now."""
    return len(client.nthreads())


def worker_threads(client: distributed.Client) -> int:
    """Total number of worker threads (tasks that can run at once) on the cluster now."""
    return sum(client.nthreads().values())


def ensure_workers(client: distributed.Client, n: int = 1, timeout: float = 60) -> None:
    """Wait until at least ``n`` workers are connected (jobs queued, pods starting …).

    Raises
    ------
    ClusterError
        If fewer than ``n`` workers are connected after ``timeout`` seconds.
    """
    try:
        client.wait_for_workers(n_workers=n, timeout=timeout)
    except TimeoutError:
        raise ClusterError(
            f"scheduler {client.scheduler.address}: {worker_count(client)} worker(s) after "
            f"{timeout:g} s, {n} needed (are the worker jobs running?)"
        ) from None


def _free_dashboard_address(address: str | None) -> str | None:
    """``address`` if its port is free, else ``":0"`` (a random port), so that a second run on
    the same machine still gets a dashboard without distributed's warning."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return address  # a random port already, or for distributed to judge
    with socket.socket() as probe:
        try:
            probe.bind((host.strip("[]") or "", int(port)))
        except OSError:
            return f"{host}:0"
    return address


def _scheduler_address(address: str) -> str:
    """The address itself, or the one written in a ``dask scheduler --scheduler-file``."""
    path = Path(address)
    if address.endswith(".json") or path.is_file():
        try:
            return str(json.loads(path.read_text())["address"])
        except (OSError, ValueError, KeyError) as error:
            raise ClusterError(
                f"scheduler file {address}: cannot read an address ({error})"
            ) from None
    return address if "://" in address else f"tcp://{address}"


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast when nothing listens on a ``tcp://`` address (the client would retry until
    its timeout)."""
    if not address.startswith("tcp://"):
        return
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ClusterError(f"scheduler {address}: cannot connect ({error})") from None


def _connect_address(address: str, timeout: float) -> distributed.Client:
    import distributed

    address = _scheduler_address(address)
    _check_reachable(address, timeout)
    try:
        return distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ClusterError(f"scheduler {address}: cannot connect ({message})") from None


def _local_cluster(cluster: ClusterConfig | None, n_workers: int | None) -> Any:
    import distributed

    default_workers, default_threads = default_local_workers()
    return distributed.LocalCluster(
        n_workers=n_workers or _get(cluster, "n_workers", default_workers),
        threads_per_worker=_get(cluster, "threads_per_worker", default_threads),
        processes=True,
        memory_limit=_get(cluster, "memory_limit", "auto"),
        dashboard_address=_free_dashboard_address(_get(cluster, "dashboard_address", ":8787")),
        silence_logs=logging.ERROR,
    )


def gpu_unavailable_reason() -> str | None:
    """Why no CUDA GPU can be used from this process, or ``None`` when cupy sees one."""
    try:
        import cupy

        if not cupy.cuda.is_available():
            return "cupy.cuda.is_available() is False"
    except Exception as error:  # ImportError, or a CUDA driver/runtime error
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _gpu_local_cluster(cluster: ClusterConfig | None, n_workers: int | None) -> Any:
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise ClusterError(f"device gpu: no working CUDA GPU ({reason})")
    dask_cuda = _import_extra("gpu-local")
    return dask_cuda.LocalCUDACluster(
        n_workers=n_workers or _get(cluster, "n_workers"),
        threads_per_worker=_get(cluster, "threads_per_worker", 1),
        memory_limit=_get(cluster, "memory_limit", "auto"),
        CUDA_VISIBLE_DEVICES=_get(cluster, "cuda_visible_devices"),
        dashboard_address=_free_dashboard_address(_get(cluster, "dashboard_address", ":8787")),
        silence_logs=logging.ERROR,
    )


def jobqueue_cluster(cluster: ClusterConfig | None, device: str | None = None) -> Any:
    """A ``dask-jobqueue`` ``SLURMCluster`` or ``PBSCluster`` for ``cluster.kind``, not scaled.

    Its scheduler runs in this process; ``cluster.job_script()`` shows the batch script that
    each job will run. With GPUs (``gpus_per_job`` > 0 or ``device: gpu``) every job asks for
    ``gpus_per_job`` GPUs (Slurm ``--gres=gpu:N``, PBS ``ngpus=N``) and runs
    ``dask cuda worker``, one worker process per GPU, each with ``cores / N`` threads and
    ``memory / N`` of host memory.

    Raises
    ------
    ConfigError
        If ``cores`` or ``memory`` (per job) is missing.
    ClusterError
        If ``dask-jobqueue`` is not installed.
    """
    kind = str(_get(cluster, "kind"))
    jobqueue = _import_extra(kind)
    for field in ("cores", "memory"):
        if _get(cluster, field) is None:
            raise ConfigError(f"cluster.{field}: required for kind {kind} (per job)")
    cores, memory = int(_get(cluster, "cores")), str(_get(cluster, "memory"))
    gpus = int(_get(cluster, "gpus_per_job", 0))
    if gpus == 0 and (device or _get(cluster, "device", "cpu")) == "gpu":
        gpus = 1
    directives = list(_get(cluster, "job_extra_directives", []))
    options: dict[str, Any] = {
        "queue": _get(cluster, "queue"),
        "account": _get(cluster, "account"),
        "walltime": _get(cluster, "walltime"),
        "cores": cores,
        "memory": memory,
        "processes": gpus or int(_get(cluster, "processes", 1)),
        "local_directory": _get(cluster, "local_directory"),
        "scheduler_options": {
            "dashboard_address": _free_dashboard_address(
                _get(cluster, "dashboard_address", ":8787")
            )
        },
        "job_name": "dtm-worker",
    }
    if gpus:
        options["worker_command"] = "dask cuda worker"  # run as `python -m dask cuda worker`
        if kind == "slurm" and not any("gres" in d or "gpus" in d for d in directives):
            directives.append(f"--gres=gpu:{gpus}")
        if kind == "pbs":
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            pbs_memory = pbs_format_bytes_ceil(parse_bytes(memory))
            options["resource_spec"] = f"select=1:ncpus={cores}:ngpus={gpus}:mem={pbs_memory}"
    options["job_extra_directives"] = directives
    cls = jobqueue.SLURMCluster if kind == "slurm" else jobqueue.PBSCluster
    return cls(**{key: value for key, value in options.items() if value is not None})


def _kubernetes_cluster(
    cluster: ClusterConfig | None, n_workers: int | None, device: str | None
) -> Any:
    operator = _import_extra("kubernetes")
    image = _get(cluster, "image")
    if image is None:
        raise ConfigError("cluster.image: required for kind kubernetes (an image with dtm)")
    gpu = (device or _get(cluster, "device", "cpu")) == "gpu"
    return operator.KubeCluster(
        name=_get(cluster, "name", "dtm"),
        image=image,
        n_workers=n_workers or _get(cluster, "n_workers", 2),
        resources=_get(cluster, "resources", {}),
        namespace=_get(cluster, "namespace"),
        worker_command="dask cuda worker" if gpu else "dask worker",
    )


@contextlib.contextmanager
def connect(
    cluster: ClusterConfig | None = None,
    *,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> Iterator[distributed.Client]:
    """Start or reach the Dask cluster described by ``cluster`` and yield a client.

    Parameters
    ----------
    cluster
        The ``cluster:`` section of the configuration (:class:`dtm.config.ClusterConfig`);
        ``None`` for the defaults (an embedded local cluster sized to the machine).
    scheduler_address, n_workers, device
        Command-line overrides (``--scheduler``, ``--workers``, ``--device``); they win over
        the configuration. An address may be ``tcp://host:port``, ``host:port`` or the path
        of a ``dask scheduler --scheduler-file`` JSON file. ``n_workers`` is the number of
        worker processes (local), of GPU workers (gpu-local), of jobs (slurm, pbs) or of
        worker pods (kubernetes); an external scheduler keeps its own workers.
    quiet
        Do not print the one-line summary with the dashboard link.

    Yields
    ------
    distributed.Client
        Connected client. Clusters started here (local, jobqueue, kubernetes, dask-cuda)
        are closed on exit; an external scheduler and its workers are left running. Jobqueue
        and kubernetes workers may still be starting: see :func:`ensure_workers`.

    Raises
    ------
    ClusterError
        The scheduler cannot be reached, an optional dependency is missing (the message
        names the extra to install), or no GPU is usable for ``device: gpu``.
    """
    import distributed

    kind = resolve_kind(cluster, scheduler_address, device)
    with contextlib.ExitStack() as stack:
        if kind == "address":
            address = scheduler_address or str(_get(cluster, "scheduler_address"))
            client = stack.enter_context(_connect_address(address, CONNECT_TIMEOUT_S))
            summary = f"scheduler {client.scheduler.address}"
        else:
            if kind == "local":
                started = _local_cluster(cluster, n_workers)
            elif kind == "gpu-local":
                started = _gpu_local_cluster(cluster, n_workers)
            elif kind in ("slurm", "pbs"):
                started = jobqueue_cluster(cluster, device)
            elif kind == "kubernetes":
                started = _kubernetes_cluster(cluster, n_workers, device)
            else:
                raise ConfigError(f"cluster.kind: unknown kind {kind!r}")
            stack.enter_context(started)
            if kind in ("slurm", "pbs"):
                _scale_jobs(started, cluster, n_workers)
            client = stack.enter_context(distributed.Client(started))
            summary = f"{kind} cluster"
        if not quiet:
            link = dashboard_link(client) or "(no dashboard)"
            print(
                f"dtm: {summary}, {worker_count(client)} workers, {worker_threads(client)} "
                f"threads; dashboard {link}",
                flush=True,
            )
        yield client


def _scale_jobs(started: Any, cluster: ClusterConfig | None, n_jobs: int | None) -> None:
    """Fixed number of jobs, or adaptive between ``adapt_minimum`` and ``adapt_maximum``."""
    maximum = _get(cluster, "adapt_maximum")
    if maximum is not None and n_jobs is None:
        started.adapt(minimum_jobs=int(_get(cluster, "adapt_minimum", 0)), maximum_jobs=maximum)
    else:
        started.scale(jobs=n_jobs or int(_get(cluster, "n_jobs", 1)))


@contextlib.contextmanager
def session(
    client: distributed.Client | None,
    cluster: ClusterConfig | None,
    *,
    out: Any,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    device: str | None = None,
) -> Iterator[distributed.Client]:
    """The client a program runs on: ``client`` if given, else one from :func:`connect`.

    Waits for a worker, installs dtm's dashboard page and prints the dashboard link to
    ``out``; a cluster started here is closed on exit.
    """
    from dtm import dashboard  # noqa: PLC0415 (imports bokeh; only once a cluster is used)

    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(
                connect(
                    cluster,
                    scheduler_address=scheduler_address,
                    n_workers=n_workers,
                    device=device,
                    quiet=True,
                )
            )
        ensure_workers(client, 1)
        dashboard.install(client)
        link = dashboard_link(client)
        rate_page = f"  (correlations/s per worker: {link.removesuffix('/status')}/dtm)"
        print(f"dashboard: {link}" + (rate_page if link else ""), file=out)
        yield client
