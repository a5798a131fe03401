"""Every bad input: one clear line naming it, exit status 2, earlier results untouched."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import mrcfile
import numpy as np
import pandas as pd
import pytest
from datasets import PIXEL_SIZE, match_config, write_config, write_dataset

from dtm.cli import CLUSTER_KINDS, main
from dtm.config import ClusterConfig


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("good"), shape=(160, 160), n_particles=1)


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _earlier_results(out: Path) -> None:
    """An output directory as an earlier run leaves it (contents only matter for the hash)."""
    (out / "results.zarr").mkdir(parents=True)
    (out / "results.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (out / "job.json").write_text('{"fingerprint": {}}')
    (out / "peaks.csv").write_text("pos_x,pos_y\n1,2\n")


def _mrc(path: Path, data: np.ndarray, pixel_size: float = PIXEL_SIZE) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = pixel_size
    return path


def _micrograph(good: dict) -> np.ndarray:
    with mrcfile.open(good["micrograph_path"]) as mrc:
        return mrc.data.copy()


def _truncated(tmp: Path, good: dict, cfg: dict) -> str:
    path = tmp / "truncated.mrc"
    path.write_bytes(Path(good["micrograph_path"]).read_bytes()[:5000])
    cfg["micrograph_path"] = str(path)
    return "truncated.mrc"


def _corrupt(tmp: Path, good: dict, cfg: dict) -> str:
    path = tmp / "corrupt.mrc"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    cfg["micrograph_path"] = str(path)
    return "corrupt.mrc"


def _complex_mode(tmp: Path, good: dict, cfg: dict) -> str:
    cfg["micrograph_path"] = str(_mrc(tmp / "complex.mrc", _micrograph(good).astype(np.complex64)))
    return "complex.mrc"


def _stack(tmp: Path, good: dict, cfg: dict) -> str:
    cfg["micrograph_path"] = str(_mrc(tmp / "stack.mrc", np.stack([_micrograph(good)] * 3)))
    return "stack.mrc"


def _with_value(value: float, name: str) -> Callable[[Path, dict, dict], str]:
    def make(tmp: Path, good: dict, cfg: dict) -> str:
        data = _micrograph(good)
        data[10, 20] = value
        cfg["micrograph_path"] = str(_mrc(tmp / name, data))
        return name

    return make


def _constant(tmp: Path, good: dict, cfg: dict) -> str:
    cfg["micrograph_path"] = str(_mrc(tmp / "flat.mrc", np.full((160, 160), 3.0, np.float32)))
    return "flat.mrc"


def _too_small(tmp: Path, good: dict, cfg: dict) -> str:
    cfg["micrograph_path"] = str(_mrc(tmp / "small.mrc", _micrograph(good)[:48, :48]))
    return "small.mrc"


def _non_cubic(tmp: Path, good: dict, cfg: dict) -> str:
    volume = np.random.default_rng(1).random((32, 64, 64)).astype(np.float32)
    cfg["template_volume_path"] = str(_mrc(tmp / "slab.mrc", volume))
    return "slab.mrc"


def _pixel_mismatch(tmp: Path, good: dict, cfg: dict) -> str:
    cfg["micrograph_path"] = str(_mrc(tmp / "px.mrc", _micrograph(good), pixel_size=3.5))
    return "3.5"


def _setter(dotted: str, value: object, expect: str) -> Callable[[Path, dict, dict], str]:
    def make(tmp: Path, good: dict, cfg: dict) -> str:
        *parents, key = dotted.split(".")
        node = cfg
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
        return expect

    return make


def _table(rows: list[dict], expect: str) -> Callable[[Path, dict, dict], str]:
    def make(tmp: Path, good: dict, cfg: dict) -> str:
        frame = pd.DataFrame(rows).fillna({"micrograph_path": str(good["micrograph_path"])})
        frame.to_csv(tmp / "table.csv", index=False)
        del cfg["micrograph_path"]
        cfg["micrograph_table"] = str(tmp / "table.csv")
        return expect

    return make


_CTF = {"defocus_u": 10000.0, "defocus_v": 9500.0, "astigmatism_angle": 30.0}


def _unwritable(tmp: Path, good: dict, cfg: dict) -> str:
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    cfg["output_dir"] = str(blocker / "out")
    return "not writable"


CASES: dict[str, tuple[Callable[[Path, dict, dict], str], list[str]]] = {
    "truncated mrc": (_truncated, []),
    "corrupt mrc": (_corrupt, []),
    "complex mode mrc": (_complex_mode, []),
    "3-D stack as micrograph": (_stack, []),
    "nan pixel": (_with_value(np.nan, "nan.mrc"), []),
    "inf pixel": (_with_value(np.inf, "inf.mrc"), []),
    "empty micrograph": (_constant, []),
    "template larger than micrograph": (_too_small, []),
    "non-cubic template": (_non_cubic, []),
    # Without --strict, the configuration's pixel size is used (with a notice).
    "pixel size mismatch": (_pixel_mismatch, ["--strict"]),
    "unknown key": (_setter("orientation_search_config.psi_stepp", 5.0, "psi_stepp"), []),
    "wrong type": (_setter("orientation_search_config.psi_step", "fast", "psi_step"), []),
    "negative step": (_setter("orientation_search_config.theta_step", -5.0, "theta_step"), []),
    "zero defocus step": (_setter("defocus_search_config.defocus_step", 0.0, "defocus_step"), []),
    "inverted defocus range": (
        _setter("defocus_search_config.defocus_min", 5000.0, "defocus_min"),
        [],
    ),
    "unknown symmetry": (_setter("orientation_search_config.symmetry", "X7", "X7"), []),
    "resolution limit leaves no template": (
        _setter("high_resolution_limit", 1000.0, "high_resolution_limit: 1000 Å would leave"),
        [],
    ),
    "missing template": (_setter("template_volume_path", "/nonexistent/t.mrc", "t.mrc"), []),
    "missing micrograph in table": (
        _table([{"micrograph_path": "/nonexistent/m.mrc", **_CTF}], "m.mrc"),
        [],
    ),
    "duplicate micrograph names": (
        _table([{"micrograph_path": None, **_CTF}] * 2, "duplicate"),
        [],
    ),
    "unwritable output directory": (_unwritable, []),
    "unreachable scheduler": (
        _setter("output_dir", None, "tcp://127.0.0.1:1"),
        ["--scheduler", "tcp://127.0.0.1:1"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, good, tmp_path, capsys):
    make, flags = CASES[case]
    out = tmp_path / "out"
    _earlier_results(out)
    before = _tree_digest(out)
    cfg = match_config(good["micrograph_path"], good["template_path"], out)
    expect = make(tmp_path, good, cfg)
    if cfg.get("output_dir") is None:
        cfg["output_dir"] = str(out)
    config = write_config(tmp_path / "config.yaml", cfg)
    status = main(["match", str(config), "--overwrite", *flags])
    captured = capsys.readouterr()
    assert status == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dtm: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _tree_digest(out) == before


def test_existing_results_need_resume_or_overwrite(good, tmp_path, capsys):
    out = tmp_path / "out"
    _earlier_results(out)
    before = _tree_digest(out)
    config = write_config(
        tmp_path / "c.yaml", match_config(good["micrograph_path"], good["template_path"], out)
    )
    assert main(["match", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and "--overwrite" in err and str(out) in err
    assert _tree_digest(out) == before


def test_yaml_syntax_error_and_the_real_console_exit_status(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("micrograph_path: [unclosed\n")
    result = subprocess.run(
        [sys.executable, "-m", "dtm.cli", "match", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "broken.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_kind_from_the_command_line(good, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml",
        match_config(good["micrograph_path"], good["template_path"], tmp_path / "out"),
    )
    # slurm needs cores and memory per job: the configuration has neither.
    assert main(["match", str(config), "--cluster", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtm: error: ") and "\n" not in err and "slurm" in err
    assert not (tmp_path / "out").exists()
    # kind address without an address is a configuration error naming the field.
    assert main(["match", str(config), "--cluster", "address"]) == 2
    assert "scheduler_address" in capsys.readouterr().err
    # --cluster offers exactly the kinds the configuration accepts.
    assert CLUSTER_KINDS == list(get_args(ClusterConfig.model_fields["kind"].annotation))


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["match", "c.yaml", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["match", "c.yaml", "--workers", "two"], "argument --workers: expected an integer"),
        (["peaks", "out", "--border", "-1"], "argument --border: must be >= 0, got -1"),
        (["browse", "out", "--port", "-5"], "argument --port: must be >= 0, got -5"),
        (["browse", "out", "--port", "70000"], "argument --port: must be <= 65535, got 70000"),
        (["peaks", "out", "--z-cutoff", "nan"], "argument --z-cutoff: expected a finite number"),
        (["peaks", "out", "--false-positives", "0"], "argument --false-positives: must be > 0"),
        (["peaks", "out", "--min-distance", "x"], "argument --min-distance: expected a number"),
    ],
)
def test_out_of_range_options_are_refused_before_anything_runs(argv, expect, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expect in capsys.readouterr().err.strip().splitlines()[-1]


def test_ctrl_c_exits_130_and_says_how_to_resume(good, tmp_path):
    out = tmp_path / "out"
    fine = {"psi_step": 2.0, "theta_step": 2.0}  # long enough to be interrupted
    cfg = match_config(
        good["micrograph_path"], good["template_path"], out, orientation_search_config=fine
    )
    config = write_config(tmp_path / "c.yaml", cfg)
    run = subprocess.Popen(
        [sys.executable, "-m", "dtm.cli", "match", str(config), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert run.stdout is not None
    try:
        # Interrupt once the search has started: the dashboard line comes once the cluster
        # is up (an interrupt while a LocalCluster starts ends in distributed's own atexit
        # traceback, "AssertionError: Status.init", on a loaded machine).
        for line in run.stdout:
            if line.startswith("dashboard:"):
                break
        time.sleep(2.0)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:  # a search that ignored the interrupt must not outlive the test
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # with its worker processes
            run.communicate()
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"dtm: interrupted; continue with: dtm match {config} --workers 1 --resume"
    )
    assert "Traceback" not in err


def test_ctrl_c_inside_a_gc_callback_is_delivered_after_it():
    """Python drops an exception raised in a gc callback ("Exception ignored"); distributed
    runs such callbacks, and a Ctrl-C landing in one used to be lost. It must also wake a
    main thread that is blocked in a wait."""
    from dtm.cli import _reliable_interrupts

    landed_in_callback = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start" and not landed_in_callback:
            landed_in_callback.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # handled before this callback returns
            for _ in range(1000):  # Python code for the handler to run inside
                pass

    gc.callbacks.append(callback)
    start = time.monotonic()
    try:
        with _reliable_interrupts(), pytest.raises(KeyboardInterrupt):
            gc.collect()
            threading.Event().wait(60)  # blocked: the interrupt must wake it
    finally:
        gc.callbacks.remove(callback)
    assert landed_in_callback
    assert time.monotonic() - start < 30  # woken, not timed out
