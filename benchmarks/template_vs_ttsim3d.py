"""`dtm template` against ttsim3d: agreement of the volumes, and time and memory of the commands.

For each case, both whole commands run from the shell on the same CPU cores (the same
affinity mask), one after the other, each in a fresh process: ``dtm template`` and
ttsim3d's ``ttsim3d-cli`` (dose weighting and DQE off: the plain potential). Wall time and
peak resident memory (``wait4``'s ``ru_maxrss``) of each command are measured; the volumes
are then compared (the CPU time, user + system, is reported too: on a shared machine it
varies much less than the wall time):

- Pearson correlation after a 4 Å low-pass (the requirement: ≥ 0.97), and unfiltered;
- the centre of the cross-correlation peak (sub-voxel, parabolic), which must lie within one
  voxel of no shift: the same centre, axes and hand;
- the same correlation with dtm's volume mirrored (x → −x about the centre), at the centre
  and at its best translation: the hand must make a clear difference;
- the Fourier shell correlation between the two volumes.

Cases: ``96`` — the bundled 7DDO model (6,468 atoms, human ACE2 with a coronavirus RBD,
cryo-EM) in a 96³ box at 1.5 Å; ``400`` — a ribosome-sized model of 200,508 atoms made by
placing 31 rotated copies of 7DDO on a lattice, in a 400³ box at 1 Å. Both pixel sizes give
ttsim3d's 2× oversampling. ``96f`` is ``96`` with ttsim3d's default filters, dose weighting
from 0 to 30 e⁻/Å² and its K2 MTF (``--dose-weighting 0 30 --mtf`` that file for dtm).
(ttsim3d 0.4.2's automatic 4× oversampling, above 1.5 Å per
pixel, crops the wrong half of the spectrum's last axis: its volumes there are not
templates, so no case uses it.)

Run (a Python environment with ttsim3d, e.g. ``pip install ttsim3d``; torch on the CPU)::

    python benchmarks/template_vs_ttsim3d.py --ttsim3d /path/to/bin/ttsim3d-cli \
        --cases 96,400 --out /tmp/template-bench [--cores 0,1] [--json results.json]

About 1 minute for 96, 10 for 400 on 2 cores; the 400 case needs about 10 GB of memory
(ttsim3d holds its 800³ grid and its spectra).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import mrcfile
import numpy as np
import scipy.fft
from scipy.spatial.transform import Rotation

BUNDLED = Path(str(files("dtm") / "data" / "7ddo.pdb.gz"))
# box, pixel size (Å), copies of 7DDO, filters (dose weighting 0–30 e⁻/Å² and K2 MTF)
CASES = {"96": (96, 1.5, 1, False), "400": (400, 1.0, 31, False), "96f": (96, 1.5, 1, True)}
LOW_PASS = 4.0  # Å


def tiled_model(source: Path, copies: int, out: Path, spacing: float = 60.0) -> Path:
    """``copies`` randomly rotated copies of ``source`` on a cubic lattice (mmCIF)."""
    import gemmi

    structure = gemmi.read_structure(str(source))
    structure.remove_hydrogens()
    original = structure[0]
    centre = np.mean([a.pos.tolist() for r in original.all() for a in [r.atom]], axis=0)
    side = int(np.ceil(copies ** (1 / 3)))
    points = [np.array(p) for p in np.ndindex(side, side, side)][:copies]
    offset = (side - 1) / 2
    rotations = Rotation.random(copies, random_state=0).as_matrix()
    model = gemmi.Model(1)
    for k, (point, rotation) in enumerate(zip(points, rotations, strict=True)):
        shift = (point - offset) * spacing
        for chain in original:
            copy = chain.clone()
            copy.name = f"{chain.name}{k}"
            for residue in copy:
                for atom in residue:
                    xyz = rotation @ (np.array(atom.pos.tolist()) - centre) + shift
                    atom.pos = gemmi.Position(*xyz)
            model.add_chain(copy)
    tiled = gemmi.Structure()
    tiled.add_model(model)
    tiled.setup_entities()
    tiled.make_mmcif_document().write_file(str(out))
    return out


def measure(argv: list[str], cores: set[int]) -> tuple[float, float, float, str]:
    """Run ``argv`` on ``cores``; wall seconds, CPU seconds (user + system: what other
    processes on the machine disturb least), peak RSS (GiB) and its output."""
    start = time.perf_counter()
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{argv[0]} failed ({status}):\n{output}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20, output


def low_pass(volume: np.ndarray, pixel_size: float, resolution: float) -> np.ndarray:
    n = volume.shape[0]
    k = np.sqrt(
        np.fft.fftfreq(n)[:, None, None] ** 2
        + np.fft.fftfreq(n)[None, :, None] ** 2
        + np.fft.rfftfreq(n)[None, None, :] ** 2
    )
    keep = k / pixel_size <= 1 / resolution
    return scipy.fft.irfftn(scipy.fft.rfftn(volume) * keep, s=volume.shape)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def peak(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Sub-voxel shift of ``a`` against ``b`` at the normalised cross-correlation's maximum."""
    a, b = a - a.mean(), b - b.mean()
    cc = scipy.fft.irfftn(scipy.fft.rfftn(a) * np.conj(scipy.fft.rfftn(b)), s=a.shape)
    cc /= np.sqrt((a * a).sum() * (b * b).sum())
    index = np.unravel_index(int(cc.argmax()), cc.shape)
    n = a.shape[0]
    shift = []
    for axis in range(3):
        around = [list(index) for _ in range(3)]
        for j, step in enumerate((-1, 0, 1)):
            around[j][axis] = (index[axis] + step) % n
        m, c, p = (cc[tuple(i)] for i in around)
        whole = index[axis] if index[axis] <= n // 2 else index[axis] - n
        shift.append(whole + 0.5 * (m - p) / (m - 2 * c + p))
    return np.array(shift), float(cc.max())


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC in shells of one Fourier voxel, shells 1 … n/2 (cycles/pixel = shell / n)."""
    n = a.shape[0]
    fa, fb = scipy.fft.rfftn(a), scipy.fft.rfftn(b)
    k = np.sqrt(
        np.fft.fftfreq(n, 1 / n)[:, None, None] ** 2
        + np.fft.fftfreq(n, 1 / n)[None, :, None] ** 2
        + np.fft.rfftfreq(n, 1 / n)[None, None, :] ** 2
    )
    shell = np.rint(k).astype(int).ravel()
    weight = np.full(fa.shape, 2.0)
    weight[..., 0] = 1.0  # the rfft half-plane: others stand for two coefficients
    if n % 2 == 0:
        weight[..., -1] = 1.0
    cross = np.bincount(shell, (weight * (fa * np.conj(fb)).real).ravel(), n)
    pa = np.bincount(shell, (weight * np.abs(fa) ** 2).ravel(), n)
    pb = np.bincount(shell, (weight * np.abs(fb) ** 2).ravel(), n)
    with np.errstate(invalid="ignore"):  # shells beyond the corner of the cube are empty
        return (cross / np.sqrt(pa * pb))[1 : n // 2 + 1]


def compare(dtm_volume: np.ndarray, tt_volume: np.ndarray, pixel_size: float) -> dict:
    a = low_pass(dtm_volume.astype(np.float64), pixel_size, LOW_PASS)
    b = low_pass(tt_volume.astype(np.float64), pixel_size, LOW_PASS)
    mirrored = np.roll(a[:, :, ::-1], 1, axis=2)  # x → −x about index n // 2
    shift, _ = peak(a, b)
    _, mirrored_best = peak(mirrored, b)
    curve = fsc(dtm_volume.astype(np.float64), tt_volume.astype(np.float64))
    n = dtm_volume.shape[0]
    at = {f"{r:g} Å": float(curve[int(round(n * pixel_size / r)) - 1]) for r in (10, 6, 4, 3)}
    at["Nyquist"] = float(curve[-1])
    return {
        "correlation_4A": correlation(a, b),
        "correlation_unfiltered": correlation(dtm_volume, tt_volume),
        "peak_shift_voxels": [round(float(v), 3) for v in shift],
        "mirrored_correlation_4A": correlation(mirrored, b),
        "mirrored_best_translation_4A": mirrored_best,
        "fsc": at,
        "fsc_min_to_4A": float(curve[: int(n * pixel_size / 4)].min()),
        "fsc_min": float(curve.min()),
        # ttsim3d's dose filter zeroes the zero frequency (float32 rounding of its k = 0
        # limit), so its filtered volumes sum to nothing: no ratio then.
        "sum_ratio": (
            float(dtm_volume.sum() / tt_volume.sum())
            if abs(float(tt_volume.sum())) > 1e-3 * abs(float(dtm_volume.sum()))
            else None
        ),
    }


def run_case(name: str, args: argparse.Namespace, cores: set[int]) -> dict:
    box, pixel_size, copies, filters = CASES[name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = BUNDLED if copies == 1 else out / f"tiled_{copies}.cif"
    if copies > 1 and not model.exists():
        tiled_model(BUNDLED, copies, model)
    # ttsim3d's reader (mmdf) wants an uncompressed file.
    plain = out / (model.name.removesuffix(".gz"))
    if model.suffix == ".gz" and not plain.exists():
        import gzip

        plain.write_bytes(gzip.decompress(model.read_bytes()))
    dtm_out, tt_out = out / f"dtm_{name}.mrc", out / f"ttsim3d_{name}.mrc"
    dtm_argv = [
        sys.executable,
        "-m",
        "dtm.cli",
        "template",
        str(plain),
        "--pixel-size",
        str(pixel_size),
        "--box",
        str(box),
        "--output",
        str(dtm_out),
        "--overwrite",
    ]
    tt_argv = [
        args.ttsim3d,
        "--pdb-filepath",
        str(plain),
        "--mrc-filepath",
        str(tt_out),
        "--pixel-spacing",
        str(pixel_size),
        "--volume-shape",
        str(box),
        str(box),
        str(box),
        "--apply-dose-weighting",
        "False",
        "--mtf-reference",
        "k2_300kv",
    ]
    if filters:  # ttsim3d's defaults: dose weighting 0–30 e⁻/Å², its K2 300 kV MTF
        mtf = _ttsim3d_mtf(args.ttsim3d)
        dtm_argv += ["--dose-weighting", "0", "30", "--mtf", mtf]
        tt_argv[tt_argv.index("--apply-dose-weighting") + 1] = "True"
        tt_argv += ["--apply-dqe"]
    result: dict = {"case": name, "box": box, "pixel_size": pixel_size, "cores": len(cores)}
    for label, argv in (("dtm", dtm_argv), ("ttsim3d", tt_argv)):
        wall, cpu, rss, _ = measure(argv, cores)
        result[label] = {
            "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "peak_rss_gib": round(rss, 2),
        }
        print(f"{name}: {label} {wall:.1f} s ({cpu:.1f} s CPU), peak {rss:.2f} GiB", flush=True)
    result["atoms"] = _atoms(plain)
    result.update(compare(mrcfile.read(dtm_out), mrcfile.read(tt_out), pixel_size))
    return result


def _ttsim3d_mtf(command: str) -> str:
    """The K2 300 kV MTF file that ttsim3d ships (its default ``k2_300kv``)."""
    python = Path(command).parent / "python"
    code = "import ttsim3d.models as m; print(m.DEFAULT_MTF_REFERENCES['k2_300kv'])"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()


def _atoms(path: Path) -> int:
    import gemmi

    structure = gemmi.read_structure(str(path))
    structure.remove_hydrogens()
    return int(structure[0].count_atom_sites())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttsim3d", default="ttsim3d-cli", help="ttsim3d's command")
    parser.add_argument("--cases", default="96,400")
    parser.add_argument("--out", default="template-bench", help="working directory")
    parser.add_argument("--cores", help="CPU cores for both commands, e.g. 0,1 (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    cores = {int(c) for c in args.cores.split(",")} if args.cores else os.sched_getaffinity(0)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = [run_case(name, args, cores) for name in args.cases.split(",")]
    print(f"load average after: {os.getloadavg()}")
    for r in results:
        print(json.dumps(r, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
