"""Compute resources: the Dask cluster and Leopard-EM's ``computational_config``."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from dtm.config.base import InputFile, Positive, PositiveInt, _Model, _ordered, _Problem


class ComputationalConfig(_Model):
    """Leopard-EM compute resources: ``gpu_ids: cpu`` runs on CPUs, any other value on GPUs."""

    leopard_unused = {"backend": "Leopard-EM's choice of GPU kernel; dtm has one per device"}
    gpu_ids: int | list[int] | str | list[str] = [0]
    """GPU index, list of indices, 'cuda:N' (or a list of them), 'all' or 'cpu'."""
    num_cpus: PositiveInt = 1
    """CPU threads (Leopard-EM: streams per GPU)."""
    backend: str | None = None
    """Leopard-EM kernel choice (streamed, batched, zipfft); unused by dtm."""

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _check_gpu_ids(cls, value: Any) -> Any:
        def gpu(item: Any) -> bool:
            if isinstance(item, str):
                return re.fullmatch(r"(cuda:)?\d+", item) is not None
            return isinstance(item, int) and not isinstance(item, bool) and item >= 0

        items = value if isinstance(value, list) else [value]
        if value not in ("all", "cpu") and not (items and all(gpu(i) for i in items)):
            raise ValueError("expected a GPU index >= 0, a list of them, 'cuda:N', 'all' or 'cpu'")
        return value

    @property
    def device(self) -> Literal["cpu", "gpu"]:
        """``cpu`` when ``gpu_ids`` is ``"cpu"``, else ``gpu``."""
        return "cpu" if self.gpu_ids == "cpu" else "gpu"

    def gpu_indices(self) -> list[int] | None:
        """The GPU indices to use; None for all GPUs (``all``) or none (``cpu``)."""
        if self.gpu_ids in ("all", "cpu"):
            return None
        items = self.gpu_ids if isinstance(self.gpu_ids, list) else [self.gpu_ids]
        return [int(str(item).removeprefix("cuda:")) for item in items]


class SecurityConfig(_Model):
    """TLS certificates of the Dask cluster, under the names of Dask's ``Security``.

    Used to connect to a scheduler (``--scheduler tls://…``) and, for a cluster dtm starts,
    by its scheduler and workers as well: the one certificate serves every role.
    """

    tls_ca_file: InputFile
    """PEM file of the certificate authority that signed the cluster's certificates."""
    tls_client_cert: InputFile
    """PEM file of this side's certificate (may hold the key as well)."""
    tls_client_key: InputFile | None = None
    """PEM file of the certificate's private key, if not in ``tls_client_cert``."""
    require_encryption: bool = True
    """Refuse unencrypted (``tcp://``) connections."""


class ClusterConfig(_Model):
    """Where the Dask workers come from, and how the search is cut into tasks."""

    kind: Literal["local", "address", "slurm", "pbs", "kubernetes", "gpu-local"] = "local"
    """local: an embedded LocalCluster; address: an existing scheduler; slurm, pbs:
    dask-jobqueue; kubernetes: dask-kubernetes; gpu-local: a LocalCUDACluster."""
    scheduler_address: str | None = None
    """Scheduler to connect to, e.g. tcp://host:8786 (implies kind address)."""
    n_workers: PositiveInt | None = None
    """Number of workers (local, gpu-local, kubernetes)."""
    threads_per_worker: PositiveInt | None = None
    """Threads per worker."""
    memory_limit: str | None = None
    """Memory limit per worker, e.g. '8GB'."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Array backend of the workers: numpy (cpu) or cupy (gpu)."""
    chunk_size: PositiveInt | None = None
    """Orientations per task; null chooses automatically."""
    split_every: Annotated[int, Field(ge=2)] = 8
    """Partial results merged by one reduction task."""
    worker_timeout: Positive | None = None
    """Seconds to wait for the first worker before giving up; default 60, and no limit for
    slurm, pbs and kubernetes, whose workers may wait in a queue."""
    dashboard_address: str = "127.0.0.1:8787"
    """Dashboard address of a cluster that dtm starts; without a host (':8787') it listens
    on 127.0.0.1 only. '0.0.0.0:8787' opens it to the network."""
    host: str | None = None
    """Address the scheduler and the workers of a cluster dtm starts listen on; default
    127.0.0.1 (local, gpu-local: this machine only) and every interface (slurm, pbs: the
    jobs must reach the scheduler; TLS)."""
    security: SecurityConfig | None = None
    """TLS certificates: used to reach a tls:// scheduler and by clusters dtm starts
    (slurm and pbs use temporary certificates without them)."""
    queue: str | None = None
    """Batch queue or partition (slurm, pbs)."""
    account: str | None = None
    """Account or project charged (slurm, pbs)."""
    walltime: str | None = None
    """Wall time of one job, e.g. '02:00:00' (slurm, pbs)."""
    cores: PositiveInt | None = None
    """Cores per job (slurm, pbs)."""
    memory: str | None = None
    """Memory per job, e.g. '64GB' (slurm, pbs)."""
    processes: PositiveInt | None = None
    """Worker processes per job (slurm, pbs)."""
    gpus_per_job: Annotated[int, Field(ge=0)] | None = None
    """GPUs per job (slurm, pbs)."""
    n_jobs: PositiveInt | None = None
    """Jobs to start (slurm, pbs)."""
    adapt_minimum: PositiveInt | None = None
    """Adaptive scaling: fewest jobs (slurm, pbs; default 1: the search starts once a worker
    is up, and adaptive scaling asks for jobs only for tasks already submitted)."""
    adapt_maximum: PositiveInt | None = None
    """Adaptive scaling: most jobs (slurm, pbs)."""
    job_extra_directives: list[str] = []
    """Extra scheduler directives, e.g. '--gres=gpu:1' (slurm, pbs)."""
    local_directory: str | None = None
    """Scratch directory of the workers."""
    name: str | None = None
    """Cluster name (kubernetes)."""
    image: str | None = None
    """Container image of the workers (kubernetes)."""
    resources: dict[str, Any] | None = None
    """Worker pod resources, e.g. {limits: {cpu: '2', memory: 8G}} (kubernetes; default
    with device gpu: {limits: {nvidia.com/gpu: 1}})."""
    namespace: str | None = None
    """Namespace (kubernetes)."""
    stall_timeout: Positive | None = 600.0
    """Seconds without any finished task (every worker paused for memory, or none left)
    after which the run stops with a message (resume it with --resume); null: never."""
    _check_adapt = _ordered("adapt_minimum", "adapt_maximum")

    @field_validator("memory_limit", "memory")
    @classmethod
    def _check_bytes(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        from dask.utils import parse_bytes

        try:
            n_bytes = parse_bytes(value)
        except (ValueError, TypeError):
            n_bytes = None
        if not n_bytes or n_bytes <= 0:
            raise ValueError("expected an amount of memory such as '8GB', '512MiB' or 'auto'")
        return value

    @model_validator(mode="after")
    def _address_rule(self) -> ClusterConfig:
        if self.scheduler_address and self.kind == "local":
            self.kind = "address"
        elif self.scheduler_address and self.kind != "address":
            raise _Problem("scheduler_address needs kind address", "kind", self.kind)
        elif self.kind == "address" and not self.scheduler_address:
            raise _Problem("required with kind address", "scheduler_address")
        return self

    @model_validator(mode="after")
    def _settings_of_the_kind(self) -> ClusterConfig:
        required: dict[str, tuple[str, ...]] = {
            "slurm": ("cores", "memory"),
            "pbs": ("cores", "memory"),
            "kubernetes": ("image",),
        }
        for name in required.get(self.kind, ()):
            if getattr(self, name) is None:
                raise _Problem(f"required with kind {self.kind}", name)
        if self.kind == "kubernetes" and self.security is not None:
            # KubeCluster and the Dask operator connect to the scheduler with plain tcp://.
            raise _Problem(
                "not supported with kind kubernetes (dask-kubernetes has no TLS)", "security"
            )
        return self
