"""Accuracy cost of storing the micrograph spectrum in half precision (the GPU option).

On a GPU the micrograph's spectrum is read once per correlation map; storing it as two
float16 per coefficient would halve that traffic. What it costs in accuracy does not need a
GPU: the spectrum rounded to float16 and widened back is exactly what the product would
see. This runs the CPU kernel on a simulated micrograph with planted particles twice —
complex64 spectrum, and the same spectrum rounded through float16 — and prints the largest
change of the MIP, of the scaled MIP at the particles, and whether every particle is still
found at the same position, orientation and defocus.

Run ``python benchmarks/half_precision.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from dtm.physics.projection import PreparedTemplate, prepare_template
from dtm.search.kernel import correlate_chunk
from dtm.search.orientations import uniform_grid
from dtm.search.prepare import ImageInputs, Optics, prepare_image
from dtm.search.space import SearchSpace
from dtm.search.stats import finalise, merge_all
from dtm.simulate import random_particles, simulate_micrograph, simulate_template

PIXEL_SIZE, BOX, SHAPE = 3.0, 64, (448, 448)
DEFOCUS = np.array([-1200.0, 0.0, 1200.0])
OPTICS = {
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 10000.0,
    "defocus_v": 9500.0,
    "astigmatism_angle": 30.0,
}


def to_half_and_back(spectrum: np.ndarray) -> np.ndarray:
    """Round real and imaginary parts to float16, as half-precision storage would."""
    real = spectrum.real.astype(np.float16).astype(np.float32)
    imag = spectrum.imag.astype(np.float16).astype(np.float32)
    return (real + 1j * imag).astype(np.complex64)


def search(image: ImageInputs, template: PreparedTemplate, space: SearchSpace) -> dict:
    """MIP, best search index and scaled MIP of the whole search."""
    euler = space.euler
    stats = merge_all(
        [correlate_chunk(image, template, euler[i : i + 64], i) for i in range(0, len(euler), 64)]
    )
    maps = finalise(stats, space)
    return {"mip": stats.mip, "best_index": stats.best_index, "scaled_mip": maps["scaled_mip"]}


def main() -> int:
    volume = simulate_template(BOX, pixel_size=PIXEL_SIZE, n_atoms=4000, seed=1)
    euler = uniform_grid(psi_step=30.0, theta_step=30.0)
    particles = random_particles(
        6, SHAPE, BOX, orientations=euler, defocus_values=DEFOCUS, min_separation=77, seed=0
    )
    micrograph = simulate_micrograph(
        volume,
        SHAPE,
        particles,
        pixel_size=PIXEL_SIZE,
        signal_scale=18.0,
        low_frequency_noise=5.0,
        seed=100,
        **OPTICS,
    )
    optics = Optics(PIXEL_SIZE, **OPTICS)
    image = prepare_image(micrograph, box_shape=(BOX, BOX), optics=optics, relative_defocus=DEFOCUS)
    half = replace(image, spectrum=to_half_and_back(image.spectrum))
    template = prepare_template(volume)
    space = SearchSpace(euler=euler, defocus=DEFOCUS)
    full_maps, half_maps = search(image, template, space), search(half, template, space)

    spectrum_error = np.abs(half.spectrum - image.spectrum).max() / np.abs(image.spectrum).max()
    mip_error = np.abs(half_maps["mip"] - full_maps["mip"]).max()
    print(f"spectrum: largest change {spectrum_error:.2e} of the largest coefficient")
    print(f"MIP: largest absolute change {mip_error:.2e} (MIP up to {full_maps['mip'].max():.2f})")
    same_index = np.mean(half_maps["best_index"] == full_maps["best_index"])
    print(f"best orientation/defocus index unchanged at {same_index:.4%} of the positions")
    print("| particle (y, x) | scaled MIP complex64 | float16 | change | same pose |")
    print("|---|---|---|---|---|")
    for p in particles:
        y, x = p.pos_y, p.pos_x
        a, b = full_maps["scaled_mip"][y, x], half_maps["scaled_mip"][y, x]
        same = full_maps["best_index"][y, x] == half_maps["best_index"][y, x]
        print(f"| ({y}, {x}) | {a:.3f} | {b:.3f} | {(b - a) / a:+.2e} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
