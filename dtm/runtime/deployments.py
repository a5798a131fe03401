"""Start each kind of Dask cluster a search can run on, from the ``cluster:`` section.

``local``: an embedded :class:`distributed.LocalCluster` of worker processes sized to the
machine; ``gpu-local``: a ``dask-cuda`` :class:`LocalCUDACluster`, one worker per GPU;
``slurm`` / ``pbs``: ``dask-jobqueue`` batch jobs; ``kubernetes``: a ``DaskCluster``
created through the ``dask-kubernetes`` operator. Their optional dependencies are imported
only when their kind is started (:func:`import_extra` names the extra to install).
:func:`dtm.runtime.cluster.connect` chooses the kind and closes what it started.

Threads: each worker process runs ``threads_per_worker`` tasks at once. Worker processes
started by ``distributed`` (nannies) set ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` to 1 (``distributed.nanny.pre-spawn-environ``), so BLAS does not
oversubscribe the cores; the search kernel passes ``workers=`` to :mod:`scipy.fft`
explicitly rather than relying on a global default. Hence the default of one
single-threaded worker per core. GPU workers have one thread each.

Network: clusters started here listen on 127.0.0.1 (local, gpu-local: scheduler, workers,
dashboard) unless ``cluster.host`` / ``cluster.dashboard_address`` name another address;
batch-job clusters (slurm, pbs), whose jobs must reach the scheduler over the network, use
TLS with temporary certificates (:func:`cluster_security`), or the user's
``cluster.security``; their dashboard stays on 127.0.0.1. A Dask port that anyone can reach
runs anyone's code (the scheduler and workers unpickle functions).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dask.system

from dtm.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from dtm.config import ClusterConfig

#: Extra that provides the optional dependency of each deployment kind.
_EXTRAS = {
    "slurm": ("dask_jobqueue", "dask-jobqueue", "slurm"),
    "pbs": ("dask_jobqueue", "dask-jobqueue", "pbs"),
    "kubernetes": ("dask_kubernetes.operator", "dask-kubernetes", "kubernetes"),
    "gpu-local": ("dask_cuda", "dask-cuda", "gpu"),
}


def default_local_workers() -> tuple[int, int]:
    """Default size of the embedded cluster: ``(n_workers, threads_per_worker)``.

    One single-threaded worker process per available core: the kernel's FFTs release the
    GIL but processes avoid any contention in the pure-Python parts. The cores are Dask's
    count: the affinity mask (a Slurm allocation) and a cgroup CPU quota (Docker,
    Kubernetes) both lower it.
    """
    return dask.system.CPU_COUNT, 1


def setting(cluster: ClusterConfig | None, name: str, default: Any = None) -> Any:
    """``cluster.name``, or ``default`` when there is no section or the setting is unset."""
    value = getattr(cluster, name, default) if cluster is not None else default
    return default if value is None else value


def _import_extra(kind: str) -> Any:
    """The optional dependency of ``kind``, imported; the Ctrl-C handler is kept.

    ``dask_jobqueue.runner`` replaces the SIGINT handler when imported (with one that calls
    ``sys.exit()``): Ctrl-C would then end ``dtm match`` with status 0 and without the
    "continue with --resume" line.
    """
    module, package, extra = _EXTRAS[kind]
    handler = signal.getsignal(signal.SIGINT)
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ClusterError(
            f"kind {kind} needs {package}: pip install 'dtm[{extra}]' ({error})"
        ) from None
    finally:
        main = threading.current_thread() is threading.main_thread()
        if main and handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


#: Where clusters started by dtm listen unless the configuration names another address.
LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 possibly in brackets) is this machine
    only: ``localhost``, 127.0.0.0/8 or ::1."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn(message: str) -> None:
    """One line on stderr: ``dtm: warning: …``."""
    print(f"dtm: warning: {message}", file=sys.stderr, flush=True)


def warn_unencrypted(
    what: str, remedy: str = "set cluster.security, see 'Security' in docs/deployment.md"
) -> None:
    """The one-line warning for a ``tcp://`` port open beyond this machine without TLS."""
    warn(
        f"{what} without TLS: anyone who can reach it can run code as you (Dask runs "
        f"pickled functions); {remedy}"
    )


def cluster_security(cluster: ClusterConfig | None, kind: str) -> Any:
    """The :class:`distributed.security.Security` of a cluster of ``kind``, or ``None``.

    ``cluster.security`` when given: its certificate serves every role (client, scheduler,
    workers). Otherwise slurm and pbs get temporary certificates
    (``Security.temporary()``, made in memory; dask-jobqueue writes the workers' copies,
    mode 0600, to its shared temporary directory) and the other kinds none (``address``:
    then Dask's own configuration, if any, applies).

    Raises
    ------
    ClusterError
        If temporary certificates cannot be made (``cryptography`` missing).
    """
    from distributed.security import Security

    given = setting(cluster, "security")
    if given is not None:
        cert = str(given.tls_client_cert)
        key = None if given.tls_client_key is None else str(given.tls_client_key)
        return Security(
            tls_ca_file=str(given.tls_ca_file),
            require_encryption=bool(given.require_encryption),
            **{
                f"tls_{role}_{part}": value
                for role in ("client", "scheduler", "worker")
                for part, value in (("cert", cert), ("key", key))
            },
        )
    if kind in ("slurm", "pbs"):
        try:
            return Security.temporary()
        except ImportError:
            raise ClusterError(
                f"kind {kind}: temporary TLS certificates need the package cryptography "
                "(pip install cryptography), or give certificates in cluster.security"
            ) from None
    return None


def dashboard_host(cluster: ClusterConfig | None) -> str:
    """The host the dashboard of a cluster dtm starts listens on (127.0.0.1 by default)."""
    address = str(setting(cluster, "dashboard_address", "") or "")
    return address.rpartition(":")[0].strip("[]") or LOOPBACK


def _dashboard_address(cluster: ClusterConfig | None) -> str | None:
    """``cluster.dashboard_address`` with 127.0.0.1 for a missing host, moved to a random
    port when its port is taken; a one-line warning when it is open beyond this machine."""
    address = setting(cluster, "dashboard_address", f"{LOOPBACK}:8787")
    if not address:
        return None
    host, _, port = str(address).rpartition(":")
    if host and not is_loopback(host):
        warn(
            f"cluster.dashboard_address {address}: the dashboard is open to the network "
            "(it shows task names, file paths and logs)"
        )
    return _free_dashboard_address(f"{host or LOOPBACK}:{port}")


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


def _listen_options(cluster: ClusterConfig | None, kind: str) -> dict[str, Any]:
    """``host``, ``security``, ``protocol`` and ``dashboard_address`` of a local cluster:
    127.0.0.1 unless ``cluster.host`` says otherwise (with a warning without TLS)."""
    host = str(setting(cluster, "host", LOOPBACK))
    security = cluster_security(cluster, kind)
    options: dict[str, Any] = {"host": host, "dashboard_address": _dashboard_address(cluster)}
    if security is not None:
        options |= {"security": security, "protocol": "tls://"}
    elif not is_loopback(host):
        warn_unencrypted(f"cluster.host {host}: the {kind} cluster listens on {host}")
    return options


def _started_quietly(start: Callable[[], Any]) -> Any:
    """``start()``, which builds a cluster; interrupted (Ctrl-C) before it returns, the
    half-started cluster is closed here, quietly.

    distributed closes a cluster whose start fails with an exception, but not one stopped
    by ``KeyboardInterrupt``: its exit hook then closes it and prints a traceback
    (``AssertionError: Status.init``) after dtm's one-line message. Found by
    ``test_ctrl_c_exits_130_and_says_how_to_resume`` on a loaded machine.
    """
    from distributed.deploy.spec import SpecCluster

    before = set(SpecCluster._instances)
    try:
        return start()
    except BaseException:
        for half_started in set(SpecCluster._instances) - before:
            with contextlib.suppress(Exception):
                half_started.close(timeout=10)
            half_started.shutdown_on_close = False  # nothing left for the exit hook
            # A worker start cut short leaves a failed task that asyncio reports, with its
            # traceback, when it is collected: the process is ending, say nothing more.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        raise


def _local_cluster(cluster: ClusterConfig | None, n_workers: int | None) -> Any:
    import distributed

    default_workers, default_threads = default_local_workers()
    return _started_quietly(
        functools.partial(
            distributed.LocalCluster,
            n_workers=n_workers or setting(cluster, "n_workers", default_workers),
            threads_per_worker=setting(cluster, "threads_per_worker", default_threads),
            processes=True,
            memory_limit=setting(cluster, "memory_limit", "auto"),
            # Task failures come back to the client, which says them in one line and keeps
            # the traceback in its log file: the workers do not print them on the terminal.
            silence_logs=logging.CRITICAL,
            **_listen_options(cluster, "local"),
        )
    )


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """Why no CUDA GPU can be used from this process, or ``None`` when the search runs on one.

    Beyond ``cupy.cuda.is_available()`` (which only counts devices), one tiny cuFFT
    transform and the statistics kernel (compiled by NVRTC) run, so that a driver without
    the CUDA libraries fails here, in one line, rather than in the first task of a search.
    Checked once per process.
    """
    try:
        import cupy
        import cupyx.scipy.fft

        from dtm.search.stats import PartialStats, update

        if not cupy.cuda.is_available():
            return "cupy.cuda.is_available() is False"
        maps = cupyx.scipy.fft.irfft(cupyx.scipy.fft.rfft(cupy.ones((2, 1, 4), "f4")), n=4)
        stats = PartialStats.empty((1, 4), cupy)
        update(stats, maps.astype(cupy.float32), 0)
        if float(stats.total.sum()) != 8.0:
            return "the CUDA statistics update gave a wrong sum"
    except ImportError as error:
        return f"{type(error).__name__}: {error}; install with pip install 'dtm[gpu]'"
    except Exception as error:  # a CUDA driver/runtime/compiler error
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _gpu_local_cluster(cluster: ClusterConfig | None, n_workers: int | None) -> Any:
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise ClusterError(f"device gpu: no working CUDA GPU ({reason})")
    dask_cuda = _import_extra("gpu-local")
    return dask_cuda.LocalCUDACluster(
        n_workers=n_workers or setting(cluster, "n_workers"),
        threads_per_worker=setting(cluster, "threads_per_worker", 1),
        memory_limit=setting(cluster, "memory_limit", "auto"),
        # Task failures come back to the client, which says them in one line and keeps
        # the traceback in its log file: the workers do not print them on the terminal.
        silence_logs=logging.CRITICAL,
        **_listen_options(cluster, "gpu-local"),
    )


def jobqueue_cluster(cluster: ClusterConfig | None, device: str | None = None) -> Any:
    """A ``dask-jobqueue`` ``SLURMCluster`` or ``PBSCluster`` for ``cluster.kind``, not scaled.

    Its scheduler runs in this process; ``cluster.job_script()`` shows the batch script that
    each job will run. With GPUs (``gpus_per_job`` > 0 or ``device: gpu``) every job asks for
    ``gpus_per_job`` GPUs (Slurm ``--gres=gpu:N``, PBS ``ngpus=N``) and runs
    ``dask cuda worker``, one worker process per GPU with one thread (as ``dask-cuda``
    does: threads of a worker would share its GPU's memory, about five FFT batches per
    running task) and ``memory / N`` of host memory; the job still books ``cores`` CPUs.

    ``cores`` and ``memory`` (per job) are required by the configuration's validation.

    The scheduler listens on every interface (``cluster.host`` to choose one) with TLS:
    ``cluster.security``, or temporary certificates whose worker copies dask-jobqueue
    writes (mode 0600) to its ``shared-temp-directory`` (Dask configuration
    ``jobqueue.KIND.shared-temp-directory``; default: the home directory, which the jobs
    must see) for as long as the cluster runs. The dashboard listens on 127.0.0.1 unless
    ``cluster.dashboard_address`` names a host.

    Raises
    ------
    ClusterError
        If ``dask-jobqueue`` is not installed.
    """
    kind = str(setting(cluster, "kind"))
    jobqueue = _import_extra(kind)
    cores, memory = int(setting(cluster, "cores")), str(setting(cluster, "memory"))
    gpus = int(setting(cluster, "gpus_per_job", 0))
    if gpus == 0 and (device or setting(cluster, "device", "cpu")) == "gpu":
        gpus = 1
    directives = list(setting(cluster, "job_extra_directives", []))
    options: dict[str, Any] = {
        "queue": setting(cluster, "queue"),
        "account": setting(cluster, "account"),
        "walltime": setting(cluster, "walltime"),
        "cores": cores,
        "memory": memory,
        "processes": gpus or int(setting(cluster, "processes", 1)),
        "local_directory": setting(cluster, "local_directory"),
        "scheduler_options": {"dashboard_address": _dashboard_address(cluster)},
        "job_name": "dtm-worker",
        "security": cluster_security(cluster, kind),
        "shared_temp_directory": _shared_temp_directory(kind),
    }
    if setting(cluster, "host") is not None:
        options["scheduler_options"]["host"] = setting(cluster, "host")
    if gpus:
        options["worker_command"] = "dask cuda worker"  # run as `python -m dask cuda worker`
        # jobqueue gives each process cores / processes threads: one per GPU worker.
        options["cores"] = gpus
        if kind == "slurm":
            options["job_cpu"] = cores
            if not any("gres" in d or "gpus" in d for d in directives):
                directives.append(f"--gres=gpu:{gpus}")
        if kind == "pbs":
            from dask.utils import parse_bytes
            from dask_jobqueue.pbs import pbs_format_bytes_ceil

            pbs_memory = pbs_format_bytes_ceil(parse_bytes(memory))
            options["resource_spec"] = f"select=1:ncpus={cores}:ngpus={gpus}:mem={pbs_memory}"
    options["job_extra_directives"] = directives
    cls = jobqueue.SLURMCluster if kind == "slurm" else jobqueue.PBSCluster
    return cls(**{key: value for key, value in options.items() if value is not None})


def _shared_temp_directory(kind: str) -> str:
    """Where dask-jobqueue writes the workers' copies of temporary certificates: its own
    setting, else the home directory (seen by the jobs on nearly every site)."""
    import dask

    configured = dask.config.get(f"jobqueue.{kind}.shared-temp-directory", None)
    return os.path.expanduser(os.path.expandvars(str(configured or "~")))


def kubernetes_cluster_spec(
    cluster: ClusterConfig | None, n_workers: int | None = None, device: str | None = None
) -> dict[str, Any]:
    """The ``DaskCluster`` resource that ``kind: kubernetes`` asks the Dask operator for.

    ``cluster.resources`` go to the worker pods only (the scheduler needs no GPU). GPU
    workers run ``dask cuda worker`` and, when ``resources`` is not given, each asks for
    one ``nvidia.com/gpu``: without it Kubernetes would start them without a GPU.

    ``cluster.image`` is required by the configuration's validation.

    Raises
    ------
    ClusterError
        If ``dask-kubernetes`` is not installed.
    """
    operator = _import_extra("kubernetes")
    image = setting(cluster, "image")
    gpu = (device or setting(cluster, "device", "cpu")) == "gpu"
    spec: dict[str, Any] = operator.make_cluster_spec(
        name=setting(cluster, "name", "dtm"),
        image=image,
        n_workers=n_workers or setting(cluster, "n_workers", 2),
        worker_command="dask cuda worker" if gpu else "dask worker",
    )
    resources = setting(cluster, "resources") or (
        {"limits": {"nvidia.com/gpu": 1}} if gpu else None
    )
    spec["spec"]["worker"]["spec"]["containers"][0]["resources"] = resources
    return spec


def _kubernetes_cluster(
    cluster: ClusterConfig | None, n_workers: int | None, device: str | None
) -> Any:
    spec = kubernetes_cluster_spec(cluster, n_workers, device)
    operator = _import_extra("kubernetes")
    # dask-kubernetes reaches the scheduler with plain tcp:// (its KubeCluster and the
    # operator's DASK_SCHEDULER_ADDRESS), so this kind cannot use TLS: say so.
    warn_unencrypted(
        "kind kubernetes: the scheduler listens on the Kubernetes cluster's network",
        "restrict it with deploy/kubernetes/networkpolicy.yaml",
    )
    return operator.KubeCluster(custom_cluster_spec=spec, namespace=setting(cluster, "namespace"))


def _scale_jobs(started: Any, cluster: ClusterConfig | None, n_jobs: int | None) -> None:
    """Fixed number of jobs, or adaptive between ``adapt_minimum`` and ``adapt_maximum``."""
    maximum = setting(cluster, "adapt_maximum")
    if maximum is not None and n_jobs is None:
        started.adapt(minimum_jobs=int(setting(cluster, "adapt_minimum", 1)), maximum_jobs=maximum)
    else:
        started.scale(jobs=n_jobs or int(setting(cluster, "n_jobs", 1)))


def start_cluster(
    kind: str, cluster: ClusterConfig | None, n_workers: int | None, device: str | None
) -> Any:
    """Start a cluster of ``kind`` (not ``address``); jobqueue clusters are scaled.

    Raises
    ------
    ConfigError
        For an unknown kind or a missing required field.
    ClusterError
        If the kind's optional dependency is missing or no GPU works for ``gpu-local``.
    """
    if kind == "local":
        return _local_cluster(cluster, n_workers)
    if kind == "gpu-local":
        return _gpu_local_cluster(cluster, n_workers)
    if kind == "kubernetes":
        return _kubernetes_cluster(cluster, n_workers, device)
    if kind in ("slurm", "pbs"):
        started = jobqueue_cluster(cluster, device)
        try:
            _scale_jobs(started, cluster, n_workers)
        except BaseException:
            started.close()
            raise
        return started
    raise ConfigError(f"cluster.kind: unknown kind {kind!r}")
