"""Planning a run: task sizes, the device a configuration asks for, what changed on resume."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from dtm.config import MatchConfig
from dtm.io.rundir import changed_keys
from dtm.programs.plan import MIN_TASKS, TARGET_TASK_WORK, auto_chunk_size, resolve_device
from dtm.runtime.cluster import gpu_unavailable_reason
from dtm.search.space import SearchSpace


def _space(n_orientations: int, n_defocus: int) -> SearchSpace:
    euler = np.zeros((n_orientations, 3))
    euler[:, 2] = np.arange(n_orientations) % 360
    return SearchSpace(euler=euler, defocus=np.linspace(-600.0, 600.0, n_defocus))


def test_chunks_are_a_few_seconds_of_work_and_at_least_min_tasks() -> None:
    # Case S of the benchmarks: the work target allows 953 orientations per task, but
    # 14,832 orientations must still make MIN_TASKS tasks.
    s = _space(14_832, 1)
    chunk = auto_chunk_size(s, (512, 512))
    assert chunk == math.ceil(14_832 / MIN_TASKS) == 464
    assert len(s.chunks(chunk)) >= MIN_TASKS
    # Large images with many defocus planes: the work per task decides, never below one.
    large = _space(100_000, 13)
    assert auto_chunk_size(large, (1024, 1024)) == int(TARGET_TASK_WORK // (1024**2 * 13)) == 18
    assert auto_chunk_size(large, (4096, 4096)) == 1
    # A tiny search: one orientation per task.
    assert auto_chunk_size(_space(24, 3), (512, 512)) == 1


def test_gpu_tasks_are_a_thousand_times_larger_within_the_task_count() -> None:
    full = _space(1_584_480, 13)  # a full search at 4096² (case L)
    cpu, gpu = auto_chunk_size(full, (4096, 4096)), auto_chunk_size(full, (4096, 4096), "gpu")
    assert cpu == 1
    assert gpu == int(1000 * TARGET_TASK_WORK // (4096**2 * 13)) == 1146
    assert auto_chunk_size(_space(14_832, 1), (512, 512), "gpu") == 464  # still 32 tasks


def _config(tmp_path: Path, **changes: object) -> MatchConfig:
    for name in ("micrograph.mrc", "template.mrc"):
        (tmp_path / name).write_bytes(b"")
    data = {
        "micrograph_path": "micrograph.mrc",
        "template_volume_path": "template.mrc",
        "optics_group": {"pixel_size": 1.0, "voltage": 300.0, "defocus_u": 8e3, "defocus_v": 8e3},
        **changes,
    }
    return MatchConfig.model_validate(data, context={"base_dir": tmp_path})


def test_device_from_the_command_line_then_cluster_then_leopard_gpu_ids(tmp_path: Path) -> None:
    out = io.StringIO()
    leopard = _config(tmp_path, computational_config={"gpu_ids": [0]})
    assert resolve_device(leopard, "cpu", out) == "cpu"
    explicit = _config(tmp_path, computational_config={"gpu_ids": [0]}, cluster={"device": "cpu"})
    assert resolve_device(explicit, None, out) == "cpu"
    assert resolve_device(_config(tmp_path), None, out) == "cpu"  # dtm's default
    assert resolve_device(
        _config(tmp_path, computational_config={"gpu_ids": "cpu"}), None, out
    ) == ("cpu")
    assert out.getvalue() == ""  # none of these asked for a GPU


def test_leopard_gpu_file_runs_on_the_cpu_where_no_gpu_works(tmp_path: Path) -> None:
    out = io.StringIO()
    device = resolve_device(_config(tmp_path, computational_config={"gpu_ids": [0]}), None, out)
    notices = out.getvalue().splitlines()
    assert notices[0] == (
        "notice: computational_config.gpu_ids: dtm uses every GPU its workers see; "
        "choose GPUs with CUDA_VISIBLE_DEVICES"
    )
    reason = gpu_unavailable_reason()
    if reason is None:
        assert device == "gpu" and len(notices) == 1
    else:
        assert device == "cpu"
        assert notices[1] == (
            "notice: computational_config.gpu_ids asks for a GPU, none works here "
            f"({reason}): running on the CPU"
        )
    all_gpus = io.StringIO()
    resolve_device(_config(tmp_path, computational_config={"gpu_ids": "all"}), None, all_gpus)
    assert "CUDA_VISIBLE_DEVICES" not in all_gpus.getvalue()  # nothing to choose


def test_changed_keys_names_every_differing_leaf() -> None:
    old = {"a": 1, "grid": {"psi_step": 1.5, "theta_step": 2.5}, "gone": 0, "same": {"x": [1]}}
    new = {"a": 1, "grid": {"psi_step": 2.0, "theta_step": 2.5}, "added": 3, "same": {"x": [1]}}
    assert changed_keys(old, new) == ["added", "gone", "grid.psi_step"]
    assert changed_keys(old, old) == []
    assert changed_keys({"grid": {"psi_step": 1}}, {"grid": 5}) == ["grid"]
