"""The results store: datasets written whole, groups listed, maps exported with their names."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from dtm.errors import InputError
from dtm.io.store import (
    MRC_NAMES,
    build_dataset,
    export_maps,
    open_results,
    result_groups,
    write_dataset,
)
from dtm.search.stats import MAP_NAMES


def _maps(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(20, 30)).astype(np.float32) for name in MAP_NAMES}


def _dataset(name: str, seed: int):
    return build_dataset(_maps(seed), pixel_size=1.5, attrs={"micrograph_name": name})


def test_single_dataset_at_the_root_round_trips(tmp_path):
    ds = _dataset("mic", 0)
    write_dataset(ds, tmp_path / "results.zarr")
    assert result_groups(tmp_path / "results.zarr") == [None]
    [(name, back)] = open_results(tmp_path).items()
    assert name == "mic"
    np.testing.assert_array_equal(back.mip.values, ds.mip.values)
    np.testing.assert_allclose(back.x_angstrom.values, np.arange(30) * 1.5)


def test_groups_are_listed_but_never_half_written_ones(tmp_path):
    store = tmp_path / "results.zarr"
    write_dataset(_dataset("b", 1), store, "b")
    write_dataset(_dataset("a", 2), store, "a")
    # What a crash in the middle of a write could leave behind must not count as a micrograph.
    (store / ".c.tmp").mkdir()
    (store / ".c.tmp" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    assert result_groups(store) == ["a", "b"]
    assert sorted(open_results(store)) == ["a", "b"]
    assert not list(tmp_path.glob(".*.tmp"))  # the writer's own temporary copies are gone


def test_export_maps_uses_leopard_names_and_voxel_size(tmp_path):
    paths = export_maps(_maps(3), tmp_path, pixel_size=2.5, prefix="m1_")
    assert set(paths) == set(MAP_NAMES)
    for name, path in paths.items():
        assert path.endswith("m1_" + MRC_NAMES[name])
        with mrcfile.open(path) as mrc:
            assert float(mrc.voxel_size.x) == pytest.approx(2.5)
            assert mrc.data.shape == (20, 30)


def test_open_results_of_a_directory_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no dtm results store"):
        open_results(tmp_path)
