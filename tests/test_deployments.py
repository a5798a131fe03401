"""Starting each kind of cluster: the batch scripts of Slurm/PBS jobs, the Kubernetes spec.

Nothing is submitted: ``job_script()`` and the ``DaskCluster`` resource are what would be.
"""

from __future__ import annotations

import pytest

from dtm.config import ClusterConfig
from dtm.deployments import jobqueue_cluster, kubernetes_cluster_spec, start_cluster
from dtm.errors import ClusterError, ConfigError


def _jobqueue_installed() -> bool:
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return False
    return True


def _job_script(config: ClusterConfig) -> str:
    cluster = jobqueue_cluster(config)
    try:
        return str(cluster.job_script())
    finally:
        cluster.close()


SLURM_GPU = dict(
    kind="slurm",
    queue="gpu-a100",
    account="cryoem42",
    walltime="02:30:00",
    cores=8,
    memory="64GB",
    gpus_per_job=2,
    job_extra_directives=["--constraint=a100"],
    local_directory="/scratch/dtm",
    dashboard_address=":0",
)


def test_slurm_job_script_has_the_configured_directives():
    config = ClusterConfig(**SLURM_GPU)
    if not _jobqueue_installed():  # then the kind must say which extra to install
        with pytest.raises(ClusterError, match=r"pip install 'dtm\[slurm\]'"):
            jobqueue_cluster(config)
        return
    lines = _job_script(config).splitlines()
    for directive in (
        "-p gpu-a100",
        "-A cryoem42",
        "-t 02:30:00",
        "--cpus-per-task=8",
        "--gres=gpu:2",
        "--constraint=a100",
    ):
        assert f"#SBATCH {directive}" in lines
    command = lines[-1]
    assert " -m dask cuda worker " in command  # one dask-cuda worker per GPU
    # One thread per GPU worker: threads would share the GPU's memory.
    assert "--nthreads 1" in command and "--local-directory /scratch/dtm" in command


def test_pbs_job_script_has_the_configured_directives():
    config = ClusterConfig(**{**SLURM_GPU, "kind": "pbs", "job_extra_directives": []})
    if not _jobqueue_installed():
        with pytest.raises(ClusterError, match=r"pip install 'dtm\[pbs\]'"):
            jobqueue_cluster(config)
        return
    lines = _job_script(config).splitlines()
    for directive in ("-q gpu-a100", "-A cryoem42", "-l walltime=02:30:00"):
        assert f"#PBS {directive}" in lines
    assert any(line.startswith("#PBS -l select=1:ncpus=8:ngpus=2:mem=") for line in lines)
    assert "--nthreads 1" in lines[-1]
    cpu_config = ClusterConfig(**{**SLURM_GPU, "kind": "pbs", "gpus_per_job": 0})
    command = _job_script(cpu_config).splitlines()[-1]
    assert "distributed.cli.dask_worker" in command and "--nthreads 8" in command


def _containers(spec: dict, component: str) -> list[dict]:
    return spec["spec"][component]["spec"]["containers"]


def test_kubernetes_spec_gives_gpu_workers_a_gpu_and_the_scheduler_none():
    config = ClusterConfig(kind="kubernetes", image="example/dtm:1", n_workers=3)
    gpu = kubernetes_cluster_spec(config, device="gpu")
    (worker,) = _containers(gpu, "worker")
    assert gpu["spec"]["worker"]["replicas"] == 3
    assert worker["image"] == "example/dtm:1"
    assert worker["args"][:3] == ["dask", "cuda", "worker"]
    assert worker["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert [c["resources"] for c in _containers(gpu, "scheduler")] == [None]
    # The user's resources replace the default and still stay off the scheduler.
    limits = {"limits": {"nvidia.com/gpu": 2, "memory": "32Gi"}}
    custom = kubernetes_cluster_spec(
        ClusterConfig(**{**config.model_dump(), "resources": limits}), n_workers=5, device="gpu"
    )
    assert _containers(custom, "worker")[0]["resources"] == limits
    assert custom["spec"]["worker"]["replicas"] == 5
    assert [c["resources"] for c in _containers(custom, "scheduler")] == [None]
    (cpu_worker,) = _containers(kubernetes_cluster_spec(config), "worker")
    assert cpu_worker["args"][:2] == ["dask", "worker"] and cpu_worker["resources"] is None


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^cluster\.kind: unknown kind 'mesos'$"):
        start_cluster("mesos", None, None, None)
