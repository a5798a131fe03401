"""Many micrographs, resume after SIGKILL, lost workers, changed configurations."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split
from datasets import PSI_STEP, THETA_STEP, match_config, write_config, write_dataset
from distributed import Client, LocalCluster, SchedulerPlugin

from dtm.config import MatchConfig
from dtm.config.match import PeaksConfig
from dtm.errors import ConfigError
from dtm.physics.orientations import uniform_grid
from dtm.programs.match import match_template
from dtm.programs.peaks import repick
from dtm.search.stats import MAP_NAMES

pytestmark = pytest.mark.slow

#: Many small tasks and checkpoint groups, so that a kill lands in the middle of the search.
FINE_CLUSTER = {"chunk_size": 8, "split_every": 3}
#: Orientations of the datasets' search grid.
N_ORIENTATIONS = len(uniform_grid(psi_step=PSI_STEP, theta_step=THETA_STEP))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    for i in range(3):
        written = write_dataset(
            directory, shape=(256, 256), n_particles=3, seed=10 + i, name=f"mic{i}"
        )
        PLANTED[f"mic{i}"] = written["particles"]
    return directory


#: Micrograph name → its planted particles (filled by the ``data`` fixture).
PLANTED: dict[str, list] = {}


@pytest.fixture(scope="module")
def client() -> Client:
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _config(data: Path, out: Path, mic: str = "mic0", **extra: object) -> dict:
    return match_config(data / f"{mic}.mrc", data / "template.mrc", out, **extra)


@pytest.fixture(scope="module")
def reference(data: Path, client: Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Uninterrupted single-micrograph runs of each micrograph (fine chunking)."""
    maps = {}
    for i in range(3):
        out = tmp_path_factory.mktemp(f"ref{i}")
        cfg = MatchConfig.model_validate(_config(data, out, f"mic{i}", cluster=FINE_CLUSTER))
        maps[f"mic{i}"] = match_template(cfg, client=client).load()
    return maps


def _assert_same_maps(a, b) -> None:
    for name in MAP_NAMES:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_kill_at_half_then_resume_is_bit_identical(data, reference, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", _config(data, out, cluster=FINE_CLUSTER))
    command = [sys.executable, "-m", "dtm.cli", "match", str(config), "--workers", "2"]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    checkpoints = out / "checkpoints"
    n_chunks = math.ceil(N_ORIENTATIONS / FINE_CLUSTER["chunk_size"])
    n_groups = math.ceil(n_chunks / FINE_CLUSTER["split_every"])
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(checkpoints.rglob("group-*.npz"))) >= n_groups // 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the client, its scheduler and its workers, at once
    proc.wait()
    done_before = len(list(checkpoints.rglob("group-*.npz")))
    assert 0 < done_before < n_groups
    assert not (out / "results.zarr").exists()

    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "restored from checkpoints" in resumed.stdout
    report = json.loads((out / "run.json").read_text())
    assert report["tasks_computed"] <= 0.6 * report["tasks_total"]
    from dtm.io.store import open_results

    _assert_same_maps(open_results(out)["mic0"].load(), reference["mic0"])
    assert not (checkpoints / "").exists() or not list(checkpoints.rglob("*.npz"))


def test_resume_refuses_a_changed_configuration(data, client, tmp_path):
    out = tmp_path / "out"
    first = MatchConfig.model_validate(_config(data, out))
    match_template(first, client=client)
    changed = MatchConfig.model_validate(
        _config(data, out, orientation_search_config={"psi_step": 45.0, "theta_step": 30.0})
    )
    with pytest.raises(ConfigError, match="orientation_search_config.psi_step"):
        match_template(changed, client=client, resume=True)
    # Resuming a finished run with the same configuration recomputes nothing and keeps the
    # peaks the user re-picked since.
    repick(out, PeaksConfig(z_score_cutoff=0.0))
    picked = (out / "peaks.csv").read_bytes()
    printed = io.StringIO()
    match_template(first, client=client, resume=True, out=printed)
    assert json.loads((out / "run.json").read_text())["tasks_computed"] == 0
    assert (out / "peaks.csv").read_bytes() == picked
    assert "peaks.csv kept" in printed.getvalue()
    assert "(nothing left to search)" in printed.getvalue()


def test_lost_worker_gives_identical_maps(data, reference, dask_cli_cluster, tmp_path):
    out = tmp_path / "out"
    cfg = MatchConfig.model_validate(_config(data, out, cluster=FINE_CLUSTER))
    result: dict = {}

    def run() -> None:
        result["ds"] = match_template(cfg, scheduler_address=dask_cli_cluster.address)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").rglob("group-*.npz")):
        time.sleep(0.05)
    try:
        assert thread.is_alive(), "the run ended before a worker could be lost"
        dask_cli_cluster.kill_worker()
        thread.join(timeout=300)
        assert "ds" in result, "the run did not finish after losing a worker"
        _assert_same_maps(result["ds"].load(), reference["mic0"])
    finally:
        dask_cli_cluster.restore_workers()


class _MicrographsOnScheduler(SchedulerPlugin):
    """The most micrographs whose graphs (their persist tasks) the scheduler held at once."""

    name = "dtm-test-micrographs-on-scheduler"

    def __init__(self, scheduler: object) -> None:
        self.scheduler = scheduler
        self.most = 0

    def transition(self, key: object, start: str, finish: str, *args, **kwargs) -> None:
        held = sum(key_split(k) == "persist" for k in self.scheduler.tasks)
        self.most = max(self.most, held)


def test_micrograph_table_run_equals_single_runs_and_skips_a_bad_one(
    data, reference, client, tmp_path
):
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an mrc file")
    table = pd.DataFrame(
        {
            "micrograph_path": [str(data / f"mic{i}.mrc") for i in range(3)] + [str(bad)],
            "defocus_u": 10000.0,
            "defocus_v": 9500.0,
            "astigmatism_angle": 30.0,
        }
    )
    table.to_csv(tmp_path / "mics.csv", index=False)
    out = tmp_path / "out"
    config = _config(data, out, cluster=FINE_CLUSTER)
    del config["micrograph_path"]
    config["micrograph_table"] = str(tmp_path / "mics.csv")
    printed = io.StringIO()
    watch = _MicrographsOnScheduler(client.cluster.scheduler)
    client.cluster.scheduler.add_plugin(watch)
    try:
        results = match_template(MatchConfig.model_validate(config), client=client, out=printed)
    finally:
        client.cluster.scheduler.remove_plugin(watch.name)
    # 69 tasks per micrograph keep 2 threads busy: two micrographs in flight at most.
    assert watch.most == 2
    assert set(results) == {"mic0", "mic1", "mic2"}
    n_chunks = math.ceil(N_ORIENTATIONS / FINE_CLUSTER["chunk_size"])
    expected = f"3 micrograph(s) (1 skipped); {3 * n_chunks} tasks ({n_chunks} per micrograph)"
    assert expected in printed.getvalue()
    for name, ds in results.items():
        _assert_same_maps(ds.load(), reference[name])
    report = json.loads((out / "run.json").read_text())
    assert report["micrographs"]["bad"]["status"] == "failed"
    assert "bad.mrc" in report["micrographs"]["bad"]["error"]
    assert (out / "maps" / "mic1_scaled_mip.mrc").exists()
    peaks = pd.read_csv(out / "peaks.csv")
    assert set(peaks.micrograph_name) == {"mic0", "mic1", "mic2"}
    for name, particles in PLANTED.items():
        picked = peaks[peaks.micrograph_name == name]
        for p in particles:
            hit = picked[(picked.pos_y == p.pos_y) & (picked.pos_x == p.pos_x)]
            assert len(hit) == 1, f"{name}: planted particle at ({p.pos_y}, {p.pos_x}) not picked"
    with pytest.raises(Exception, match="bad.mrc"):
        match_template(
            MatchConfig.model_validate(config), client=client, overwrite=True, strict=True
        )
