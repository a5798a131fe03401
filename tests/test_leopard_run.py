"""End to end: the file Leopard-EM 1.3 writes runs in dtm from the folder it runs from in
Leopard-EM, with its random Fourier dropout and correlation table; header pixel sizes that
are unset or wrong are noted, and the configuration's pixel size gives the same maps."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import yaml
from datasets import DEFOCUS, OPTICS, PIXEL_SIZE, match_config, write_dataset

from dtm.cli import main
from dtm.config import MatchConfig
from dtm.errors import InputError
from dtm.programs.match import match_template

pytestmark = pytest.mark.slow
LEOPARD = Path(__file__).parent / "data" / "leopard"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("data"), shape=(192, 192), n_particles=1)


def _leopard_file(folder: Path, dropout: bool) -> Path:
    """Leopard-EM's own to_yaml output (HDF5 result variant, dropout, correlation table),
    its values fitted to the test data set."""
    config = yaml.safe_load((LEOPARD / "match_template_hdf5_to_yaml.yaml").read_text())
    config["optics_group"].update(pixel_size=PIXEL_SIZE, ctf_B_factor=0.0, **OPTICS)
    config["defocus_search_config"].update(
        defocus_min=DEFOCUS[0], defocus_max=DEFOCUS[-1], defocus_step=DEFOCUS[1] - DEFOCUS[0]
    )
    config["orientation_search_config"].update(psi_step=45.0, theta_step=45.0)
    config["preprocessing_filters"]["random_fourier_dropout"]["enabled"] = dropout
    path = folder / "leopard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_leopard_em_file_runs_from_its_working_directory(dataset, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(dataset["micrograph_path"], run / "micrograph.mrc")
    shutil.copy(dataset["template_path"], run / "template.mrc")
    configs = tmp_path / "configs"  # the file is elsewhere: Leopard-EM's paths are the cwd's
    configs.mkdir()
    monkeypatch.chdir(run)
    mips = {}
    for dropout in (True, False):
        path = _leopard_file(configs, dropout)
        assert main(["match", str(path), "--workers", "1", "--overwrite"]) == 0
        printed = capsys.readouterr().out
        assert f"notice: relative paths are resolved from the working directory {run}" in printed
        assert "notice: match_template_result.hdf5_path: accepted, has no effect" in printed
        with mrcfile.open(run / "dtm-out" / "maps" / "mip.mrc") as mrc:
            mips[dropout] = np.array(mrc.data)
        # correlation_table_path: dtm's table (parquet) where Leopard-EM writes its own.
        table = pd.read_parquet(run / "out" / "table.h5")
        assert len(table) > 0 and (table["correlation"] > 5.5).all()
    # The dropout changes the correlations, but the planted particle is still found.
    assert not np.array_equal(mips[True], mips[False])
    particle = dataset["particles"][0]
    assert mips[True].argmax() == np.ravel_multi_index(
        (particle.pos_y, particle.pos_x), mips[True].shape
    )


def _with_header(source: Path, target: Path, voxel_size: float) -> Path:
    shutil.copy(source, target)
    with mrcfile.open(target, mode="r+") as mrc:
        mrc.voxel_size = voxel_size
    return target


def test_header_pixel_sizes_are_noted_and_the_configurations_is_used(
    dataset, two_workers, tmp_path
):
    """Headers at 1.0 (micrograph) and unset (template): the same maps as correct headers,
    with a Fourier crop (high_resolution_limit) that needs the pixel size."""
    micrograph = _with_header(dataset["micrograph_path"], tmp_path / "mic.mrc", 1.0)
    template = _with_header(dataset["template_path"], tmp_path / "tmpl.mrc", 0.0)
    extra = {"high_resolution_limit": 8.0, "orientation_search_config": {"psi_step": 45.0}}
    right = MatchConfig.model_validate(
        match_config(dataset["micrograph_path"], dataset["template_path"], tmp_path / "a", **extra)
    )
    wrong = MatchConfig.model_validate(match_config(micrograph, template, tmp_path / "b", **extra))
    out = io.StringIO()
    expected = match_template(right, client=two_workers)
    result = match_template(wrong, client=two_workers, out=out)
    for name in ("mip", "scaled_mip", "psi", "defocus"):
        np.testing.assert_array_equal(result[name].values, expected[name].values)
    notices = [line for line in out.getvalue().splitlines() if line.startswith("notice: ")]
    assert notices == [
        f"notice: micrograph {micrograph}: header pixel size 1 Å differs from the "
        f"configuration's pixel_size {PIXEL_SIZE:g} Å by more than 0.1 %; {PIXEL_SIZE:g} Å is "
        "used (--strict refuses it)",
        f"notice: template {template}: the header has no pixel size (voxel size 0); the "
        f"configuration's pixel_size {PIXEL_SIZE:g} Å is used",
    ]
    with pytest.raises(InputError, match=r"mic.mrc has 1 Å in its header.*--strict"):
        match_template(wrong, client=two_workers, strict=True, out=io.StringIO())
