"""What dtm opens on the network: loopback by default, TLS with the user's certificates.

Real processes only (``dtm match``, ``dask scheduler``, ``dask worker``), all on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import STARTUP_TIMEOUT_S, _dask_command, _dask_environment, _log_tail, _stop
from datasets import match_config, write_config, write_dataset
from distributed import Client
from distributed.security import Security

from dtm.config import ClusterConfig
from dtm.io.store import open_results
from dtm.runtime.deployments import _listen_options, is_loopback
from dtm.runtime.throughput import TOTAL_METRIC
from dtm.search.stats import MAP_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("data"))


def _dtm(*args: str, **kwargs) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dtm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _write_certificates(directory: Path) -> dict[str, str]:
    """A certificate authority and a certificate it signed for the cluster's processes, as
    PEM files in a 0700 directory; returns them under Dask's ``Security`` names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(mode=0o700)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("dtm test CA"))
        .issuer_name(name("dtm test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("dtm test cluster"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "tls_ca_file": ("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "tls_client_cert": ("cert.pem", cert.public_bytes(serialization.Encoding.PEM)),
        "tls_client_key": (
            "key.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    }
    paths = {}
    for field, (filename, content) in files.items():
        path = directory / filename
        path.write_bytes(content)
        path.chmod(0o600)
        paths[field] = str(path)
    return paths


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _write_certificates(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def tls_cluster(
    certificates: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A TLS-only ``dask scheduler`` and ``dask worker`` (two processes) on 127.0.0.1."""
    log_dir = tmp_path_factory.mktemp("tls-cluster")
    tls = [
        "--tls-ca-file",
        certificates["tls_ca_file"],
        "--tls-cert",
        certificates["tls_client_cert"],
        "--tls-key",
        certificates["tls_client_key"],
    ]
    # TLS only: plain tcp:// connections are refused by every process.
    env = {**_dask_environment(), "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True"}
    scheduler_file = log_dir / "scheduler.json"
    procs = []

    def start(args: list[str], log: str) -> None:
        with (log_dir / log).open("wb") as out:
            procs.append(
                subprocess.Popen(
                    _dask_command(*args),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    start(
        [
            "scheduler",
            "--protocol",
            "tls",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--scheduler-file",
            str(scheduler_file),
            *tls,
        ],
        "scheduler.log",
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not scheduler_file.exists() or "address" not in scheduler_file.read_text():
            assert procs[0].poll() is None, _log_tail(log_dir / "scheduler.log")
            assert time.monotonic() < deadline, _log_tail(log_dir / "scheduler.log")
            time.sleep(0.1)
        time.sleep(0.2)  # the file is complete once it parses
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tls://127.0.0.1:")
        start(
            [
                "worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--memory-limit",
                "2GiB",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--local-directory",
                str(log_dir / "worker"),
                *tls,
            ],
            "worker.log",
        )
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_match_on_a_tls_scheduler_gives_the_embedded_maps(
    dataset: dict, certificates: dict[str, str], tls_cluster: str, tmp_path: Path
) -> None:
    paths = dataset["micrograph_path"], dataset["template_path"]
    embedded = write_config(tmp_path / "embedded.yaml", match_config(*paths, tmp_path / "embedded"))
    over_tls = write_config(
        tmp_path / "tls.yaml",
        match_config(*paths, tmp_path / "tls", cluster={"security": certificates}),
    )
    run = _dtm("match", str(over_tls), "--scheduler", tls_cluster)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, out + err
    assert "warning" not in err, err
    # The TLS cluster's workers did the search (the counters of dtm's dashboard plugin).
    security = Security(**certificates, require_encryption=True)
    with Client(tls_cluster, security=security, timeout=30) as client:
        totals = client.run(lambda dask_worker: dask_worker.metrics[TOTAL_METRIC](dask_worker))
    assert len(totals) == 2 and sum(totals.values()) == 552 * 3, totals
    assert "552 orientations × 3 defocus planes" in out
    local = _dtm("match", str(embedded), "--workers", "2")
    out, err = local.communicate(timeout=300)
    assert local.returncode == 0, out + err
    reference = open_results(tmp_path / "embedded")["micrograph"]
    maps = open_results(tmp_path / "tls")["micrograph"]
    for name in MAP_NAMES:
        np.testing.assert_array_equal(maps[name].values, reference[name].values, err_msg=name)


def test_tls_scheduler_without_certificates_is_a_one_line_error(
    dataset: dict, tls_cluster: str, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        match_config(dataset["micrograph_path"], dataset["template_path"], tmp_path / "out"),
    )
    run = _dtm("match", str(config), "--scheduler", tls_cluster)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2, out + err
    assert err.strip() == (
        f"dtm: error: scheduler {tls_cluster}: TLS needs certificates: set cluster.security "
        "(tls_ca_file, tls_client_cert, tls_client_key)"
    )
    # The TLS-only scheduler refuses a plain tcp:// client.
    plain = tls_cluster.replace("tls://", "tcp://")
    run = _dtm("match", str(config), "--scheduler", plain)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2 and err.startswith(f"dtm: error: scheduler {plain}: "), out + err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "results.zarr").exists()


def _listening(pid: int) -> set[tuple[str, int]]:
    """The listening TCP sockets of process ``pid`` and its descendants now."""
    found = set()
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def test_embedded_cluster_listens_on_loopback_only(dataset: dict, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        match_config(dataset["micrograph_path"], dataset["template_path"], tmp_path / "out"),
    )
    run = _dtm("match", str(config), "--workers", "2")
    seen: set[tuple[str, int]] = set()
    while run.poll() is None:  # sample the process tree until the run ends
        seen |= _listening(run.pid)
        time.sleep(0.05)
    out, err = run.communicate()
    assert run.returncode == 0, out + err
    # the scheduler, its dashboard, and each worker and nanny
    assert len(seen) >= 6, seen
    assert all(is_loopback(ip) for ip, _ in seen), seen
    dashboard = next(line for line in out.splitlines() if line.startswith("dashboard: "))
    assert dashboard.startswith("dashboard: http://127.0.0.1:"), dashboard
    port = int(dashboard.split(":")[3].split("/")[0])
    assert ("127.0.0.1", port) in seen


def test_security_files_must_exist_one_line_naming_the_field(
    dataset: dict, certificates: dict[str, str], tmp_path: Path
) -> None:
    missing = {**certificates, "tls_client_key": str(tmp_path / "nope.pem")}
    config = write_config(
        tmp_path / "config.yaml",
        match_config(
            dataset["micrograph_path"],
            dataset["template_path"],
            tmp_path / "out",
            cluster={"security": missing},
        ),
    )
    run = _dtm("match", str(config))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2, out + err
    assert err.startswith(f"dtm: error: {config}: cluster.security.tls_client_key: "), err
    assert "nope.pem" in err and len(err.strip().splitlines()) == 1
    # dask-kubernetes reaches its scheduler with plain tcp://: certificates cannot be used.
    kubernetes = {"kind": "kubernetes", "image": "example/dtm:1", "security": certificates}
    config = write_config(
        tmp_path / "kubernetes.yaml",
        match_config(
            dataset["micrograph_path"],
            dataset["template_path"],
            tmp_path / "out",
            cluster=kubernetes,
        ),
    )
    run = _dtm("match", str(config))
    out, err = run.communicate(timeout=120)
    assert run.returncode == 2, out + err
    assert err.startswith(f"dtm: error: {config}: cluster.security: not supported with kind "), err
    assert len(err.strip().splitlines()) == 1


def test_unencrypted_remote_scheduler_is_warned_about(capsys: pytest.CaptureFixture) -> None:
    from dtm.runtime.cluster import _client_security

    # Only the decision: nothing is sent anywhere.
    assert _client_security("tcp://192.0.2.7:8786", None) is None
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("dtm: warning: scheduler tcp://192.0.2.7:8786: connecting without")
    assert "\n" not in warning
    _client_security("tcp://127.0.0.1:8786", None)
    _client_security("tcp://[::1]:8786", None)
    assert capsys.readouterr().err == ""
    assert os.environ.get("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION") is None
    # A cluster told to listen beyond loopback without certificates (nothing is started).
    options = _listen_options(ClusterConfig(host="192.0.2.7", dashboard_address=":0"), "local")
    assert options["host"] == "192.0.2.7" and "security" not in options
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(
        "dtm: warning: cluster.host 192.0.2.7: the local cluster listens on 192.0.2.7 without TLS"
    )
    assert "\n" not in warning
    assert _listen_options(ClusterConfig(dashboard_address=":0"), "local") == {
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }
    assert capsys.readouterr().err == ""
    # A dashboard opened to the network (port 0: nothing is bound here).
    _listen_options(ClusterConfig(dashboard_address="192.0.2.7:0"), "local")
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("dtm: warning: cluster.dashboard_address 192.0.2.7:0: the dashboard")
    assert "\n" not in warning
