import numpy as np
import pydantic
import pytest

from dtm.config import DefocusSearchConfig
from dtm.search.space import SearchSpace


def _grid(lo: float, hi: float, step: float, **extra: object) -> np.ndarray:
    config = DefocusSearchConfig(defocus_min=lo, defocus_max=hi, defocus_step=step, **extra)
    return config.values()


@pytest.mark.parametrize(
    ("lo", "hi", "step", "expected"),
    [
        (-1000, 1000, 200, 11),
        (-1200, 1200, 200, 13),
        (-400, 400, 400, 3),
        (0, 0, 100, 1),
    ],
)
def test_defocus_grid_counts(lo, hi, step, expected):
    values = _grid(lo, hi, step)
    assert len(values) == expected
    assert values[0] == lo and values[-1] == hi
    assert 0.0 in values


def test_defocus_grid_inserts_zero_when_off_grid():
    np.testing.assert_allclose(_grid(-400, 400, 300), [-400, -100, 0, 200])
    assert list(_grid(-400, 400, 300, skip_enforce_zero=True)) == [-400, -100, 200]


@pytest.mark.parametrize(("lo", "hi", "step"), [(-100, 100, 0), (-100, 100, -5), (100, -100, 10)])
def test_defocus_grid_rejects_bad_ranges(lo, hi, step):
    with pytest.raises(pydantic.ValidationError):
        _grid(lo, hi, step)


def test_chunks_cover_the_orientations_once():
    space = SearchSpace(euler=np.zeros((103, 3)), defocus=np.array([-1.0, 0.0, 1.0]))
    chunks = space.chunks(10)
    assert chunks[0] == (0, 10) and chunks[-1] == (100, 103)
    covered = np.concatenate([np.arange(a, b) for a, b in chunks])
    np.testing.assert_array_equal(covered, np.arange(103))
    assert space.n_correlations == 309


def test_encode_decode_round_trip():
    space = SearchSpace(euler=np.zeros((50, 3)), defocus=np.zeros(7))
    o, d = np.meshgrid(np.arange(50), np.arange(7), indexing="ij")
    g = space.encode(o, d)
    # Defocus fastest: consecutive indices walk through the defocus planes first.
    assert g[0, 1] == 1 and g[1, 0] == 7
    o2, d2 = space.decode(g)
    np.testing.assert_array_equal(o2, o)
    np.testing.assert_array_equal(d2, d)
