"""The kernel on cupy: same particles, same maps as on the CPU; fused CUDA statistics update.

Marked ``gpu``: skipped by ``conftest.py`` where no CUDA GPU works (the only skip of the
suite). Run them on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_kernel import _planted_search

from dtm.physics.projection import prepare_template
from dtm.physics.resample import fourier_crop
from dtm.physics.simulate import simulate_template
from dtm.search import fused
from dtm.search.stats import PartialStats, update, update_numpy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def volume():
    return simulate_template(64, pixel_size=3.0, n_atoms=4000)


@pytest.mark.parametrize("mode", ["valid", "same"])
def test_planted_particle_on_gpu_matches_cpu(volume, mode):
    import cupy

    cpu_particle, cpu_maps, euler = _planted_search(volume, prepare_template(volume), mode)
    particle, maps, _ = _planted_search(
        volume, prepare_template(cupy.asarray(volume)), mode, xp=cupy
    )
    inside = (slice(0, 160 - 63), slice(0, 160 - 63))
    scaled = maps["scaled_mip"][inside]
    peak = np.unravel_index(np.argmax(scaled), scaled.shape)
    assert peak == (particle.pos_y, particle.pos_x)
    found = [maps[name][inside][peak] for name in ("phi", "theta", "psi")]
    np.testing.assert_allclose(found, euler, atol=1e-3)
    assert maps["defocus"][inside][peak] == pytest.approx(2000.0)
    # Same maps as the CPU: MIP within 1e-4 relative, the same best pose almost everywhere
    # (positions whose two best poses are closer than float32 rounding may differ).
    np.testing.assert_allclose(maps["mip"], cpu_maps["mip"], rtol=1e-4, atol=1e-5)
    same_pose = np.mean(
        (maps["phi"] == cpu_maps["phi"])
        & (maps["psi"] == cpu_maps["psi"])
        & (maps["defocus"] == cpu_maps["defocus"])
    )
    assert same_pose > 0.999
    np.testing.assert_allclose(
        maps["correlation_variance"], cpu_maps["correlation_variance"], rtol=1e-4, atol=1e-6
    )


def test_cuda_update_is_bit_identical_to_reference():
    import cupy

    rng = np.random.default_rng(5)
    full = np.round(rng.normal(size=(2, 9, 33, 70)) * 2).astype(np.float32) / 2  # many ties
    fast, reference = PartialStats.empty((33, 61), cupy), PartialStats.empty((33, 61), cupy)
    for first, batch in zip((4, 13), cupy.asarray(full), strict=True):
        cropped = batch[:, :, 5:66]  # a crop of the inverse FFT's rows, as the kernel passes
        assert fused.cuda_update(
            cropped, first, fast.mip, fast.best_index, fast.total, fast.total_sq
        )
        fast.count += 9
        update_numpy(reference, cropped, first)
    for name in ("mip", "best_index", "total", "total_sq"):
        np.testing.assert_array_equal(getattr(fast, name).get(), getattr(reference, name).get())
    # The public update takes the fused path on cupy arrays and agrees with the host.
    host = PartialStats.empty((33, 61))
    device = PartialStats.empty((33, 61), cupy)
    update(host, full[0, :, :, 5:66], 4)
    update(device, cupy.asarray(full[0])[:, :, 5:66], 4)
    np.testing.assert_array_equal(device.best_index.get(), host.best_index)
    np.testing.assert_array_equal(device.total_sq.get(), host.total_sq)


def test_cuda_update_refuses_arrays_it_would_read_out_of_bounds():
    import cupy

    maps = cupy.ones((3, 8, 10), dtype=cupy.float32)
    good = PartialStats.empty((8, 10), cupy)
    state = [good.mip, good.best_index, good.total, good.total_sq]
    wrong = {
        "shape": PartialStats.empty((8, 9), cupy).mip,
        "dtype": good.mip.astype(cupy.float64),
        "host array": good.mip.get(),
        "not contiguous": cupy.ones((10, 8), dtype=cupy.float32).T,
    }
    for bad in wrong.values():
        assert not fused.cuda_update(maps, 0, bad, *state[1:])
    narrow = PartialStats.empty((8, 5), cupy)
    strided = maps[:, :, ::2]  # the kernel needs unit steps along a row
    assert not fused.cuda_update(
        strided, 0, narrow.mip, narrow.best_index, narrow.total, narrow.total_sq
    )
    assert fused.cuda_update(maps, 0, *state)
    assert float(good.total.sum()) == 3 * 80


def test_fourier_crop_on_gpu_matches_cpu(volume):
    import cupy

    cropped, pixel = fourier_crop(cupy.asarray(volume), 3.0, 4.5)
    reference, reference_pixel = fourier_crop(volume, 3.0, 4.5)
    assert pixel == reference_pixel
    np.testing.assert_allclose(cropped.get(), reference, rtol=1e-4, atol=1e-5 * reference.max())


def test_pipeline_task_moves_cpu_inputs_to_the_gpu(volume):
    """`tasks.correlate(..., device="gpu")` as a GPU worker runs it: host inputs, GPU copies."""
    from dtm.physics.orientations import uniform_grid
    from dtm.runtime import tasks
    from dtm.search.prepare import Optics, prepare_image
    from dtm.search.space import SearchSpace

    rng = np.random.default_rng(0)
    image = prepare_image(
        rng.normal(size=(128, 128)).astype(np.float32),
        box_shape=(64, 64),
        optics=Optics(3.0, 300.0, 2.7, 0.07, 10000.0, 9500.0, 30.0),
        relative_defocus=np.array([-1000.0, 0.0, 1000.0]),
    )
    template = prepare_template(volume)
    space = SearchSpace(uniform_grid(psi_step=30.0, theta_step=30.0)[:40], np.zeros(3))
    on_gpu = tasks.correlate(image, template, space, 0, 40, device="gpu")
    # A second call reuses the cached copies; a different image must not be served from them.
    other = prepare_image(
        rng.normal(size=(128, 128)).astype(np.float32),
        box_shape=(64, 64),
        optics=Optics(3.0, 300.0, 2.7, 0.07, 10000.0, 9500.0, 30.0),
        relative_defocus=np.array([-1000.0, 0.0, 1000.0]),
    )
    on_cpu = tasks.correlate(image, template, space, 0, 40, device="cpu")
    np.testing.assert_allclose(on_gpu.mip, on_cpu.mip, rtol=1e-4, atol=1e-5)
    assert on_gpu.count == on_cpu.count == 120
    other_gpu = tasks.correlate(other, template, space, 0, 40, device="gpu")
    other_cpu = tasks.correlate(other, template, space, 0, 40, device="cpu")
    np.testing.assert_allclose(other_gpu.mip, other_cpu.mip, rtol=1e-4, atol=1e-5)


def test_correlation_table_rows_on_gpu_equal_the_cpu_rows():
    import cupy

    from dtm.search.stats import update_with_table
    from dtm.search.table import TableCollector, TableRows

    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((3, 40, 50), dtype=np.float32) * 2 for _ in range(3)]
    rows = {}
    for name, xp in (("cpu", np), ("gpu", cupy)):
        stats = PartialStats.empty((40, 50), xp)
        collector = TableCollector(4.0, 10**6)
        for i, batch in enumerate(batches):
            update_with_table(stats, xp.asarray(batch), 7 + 3 * i, collector)
        rows[name] = collector.rows().to_numpy()
    assert len(rows["cpu"]) > 0
    for field in TableRows.FIELDS:
        np.testing.assert_array_equal(getattr(rows["gpu"], field), getattr(rows["cpu"], field))
