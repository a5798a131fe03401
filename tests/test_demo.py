"""The README's first command: `dtm demo` finds the planted particles."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from dtm.errors import OutputError
from dtm.programs.demo import DEMO_MARKER, claim_directory

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
    config = yaml.safe_load((tmp_path / "dtm-demo" / "config.yaml").read_text())
    assert config["micrograph_path"] == "data/micrograph.mrc"  # relative to the config file
    peaks = pd.read_csv(tmp_path / "dtm-demo" / "results" / "peaks.csv")
    # The six, and at most the one false positive per micrograph that the threshold allows.
    assert 6 <= len(peaks) <= 7


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
