"""Detection benchmark: recall against ideal SNR, and false picks per micrograph.

Micrographs come from ``detection_data.py`` (a simulator apart from dtm's: three molecule
shapes, off-grid orientations, sub-pixel positions, relative defocus between planes,
counting noise on a 1/f background, each particle at a chosen ideal matched-filter SNR). For
every shape, one ``dtm match`` run searches all its micrographs (10° grid, one defocus
plane); then each picking method is applied to the same maps:

- ``default``: what ``dtm match`` picks (``peaks.metric: detection_z``, the template's radius
  as minimum distance);
- ``scaled_mip``: the z-score, picked as before (0.15 × box apart, no merging);
- ``mip``: the raw MIP at the same z*, picked the same way;
- ``pvalue`` and ``gev``: Leopard-EM 1.3's metrics (``peaks.metric``), with the template's
  radius as minimum distance.

A pick is true when it lies within ``--tolerance`` pixels of a planted centre not yet matched
(picks taken strongest first); every other pick — noise, a side maximum, a second pick of one
particle — is false. Prints recall per SNR and method, false picks per micrograph with
particles, and picks per noise-only micrograph. Figures in docs/performance.md.

    python benchmarks/detection.py --seed 1 --out /tmp/detection --plot detection.png
    # 45 micrographs of 512², 14,832 orientations each: ~15 min on 2 quiet cores; searched
    # once (kept in --out), so a second call only picks again
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import detection_data  # noqa: E402

from dtm.config.match import PeaksConfig  # noqa: E402
from dtm.io.store import open_results  # noqa: E402
from dtm.programs.peaks import peaks_table  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "scaled_mip": {
        "metric": "scaled_mip",
        "min_distance_pixels": "0.15box",
        "merge_side_maxima": False,
    },
    "mip": {"metric": "mip", "min_distance_pixels": "0.15box", "merge_side_maxima": False},
    "pvalue": {"metric": "pvalue"},
    "gev": {"metric": "gev"},
}


def search(directory: Path, manifest: dict[str, Any], shape: str, workers: int) -> Path:
    """Run ``dtm match`` over every micrograph of one shape; return the output directory."""
    entry = manifest["shapes"][shape]
    optics = manifest["optics"]
    out = directory / f"out_{shape}"
    config = {
        "micrographs": [
            {
                "micrograph_path": m["path"],
                "name": m["name"],
                "defocus_u": optics["defocus_u"],
                "defocus_v": optics["defocus_v"],
                "astigmatism_angle": optics["astigmatism_angle"],
            }
            for m in entry["micrographs"]
        ],
        "template_volume_path": entry["template"],
        "output_dir": out.name,
        "optics_group": {
            "label": "benchmark",
            "pixel_size": optics["pixel_size"],
            "voltage": optics["voltage"],
            "spherical_aberration": optics["spherical_aberration"],
            "amplitude_contrast_ratio": optics["amplitude_contrast_ratio"],
            "astigmatism_angle": optics["astigmatism_angle"],
        },
        "defocus_search_config": {"enabled": False},
        "orientation_search_config": {"psi_step": 10.0, "theta_step": 10.0},
        "cluster": {"n_workers": workers, "threads_per_worker": 1},
    }
    path = directory / f"{shape}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not (out / "results.zarr").exists():
        subprocess.run(
            [sys.executable, "-m", "dtm.cli", "match", str(path), "--overwrite"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def score(picks: pd.DataFrame, truths: list[dict[str, Any]], tolerance: float) -> tuple[int, int]:
    """``(true picks, false picks)``: picks in table order, each matched to the nearest
    unmatched planted centre within ``tolerance`` pixels."""
    free = [(t["y"], t["x"]) for t in truths]
    hits = 0
    for y, x in zip(picks["pos_y_img"], picks["pos_x_img"], strict=True):
        distances = [math.hypot(y - ty, x - tx) for ty, tx in free]
        if distances and min(distances) <= tolerance:
            free.pop(int(np.argmin(distances)))
            hits += 1
    return hits, len(picks) - hits


def evaluate(directory: Path, manifest: dict[str, Any], tolerance: float) -> pd.DataFrame:
    """One row per (method, micrograph): SNR, particles, true and false picks."""
    rows = []
    box = int(manifest["box"])
    for shape, entry in manifest["shapes"].items():
        results = open_results(directory / f"out_{shape}")
        for micrograph in entry["micrographs"]:
            ds = results[micrograph["name"]]
            for method, options in METHODS.items():
                options = dict(options)
                if options.get("min_distance_pixels") == "0.15box":
                    options["min_distance_pixels"] = 0.15 * box
                try:
                    picks = peaks_table(ds, PeaksConfig(**options))
                except Exception as error:  # a metric that fails is reported, not fatal
                    print(f"{method} on {micrograph['name']}: {error}", file=sys.stderr)
                    continue
                hits, false = score(picks, micrograph["particles"], tolerance)
                rows.append(
                    {
                        "method": method,
                        "shape": shape,
                        "micrograph": micrograph["name"],
                        "snr": micrograph["snr"],
                        "particles": len(micrograph["particles"]),
                        "found": hits,
                        "false": false,
                    }
                )
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> str:
    """Recall per SNR (columns) and method (rows), false picks per micrograph."""
    signal = table[table["snr"] > 0]
    recall = signal.groupby(["method", "snr"])[["found", "particles"]].sum()
    recall = (recall["found"] / recall["particles"]).unstack("snr")
    false = signal.groupby("method")["false"].mean().rename("false/mic")
    noise = table[table["snr"] == 0].groupby("method")["false"].mean().rename("picks/noise mic")
    summary = recall.join(false).join(noise).reindex(list(METHODS)).dropna(how="all")
    summary.columns = [f"recall SNR {c:g}" if isinstance(c, float) else c for c in summary.columns]
    return summary.to_string(float_format=lambda v: f"{v:.2f}")


def plot(table: pd.DataFrame, path: Path) -> None:
    """Recall against SNR, one line per method; false picks per micrograph in the legend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    signal = table[table["snr"] > 0]
    for method in METHODS:
        rows = signal[signal["method"] == method]
        if rows.empty:
            continue
        sums = rows.groupby("snr")[["found", "particles"]].sum()
        false = rows["false"].mean()
        noise = table[(table["snr"] == 0) & (table["method"] == method)]["false"].mean()
        label = f"{method} ({false:.2f} false/mic, {noise:.2f} on noise)"
        axes.plot(sums.index, sums["found"] / sums["particles"], marker="o", label=label)
    axes.set_xlabel("ideal matched-filter SNR of each particle")
    axes.set_ylabel("fraction of particles found")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center right")
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("detection-benchmark"))
    parser.add_argument("--seed", type=int, default=1, help="data set (0 was used to tune)")
    parser.add_argument("--snrs", default="6,8,10,12")
    parser.add_argument("--per-snr", type=int, default=2, help="micrographs per SNR and shape")
    parser.add_argument("--noise-only", type=int, default=7, help="noise micrographs per shape")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=6.0, help="pixels")
    parser.add_argument("--json", type=Path, help="write the per-micrograph rows here")
    parser.add_argument("--plot", type=Path, help="write recall against SNR as a PNG here")
    args = parser.parse_args()

    directory = args.out.resolve()
    t0 = time.perf_counter()
    manifest_path = directory / "truth.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    else:
        manifest = detection_data.write_set(
            directory,
            seed=args.seed,
            snrs=tuple(float(s) for s in args.snrs.split(",")),
            per_snr=args.per_snr,
            noise_only=args.noise_only,
        )
    for shape in manifest["shapes"]:
        search(directory, manifest, shape, args.workers)
    table = evaluate(directory, manifest, args.tolerance)
    n_signal = table[(table.method == "default") & (table.snr > 0)].shape[0]
    n_noise = table[(table.method == "default") & (table.snr == 0)].shape[0]
    print(
        f"seed {args.seed}: {n_signal} micrographs with particles, {n_noise} noise-only, "
        f"shapes {', '.join(manifest['shapes'])}; tolerance {args.tolerance:g} px; "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print(summarise(table))
    if args.json:
        table.to_json(args.json, orient="records", indent=1)
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    main()
