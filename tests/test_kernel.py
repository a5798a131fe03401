"""The correlation kernel against brute-force references, and its invariants.

The reference correlation is ``scipy.signal.correlate`` (direct sums, no FFT) of the
normalised micrograph with each normalised filtered projection, so the kernel's padding,
pruned transforms, conjugation, cropping and statistics are all checked independently.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.fft
import scipy.signal
from datasets import OPTICS

from dtm.physics.orientations import uniform_grid
from dtm.physics.projection import extract_central_slices, prepare_template
from dtm.physics.rotations import euler_to_matrix
from dtm.physics.simulate import PlantedParticle, simulate_micrograph, simulate_template
from dtm.search import fused
from dtm.search.kernel import correlate_chunk, filtered_projections
from dtm.search.prepare import (
    FilterSettings,
    ImageInputs,
    Optics,
    filter_micrograph,
    prepare_image,
    projection_filters,
)
from dtm.search.space import SearchSpace
from dtm.search.stats import PartialStats, finalise, update, update_numpy


def _optics(pixel_size: float) -> Optics:
    return Optics(pixel_size=pixel_size, **OPTICS)


def _normalised_micrograph(image: ImageInputs) -> np.ndarray:
    """The filtered, normalised micrograph the kernel correlates with (real space)."""
    H, W = image.image_shape
    return scipy.fft.irfft2(image.spectrum, s=image.fft_shape)[:H, :W].astype(np.float64)


def _reference_maps(image: ImageInputs, template, euler: np.ndarray) -> np.ndarray:
    """``(n_orientations * n_defocus, Hm, Wm)`` correlations by direct summation."""
    y = _normalised_micrograph(image)
    if image.mode == "same":
        h, w = image.box_shape
        y = np.pad(y, ((0, h - 1), (0, w - 1)))  # zeros along the bottom and right edges
    projections = filtered_projections(
        template, euler_to_matrix(euler), image.filters, image.image_shape
    )
    maps = [
        scipy.signal.correlate(y, p.astype(np.float64), mode="valid", method="direct")
        for p in projections.reshape(-1, *image.box_shape)
    ]
    return np.stack(maps)


@pytest.fixture(scope="module")
def small_problem():
    """A 37 x 45 noisy micrograph with a 12^3 template and two defocus planes."""
    rng = np.random.default_rng(1)
    volume = simulate_template(12, pixel_size=3.0, n_atoms=200, seed=2)
    micrograph = rng.normal(size=(37, 45)).astype(np.float32)
    return micrograph, prepare_template(volume)


def _prepare(micrograph, mode, defocus=(-500.0, 500.0), pixel_size=3.0, **filters):
    return prepare_image(
        micrograph,
        box_shape=(12, 12),
        optics=_optics(pixel_size),
        relative_defocus=np.asarray(defocus),
        filters=FilterSettings(**filters),
        mode=mode,
    )


def test_filtered_micrograph_is_normalised_and_is_what_the_kernel_correlates(small_problem):
    micrograph, _ = small_problem
    settings = FilterSettings(low_resolution=40.0, high_resolution=8.0)
    filtered, profile = filter_micrograph(micrograph, pixel_size=3.0, filters=settings)
    assert filtered.dtype == np.float32 and filtered.shape == micrograph.shape
    assert profile is not None  # whitening is on by default
    assert abs(float(filtered.mean())) < 1e-6
    assert float(filtered.std(dtype=np.float64)) * np.sqrt(filtered.size) == pytest.approx(1.0)
    image = _prepare(micrograph, "valid", low_resolution=40.0, high_resolution=8.0)
    np.testing.assert_allclose(_normalised_micrograph(image), filtered, atol=1e-6)
    stack = projection_filters((12, 12), _optics(3.0), np.array([-500.0, 500.0]), settings, profile)
    np.testing.assert_array_equal(stack, image.filters)
    assert stack.shape == (2, 12, 7) and np.all(stack[:, 0, 0] == 0)


@pytest.mark.parametrize("mode", ["valid", "same"])
def test_kernel_matches_direct_correlation(small_problem, mode):
    micrograph, template = small_problem
    image = _prepare(micrograph, mode)
    euler = np.array([[0.0, 0.0, 0.0], [30.0, 60.0, 90.0], [200.0, 120.0, 10.0]])
    reference = _reference_maps(image, template, euler)
    H, W = micrograph.shape
    assert reference.shape[1:] == ((H - 11, W - 11) if mode == "valid" else (H, W))
    assert image.out_shape == reference.shape[1:]
    stats = correlate_chunk(image, template, euler, 5, batch_size=2)
    first = 5 * 2  # first orientation 5, two defocus planes
    np.testing.assert_allclose(stats.mip, reference.max(axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(stats.best_index, reference.argmax(axis=0) + first)
    np.testing.assert_allclose(stats.total, reference.sum(axis=0), atol=1e-4)
    np.testing.assert_allclose(stats.total_sq, (reference**2).sum(axis=0), rtol=1e-4)
    assert stats.count == 6
    assert stats.total.dtype == np.float64 and stats.total_sq.dtype == np.float64


def test_ties_go_to_lowest_global_index(small_problem):
    micrograph, template = small_problem
    # Identical defocus planes and a repeated orientation: every map appears several times.
    image = _prepare(micrograph, "valid", defocus=(0.0, 0.0, 0.0))
    base = np.array([[10.0, 40.0, 0.0], [250.0, 80.0, 45.0]])
    euler = np.concatenate([base, base, base[::-1]])
    for batch_size in (1, 2, 4):
        stats = correlate_chunk(image, template, euler, 3, batch_size=batch_size)
        single = correlate_chunk(image, template, base, 3, batch_size=1)
        np.testing.assert_array_equal(stats.mip, single.mip)
        # Lowest global index of the tied copies: orientation 3 or 4, defocus plane 0.
        assert set(np.unique(stats.best_index)) <= {9, 12}
        np.testing.assert_array_equal(stats.best_index, single.best_index)


def test_results_do_not_depend_on_batch_size_or_fft_size(small_problem):
    micrograph, template = small_problem
    euler = uniform_grid(psi_step=60.0, theta_step=60.0)[:11]
    for mode in ("valid", "same"):
        image = _prepare(micrograph, mode)
        runs = [correlate_chunk(image, template, euler, 0, batch_size=b) for b in (1, 3, 11)]
        for other in runs[1:]:
            np.testing.assert_array_equal(other.mip, runs[0].mip)
            np.testing.assert_array_equal(other.best_index, runs[0].best_index)
            np.testing.assert_allclose(other.total, runs[0].total, rtol=1e-12, atol=1e-12)
        # The smallest FFT size without wrap-around (not a fast size) gives the same maps.
        H, W = image.image_shape
        exact = (H, W) if mode == "valid" else (H + 11, W + 11)
        assert exact != image.fft_shape
        spectrum = scipy.fft.rfft2(_normalised_micrograph(image), s=exact).astype(np.complex64)
        plain = replace(image, spectrum=spectrum, fft_shape=exact)
        other = correlate_chunk(plain, template, euler, 0, batch_size=4)
        np.testing.assert_allclose(other.mip, runs[0].mip, atol=1e-5)
        np.testing.assert_array_equal(other.best_index, runs[0].best_index)
        np.testing.assert_allclose(other.total_sq, runs[0].total_sq, rtol=1e-5, atol=1e-5)


def test_both_layouts_of_the_transforms_along_y_give_identical_maps(small_problem, monkeypatch):
    """The strided (GPU, some CPUs) and transposed layouts agree bit for bit.

    Each worker times both and keeps the faster, so the maps must not depend on the choice.
    """
    from dtm.search import kernel

    micrograph, template = small_problem
    euler = uniform_grid(psi_step=60.0, theta_step=60.0)[:7]
    for mode in ("valid", "same"):
        image = _prepare(micrograph, mode)
        runs = []
        for layout in (kernel._along_y_transposed, kernel._along_y_strided):
            with monkeypatch.context() as patch:
                patch.setattr(kernel, "_cpu_layout", lambda *_, layout=layout: layout)
                runs.append(correlate_chunk(image, template, euler, 0, batch_size=3))
        for name in ("mip", "best_index", "total", "total_sq"):
            np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))
        # The timed choice is one of the two and is kept for the problem's shape.
        chosen = correlate_chunk(image, template, euler, 0, batch_size=3)
        np.testing.assert_array_equal(chosen.mip, runs[0].mip)
        key = (image.fft_shape, image.box_shape, image.out_shape)
        assert kernel._CPU_LAYOUT[key] in (kernel._along_y_transposed, kernel._along_y_strided)


@pytest.fixture(scope="module")
def big_template():
    volume = simulate_template(64, pixel_size=3.0, n_atoms=4000)
    return volume, prepare_template(volume)


def test_white_noise_correlations_are_standard_normal(big_template):
    _, template = big_template
    # 320^2: at 160^2 the few low-frequency samples make the pooled std fluctuate by ~4 %.
    micrograph = np.random.default_rng(7).normal(size=(320, 320)).astype(np.float32)
    image = prepare_image(
        micrograph,
        box_shape=(64, 64),
        optics=_optics(3.0),
        relative_defocus=np.array([-1000.0, 0.0, 1000.0]),
        filters=FilterSettings(whitening=True),
        mode="valid",
    )
    euler = uniform_grid(psi_step=30.0, theta_step=30.0)[::2]
    assert len(euler) >= 100
    stats = correlate_chunk(image, template, euler, 0, batch_size=8)
    n = stats.count * stats.total.size
    mean = stats.total.sum() / n
    std = np.sqrt(stats.total_sq.sum() / n - mean**2)
    assert abs(mean) < 0.02
    assert abs(std - 1.0) < 0.02


def _planted_search(volume, template, mode: str, xp=np):
    """A 160^2 micrograph with one particle; search near its pose plus random poses.

    ``xp`` (numpy or cupy) is the array module the search runs on.
    """
    grid = uniform_grid(psi_step=15.0, theta_step=15.0)
    truth = 1234
    phi, theta, psi = grid[truth]
    defocus = np.array([-2000.0, 0.0, 2000.0])
    particle = PlantedParticle(41, 57, phi, theta, psi, relative_defocus=2000.0)
    micrograph = simulate_micrograph(
        volume,
        (160, 160),
        [particle],
        pixel_size=3.0,
        signal_scale=18.0,
        low_frequency_noise=5.0,
        seed=3,
        **OPTICS,
    )
    image = prepare_image(
        xp.asarray(micrograph),
        box_shape=(64, 64),
        optics=_optics(3.0),
        relative_defocus=defocus,
        mode=mode,  # type: ignore[arg-type]
    )
    rng = np.random.default_rng(4)
    near = np.arange(truth - 100, truth + 100)
    others = rng.choice(len(grid), size=150, replace=False)
    index = np.unique(np.concatenate([near, others]))
    space = SearchSpace(euler=grid[index], defocus=defocus)
    stats = correlate_chunk(image, template, space.euler, 0, batch_size=8)
    maps = finalise(stats, space)
    return particle, maps, grid[truth]


@pytest.mark.parametrize("mode", ["valid", "same"])
def test_planted_particle_is_found_exactly(big_template, mode):
    volume, template = big_template
    particle, maps, euler = _planted_search(volume, template, mode)
    # In ``same`` mode positions whose box leaves the micrograph carry no significance.
    inside = {name: m[: 160 - 63, : 160 - 63] for name, m in maps.items()}
    scaled = inside["scaled_mip"]
    peak = np.unravel_index(np.argmax(scaled), scaled.shape)
    assert peak == (particle.pos_y, particle.pos_x)
    assert inside["mip"][peak] > 9.0  # an 18-sigma particle after filtering losses
    elsewhere = scaled.copy()
    elsewhere[peak[0] - 10 : peak[0] + 11, peak[1] - 10 : peak[1] + 11] = -np.inf
    assert scaled[peak] > elsewhere.max() + 1.0
    found = [inside[name][peak] for name in ("phi", "theta", "psi")]
    np.testing.assert_allclose(found, euler, atol=1e-3)
    assert inside["defocus"][peak] == pytest.approx(2000.0)


def _stats_state(stats) -> list[np.ndarray]:
    return [stats.mip, stats.best_index, stats.total, stats.total_sq]


@pytest.mark.parametrize("layout", ["contiguous", "cropped", "reversed"])
def test_fused_update_is_bit_identical_to_numpy_reference(layout):
    assert fused.numba_update() is not None  # numba is a dependency: the fast path must run
    rng = np.random.default_rng(5)
    full = np.round(rng.normal(size=(2, 7, 13, 20)) * 2).astype(np.float32) / 2  # many ties
    if layout == "contiguous":
        batches = [full[0, :, :, :11].copy(), full[1, :, :, :11].copy()]
    elif layout == "cropped":  # as the kernel passes it: a crop of the inverse FFT's rows
        batches = [full[0, :, :, 4:15], full[1, :, :, 4:15]]
    else:  # a layout the compiled kernel cannot take directly (copied first)
        batches = [full[0, :, :, 15:4:-1], full[1, :, :, 15:4:-1]]
    fast, reference = PartialStats.empty((13, 11)), PartialStats.empty((13, 11))
    for first, batch in zip((3, 10), batches, strict=True):
        update(fast, batch, first)
        update_numpy(reference, batch, first)
    for a, b in zip(_stats_state(fast), _stats_state(reference), strict=True):
        np.testing.assert_array_equal(a, b)
    assert fast.count == reference.count == 14
    # And both agree with a direct reduction (lowest index on ties).
    stacked = np.concatenate(batches).astype(np.float64)
    np.testing.assert_array_equal(fast.best_index, stacked.argmax(axis=0) + 3)
    np.testing.assert_allclose(fast.total_sq, (stacked**2).sum(axis=0), rtol=1e-12)


def test_compiled_slicer_matches_reference_slicer():
    template = prepare_template(simulate_template(24, pixel_size=2.0, n_atoms=300, seed=1))
    rotations = euler_to_matrix(uniform_grid(psi_step=40.0, theta_step=40.0))
    fast = fused.central_slices(template, rotations)
    reference = extract_central_slices(template, rotations)
    assert fast.shape == reference.shape and fast.dtype == np.complex64
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-6 * np.abs(reference).max())
