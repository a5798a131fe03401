"""The multiscale pyramid of results.zarr, and reading results through fsspec URLs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import xarray as xr
import zarr
from synthetic_results import PLANTED, synthetic_dataset, write_results

from dtm.io.pyramid import max_pool, open_pyramid, pyramid_factors, write_pyramid
from dtm.io.results import open_micrographs
from dtm.io.store import build_dataset, open_results, result_groups, write_dataset
from dtm.io.tables import read_table
from dtm.programs.peaks import peaks_dataframe, read_peaks


def naive_block_max(data: np.ndarray, factor: int) -> np.ndarray:
    """Reference: a loop over blocks, NaN ignored (all-NaN block → NaN)."""
    h, w = data.shape
    out = np.full((-(-h // factor), -(-w // factor)), np.nan, dtype=data.dtype)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = data[i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
            finite = block[~np.isnan(block)]
            if finite.size:
                out[i, j] = finite.max()
    return out


@pytest.fixture
def memory_copy() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """A fresh folder of fsspec's in-memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/dtm-test-{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_max_pool_matches_block_loop_with_nan_and_partial_blocks(factor: int) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(size=(23, 17)).astype(np.float32)
    data[rng.uniform(size=data.shape) < 0.2] = np.nan
    data[:factor, :factor] = np.nan  # one all-NaN block
    np.testing.assert_array_equal(max_pool(data, factor), naive_block_max(data, factor))


def test_pyramid_factors_halve_down_to_min_size() -> None:
    assert pyramid_factors((4092, 5760)) == [2, 4, 8, 16, 32]  # 5760 / 32 = 180 <= 256
    assert pyramid_factors((160, 160)) == [2]
    assert pyramid_factors((512, 300)) == [2]
    assert pyramid_factors((513, 300)) == [2, 4]
    assert pyramid_factors((1, 1)) == []


def test_write_dataset_adds_a_max_pyramid_beside_each_micrograph(tmp_path: Path) -> None:
    store = tmp_path / "results.zarr"
    shape = (600, 530)
    maps_by_name = {}
    for index, name in enumerate(["a", "b"]):
        maps, attrs = synthetic_dataset(name, shape, seed=index)
        maps_by_name[name] = maps
        write_dataset(build_dataset(maps, pixel_size=2.0, attrs=attrs), store, name)

    # Pyramids live inside the micrograph groups: the store still lists micrographs only.
    assert result_groups(store) == ["a", "b"]
    datasets = open_results(tmp_path)
    assert sorted(datasets) == ["a", "b"]
    assert "pyramid" not in datasets["a"].data_vars
    assert len(datasets["a"].data_vars) == 8

    levels = open_pyramid(store, "b")
    assert sorted(levels) == [2, 4]  # 600 / 4 = 150 <= 256
    for factor, level in levels.items():
        for name in ("scaled_mip", "mip"):
            expected = naive_block_max(maps_by_name["b"][name], factor)
            np.testing.assert_array_equal(level[name].values, expected)
        np.testing.assert_array_equal(level["x"].values, np.arange(level.sizes["x"]) * factor)
        assert level.attrs["reduction"] == "max"
    # Readable by plain xarray under the documented group name.
    direct = xr.open_zarr(store, group="b/pyramid/4", consolidated=False)
    assert direct.sizes == {"y": 150, "x": 133}
    spec: Any = zarr.open_group(str(store), path="b/pyramid", mode="r").attrs["multiscales"]
    assert [d["downsample_factor"] for d in spec[0]["datasets"]] == [2, 4]


def test_planted_peaks_keep_their_height_at_every_level(tmp_path: Path) -> None:
    maps, attrs = synthetic_dataset("m", (700, 300))
    write_dataset(build_dataset(maps, pixel_size=2.0, attrs=attrs), tmp_path / "r.zarr")
    levels = open_pyramid(tmp_path / "r.zarr", None)
    assert sorted(levels) == [2, 4]
    for factor, level in levels.items():
        for y, x in PLANTED:
            assert level["scaled_mip"].values[y // factor, x // factor] == pytest.approx(9.0)


def test_single_micrograph_at_root_and_no_pyramid_option(tmp_path: Path) -> None:
    maps, attrs = synthetic_dataset("only", (40, 50))
    dataset = build_dataset(maps, pixel_size=2.0, attrs=attrs)
    write_dataset(dataset, tmp_path / "with.zarr")
    write_dataset(dataset, tmp_path / "without.zarr", pyramid=False)
    assert result_groups(tmp_path / "with.zarr") == [None]
    assert list(open_results(tmp_path / "with.zarr")) == ["only"]
    assert sorted(open_pyramid(tmp_path / "with.zarr", None)) == [2]
    assert open_pyramid(tmp_path / "without.zarr", None) == {}


def test_write_pyramid_explicit_factors_into_an_existing_store(tmp_path: Path) -> None:
    data = np.arange(36, dtype=np.float32).reshape(6, 6)
    assert write_pyramid(tmp_path / "s.zarr", "g", {"mip": data}, factors=[3]) == [3]
    level = open_pyramid(tmp_path / "s.zarr", "g")[3]
    np.testing.assert_array_equal(level["mip"].values, [[14, 17], [32, 35]])


def test_results_and_peaks_read_through_fsspec_urls(
    tmp_path: Path, memory_copy: tuple[fsspec.AbstractFileSystem, str]
) -> None:
    results = write_results(tmp_path / "run", names=("m1", "m2"))
    local_peaks = read_table(results / "peaks.csv")
    fs, root = memory_copy
    fs.put(str(results), root, recursive=True)

    for url in (f"memory://{root}", f"file://{results}"):
        datasets = open_results(url)
        assert sorted(datasets) == ["m1", "m2"]
        np.testing.assert_array_equal(
            datasets["m2"]["scaled_mip"].values, open_results(results)["m2"]["scaled_mip"].values
        )
        micrographs = open_micrographs(url)
        assert [(m.name, m.group, sorted(m.pyramid)) for m in micrographs] == [
            ("m1", "m1", [2]),
            ("m2", "m2", [2]),
        ]
        picked = peaks_dataframe(url).compute().reset_index(drop=True)
        assert picked[["pos_y", "pos_x"]].equals(local_peaks[["pos_y", "pos_x"]])
        table, source = read_peaks(url)
        assert source == "peaks.csv"
        assert table[["micrograph_name", "pos_y", "pos_x"]].equals(
            local_peaks[["micrograph_name", "pos_y", "pos_x"]]
        )


def test_read_peaks_picks_peaks_when_no_table_was_written(
    memory_copy: tuple[fsspec.AbstractFileSystem, str], tmp_path: Path
) -> None:
    results = write_results(tmp_path / "run")
    fs, root = memory_copy
    fs.put(str(results / "results.zarr"), f"{root}/results.zarr", recursive=True)
    table, source = read_peaks(f"memory://{root}")
    assert source.startswith("picked now")
    expected = read_table(results / "peaks.csv")
    assert table[["pos_y", "pos_x"]].equals(expected[["pos_y", "pos_x"]])
