"""Partial statistics: merging is exact for the maximum and order-independent."""

import itertools

import numpy as np
import pytest

from dtm.search.space import SearchSpace
from dtm.search.stats import PartialStats, finalise, merge, merge_all, update


def _correlations(n: int, shape=(6, 7), seed=0, ties=True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cc = rng.normal(size=(n, *shape)).astype(np.float32)
    if ties:
        # Round to a coarse grid so that many maxima are tied between search indices.
        cc = np.round(cc * 2) / 2
    return cc


def _stats_of(cc: np.ndarray, start: int, stop: int) -> PartialStats:
    stats = PartialStats.empty(cc.shape[1:])
    update(stats, cc[start:stop], start)
    return stats


def test_update_matches_direct_reduction():
    cc = _correlations(40)
    stats = _stats_of(cc, 0, 40)
    np.testing.assert_array_equal(stats.mip, cc.max(axis=0))
    # np.argmax returns the first (lowest) index of a tie, as the search must.
    np.testing.assert_array_equal(stats.best_index, cc.argmax(axis=0))
    np.testing.assert_allclose(stats.total, cc.astype(np.float64).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.total_sq, (cc.astype(np.float64) ** 2).sum(axis=0), rtol=1e-12)
    assert stats.count == 40


@pytest.mark.parametrize("n_chunks", [1, 3, 17])
def test_any_split_and_merge_order_gives_identical_maps(n_chunks):
    cc = _correlations(85)
    reference = _stats_of(cc, 0, 85)
    bounds = np.linspace(0, 85, n_chunks + 1).astype(int)
    parts = [_stats_of(cc, a, b) for a, b in itertools.pairwise(bounds)]
    rng = np.random.default_rng(n_chunks)
    for trial in range(3):
        order = rng.permutation(len(parts)) if trial else np.arange(len(parts))
        # Merge in a random order, as a tree (pairwise), not only left to right.
        level = [parts[i] for i in order]
        while len(level) > 1:
            level = [merge_all(level[i : i + 2]) for i in range(0, len(level), 2)]
        merged = level[0]
        np.testing.assert_array_equal(merged.mip, reference.mip)
        np.testing.assert_array_equal(merged.best_index, reference.best_index)
        np.testing.assert_allclose(merged.total, reference.total, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(merged.total_sq, reference.total_sq, rtol=1e-9)
        assert merged.count == reference.count


def test_merge_breaks_ties_on_lowest_index_whatever_the_side():
    a = PartialStats.empty((1, 1))
    b = PartialStats.empty((1, 1))
    update(a, np.full((1, 1, 1), 2.0, np.float32), 5)
    update(b, np.full((1, 1, 1), 2.0, np.float32), 9)
    assert merge(a, b).best_index[0, 0] == 5
    assert merge(b, a).best_index[0, 0] == 5


def test_save_load_round_trip(tmp_path):
    stats = _stats_of(_correlations(10), 0, 10)
    stats.save(str(tmp_path / "s.npz"))
    loaded = PartialStats.load(str(tmp_path / "s.npz"))
    for name in ("mip", "best_index", "total", "total_sq"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
    assert loaded.count == 10


def test_finalise_decodes_angles_and_statistics():
    euler = np.array([[0.0, 0.0, 0.0], [10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    space = SearchSpace(euler=euler, defocus=np.array([-100.0, 0.0, 100.0, 200.0]))
    cc = _correlations(space.n_correlations, ties=False)
    maps = finalise(_stats_of(cc, 0, space.n_correlations), space)
    best = cc.argmax(axis=0)
    np.testing.assert_array_equal(maps["phi"], euler[best // 4, 0].astype(np.float32))
    np.testing.assert_array_equal(maps["psi"], euler[best // 4, 2].astype(np.float32))
    np.testing.assert_array_equal(maps["defocus"], space.defocus[best % 4].astype(np.float32))
    cc64 = cc.astype(np.float64)
    np.testing.assert_allclose(maps["correlation_mean"], cc64.mean(axis=0), rtol=1e-6, atol=1e-7)
    # The variance (ddof 0), not the standard deviation.
    np.testing.assert_allclose(maps["correlation_variance"], cc64.var(axis=0), rtol=1e-5)
    expected = (cc64.max(axis=0) - cc64.mean(axis=0)) / cc64.std(axis=0)
    np.testing.assert_allclose(maps["scaled_mip"], expected, rtol=1e-5)
    assert all(m.dtype == np.float32 for m in maps.values())


def test_finalise_refuses_incomplete_statistics():
    space = SearchSpace(euler=np.zeros((3, 3)), defocus=np.zeros(2))
    with pytest.raises(ValueError, match="cover 4 correlations"):
        finalise(_stats_of(_correlations(4), 0, 4), space)
