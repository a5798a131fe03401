"""`dtm template` from the shell, and searches that name a model (``template_model_path``):
the configuration's rules and where the simulated template goes (the whole run is in
``tests/test_demo.py``)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml
from test_template import write_model

from dtm.cli import main
from dtm.config import load_match_config
from dtm.config.template import default_box
from dtm.errors import ConfigError, OutputError
from dtm.io.model import read_model
from dtm.io.mrc import write_map
from dtm.programs.template import TEMPLATE_FILE, search_template, simulate_template

ATOMS = [("C", (0.0, 0.0, 0.0)), ("N", (4.0, 1.0, -2.0)), ("S", (-12.0, 5.0, 2.0))]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.pdb", ATOMS, b=30.0)


def test_command_writes_the_template(model, tmp_path, capsys):
    out = tmp_path / "t.mrc"
    argv = ["template", str(model), "--pixel-size", "1.5", "--box", "32", "--output", str(out)]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("template: 3 atoms (0 hydrogens left out, 0 water atoms kept) →")
    assert "32³ voxels of 1.5 Å, oversampled 2×" in line
    with mrcfile.open(out) as mrc:
        assert mrc.data.shape == (32, 32, 32) and float(mrc.voxel_size.x) == pytest.approx(1.5)
        volume = mrc.data.copy()
    expected, _ = simulate_template(model, pixel_size=1.5, box=32)
    np.testing.assert_array_equal(volume, expected)


def test_command_refuses_bad_input_in_one_line(model, tmp_path, capsys):
    out = tmp_path / "t.mrc"
    out.write_bytes(b"mine")
    cases = [
        ([], "--output .*t.mrc: exists; add --overwrite to replace it"),
        (["--overwrite", "--dose-weighting", "30", "0"], "command line: dose_weighting: needs"),
        (["--overwrite", "--mtf", str(tmp_path / "none.star")], "mtf_path: file not found"),
        (["--overwrite", "--box", "10"], r"1 atom\(s\) lie outside the 10-voxel box"),
    ]
    for extra, message in cases:
        argv = ["template", str(model), "--pixel-size", "1.5", "--output", str(out), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("dtm: error: "), err
        assert re.search(message, err), err
    assert out.read_bytes() == b"mine"  # nothing written


def test_command_on_a_cluster_gives_the_same_template(model, tmp_path, two_workers):
    local, remote = tmp_path / "local.mrc", tmp_path / "remote.mrc"
    common = ["template", str(model), "--pixel-size", "1.0", "--box", "24", "--output"]
    assert main([*common, str(local)]) == 0
    address = two_workers.scheduler.address
    assert main([*common, str(remote), "--scheduler", address]) == 0
    np.testing.assert_array_equal(mrcfile.read(local), mrcfile.read(remote))


def _config(tmp_path: Path, **keys) -> Path:
    micrograph = tmp_path / "micrograph.mrc"
    if not micrograph.exists():
        write_map(micrograph, np.random.default_rng(0).normal(size=(96, 96)), pixel_size=1.5)
    data = {
        "micrograph_path": "micrograph.mrc",
        "output_dir": "out",
        "optics_group": {
            "label": "t",
            "pixel_size": 1.5,
            "voltage": 200.0,
            "defocus_u": 10000.0,
            "defocus_v": 9000.0,
            "astigmatism_angle": 0.0,
        },
        **keys,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_configuration_names_one_template(model, tmp_path):
    volume = tmp_path / "v.mrc"
    write_map(volume, np.ones((8, 8, 8)), pixel_size=1.5)
    problems = [
        ({}, "template_volume_path: required: give template_volume_path or template_model_path"),
        (
            {"template_volume_path": "v.mrc", "template_model_path": "model.pdb"},
            "template_model_path: give template_volume_path or template_model_path, not both",
        ),
        ({"template_volume_path": "v.mrc", "template_box": 40}, "template_box: only with"),
        (
            {"template_volume_path": "v.mrc", "template_simulation": {"waters": False}},
            "template_simulation: only with template_model_path",
        ),
        (
            {"template_model_path": "model.pdb", "template_simulation": {"dose_weighting": [5, 1]}},
            "template_simulation.dose_weighting: needs start < end",
        ),
        ({"template_model_path": "none.cif"}, "template_model_path: file not found"),
    ]
    for keys, message in problems:
        with pytest.raises(ConfigError, match=message):
            load_match_config(_config(tmp_path, **keys))
    config = load_match_config(_config(tmp_path, template_model_path="model.pdb"))
    assert config.template_model_path == model
    with pytest.raises(ConfigError, match="not been simulated yet"):
        _ = config.template_path


def test_search_simulates_into_the_output_directory(model, tmp_path, two_workers):
    config = load_match_config(
        _config(
            tmp_path,
            template_model_path="model.pdb",
            template_simulation={"b_factor_scaling": 0.5, "waters": False},
        )
    )
    # On the caller's cluster (match_template given a client): the same bits as here.
    ready = search_template(
        config, resume=False, overwrite=False, out=io.StringIO(), client=two_workers
    )
    path = tmp_path / "out" / TEMPLATE_FILE
    assert ready.template_path == path and path.is_file()
    settings = config.template_simulation
    expected, record = simulate_template(model, pixel_size=1.5, voltage=200.0, settings=settings)
    np.testing.assert_array_equal(mrcfile.read(path), expected)
    # Every parameter is resolved, for job.json and the dataset attributes.
    assert ready.template_box == record["box"] == default_box(read_model(model).radius(), 1.5)
    assert ready.template_simulation.oversampling == 2
    assert ready.template_record() == {
        "model_path": str(model),
        "box": record["box"],
        "pixel_size": 1.5,
        "voltage": 200.0,
        **ready.template_simulation.record(),
    }


def test_search_writes_its_template_only_where_safe(model, tmp_path):
    quiet = io.StringIO()
    first = load_match_config(_config(tmp_path, template_model_path="model.pdb"))
    search_template(first, resume=False, overwrite=False, out=quiet)
    path = tmp_path / "out" / TEMPLATE_FILE
    (tmp_path / "out" / "job.json").write_text("{}")  # the run's results
    before = path.stat().st_mtime_ns
    # The same template: nothing to write, whatever the flags (the run then decides).
    search_template(first, resume=True, overwrite=False, out=quiet)
    search_template(first, resume=False, overwrite=False, out=quiet)
    assert path.stat().st_mtime_ns == before
    changed = load_match_config(_config(tmp_path, template_model_path="model.pdb", template_box=40))
    with pytest.raises(ConfigError, match="^--resume: the template simulated from .* differs"):
        search_template(changed, resume=True, overwrite=False, out=quiet)
    with pytest.raises(OutputError, match="holds results of an earlier run"):
        search_template(changed, resume=False, overwrite=False, out=quiet)
    assert path.stat().st_mtime_ns == before and mrcfile.read(path).shape != (40, 40, 40)
    search_template(changed, resume=False, overwrite=True, out=quiet)
    assert mrcfile.read(path).shape == (40, 40, 40)
