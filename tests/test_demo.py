"""The README's first command: `dtm demo` finds the planted particles."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

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
    assert len(peaks) == 6
