"""Cost of the correlation table in the bare kernel (``docs/outputs.md``, the correlation table).

On a simulated micrograph with strong planted particles, :func:`dtm.search.kernel.
correlate_chunk` runs with the table off and on (cut-offs 5.5 and 4.0), single-threaded:

* ``collect``: the CPU time spent keeping the rows (the reads of the flagged rows, or of
  the running MIP's candidates without numba), as a share of the search's CPU time;
* ``paired``: the median over repeats of (time with the table) / (time without), each
  ratio against the mean of the runs without the table just before and after it.

Run ``python benchmarks/correlation_table.py [--size 512 --box 64 --orientations 128]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import dtm.search.table as table_module
from dtm.physics.orientations import uniform_grid
from dtm.physics.projection import prepare_template
from dtm.physics.simulate import random_particles, simulate_micrograph, simulate_template
from dtm.search.kernel import correlate_chunk
from dtm.search.prepare import Optics, prepare_image

OPTICS = {
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 10000.0,
    "defocus_v": 9500.0,
    "astigmatism_angle": 30.0,
    "phase_shift": 0.0,
}
CUTOFFS = (5.5, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--orientations", type=int, default=128)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    pixel = 1.5
    volume = simulate_template(args.box, pixel_size=pixel, n_atoms=2000, seed=1)
    euler = uniform_grid(psi_step=5.0, theta_step=5.0)[: args.orientations]
    shape = (args.size, args.size)
    particles = random_particles(
        args.particles, shape, args.box, orientations=euler, defocus_values=(0.0,),
        min_separation=1.2 * args.box, seed=3,
    )  # fmt: skip
    micrograph = simulate_micrograph(
        volume, shape, particles, pixel_size=pixel, signal_scale=18.0, seed=5, b_factor=0.0,
        **OPTICS,
    )  # fmt: skip
    optics = Optics(pixel, 300.0, 2.7, 0.07, 10000.0, 9500.0, 30.0)
    image = prepare_image(
        micrograph.astype(np.float32),
        box_shape=(args.box, args.box),
        optics=optics,
        relative_defocus=np.asarray([0.0]),
    )
    template = prepare_template(volume)
    for cutoff in (None, *CUTOFFS):  # compile and warm up
        correlate_chunk(image, template, euler[:2], 0, table_cutoff=cutoff)

    spent = [0.0]
    collectors = ("add", "add_flagged")
    originals = {name: getattr(table_module.TableCollector, name) for name in collectors}

    def timed(name: str):  # type: ignore[no-untyped-def]
        def method(self, *a):  # type: ignore[no-untyped-def]
            start = time.process_time()
            originals[name](self, *a)
            spent[0] += time.process_time() - start

        return method

    for name in collectors:
        setattr(table_module.TableCollector, name, timed(name))

    def run(cutoff: float | None) -> tuple[float, float, int]:
        spent[0] = 0.0
        start = time.process_time()
        stats = correlate_chunk(
            image, template, euler, 0, table_cutoff=cutoff, max_table_rows=10**9
        )
        rows = 0 if stats.table is None else len(stats.table)
        return time.process_time() - start, spent[0], rows

    ratios: dict[float, list[float]] = {c: [] for c in CUTOFFS}
    shares: dict[float, list[float]] = {c: [] for c in CUTOFFS}
    rows: dict[float, int] = {}
    off = []
    for _ in range(args.repeats):
        before = run(None)[0]
        timings = {c: run(c) for c in CUTOFFS}
        after = run(None)[0]
        off += [before, after]
        for c, (total, collect, n) in timings.items():
            ratios[c].append(total / ((before + after) / 2))
            shares[c].append(collect / (total - collect))
            rows[c] = n
    per_second = args.orientations / statistics.median(off)
    print(
        f"{args.size}² micrograph, {args.box}³ template, {args.orientations} orientations, "
        f"{args.particles} particles: table off {per_second:.0f} correlations/s (CPU time)"
    )
    for c in CUTOFFS:
        print(
            f"  cut-off {c:g}: {rows[c]:,} rows; collect {100 * statistics.median(shares[c]):.1f} %"
            f" of the search; paired {100 * (statistics.median(ratios[c]) - 1):+.1f} %"
        )


if __name__ == "__main__":
    main()
