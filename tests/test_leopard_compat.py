"""A Leopard-EM match_template file runs unchanged (only its values fitted to the test data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import pytest
import yaml
from datasets import DEFOCUS, OPTICS, PIXEL_SIZE, write_dataset

from dtm.cli import main

pytestmark = pytest.mark.slow
LEOPARD = Path(__file__).parent / "data" / "leopard_match_template.yaml"


def test_leopard_file_runs_and_exports_its_map_paths(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", shape=(192, 192), n_particles=1)
    shutil.copy(data["micrograph_path"], tmp_path / "micrograph.mrc")
    shutil.copy(data["template_path"], tmp_path / "template.mrc")
    config = yaml.safe_load(LEOPARD.read_text())
    # Same keys; values sized for a quick search of the test data.
    config["optics_group"].update(
        pixel_size=PIXEL_SIZE,
        defocus_u=OPTICS["defocus_u"],
        defocus_v=OPTICS["defocus_v"],
        astigmatism_angle=OPTICS["astigmatism_angle"],
    )
    config["defocus_search_config"].update(
        defocus_min=DEFOCUS[0], defocus_max=DEFOCUS[-1], defocus_step=DEFOCUS[1] - DEFOCUS[0]
    )
    config["orientation_search_config"].update(psi_step=45.0, theta_step=45.0)
    path = tmp_path / "leopard.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert set(yaml.safe_load(path.read_text())) == set(yaml.safe_load(LEOPARD.read_text()))

    assert main(["match", str(path), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "notice: computational_config.backend" in printed
    for name in (
        "mip",
        "scaled_mip",
        "correlation_average",
        "correlation_variance",
        "orientation_psi",
        "orientation_theta",
        "orientation_phi",
        "relative_defocus",
    ):
        with mrcfile.open(tmp_path / "out" / f"{name}.mrc") as mrc:
            assert mrc.data.shape == (192 - 64 + 1,) * 2
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE)
    assert (tmp_path / "dtm-out" / "results.zarr").exists()

    # allow_file_overwrite: false protects the maps of the first run.
    shutil.rmtree(tmp_path / "dtm-out")
    assert main(["match", str(path), "--workers", "1"]) == 2
    assert "allow_file_overwrite" in capsys.readouterr().err
