"""Failures said in one line and always resumable (issue 17), through the CLI with real
processes: bad micrographs (exit status 3, then fixed and resumed), memory limits, a lost
scheduler, a full disk, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import _start_cli_cluster
from datasets import match_config, write_config, write_dataset

from dtm.cli import main
from dtm.io.store import open_results
from dtm.search.stats import MAP_NAMES

pytestmark = pytest.mark.slow

N_MICROGRAPHS = 6
#: Small tasks and checkpoint groups, so that a failure lands in the middle of a search.
FINE_CLUSTER = {"chunk_size": 8, "split_every": 3}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    for i in range(N_MICROGRAPHS):
        write_dataset(directory, shape=(128, 128), n_particles=1, seed=20 + i, name=f"mic_{i}")
    return directory


def _entries(data: Path, folder: Path | None = None) -> list[dict]:
    folder = folder or data
    return [
        {"micrograph_path": str(folder / f"mic_{i}.mrc"), "defocus_u": 1e4, "defocus_v": 9500.0}
        for i in range(N_MICROGRAPHS)
    ]


def _dtm(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _dtm_process(*args: str, **options: object) -> subprocess.Popen:
    """``dtm ARGS`` started in the background, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "dtm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **options,  # type: ignore[arg-type]
    )


def _maps(out: Path) -> dict:
    return {name: ds.load() for name, ds in open_results(out).items()}


def _assert_same_maps(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        for key in MAP_NAMES:
            np.testing.assert_array_equal(a[name][key].values, b[name][key].values, err_msg=key)


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@pytest.fixture(scope="module")
def all_good(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The maps of an uninterrupted run of the six good micrographs."""
    tmp = tmp_path_factory.mktemp("all-good")
    cfg = match_config(None, data / "template.mrc", tmp / "out", micrographs=_entries(data))
    result = _dtm("match", str(write_config(tmp / "c.yaml", cfg)), "--workers", "2")
    assert result.returncode == 0, result.stderr
    return _maps(tmp / "out")


def test_failed_micrographs_exit_3_then_fixed_and_resumed(data, all_good, tmp_path):
    mics = tmp_path / "mics"
    shutil.copytree(data, mics)
    good_4 = (mics / "mic_4.mrc").read_bytes()
    (mics / "mic_4.mrc").write_bytes(good_4[:3000])  # truncated
    (mics / "mic_5.mrc").rename(tmp_path / "mic_5.mrc")  # missing
    out = tmp_path / "out"
    cfg = match_config(None, mics / "template.mrc", out, micrographs=_entries(data, mics))
    config = write_config(tmp_path / "c.yaml", cfg)

    # --strict refuses a missing micrograph before anything runs, like an unreadable one.
    assert main(["match", str(config), "--strict"]) == 2
    assert not out.exists()

    first = _dtm("match", str(config), "--workers", "2")
    assert first.returncode == 3, first.stderr
    _no_traceback(first)
    err = first.stderr.strip().splitlines()
    assert err[0].startswith("dtm: failed: mic_4: ") and "mic_4.mrc" in err[0]
    assert err[1].startswith("dtm: failed: mic_5: ") and "file not found" in err[1]
    assert err[2].startswith("dtm: 2 of 6 micrograph(s) failed")
    assert err[2].endswith(f"dtm match {config} --workers 2 --resume")
    report = json.loads((out / "run.json").read_text())
    assert report["failed"] == ["mic_4", "mic_5"]
    per_micrograph = report["tasks_total"] // 4
    assert report["tasks_computed"] == 4 * per_micrograph  # only the tasks that ran

    # Fixed, and a good micrograph touched: --resume searches exactly the two fixed ones.
    (mics / "mic_4.mrc").write_bytes(good_4)
    (tmp_path / "mic_5.mrc").rename(mics / "mic_5.mrc")
    os.utime(mics / "mic_0.mrc")
    resumed = _dtm("match", str(config), "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _no_traceback(resumed)
    assert (
        "resuming: 4 micrograph(s) done; searching mic_4 (changed: file content), "
        "mic_5 (changed: file content)"
    ) in resumed.stdout
    report = json.loads((out / "run.json").read_text())
    assert report["failed"] == []
    assert report["tasks_computed"] == 2 * per_micrograph
    _assert_same_maps(_maps(out), all_good)

    # Nothing changed: nothing is searched again.
    again = _dtm("match", str(config), "--workers", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming: all 6 micrograph(s) done" in again.stdout

    # A done micrograph replaced by a broken file loses its former maps (and peaks).
    (mics / "mic_0.mrc").write_bytes(good_4[:3000])
    broken = _dtm("match", str(config), "--workers", "2", "--resume")
    assert broken.returncode == 3, broken.stderr
    assert broken.stderr.startswith("dtm: failed: mic_0: ")
    assert set(open_results(out)) == {f"mic_{i}" for i in range(1, N_MICROGRAPHS)}
    assert not list((out / "maps").glob("mic_0_*"))


def _one_line(argv: list[str], capsys: pytest.CaptureFixture[str], *expect: str) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured.err
    assert len(lines) == 1, captured.err
    for text in expect:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_memory_limits_are_checked_before_anything_runs(data, tmp_path, capsys):
    out = tmp_path / "out"
    for value, expect in (
        ("lots", "cluster.memory_limit: expected an amount of memory"),
        ("1kB", "cluster.memory_limit: 0.98 kiB per worker, but a task needs about"),
    ):
        cfg = match_config(data / "mic_0.mrc", data / "template.mrc", out)
        cfg["cluster"]["memory_limit"] = value
        config = write_config(tmp_path / "c.yaml", cfg)
        start = time.monotonic()
        line = _one_line(["match", str(config)], capsys, expect)
        assert time.monotonic() - start < 60
        assert not out.exists()
    assert "set cluster.memory_limit to at least" in line


def _pause_every_worker(address: str) -> None:
    """Make every worker pause as one whose tasks filled its memory does (Dask's own
    memory monitor pauses it at once: its process uses more than 0.1 % of its limit)."""
    import distributed

    def pause_soon(dask_worker) -> None:
        dask_worker.memory_manager.memory_pause_fraction = 0.001

    with distributed.Client(address, timeout=10) as client:
        client.run(pause_soon)


def test_workers_paused_for_memory_end_the_run_with_one_line(data, tmp_path):
    cluster = _start_cli_cluster(tmp_path, n_workers=1)
    out = tmp_path / "out"
    cfg = match_config(data / "mic_0.mrc", data / "template.mrc", out, cluster=FINE_CLUSTER)
    cfg["cluster"]["stall_timeout"] = 10
    config = write_config(tmp_path / "c.yaml", cfg)
    try:
        proc = _dtm_process("match", str(config), "--scheduler", cluster.address)
        try:
            _wait_for(lambda: list((out / "checkpoints").rglob("group-*.npz")), proc)
            _pause_every_worker(cluster.address)
            start = time.monotonic()
            stdout, stderr = proc.communicate(timeout=120)
            assert time.monotonic() - start < 60
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        cluster.close()
    assert proc.returncode == 4, stderr
    assert "Traceback" not in stdout + stderr
    err = stderr.strip().splitlines()
    assert len(err) == 2, stderr
    assert "paused because they hit their memory limit" in err[0]
    assert "cluster.memory_limit" in err[0]
    assert err[1].endswith(f"--scheduler {cluster.address} --resume")
    assert "1 paused for memory" in stdout  # on the progress line


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the run ended before the failure could be made"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def test_lost_scheduler_is_one_message_and_resumes_on_a_fresh_one(data, tmp_path):
    out = tmp_path / "out"
    cfg = match_config(data / "mic_0.mrc", data / "template.mrc", out, cluster=FINE_CLUSTER)
    config = write_config(tmp_path / "c.yaml", cfg)
    (tmp_path / "first").mkdir()
    cluster = _start_cli_cluster(tmp_path / "first", n_workers=2)
    try:
        proc = _dtm_process("match", str(config), "--scheduler", cluster.address)
        try:
            _wait_for(lambda: list((out / "checkpoints").rglob("group-*.npz")), proc)
            os.killpg(cluster.scheduler_proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        cluster.close()
    assert proc.returncode == 4, stderr
    assert "Traceback" not in stdout + stderr
    err = stderr.strip().splitlines()
    assert len(err) == 2, stderr
    log = out / "dtm-error.log"
    assert err[0].startswith("dtm: error: lost the connection to the dask scheduler")
    assert f"details in {log}" in err[0]
    assert "Traceback" in log.read_text()
    assert err[1].startswith(f"dtm: saved in {out}: 0 of 1 micrograph(s) done, ")
    assert err[1].endswith(f"dtm match {config} --scheduler {cluster.address} --resume")

    (tmp_path / "second").mkdir()
    fresh = _start_cli_cluster(tmp_path / "second", n_workers=2)
    try:
        resumed = _dtm("match", str(config), "--scheduler", fresh.address, "--resume")
        reference_out = tmp_path / "reference"
        reference = _dtm(
            "match", str(config), "--scheduler", fresh.address, "--output-dir", str(reference_out)
        )
    finally:
        fresh.close()
    assert resumed.returncode == 0, resumed.stderr
    assert "restored from checkpoints" in resumed.stdout
    assert reference.returncode == 0, reference.stderr
    _assert_same_maps(_maps(out), _maps(reference_out))


def test_all_workers_lost_is_one_message(data, tmp_path):
    cluster = _start_cli_cluster(tmp_path, n_workers=1)
    out = tmp_path / "out"
    cfg = match_config(data / "mic_0.mrc", data / "template.mrc", out, cluster=FINE_CLUSTER)
    cfg["cluster"]["worker_timeout"] = 5
    config = write_config(tmp_path / "c.yaml", cfg)
    try:
        proc = _dtm_process("match", str(config), "--scheduler", cluster.address)
        try:
            _wait_for(lambda: list((out / "checkpoints").rglob("group-*.npz")), proc)
            cluster.kill_worker()
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        cluster.close()
    assert proc.returncode == 4, stderr
    assert "Traceback" not in stdout + stderr
    err = stderr.strip().splitlines()
    assert len(err) == 2, stderr
    assert err[0].startswith("dtm: error: no dask worker left for 0m0")
    assert "(all 1 lost)" in err[0]
    assert "workers 0 (1 lost)" in stdout  # on the progress line, as it happened


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs at ``path``; the reason it cannot be, or None."""
    path.mkdir()
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return f"cannot mount a tmpfs here: {result.stderr.strip()}"
    return None


def _fill(path: Path) -> None:
    """Fill the file system of ``path`` to the last byte."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_full_disk_mid_run_is_one_message_and_resumes(data, tmp_path):
    disk = tmp_path / "disk"
    reason = _mount_tmpfs(disk, "8m")
    if reason is not None:
        pytest.skip(reason)
    try:
        out = disk / "out"
        cfg = match_config(
            None, data / "template.mrc", out, micrographs=_entries(data)[:2], cluster=FINE_CLUSTER
        )
        config = write_config(tmp_path / "c.yaml", cfg)
        proc = _dtm_process("match", str(config), "--workers", "2")
        filler = disk / "filler"
        try:
            _wait_for(lambda: list((out / "checkpoints").rglob("group-*.npz")), proc)
            _fill(filler)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 4, stderr
        assert "Traceback" not in stdout + stderr
        err = stderr.strip().splitlines()
        assert len(err) == 2, stderr
        assert err[0].startswith("dtm: error: the output disk is full")
        assert err[1].endswith(f"dtm match {config} --workers 2 --resume")
        filler.unlink()
        resumed = _dtm("match", str(config), "--workers", "2", "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert set(open_results(out)) == {"mic_0", "mic_1"}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(data, tmp_path):
    out = tmp_path / "out"
    fine = {"psi_step": 2.0, "theta_step": 2.0}  # long enough to be stopped
    cfg = match_config(data / "mic_0.mrc", data / "template.mrc", out)
    cfg["orientation_search_config"] = fine
    config = write_config(tmp_path / "c.yaml", cfg)
    run = _dtm_process("match", str(config), "--workers", "1", start_new_session=True)
    assert run.stdout is not None
    stopped = threading.Event()
    try:
        for line in run.stdout:
            if line.startswith("dashboard:"):
                break
        time.sleep(2.0)
        run.send_signal(signal.SIGTERM)  # the client only, as `kill PID` does
        stopped.set()
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 143, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"dtm: stopped by SIGTERM; saved in {out}: 0 of 1 micrograph(s)")
    assert lines[-1] == (
        f"dtm: stopped by SIGTERM; continue with: dtm match {config} --workers 1 --resume"
    )
    report = json.loads((out / "run.json").read_text())
    assert report["stopped"] == "interrupted" and report["finished"] is False
