"""On pure noise, the threshold for F false positives lets through at most about F peaks.

It is conservative: it counts every position × orientation as an independent trial, while
neighbouring correlations are strongly correlated, so fewer than F peaks pass (cisTEM's and
Leopard-EM's threshold behaves the same). The test bounds it from both sides: few peaks at
F = 1, and a noise maximum not far below z* (a threshold set absurdly high would pass the
first check alone).
"""

from __future__ import annotations

import numpy as np

from dtm.physics.footprint import template_radius
from dtm.physics.orientations import uniform_grid
from dtm.physics.projection import prepare_template
from dtm.physics.simulate import simulate_template
from dtm.search.detection import detection_z
from dtm.search.kernel import correlate_chunk
from dtm.search.picking import default_min_distance, pick_peaks, threshold
from dtm.search.prepare import Optics, prepare_image
from dtm.search.space import SearchSpace
from dtm.search.stats import finalise

N_MICROGRAPHS = 24


def test_false_positive_rate_on_noise_micrographs():
    box = 32
    volume = simulate_template(box, pixel_size=3.0, n_atoms=2000, seed=3)
    template = prepare_template(volume)
    radius = template_radius(volume)
    space = SearchSpace(euler=uniform_grid(psi_step=20.0, theta_step=20.0), defocus=np.zeros(1))
    optics = Optics(3.0, 300.0, 2.7, 0.07, 10000.0, 9500.0, 30.0)
    rng = np.random.default_rng(2026)
    counts, maxima, cutoffs, pooled = [], [], [], []
    detection_counts, detection_maxima = [], []
    for _ in range(N_MICROGRAPHS):
        noise = rng.normal(size=(96, 96)).astype(np.float32)
        image = prepare_image(
            noise, box_shape=(box, box), optics=optics, relative_defocus=space.defocus
        )
        stats = correlate_chunk(image, template, space.euler, 0)
        maps = finalise(stats, space)
        cutoff = threshold(maps["scaled_mip"].size, space.n_correlations, 1.0)
        peaks = pick_peaks(maps["scaled_mip"], cutoff, min_distance=default_min_distance(box))
        counts.append(len(peaks))
        # The default statistic: the MIP against the background's statistics.
        z = detection_z(
            maps["mip"], maps["correlation_mean"], maps["correlation_variance"], (box, box), cutoff
        )
        detection_counts.append(len(pick_peaks(z, cutoff, min_distance=radius)))
        detection_maxima.append(float(np.nanmax(z)))
        maxima.append(float(maps["scaled_mip"].max()))
        cutoffs.append(cutoff)
        pooled.append(
            (
                stats.total.sum() / stats.count / stats.total.size,
                stats.total_sq.sum() / stats.count / stats.total.size,
            )
        )
    mean_count = float(np.mean(counts))
    print(f"false positives per noise micrograph: mean {mean_count:.2f}, counts {counts}")
    assert mean_count <= 2.0
    assert max(counts) <= 6  # never a flood
    # Not absurdly strict either: the noise maximum comes within 1.5 σ of z*, and some
    # micrograph's maximum within 0.5 σ.
    gaps = np.asarray(cutoffs) - np.asarray(maxima)
    assert np.median(gaps) < 1.5 and gaps.min() < 0.5
    # The detection statistic keeps the calibration, bounded from both sides alike.
    mean_detections = float(np.mean(detection_counts))
    print(f"detection_z picks per noise micrograph: mean {mean_detections:.2f}")
    assert mean_detections <= 1.0 and max(detection_counts) <= 4
    gaps = np.asarray(cutoffs) - np.asarray(detection_maxima)
    assert np.median(gaps) < 1.5 and gaps.min() < 0.5
    # Correlations of a noise micrograph are ~N(0, 1) (conventions.md#normalisation).
    mean, mean_sq = np.mean(pooled, axis=0)
    assert abs(mean) < 0.02
    assert abs(np.sqrt(mean_sq - mean**2) - 1.0) < 0.02
