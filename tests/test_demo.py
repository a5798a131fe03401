"""The README's first command: `dtm demo` finds the planted particles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import pandas as pd
import pytest
import yaml

from dtm.config import load_match_config
from dtm.errors import OutputError
from dtm.io.store import open_results
from dtm.programs.demo import DEMO_MARKER, claim_directory, demo_config, demo_dataset

pytestmark = pytest.mark.slow


def test_demo_command_finds_every_planted_particle(tmp_path):
    # Run from the directory a user would be in, with a relative --out as the README does.
    result = subprocess.run(
        [sys.executable, "-m", "dtm.cli", "demo", "--out", "dtm-demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "found 6 of 6 planted particles" in result.stdout
    demo = tmp_path / "dtm-demo"
    config = yaml.safe_load((demo / "config.yaml").read_text())
    assert config["micrograph_path"] == "data/micrograph.mrc"  # relative to the config file
    peaks = pd.read_csv(demo / "results" / "peaks.csv")
    # The six, and at most the one false positive per micrograph that the threshold allows.
    assert 6 <= len(peaks) <= 7
    # The real workflow: the search made its template from the bundled model, and says how.
    assert config["template_model_path"] == "data/7ddo.pdb.gz"
    assert "template_volume_path" not in config
    template = demo / "results" / "template.mrc"
    assert mrcfile.read(template).shape == (50, 50, 50)
    assert peaks["template_path"].eq(str(template.resolve())).all()
    job = json.loads((demo / "results" / "job.json").read_text())
    assert job["config"]["template_model_path"] == str((demo / "data/7ddo.pdb.gz").resolve())
    assert job["config"]["template_box"] == 50
    assert job["config"]["template_simulation"]["oversampling"] == 4
    [dataset] = open_results(demo / "results").values()
    record = dataset.attrs["template_simulation"]
    assert record["box"] == 50 and record["pixel_size"] == 3.0 and record["voltage"] == 300.0
    assert record["b_factor_scaling"] == 1.0 and record["dose_weighting"] is None


def test_synthetic_demo_searches_with_its_template_file(tmp_path):
    data = demo_dataset(tmp_path / "data", micrograph_shape=(128, 128), n_particles=1)
    config = demo_config(data, tmp_path / "results", base=tmp_path)
    assert config["template_volume_path"] == "data/template.mrc"
    assert "template_model_path" not in config
    loaded = load_match_config(_write(tmp_path / "config.yaml", config))
    assert loaded.template_path == (tmp_path / "data" / "template.mrc").resolve()
    assert loaded.template_record() is None


def test_demo_replaces_only_an_earlier_demo(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("micrograph_path: my_data.mrc\n")
    with pytest.raises(OutputError, match=r"^--out .*mine: holds other files"):
        claim_directory(mine)
    assert (mine / "config.yaml").read_text() == "micrograph_path: my_data.mrc\n"
    assert not (mine / DEMO_MARKER).exists()
    with pytest.raises(OutputError, match="not a directory"):
        claim_directory(mine / "config.yaml")
    fresh = tmp_path / "fresh"
    assert claim_directory(fresh) is False and (fresh / DEMO_MARKER).exists()
    (fresh / "config.yaml").write_text("anything: 1\n")
    assert claim_directory(fresh) is True  # marked by the first demo
    older = tmp_path / "older"
    older.mkdir()
    (older / "config.yaml").write_text(yaml.safe_dump({"optics_group": {"label": "demo"}}))
    assert claim_directory(older) is True  # a demo from before the marker


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path
