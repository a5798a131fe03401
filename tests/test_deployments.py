"""Starting each kind of cluster: the batch scripts of Slurm/PBS jobs and their TLS, the
Kubernetes spec.

Nothing reaches a real batch system: ``job_script()`` and the ``DaskCluster`` resource are
what would be submitted, and one search runs its worker job through stand-ins for
``sbatch`` and ``scancel``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dtm.config import ClusterConfig
from dtm.errors import ClusterError, ConfigError
from dtm.runtime.deployments import (
    _import_extra,
    jobqueue_cluster,
    kubernetes_cluster_spec,
    start_cluster,
)


def _jobqueue_installed() -> bool:
    # Not imported here: dask_jobqueue replaces the SIGINT handler when imported (dtm's
    # import keeps it, see test_ctrl_c_while_slurm_jobs_wait_…).
    return importlib.util.find_spec("dask_jobqueue") is not None


@pytest.fixture(autouse=True)
def _certificates_in_tmp(tmp_path: Path):
    """dask-jobqueue writes the workers' copies of temporary certificates to its shared
    temporary directory (dtm's default: the home directory): here, the test's directory."""
    try:
        _import_extra("slurm")  # jobqueue's defaults must be loaded before the override
    except ClusterError:
        yield
        return
    import dask

    directory = tmp_path / "shared-temp"
    directory.mkdir()
    settings = {
        f"jobqueue.{kind}.shared-temp-directory": str(directory) for kind in ("slurm", "pbs")
    }
    with dask.config.set(settings):
        yield


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
    host="127.0.0.1",  # the tests listen on loopback only
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


def _tls_arguments(command: str) -> dict[str, str]:
    words = command.split()
    return {
        flag: words[words.index(flag) + 1] for flag in ("--tls-ca-file", "--tls-cert", "--tls-key")
    }


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_batch_job_clusters_use_tls_with_temporary_certificates(kind: str, tmp_path: Path):
    if not _jobqueue_installed():
        pytest.skip("dask-jobqueue not installed")
    config = ClusterConfig(**{**SLURM_GPU, "kind": kind, "gpus_per_job": 0})
    cluster = jobqueue_cluster(config)
    try:
        command = str(cluster.job_script()).splitlines()[-1]
        address = cluster.scheduler.address
        listening = {
            c.laddr for c in psutil.Process().net_connections("inet") if c.status == "LISTEN"
        }
        dashboard = cluster.scheduler.http_server.port
        files = _tls_arguments(command)
        modes = {flag: stat.S_IMODE(os.stat(path).st_mode) for flag, path in files.items()}
        folders = {str(Path(path).parent) for path in files.values()}
    finally:
        cluster.close()
    assert address.startswith("tls://127.0.0.1:") and f" {address} " in command
    assert "--protocol tls://" in command
    # The workers' copies of the in-memory certificates: private to the user.
    assert folders == {str(tmp_path / "shared-temp")}
    assert set(modes.values()) == {0o600}, modes
    # The dashboard stays on this machine.
    assert [ip for ip, port in listening if port == dashboard] == ["127.0.0.1"]


def test_batch_job_clusters_use_the_configured_certificates(tmp_path: Path):
    if not _jobqueue_installed():
        pytest.skip("dask-jobqueue not installed")
    from distributed.security import Security

    temporary = Security.temporary()
    paths = {}
    for field, value in (
        ("tls_ca_file", temporary.tls_ca_file),
        ("tls_client_cert", temporary.tls_client_cert),
        ("tls_client_key", temporary.tls_client_key),
    ):
        paths[field] = tmp_path / f"{field}.pem"
        paths[field].write_text(str(value))
    config = ClusterConfig(**{**SLURM_GPU, "gpus_per_job": 0, "security": paths})
    command = _job_script(config).splitlines()[-1]
    assert _tls_arguments(command) == {
        "--tls-ca-file": str(paths["tls_ca_file"]),
        "--tls-cert": str(paths["tls_client_cert"]),
        "--tls-key": str(paths["tls_client_key"]),
    }
    assert not list((tmp_path / "shared-temp").iterdir())  # no temporary copies


# Stand-ins for Slurm's sbatch and scancel: run the job script as a process group here.
FAKE_SBATCH = """\
#!/usr/bin/env bash
# dask-jobqueue deletes the script once sbatch returns: run a copy.
script=$(mktemp "$FAKE_SLURM_DIR/job-XXXXXX.sh")
cp "${!#}" "$script"
setsid bash "$script" >"$script.log" 2>&1 </dev/null &
echo "$!" >"$script.pid"
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """\
#!/usr/bin/env bash
for job in "$@"; do kill -- "-$job" 2>/dev/null || true; done
"""


def test_slurm_kind_runs_a_search_over_tls_with_batch_jobs(tmp_path: Path):
    """``dtm match`` with ``kind: slurm``: its worker job connects back over TLS with the
    temporary certificates (sbatch stand-in: the job script runs here)."""
    if not _jobqueue_installed():
        pytest.skip("dask-jobqueue not installed")
    from datasets import match_config, write_config, write_dataset

    from dtm.io.store import open_results

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    data = write_dataset(tmp_path / "data", shape=(160, 160), n_particles=1)
    cluster = {
        "kind": "slurm",
        "cores": 1,
        "memory": "2GB",
        "n_jobs": 1,
        "host": "127.0.0.1",
        "worker_timeout": 60,
        "local_directory": str(tmp_path / "scratch"),
    }
    config = write_config(
        tmp_path / "config.yaml",
        match_config(
            data["micrograph_path"], data["template_path"], tmp_path / "out", cluster=cluster
        ),
    )
    shared = tmp_path / "shared-temp"
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        "DASK_JOBQUEUE__SLURM__SHARED_TEMP_DIRECTORY": str(shared),
        "OMP_NUM_THREADS": "1",
        "FAKE_SLURM_DIR": str(bin_dir),
    }
    run = subprocess.run(
        [sys.executable, "-m", "dtm.cli", "match", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    logs = "".join(p.read_text(errors="replace") for p in bin_dir.glob("*.log"))
    assert run.returncode == 0, run.stdout + run.stderr + logs
    assert "dashboard: http://127.0.0.1:" in run.stdout
    assert open_results(tmp_path / "out")["micrograph"].mip.shape == (97, 97)
    assert not list(shared.iterdir()), "temporary certificates left behind"
    # dtm cancelled the job (scancel): its processes are gone.
    [pid_file] = bin_dir.glob("*.pid")
    job = int(pid_file.read_text())  # the setsid'd job: its own process group
    deadline = time.monotonic() + 30
    while psutil.pid_exists(job) and time.monotonic() < deadline:
        time.sleep(0.2)
    if psutil.pid_exists(job):
        os.killpg(job, signal.SIGKILL)
        pytest.fail("the worker job survived the run")


# A batch system whose queue never starts the job: sbatch only records the submission.
QUEUED_SBATCH = """\
#!/usr/bin/env bash
echo submitted >>"$FAKE_SLURM_DIR/submitted"
echo "Submitted batch job 4242"
"""
RECORDING_SCANCEL = """\
#!/usr/bin/env bash
echo "$@" >>"$FAKE_SLURM_DIR/cancelled"
"""


def test_ctrl_c_while_slurm_jobs_wait_in_the_queue_exits_130_and_cancels_them(tmp_path: Path):
    """Importing dask-jobqueue replaces the Ctrl-C handler (``sys.exit()``: status 0); dtm
    keeps its own, so the interrupted run says how to resume and cancels its jobs."""
    if not _jobqueue_installed():
        pytest.skip("dask-jobqueue not installed")
    from datasets import match_config, write_config, write_dataset

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", QUEUED_SBATCH), ("scancel", RECORDING_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    data = write_dataset(tmp_path / "data", shape=(160, 160), n_particles=1)
    cluster = {"kind": "slurm", "cores": 1, "memory": "2GB", "n_jobs": 1, "host": "127.0.0.1"}
    config = write_config(
        tmp_path / "config.yaml",
        match_config(
            data["micrograph_path"], data["template_path"], tmp_path / "out", cluster=cluster
        ),
    )
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ["PATH"]]),
        "DASK_JOBQUEUE__SLURM__SHARED_TEMP_DIRECTORY": str(tmp_path / "shared-temp"),
        "FAKE_SLURM_DIR": str(bin_dir),
        "PYTHONUNBUFFERED": "1",
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "dtm.cli", "match", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert run.stdout is not None
        for line in run.stdout:
            if line.startswith("waiting for the first worker job"):
                break
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"dtm: interrupted; continue with: dtm match {config} --resume"
    )
    assert (bin_dir / "submitted").read_text() == "submitted\n"
    assert "4242" in (bin_dir / "cancelled").read_text()
