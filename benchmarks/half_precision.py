"""Accuracy cost of storing the micrograph spectrum in half precision (the GPU option).

On a GPU the micrograph's spectrum is read once per correlation map; storing it as two
float16 per coefficient would halve that traffic. What it costs in accuracy does not need a
GPU: the spectrum rounded to float16 and widened back is exactly what the product would
see. This runs the CPU kernel on ``dtm demo``'s simulated micrograph with planted particles twice —
complex64 spectrum, and the same spectrum rounded through float16 — and prints the largest
change of the MIP, of the scaled MIP at the particles, and whether every particle is still
found at the same position, orientation and defocus.

Run ``python benchmarks/half_precision.py`` (about two minutes on 2 cores).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace

import numpy as np

from dtm.io.mrc import read_micrograph, read_template
from dtm.physics.orientations import uniform_grid
from dtm.physics.projection import PreparedTemplate, prepare_template
from dtm.programs.demo import demo_dataset
from dtm.search.kernel import correlate_chunk
from dtm.search.prepare import ImageInputs, Optics, prepare_image
from dtm.search.space import SearchSpace
from dtm.search.stats import finalise, merge_all


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
    with tempfile.TemporaryDirectory(prefix="dtm-half-") as tmp:
        data = demo_dataset(tmp)  # dtm demo's data set: 480² micrograph, 6 particles
        micrograph = read_micrograph(data["micrograph_path"]).data
        volume = read_template(data["template_path"]).data
    grid, optics = data["search"], data["optics"]
    defocus = np.arange(
        grid["defocus_min"], grid["defocus_max"] + grid["defocus_step"] / 2, grid["defocus_step"]
    )
    space = SearchSpace(
        euler=uniform_grid(psi_step=grid["psi_step"], theta_step=grid["theta_step"]),
        defocus=defocus,
    )
    image = prepare_image(
        micrograph,
        box_shape=volume.shape[1:],
        optics=Optics(
            data["pixel_size"],
            optics["voltage"],
            optics["spherical_aberration"],
            optics["amplitude_contrast_ratio"],
            optics["defocus_u"],
            optics["defocus_v"],
            optics["astigmatism_angle"],
            optics["phase_shift"],
            optics["b_factor"],
        ),
        relative_defocus=defocus,
    )
    half = replace(image, spectrum=to_half_and_back(image.spectrum))
    template = prepare_template(volume)
    full_maps, half_maps = search(image, template, space), search(half, template, space)
    particles = data["particles"]

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
