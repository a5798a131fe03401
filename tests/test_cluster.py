"""dtm.runtime.cluster: real local clusters, a real external scheduler, jobqueue scripts, errors."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import sys
import time

import pytest

from dtm.config import ClusterConfig
from dtm.errors import ClusterError, DtmError
from dtm.runtime.cluster import (
    connect,
    dashboard_link,
    ensure_workers,
    gpu_unavailable_reason,
    resolve_kind,
    session,
    worker_count,
    worker_threads,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_cluster_two_worker_processes_closed_at_exit(capsys: pytest.CaptureFixture[str]):
    config = ClusterConfig(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    with connect(config) as client:
        assert worker_count(client) == 2
        assert worker_threads(client) == 2
        pids = set(client.run(os.getpid).values())
        link = dashboard_link(client)
    assert len(pids) == 2 and os.getpid() not in pids  # processes, not threads
    assert client.status == "closed"
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and link.startswith("http") and link in printed[0]
    deadline = time.monotonic() + 10
    while any(_pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_pid_alive(pid) for pid in pids), "worker processes survive the context"


def test_local_cluster_override_and_busy_dashboard_port(capsys: pytest.CaptureFixture[str]):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ClusterConfig(n_workers=2, dashboard_address=f":{port}")
        with connect(config, n_workers=1, quiet=True) as client:  # the CLI override wins
            assert worker_count(client) == 1
            assert client.submit(sum, [1, 2, 3]).result() == 6
            link = dashboard_link(client)
    assert link.startswith("http") and f":{port}/" not in link
    assert capsys.readouterr().out == ""  # quiet


def test_address_kind_uses_external_cluster_and_leaves_it_running(dask_cli_cluster):
    config = ClusterConfig(scheduler_address=dask_cli_cluster.address)
    assert config.kind == "address"
    with connect(config, quiet=True) as client:
        assert worker_count(client) == 2
        ensure_workers(client, 2, timeout=5)
        pids = set(client.run(os.getpid).values())
        assert client.submit(pow, 3, 4).result() == 81
    worker_pids = {proc.pid for proc in dask_cli_cluster.worker_procs}
    assert len(pids) == 2 and not pids & {os.getpid()}
    assert all(proc.poll() is None for proc in dask_cli_cluster.worker_procs), worker_pids
    assert dask_cli_cluster.connected_workers() == 2


def test_address_from_scheduler_file_and_cli_override(dask_cli_cluster):
    # a config asking for slurm is overridden by --scheduler (the file written by the scheduler)
    config = ClusterConfig(kind="slurm", cores=1, memory="1GB")
    with connect(
        config, scheduler_address=str(dask_cli_cluster.scheduler_file), quiet=True
    ) as client:
        assert client.scheduler.address == dask_cli_cluster.address
        with pytest.raises(ClusterError, match=r"3 needed"):
            ensure_workers(client, 3, timeout=0.5)


def test_unreachable_scheduler_fails_with_one_line():
    with pytest.raises(ClusterError) as error, connect(scheduler_address="tcp://127.0.0.1:1"):
        pass
    message = str(error.value)
    assert "\n" not in message and message.startswith("scheduler tcp://127.0.0.1:1: cannot connect")
    assert isinstance(error.value, DtmError)  # the CLI prints it as one line, exit 2


def test_missing_scheduler_file_is_a_cluster_error(tmp_path):
    with pytest.raises(ClusterError, match="scheduler file .*nope.json"):
        with connect(scheduler_address=str(tmp_path / "nope.json")):
            pass


def test_resolve_kind_overrides():
    assert resolve_kind(None) == "local"
    assert resolve_kind(None, device="gpu") == "gpu-local"
    job = {"cores": 8, "memory": "32GB"}
    assert resolve_kind(ClusterConfig(kind="slurm", **job), device="gpu") == "slurm"
    assert (
        resolve_kind(ClusterConfig(kind="pbs", **job), scheduler_address="tcp://h:1") == "address"
    )


@pytest.mark.parametrize(
    ("kind", "module", "extra"),
    [
        ("slurm", "dask_jobqueue", "dtm[slurm]"),
        ("pbs", "dask_jobqueue", "dtm[pbs]"),
        ("kubernetes", "dask_kubernetes.operator", "dtm[kubernetes]"),
    ],
)
def test_missing_optional_dependency_names_the_extra(monkeypatch, kind, module, extra):
    # None in sys.modules makes `import module` fail, as when the package is not installed
    monkeypatch.setitem(sys.modules, module, None)
    config = ClusterConfig(kind=kind, cores=2, memory="4GB", image="example/dtm:1")
    with pytest.raises(
        ClusterError, match=rf"kind {kind} needs .*pip install '{re.escape(extra)}'"
    ):
        with connect(config):
            pass


def test_gpu_local_needs_a_working_gpu():
    reason = gpu_unavailable_reason()
    if reason is not None:
        with pytest.raises(ClusterError, match=r"^device gpu: no working CUDA GPU \("):
            with connect(device="gpu"):
                pass
        return
    import cupy

    with connect(ClusterConfig(device="gpu", dashboard_address=":0"), quiet=True) as client:
        assert worker_count(client) == cupy.cuda.runtime.getDeviceCount()
        total = client.submit(lambda: float(cupy.arange(4, dtype=cupy.float32).sum()))
        assert total.result() == 6.0


def _square(value: int) -> int:
    return value * value


def test_external_cluster_loses_and_regains_a_worker(dask_cli_cluster):
    try:
        dask_cli_cluster.kill_worker()
        deadline = time.monotonic() + 30
        while dask_cli_cluster.connected_workers() != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dask_cli_cluster.connected_workers() == 1
    finally:
        dask_cli_cluster.restore_workers()
    with connect(scheduler_address=dask_cli_cluster.address, quiet=True) as client:
        assert worker_count(client) == 2
        # functions of test modules unpickle on the external workers too
        assert client.gather(client.map(_square, range(4))) == [0, 1, 4, 9]


@pytest.mark.parametrize(
    ("kind_settings", "says_waiting"),
    [({}, False), ({"kind": "slurm", "cores": 1, "memory": "1GB"}, True)],
)
def test_waiting_for_the_first_worker_is_bounded_by_worker_timeout(kind_settings, says_waiting):
    import distributed

    config = ClusterConfig(worker_timeout=0.5, **kind_settings)
    printed = io.StringIO()
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        with distributed.Client(empty) as client:
            with pytest.raises(ClusterError, match=r"0 worker\(s\) after 0\.5 s, 1 needed"):
                with session(client, config, out=printed):
                    pass
    assert ("waiting for the first worker job" in printed.getvalue()) == says_waiting


def test_local_cluster_with_certificates_speaks_tls_on_loopback(tmp_path):
    from distributed.security import Security

    temporary = Security.temporary()
    certificates = {}
    for field in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        certificates[field] = tmp_path / f"{field}.pem"
        certificates[field].write_text(str(getattr(temporary, field)))
    config = ClusterConfig(n_workers=1, dashboard_address=":0", security=certificates)
    with connect(config, quiet=True) as client:
        address = client.scheduler.address
        workers = list(client.scheduler_info()["workers"])
        assert client.submit(pow, 2, 10).result() == 1024
        link = dashboard_link(client)
    assert address.startswith("tls://127.0.0.1:")
    assert [w.split(":")[:2] for w in workers] == [["tls", "//127.0.0.1"]]
    assert link.startswith("http://127.0.0.1:")


def test_a_cluster_start_cut_short_by_ctrl_c_is_closed_quietly(capsys):
    import distributed
    from distributed.core import Status
    from distributed.deploy.spec import close_clusters

    from dtm.runtime.deployments import _started_quietly

    started = []

    def start_then_interrupted():
        started.append(
            distributed.LocalCluster(n_workers=1, processes=False, dashboard_address="127.0.0.1:0")
        )
        raise KeyboardInterrupt  # as if Ctrl-C landed before the constructor returned

    asyncio_logger = logging.getLogger("asyncio")
    level = asyncio_logger.level
    try:
        with pytest.raises(KeyboardInterrupt):
            _started_quietly(start_then_interrupted)
    finally:
        asyncio_logger.setLevel(level)  # the process goes on here, unlike dtm's
    [cluster] = started
    assert cluster.status == Status.closed and not cluster.shutdown_on_close
    close_clusters()  # distributed's exit hook has nothing left to do
    assert "Traceback" not in capsys.readouterr().err
