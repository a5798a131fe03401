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

How each kind is started: :mod:`dtm.runtime.deployments`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm.errors import ClusterError
from dtm.runtime.deployments import (
    cluster_security,
    dashboard_host,
    default_local_workers,
    gpu_unavailable_reason,
    is_loopback,
    jobqueue_cluster,
    kubernetes_cluster_spec,
    setting,
    start_cluster,
    warn_unencrypted,
)

# Re-exported: the cluster API users reach through dtm.runtime.cluster.
__all__ = [
    "CONNECT_TIMEOUT_S",
    "connect",
    "dashboard_link",
    "default_local_workers",
    "ensure_workers",
    "gpu_unavailable_reason",
    "jobqueue_cluster",
    "kubernetes_cluster_spec",
    "resolve_kind",
    "session",
    "worker_count",
    "worker_threads",
]

if TYPE_CHECKING:
    import distributed

    from dtm.config import ClusterConfig

#: Seconds to wait for a scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for the first worker (``cluster.worker_timeout`` overrides it) ...
WORKER_TIMEOUT_S = 60.0
#: ... except for kinds whose workers are batch jobs or pods, which may wait in a queue.
QUEUED_KINDS = frozenset({"slurm", "pbs", "kubernetes"})


def resolve_kind(
    cluster: ClusterConfig | None = None,
    scheduler_address: str | None = None,
    device: str | None = None,
) -> str:
    """The deployment kind after the command-line overrides.

    An address (from the command line or the config) means ``address``; ``device: gpu`` with
    the default ``local`` kind means ``gpu-local``.
    """
    if scheduler_address or setting(cluster, "scheduler_address"):
        return "address"
    kind = str(setting(cluster, "kind", "local"))
    if kind == "local" and (device or setting(cluster, "device", "cpu")) == "gpu":
        return "gpu-local"
    return kind


def dashboard_link(client: distributed.Client, host: str | None = None) -> str:
    """URL of the scheduler's dashboard (``…/status``), or ``""`` when it has none.

    ``host``: the address the dashboard listens on, when known (a cluster dtm started):
    Dask writes the scheduler's host in the link, which is not where a dashboard kept on
    127.0.0.1 answers.
    """
    try:
        link = str(client.dashboard_link or "")
    except (KeyError, AttributeError):  # scheduler started without the dashboard service
        return ""
    if link and host and host not in ("0.0.0.0", "::"):
        parts = urllib.parse.urlsplit(link)
        netloc = f"[{host}]" if ":" in host else host
        link = parts._replace(netloc=f"{netloc}:{parts.port}").geturl()
    return link


def _started_dashboard_host(kind: str, cluster: ClusterConfig | None) -> str | None:
    """Where the dashboard of a cluster of ``kind`` that dtm starts listens, if dtm chose it
    (Kubernetes dashboards are reached through the operator's port-forward)."""
    return dashboard_host(cluster) if kind in ("local", "gpu-local", "slurm", "pbs") else None


def worker_count(client: distributed.Client) -> int:
    """Number of workers connected to the scheduler now."""
    return len(client.nthreads())


def worker_threads(client: distributed.Client) -> int:
    """Total number of worker threads (tasks that can run at once) on the cluster now."""
    return sum(client.nthreads().values())


def ensure_workers(
    client: distributed.Client, n: int = 1, timeout: float | None = WORKER_TIMEOUT_S
) -> None:
    """Wait until at least ``n`` workers are connected (jobs queued, pods starting …);
    ``timeout`` None waits as long as it takes.

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


def _host_port(address: str) -> tuple[str, str]:
    host, _, port = address.partition("://")[2].rpartition(":")
    return host.strip("[]"), port


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast when nothing listens on a ``tcp://`` or ``tls://`` address (the client would
    retry until its timeout)."""
    if not address.startswith(("tcp://", "tls://")):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ClusterError(f"scheduler {address}: cannot connect ({error})") from None


def _client_security(address: str, cluster: ClusterConfig | None) -> Any:
    """The Security to reach ``address`` with: ``cluster.security``, else Dask's own
    configuration (``distributed.comm.tls.*``), which a ``tls://`` address needs.

    A ``tcp://`` address beyond this machine gets the one-line warning."""
    from distributed.security import Security

    security = cluster_security(cluster, "address")
    if address.startswith("tls://") and security is None:
        security = Security()
        tls = security.get_tls_config_for_role("client")
        if not (tls["ca_file"] and tls["cert"]):
            raise ClusterError(
                f"scheduler {address}: TLS needs certificates: set cluster.security "
                "(tls_ca_file, tls_client_cert, tls_client_key)"
            )
    if address.startswith("tcp://") and not is_loopback(_host_port(address)[0]):
        if security is None or not security.require_encryption:
            warn_unencrypted(f"scheduler {address}: connecting")
    return security


def _connect_address(
    address: str, timeout: float, cluster: ClusterConfig | None = None
) -> distributed.Client:
    import distributed

    address = _scheduler_address(address)
    security = _client_security(address, cluster)
    _check_reachable(address, timeout)
    try:
        return distributed.Client(address, timeout=timeout, security=security)
    except (OSError, TimeoutError, ValueError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ClusterError(f"scheduler {address}: cannot connect ({message})") from None


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
        the configuration. An address may be ``tcp://host:port``, ``tls://host:port``
        (certificates from ``cluster.security``), ``host:port`` or the path of a
        ``dask scheduler --scheduler-file`` JSON file. ``n_workers`` is the number of
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
            address = scheduler_address or str(setting(cluster, "scheduler_address"))
            client = stack.enter_context(_connect_address(address, CONNECT_TIMEOUT_S, cluster))
            summary = f"scheduler {client.scheduler.address}"
        else:
            started = stack.enter_context(start_cluster(kind, cluster, n_workers, device))
            client = stack.enter_context(distributed.Client(started))
            summary = f"{kind} cluster"
        if not quiet:
            link = dashboard_link(client, _started_dashboard_host(kind, cluster))
            link = link or "(no dashboard)"
            print(
                f"dtm: {summary}, {worker_count(client)} workers, {worker_threads(client)} "
                f"threads; dashboard {link}",
                flush=True,
            )
        yield client


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
    # distributed's HTTP handlers: imported only once a cluster is used.
    from dtm.runtime import dashboard  # noqa: PLC0415

    with contextlib.ExitStack() as stack:
        kind = resolve_kind(cluster, scheduler_address, device)
        host = None
        if client is None:
            host = _started_dashboard_host(kind, cluster)
            client = stack.enter_context(
                connect(
                    cluster,
                    scheduler_address=scheduler_address,
                    n_workers=n_workers,
                    device=device,
                    quiet=True,
                )
            )
        queued = kind in QUEUED_KINDS
        if queued and worker_count(client) == 0:
            print("waiting for the first worker job to start (Ctrl-C to stop)", file=out)
        timeout = setting(cluster, "worker_timeout", None if queued else WORKER_TIMEOUT_S)
        ensure_workers(client, 1, timeout)
        page = dashboard.install(client)
        link = dashboard_link(client, host)
        rate_page = f"  (correlations/s per worker: {link.removesuffix('/status')}/dtm)"
        print(f"dashboard: {link}" + (rate_page if link and page else ""), file=out)
        yield client
