"""End to end: dtm match on simulated micrographs with real Dask clusters, zarr and MRC files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dask.array
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import xarray as xr
from datasets import BOX, PIXEL_SIZE, match_config, write_config, write_dataset
from distributed import Client, LocalCluster

from dtm.config import MatchConfig
from dtm.config.match import PeaksConfig
from dtm.io.store import open_results
from dtm.programs.match import match_template
from dtm.programs.peaks import repick
from dtm.search.picking import threshold
from dtm.search.stats import MAP_NAMES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("data"))


def _config(dataset: dict, out: Path, **extra: object) -> MatchConfig:
    return MatchConfig.model_validate(
        match_config(dataset["micrograph_path"], dataset["template_path"], out, **extra)
    )


@pytest.fixture(scope="module")
def valid_run(dataset: dict, two_workers: Client, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("valid")
    ds = match_template(_config(dataset, out), client=two_workers)
    return out, ds


def _assert_particles_found(peaks: pd.DataFrame, particles: list) -> None:
    for p in particles:
        hit = peaks[(peaks.pos_y == p.pos_y) & (peaks.pos_x == p.pos_x)]
        assert len(hit) == 1, f"planted particle at ({p.pos_y}, {p.pos_x}) not picked"
        row = hit.iloc[0]
        assert (row.phi, row.theta, row.psi) == pytest.approx((p.phi, p.theta, p.psi), abs=1e-3)
        assert row.relative_defocus == pytest.approx(p.relative_defocus)


def test_valid_mode_finds_every_planted_particle(valid_run, dataset):
    out, ds = valid_run
    peaks = pd.read_csv(out / "peaks.csv")
    _assert_particles_found(peaks, dataset["particles"])
    # Nothing but the planted particles rises above the one-false-positive threshold.
    assert len(peaks) <= len(dataset["particles"]) + 1
    assert (peaks.pos_x_img == peaks.pos_x + BOX // 2).all()


def test_valid_mode_outputs(valid_run, dataset):
    out, ds = valid_run
    h, w = 320 - BOX + 1, 320 - BOX + 1
    assert set(MAP_NAMES) <= set(ds.data_vars)
    assert ds.mip.shape == (h, w)
    assert not (out / "checkpoints").exists()  # only while a micrograph is being searched
    reopened = xr.open_zarr(out / "results.zarr", consolidated=False)
    assert isinstance(reopened.mip.data, dask.array.Array)  # lazily backed by dask
    assert reopened.mip.chunks is not None
    attrs = reopened.attrs
    assert attrs["total_correlations"] == attrs["total_orientations"] * attrs["total_defocus"]
    assert attrs["correlation_mode"] == "valid" and attrs["pixel_size"] == PIXEL_SIZE
    assert json.loads(attrs["config"])["orientation_search_config"]["psi_step"] == 30.0
    np.testing.assert_allclose(reopened.x_angstrom.values, np.arange(w) * PIXEL_SIZE)
    for name in (
        "mip",
        "scaled_mip",
        "correlation_average",
        "correlation_variance",
        "orientation_phi",
        "orientation_theta",
        "orientation_psi",
        "relative_defocus",
    ):
        with mrcfile.open(out / "maps" / f"{name}.mrc") as mrc:
            assert mrc.data.shape == (h, w)
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE)
    with mrcfile.open(out / "maps" / "correlation_variance.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, ds.correlation_variance.values)
    report = json.loads((out / "run.json").read_text())
    assert report["micrographs"]["micrograph"]["status"] == "done"
    assert (out / "job.json").exists() and not list((out / "checkpoints").rglob("*.tmp"))


def test_same_mode_shapes_and_positions(dataset, two_workers, tmp_path):
    ds = match_template(_config(dataset, tmp_path, correlation_mode="same"), client=two_workers)
    assert ds.mip.shape == (320, 320)
    with mrcfile.open(tmp_path / "maps" / "mip.mrc") as mrc:
        assert mrc.data.shape == (320, 320)
    _assert_particles_found(pd.read_csv(tmp_path / "peaks.csv"), dataset["particles"])


def test_one_worker_two_workers_and_external_cluster_give_identical_maps(
    valid_run, dataset, dask_cli_cluster, tmp_path
):
    _, reference = valid_run
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        one = match_template(_config(dataset, tmp_path / "one"), client=client)
    external = match_template(
        _config(dataset, tmp_path / "ext"), scheduler_address=dask_cli_cluster.address
    )
    for ds in (one, external):
        for name in MAP_NAMES:
            np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)


def test_chunking_does_not_change_the_maps(valid_run, dataset, two_workers, tmp_path):
    _, reference = valid_run
    ds = match_template(
        _config(dataset, tmp_path, cluster={"chunk_size": 7, "split_every": 3}), client=two_workers
    )
    for name in ("mip", "phi", "theta", "psi", "defocus"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    for name in ("correlation_mean", "correlation_variance", "scaled_mip"):
        np.testing.assert_allclose(ds[name].values, reference[name].values, rtol=1e-5, atol=1e-6)


def test_cli_runs_and_prints_the_summary(dataset, tmp_path):
    config = write_config(
        tmp_path / "config.yaml",
        match_config(dataset["micrograph_path"], dataset["template_path"], tmp_path / "out"),
    )
    result = subprocess.run(
        [sys.executable, "-m", "dtm.cli", "match", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "correlations per micrograph" in result.stdout
    assert "dashboard: http" in result.stdout
    assert "correlations/s" in result.stdout and "finished in" in result.stdout
    assert open_results(tmp_path / "out")["micrograph"].mip.shape == (257, 257)


def test_peaks_and_report_commands_on_a_finished_run(valid_run, dataset, tmp_path, capsys):
    from dtm.cli import main

    out, _ = valid_run
    strict = tmp_path / "copy"
    import shutil

    shutil.copytree(out, strict)
    assert main(["peaks", str(strict), "--z-cutoff", "1000"]) == 0
    assert len(pd.read_csv(strict / "peaks.csv")) == 0
    assert "0 peaks above z* = 1000.00 (fixed) written to" in capsys.readouterr().out
    assert main(["peaks", str(strict)]) == 0
    picked = pd.read_csv(strict / "peaks.csv")
    _assert_particles_found(picked, dataset["particles"])
    mip = open_results(strict)["micrograph"].scaled_mip  # valid mode: every pixel counts
    z = threshold(mip.size, int(picked["total_correlations"][0]))
    expected = f"{len(picked)} peaks above z* = {z:.2f} (1 false positive per micrograph)"
    assert expected in capsys.readouterr().out
    assert main(["report", str(strict)]) == 0
    html = (strict / "report.html").read_text()
    assert "data:image/png;base64" in html and "micrograph" in html
    assert main(["peaks", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_high_resolution_limit_searches_cropped_data(dataset, two_workers, tmp_path):
    ds = match_template(_config(dataset, tmp_path, high_resolution_limit=8.0), client=two_workers)
    ds = ds.load()
    assert ds.attrs["pixel_size"] == pytest.approx(4.0)  # 8 Å limit: 4 Å pixels
    assert ds.attrs["original_pixel_size"] == pytest.approx(PIXEL_SIZE)
    with mrcfile.open(dataset["micrograph_path"], permissive=True) as mrc:
        original = mrc.data.shape
    cropped = ds.attrs["image_shape"]
    expected = [PIXEL_SIZE * n / m for n, m in zip(original, cropped, strict=True)]
    assert ds.attrs["axis_pixel_size"] == pytest.approx(expected)
    assert float(ds.x_angstrom[10]) == pytest.approx(10 * expected[1])
    assert ds.attrs["template_shape"] == [48, 48, 48]
    assert ds.mip.shape == (240 - 48 + 1,) * 2
    for p in dataset["particles"]:
        # Each planted particle is the strongest pose near its place on the coarser grid.
        y, x = round(p.pos_y * PIXEL_SIZE / 4.0), round(p.pos_x * PIXEL_SIZE / 4.0)
        window = ds.isel(y=slice(y - 2, y + 3), x=slice(x - 2, x + 3))
        iy, ix = np.unravel_index(int(np.argmax(window.mip.values)), window.mip.shape)
        best = window.isel(y=iy, x=ix)
        assert (float(best.phi), float(best.theta), float(best.psi)) == pytest.approx(
            (p.phi, p.theta, p.psi), abs=1e-3
        )
        assert float(best.scaled_mip) > 5.0
        # Positions are in 4 Å pixels: the centre in Å is within one of them of the truth.
        centre = (int(best.y) + 24) * 4.0, (int(best.x) + 24) * 4.0
        truth = (p.pos_y + BOX // 2) * PIXEL_SIZE, (p.pos_x + BOX // 2) * PIXEL_SIZE
        assert np.hypot(centre[0] - truth[0], centre[1] - truth[1]) <= 4.0 * np.sqrt(2)
    # RELION reads coordinates in pixels of the micrograph file, not of the cropped maps.
    particles = starfile.read(tmp_path / "peaks.star", always_dict=True)["particles"]
    assert (particles["rlnMicrographPixelSize"] == PIXEL_SIZE).all()
    for p in dataset["particles"]:
        offset = np.hypot(
            particles["rlnCoordinateY"] - (p.pos_y + BOX // 2),
            particles["rlnCoordinateX"] - (p.pos_x + BOX // 2),
        )
        assert offset.min() <= 2 * np.sqrt(2) + 0.5  # one 4 Å pixel, rounded to 2 Å pixels


def test_fixed_z_score_cutoff_from_the_configuration(dataset, two_workers, tmp_path):
    config = _config(dataset, tmp_path, peaks={"z_score_cutoff": 5.0, "min_distance_angstrom": 60})
    match_template(config, client=two_workers)
    peaks = pd.read_csv(tmp_path / "peaks.csv")
    assert (peaks.detection_z > 5.0).all()  # the cut-off applies to the default metric
    _assert_particles_found(peaks, dataset["particles"])
    # Given the seed's metric, it applies to the scaled MIP.
    repick(tmp_path, PeaksConfig(metric="scaled_mip", z_score_cutoff=5.0))
    assert (pd.read_csv(tmp_path / "peaks.csv").scaled_mip > 5.0).all()
