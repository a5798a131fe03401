"""Threshold, peak picking, the per-micrograph table and the cross-micrograph dataframe."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pydantic
import pytest
import xarray as xr
from scipy.spatial import cKDTree

from dtm.config.match import PeaksConfig
from dtm.errors import ConfigError, InputError
from dtm.programs.peaks import (
    PEAK_COLUMNS,
    map_threshold,
    peaks_dataframe,
    peaks_table,
    read_picking,
    repick,
    threshold_summary,
)
from dtm.search.picking import default_min_distance, pick_peaks, threshold

# The columns the users asked for (docs/outputs.md), in their order, with their types.
SEED_COLUMNS = [
    ("mip", "float"),
    ("scaled_mip", "float"),
    ("correlation_mean", "float"),
    ("correlation_variance", "float"),
    ("total_correlations", "int"),
    ("pos_x", "int"),
    ("pos_y", "int"),
    ("pos_x_img", "int"),
    ("pos_y_img", "int"),
    ("pos_x_img_angstrom", "float"),
    ("pos_y_img_angstrom", "float"),
    ("psi", "float"),
    ("theta", "float"),
    ("phi", "float"),
    ("relative_defocus", "float"),
    ("defocus_u", "float"),
    ("defocus_v", "float"),
    ("astigmatism_angle", "float"),
    ("pixel_size", "float"),
    ("voltage", "float"),
    ("spherical_aberration", "float"),
    ("amplitude_contrast_ratio", "float"),
    ("phase_shift", "float"),
    ("ctf_B_factor", "float"),
    ("micrograph_path", "str"),
    ("template_path", "str"),
    ("mip_path", "str"),
    ("scaled_mip_path", "str"),
    ("psi_path", "str"),
    ("theta_path", "str"),
    ("phi_path", "str"),
    ("defocus_path", "str"),
    ("correlation_average_path", "str"),
    ("correlation_variance_path", "str"),
]

PIXEL_SIZE = 1.25
TEMPLATE = 16  # template box d (cube d³)


def scaled(**options) -> PeaksConfig:
    """Picking on the scaled MIP: these tests plant their peaks in that map."""
    return PeaksConfig(metric="scaled_mip", **options)


def make_results(
    name: str,
    peaks: dict[tuple[int, int], float],
    *,
    image_shape: tuple[int, int] = (96, 80),
    mode: str = "valid",
    total_correlations: int = 4416 * 11,
    seed: int = 0,
) -> xr.Dataset:
    """A results dataset per the architecture contract, with known peaks on weak noise.

    The angle and defocus maps are simple functions of the position, so a row's values tell
    which pixel they were read from.
    """
    height, width = image_shape
    shape = (height - TEMPLATE + 1, width - TEMPLATE + 1) if mode == "valid" else image_shape
    rng = np.random.default_rng(seed)
    scaled = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    for (y, x), value in peaks.items():
        scaled[y, x] = value
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    maps = {
        "mip": scaled * 2.0 + 1.0,
        "scaled_mip": scaled,
        "correlation_mean": 0.01 * yy,
        "correlation_variance": 1.0 + 0.001 * xx,
        "phi": yy + 0.001 * xx,
        "theta": xx + 0.5,
        "psi": yy * 2.0,
        "defocus": (xx - yy) * 10.0,
    }
    y = np.arange(shape[0])
    x = np.arange(shape[1])
    attrs = {
        "micrograph_name": name,
        "micrograph_path": f"/data/{name}.mrc",
        "template_path": "/data/template.mrc",
        "pixel_size": PIXEL_SIZE,
        "template_shape": [TEMPLATE] * 3,
        "image_shape": [height, width],
        "correlation_mode": mode,
        "total_orientations": 4416,
        "total_defocus": 11,
        "total_correlations": total_correlations,
        "defocus_u": 12000.0,
        "defocus_v": 11500.0,
        "astigmatism_angle": 30.0,
        "voltage": 300.0,
        "spherical_aberration": 2.7,
        "amplitude_contrast_ratio": 0.07,
        "phase_shift": 0.0,
        "ctf_B_factor": 0.0,
        "map_paths": {key: f"/out/maps/{name}_{key}.mrc" for key in maps},
        "config": json.dumps({"micrograph_path": f"/data/{name}.mrc"}),
        "dtm_version": "0.1.0",
        "start_time": "2026-01-01T00:00:00",
        "end_time": "2026-01-01T01:00:00",
    }
    return xr.Dataset(
        {key: (("y", "x"), value.astype(np.float32)) for key, value in maps.items()},
        coords={
            "y": y,
            "x": x,
            "y_angstrom": ("y", y * PIXEL_SIZE),
            "x_angstrom": ("x", x * PIXEL_SIZE),
        },
        attrs=attrs,
    )


def greedy_reference(values: np.ndarray, cutoff: float, min_distance: float) -> list:
    """Literal greedy NMS: sort by (value desc, y, x), accept unless too close."""
    candidates = sorted(
        (-values[y, x], y, x) for y, x in zip(*np.nonzero(values > cutoff), strict=True)
    )
    accepted: list[tuple[int, int]] = []
    for _, y, x in candidates:
        if all((y - ay) ** 2 + (x - ax) ** 2 >= min_distance**2 for ay, ax in accepted):
            accepted.append((int(y), int(x)))
    return accepted


def test_columns_and_dtypes_are_the_seeds():
    names = [name for name, _ in SEED_COLUMNS]
    assert PEAK_COLUMNS == [
        *names,
        "micrograph_name",
        "particle_index",
        "micrograph_pixel_size",
        "detection_z",
        "neg_log_pvalue",
        "refined_pixel_size",
        "even_zernikes",
        "odd_zernikes",
        "mag_matrix",
    ]
    table = peaks_table(make_results("m1", {(10, 12): 30.0, (50, 40): 25.0}))
    assert list(table.columns) == PEAK_COLUMNS
    expected = {"float": np.dtype("float64"), "int": np.dtype("int64")}
    for name, kind in [*SEED_COLUMNS, ("micrograph_name", "str"), ("particle_index", "int")]:
        if kind == "str":
            assert pd.api.types.is_string_dtype(table[name]), name
        else:
            assert table[name].dtype == expected[kind], name


@pytest.mark.parametrize(
    ("positions", "correlations", "expected"),
    [
        (1850 * 1850, 2_359_296, 7.32),
        (5760 * 4092, 1_590_600 * 13, 7.85),
        (4096 * 4096, 1_584_480 * 13, 7.81),
    ],
)
def test_threshold_worked_values(positions, correlations, expected):
    assert round(threshold(positions, correlations), 2) == expected


def test_threshold_tail_probability_and_errors():
    from scipy.stats import norm

    # Independent reference: P(Z > z*) = FP / trials.
    z = threshold(1000, 500, false_positives=3.0)
    assert norm.sf(z) == pytest.approx(3.0 / 500_000, rel=1e-9)
    for bad in (0.0, -1.0, 1e9):
        with pytest.raises(ConfigError):
            threshold(1000, 500, false_positives=bad)


def test_nms_close_peaks_merge_far_peaks_stay():
    values = np.zeros((64, 64), dtype=np.float32)
    values[20, 20], values[20, 24] = 10.0, 9.0  # 4 px apart
    values[50, 50] = 8.0  # far away
    peaks = pick_peaks(values, 5.0, min_distance=6)
    assert peaks.tolist() == [[20, 20], [50, 50]]
    peaks = pick_peaks(values, 5.0, min_distance=4)  # distance 4 is not < 4: both stay
    assert peaks.tolist() == [[20, 20], [20, 24], [50, 50]]


@pytest.mark.parametrize("min_distance", [0.0, 1.0, 2.5, 4.0, 7.3])
def test_pick_peaks_equals_literal_greedy(min_distance):
    rng = np.random.default_rng(3)
    # Smooth-ish map with many exact ties (quantised values) and dense candidates.
    values = np.round(rng.standard_normal((40, 50)) * 3).astype(np.float32)
    values[::7, ::5] += 1.0
    peaks = pick_peaks(values, 0.5, min_distance=min_distance)
    assert [tuple(p) for p in peaks.tolist()] == greedy_reference(values, 0.5, min_distance)


def test_border_excludes_edge_positions_and_nan_never_passes():
    values = np.zeros((30, 30), dtype=np.float32)
    values[1, 15], values[15, 28], values[15, 15] = 9.0, 9.0, 7.0
    values[5, 5] = np.nan
    assert pick_peaks(values, 5.0, min_distance=2, border=3).tolist() == [[15, 15]]
    assert len(pick_peaks(values, 5.0, min_distance=2, border=0)) == 3


def test_noise_map_with_low_cutoff_is_consistent():
    rng = np.random.default_rng(7)
    values = rng.standard_normal((2048, 2048)).astype(np.float32)
    peaks = pick_peaks(values, 3.0, min_distance=5)
    expected = 2048**2 * 0.0013499  # P(Z > 3), before suppression
    assert 0.8 * expected < len(peaks) < expected
    picked = values[peaks[:, 0], peaks[:, 1]]
    assert (picked > 3.0).all() and (np.diff(picked) <= 0).all()
    pairs = cKDTree(peaks).query_pairs(5 - 1e-9)
    assert not pairs


def test_default_min_distance_scales_with_the_box():
    assert default_min_distance(400) == pytest.approx(60.0)
    assert default_min_distance(4) == 1.0
    with pytest.raises(ConfigError):
        default_min_distance(0)


def test_peaks_table_positions_values_and_optics():
    ds = make_results("m1", {(10, 12): 30.0, (50, 40): 25.0, (52, 41): 24.0})
    table = peaks_table(ds, scaled(min_distance_pixels=5))
    assert table[["pos_y", "pos_x"]].values.tolist() == [[10, 12], [50, 40]]
    assert table["particle_index"].tolist() == [0, 1]
    assert (table["pos_y_img"] == table["pos_y"] + TEMPLATE // 2).all()
    assert (table["pos_x_img"] == table["pos_x"] + TEMPLATE // 2).all()
    np.testing.assert_allclose(table["pos_x_img_angstrom"], (table["pos_x"] + 8) * PIXEL_SIZE)
    np.testing.assert_allclose(table["pos_y_img_angstrom"], (table["pos_y"] + 8) * PIXEL_SIZE)
    y, x = table["pos_y"].to_numpy(), table["pos_x"].to_numpy()
    np.testing.assert_allclose(table["scaled_mip"], [30.0, 25.0])
    np.testing.assert_allclose(table["mip"], [61.0, 51.0])
    np.testing.assert_allclose(table["phi"], y + 0.001 * x, rtol=1e-6)
    np.testing.assert_allclose(table["theta"], x + 0.5)
    np.testing.assert_allclose(table["psi"], 2.0 * y)
    np.testing.assert_allclose(table["relative_defocus"], (x - y) * 10.0)
    np.testing.assert_allclose(table["correlation_mean"], 0.01 * y, rtol=1e-6)
    assert (table["total_correlations"] == 4416 * 11).all()
    assert (table["defocus_u"] == 12000.0).all() and (table["voltage"] == 300.0).all()
    assert (table["micrograph_name"] == "m1").all()
    assert (table["correlation_average_path"] == "/out/maps/m1_correlation_mean.mrc").all()
    assert (table["defocus_path"] == "/out/maps/m1_defocus.mrc").all()
    # The 1-FP threshold of this search space is ~5.3: noise of sd 0.3 never reaches it.
    assert len(peaks_table(ds, scaled(z_score_cutoff=24.5, min_distance_pixels=1))) == 2
    in_angstrom = peaks_table(ds, scaled(min_distance_angstrom=5 * PIXEL_SIZE))
    pd.testing.assert_frame_equal(in_angstrom, table)
    # A Fourier-cropped micrograph's own pixel size per axis gives the physical positions.
    cropped = peaks_table(
        ds.assign_attrs(axis_pixel_size=[2.01, 1.99]), scaled(min_distance_pixels=5)
    )
    np.testing.assert_allclose(cropped["pos_y_img_angstrom"], (table["pos_y"] + 8) * 2.01)
    np.testing.assert_allclose(cropped["pos_x_img_angstrom"], (table["pos_x"] + 8) * 1.99)


def test_same_mode_excludes_padded_margin_and_counts_valid_positions():
    height, width = 96, 80
    n_valid = (height - TEMPLATE + 1) * (width - TEMPLATE + 1)
    z_valid, z_all = threshold(n_valid, 1000), threshold(height * width, 1000)
    between = float(np.float32((z_valid + z_all) / 2))
    assert z_valid < between < z_all
    peaks = {(20, 20): between, (height - 5, 30): 40.0, (30, width - 3): 40.0}
    ds = make_results("s", peaks, mode="same", total_correlations=1000)
    table = peaks_table(ds, scaled(min_distance_pixels=3))
    # Margin peaks (box leaving the image) are ignored; N_pos counts only valid positions.
    assert table[["pos_y", "pos_x"]].values.tolist() == [[20, 20]]
    assert peaks_table(ds, scaled(min_distance_pixels=3, border_pixels=25)).empty


def test_missing_attribute_is_an_input_error():
    ds = make_results("bad", {(10, 10): 20.0})
    del ds.attrs["total_correlations"]
    with pytest.raises(InputError, match="bad.*total_correlations"):
        peaks_table(ds)


def write_store(store: str | Path, datasets: list[xr.Dataset]) -> None:
    for ds in datasets:
        ds.to_zarr(str(store), group=ds.attrs["micrograph_name"], consolidated=False, mode="w")


def three_micrographs() -> list[xr.Dataset]:
    return [
        make_results("a", {(10, 10): 20.0, (40, 40): 18.0}, seed=1),
        make_results("b", {(30, 20): 19.0}, seed=2),
        make_results("c", {(5, 5): 22.0, (60, 50): 21.0, (60, 20): 17.0}, seed=3),
    ]


def test_dataframe_over_three_micrographs(tmp_path):
    datasets = three_micrographs()
    write_store(tmp_path / "results.zarr", datasets)
    frame = peaks_dataframe(tmp_path, scaled(min_distance_pixels=4))
    assert isinstance(frame, dd.DataFrame)
    assert frame.npartitions == 3
    assert list(frame.columns) == PEAK_COLUMNS
    with dask.config.set(scheduler="sync"):
        computed = frame.compute().reset_index(drop=True)
    expected = pd.concat(
        [peaks_table(ds, scaled(min_distance_pixels=4)) for ds in datasets], ignore_index=True
    )
    pd.testing.assert_frame_equal(computed, expected)
    assert computed.groupby("micrograph_name").size().to_dict() == {"a": 2, "b": 1, "c": 3}


def test_dataframe_from_fsspec_urls(tmp_path):
    datasets = three_micrographs()[:2]
    root = f"/dtm-test-{uuid.uuid4().hex}"
    write_store(f"memory://{root}/results.zarr", datasets)
    from_memory = peaks_dataframe(f"memory://{root}/results.zarr", scaled(min_distance_pixels=4))
    write_store(tmp_path / "results.zarr", datasets)
    from_file = peaks_dataframe(f"file://{tmp_path}/results.zarr", scaled(min_distance_pixels=4))
    try:
        with dask.config.set(scheduler="sync"):
            memory_table = from_memory.compute().reset_index(drop=True)
            file_table = from_file.compute().reset_index(drop=True)
    finally:
        fsspec.filesystem("memory").rm(root, recursive=True)
    assert len(memory_table) == 3
    pd.testing.assert_frame_equal(memory_table, file_table)


def test_single_micrograph_store_at_root(tmp_path):
    ds = make_results("only", {(10, 10): 20.0})
    ds.to_zarr(str(tmp_path / "results.zarr"), consolidated=False)
    frame = peaks_dataframe(tmp_path / "results.zarr", scaled(min_distance_pixels=4))
    assert frame.npartitions == 1
    table = frame.compute()
    assert table["micrograph_name"].tolist() == ["only"]


def test_repick_writes_tables_and_keeps_old_ones_on_error(tmp_path):
    write_store(tmp_path / "results.zarr", three_micrographs())
    table = repick(tmp_path, scaled(z_score_cutoff=18.5, min_distance_pixels=4))
    assert table["scaled_mip"].tolist() == [20.0, 19.0, 22.0, 21.0]  # not 18 and 17
    written = pd.read_csv(tmp_path / "peaks.csv")
    assert written["scaled_mip"].tolist() == table["scaled_mip"].tolist()
    assert sorted(p.name for p in (tmp_path / "peaks.parquet").iterdir()) == [
        "micrograph_name=a",
        "micrograph_name=b",
        "micrograph_name=c",
    ]
    assert (tmp_path / "peaks.star").exists()
    before = (tmp_path / "peaks.csv").read_bytes()

    broken = make_results("d", {(10, 10): 30.0})
    del broken.attrs["pixel_size"]
    write_store(tmp_path / "results.zarr", [broken])
    with pytest.raises(InputError, match="pixel_size"):
        repick(tmp_path, scaled(false_positives=1.0))
    assert (tmp_path / "peaks.csv").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_threshold_summary_names_the_cutoffs_repick_applies(tmp_path):
    small = make_results("a", {(10, 10): 20.0}, image_shape=(96, 80), total_correlations=1000)
    large = make_results("b", {(10, 10): 20.0}, image_shape=(196, 180), total_correlations=1000)
    write_store(tmp_path / "results.zarr", [small, large])
    z_small = threshold((96 - TEMPLATE + 1) * (80 - TEMPLATE + 1), 1000, 2.0)
    z_large = threshold((196 - TEMPLATE + 1) * (180 - TEMPLATE + 1), 1000, 2.0)
    assert z_small < z_large
    assert map_threshold(small, PeaksConfig(false_positives=2.0)) == z_small
    repick(tmp_path, PeaksConfig(false_positives=2.0))
    picking = read_picking(tmp_path)
    assert picking is not None and picking["thresholds"] == {"a": z_small, "b": z_large}
    assert threshold_summary(tmp_path) == (
        f"z* = {z_small:.2f}–{z_large:.2f} (2 false positives per micrograph)"
    )
    one = threshold((96 - TEMPLATE + 1) * (80 - TEMPLATE + 1), 1000)
    write_store(tmp_path / "one" / "results.zarr", [small])
    repick(tmp_path / "one")
    assert threshold_summary(tmp_path / "one") == (
        f"z* = {one:.2f} (1 false positive per micrograph)"
    )
    repick(tmp_path, scaled(z_score_cutoff=7.5))
    assert threshold_summary(tmp_path) == "z* of scaled_mip = 7.50 (fixed)"
    with pytest.raises(InputError, match="no peaks.json"):
        threshold_summary(tmp_path / "results.zarr" / "a")


def test_repick_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="not found"):
        repick(tmp_path / "missing")
    with pytest.raises(InputError, match="results.zarr"):
        repick(tmp_path)
    with pytest.raises(pydantic.ValidationError, match="not used by metric pvalue"):
        PeaksConfig(metric="pvalue", z_score_cutoff=7.0)


def test_repick_says_why_there_is_nothing_to_pick(tmp_path):
    with pytest.raises(InputError, match="results directory not found"):
        repick(tmp_path / "absent")
    with pytest.raises(InputError, match=r"no results\.zarr here \(run dtm match first\)"):
        repick(tmp_path)
    (tmp_path / "job.json").write_text("{}")  # an interrupted search
    with pytest.raises(InputError, match=r"search has not finished .*--resume"):
        repick(tmp_path)


def test_pvalue_and_gev_metrics_pick_by_their_own_maps_and_cutoffs(tmp_path):
    from dtm.search.metrics import gev_cutoff, pvalue_map

    ds = make_results("m", {(10, 12): 30.0, (50, 40): 25.0, (30, 30): 9.0}, seed=4)
    p_values = pvalue_map(ds["mip"].values, ds["scaled_mip"].values)
    table = peaks_table(ds, PeaksConfig(metric="pvalue", p_value_cutoff=8.0))
    # Every pick passes -ln p > 8, its column is the map's value there, and every position
    # of the map above 8 lies within the suppression radius of a pick.
    picked = p_values[table["pos_y"], table["pos_x"]]
    np.testing.assert_allclose(table["neg_log_pvalue"], picked)
    assert (picked > 8.0).all() and len(table) >= 1
    above = np.argwhere(p_values > 8.0)
    distance = cKDTree(table[["pos_y", "pos_x"]].to_numpy()).query(above)[0]
    assert (distance < default_min_distance(TEMPLATE)).all()

    cutoff = gev_cutoff(ds["scaled_mip"].values.astype(np.float64), false_positives=1.0)
    assert map_threshold(ds, PeaksConfig(metric="gev")) == cutoff
    gev = peaks_table(ds, PeaksConfig(metric="gev"))
    assert (gev["scaled_mip"] > cutoff).all()
    expected = pick_peaks(ds["scaled_mip"].values, cutoff, min_distance=default_min_distance(16))
    assert gev[["pos_y", "pos_x"]].values.tolist() == expected.tolist()
    write_store(tmp_path / "results.zarr", [ds])
    repick(tmp_path, PeaksConfig(metric="gev"))
    assert threshold_summary(tmp_path) == (
        f"z* of gev = {cutoff:.2f} (1 false positive per micrograph)"
    )


def test_dtm_peaks_takes_the_metric_and_its_cutoff(tmp_path, capsys):
    from dtm.cli import main

    write_store(tmp_path / "results.zarr", three_micrographs())
    assert main(["peaks", str(tmp_path), "--metric", "pvalue", "--p-value-cutoff", "9"]) == 0
    assert "-ln p* of pvalue = 9.00 (fixed)" in capsys.readouterr().out
    picking = read_picking(tmp_path)
    assert picking is not None and picking["options"]["metric"] == "pvalue"
    table = pd.read_csv(tmp_path / "peaks.csv")
    assert (table["neg_log_pvalue"] > 9.0).all()
    before = (tmp_path / "peaks.csv").read_bytes()
    # A cut-off the metric does not use is one line, and the tables stay as they were.
    assert main(["peaks", str(tmp_path), "--metric", "gev", "--z-cutoff", "7"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert (tmp_path / "peaks.csv").read_bytes() == before
