"""Scaling of ``dtm match`` with the number of workers, and worker memory vs search size.

* correlations/s with 1, 2, … single-threaded worker processes on one machine (case S of
  ``throughput.py``: 512² micrograph, 64³ template), steady state: ``ΔN / Δt`` between a
  full search and a 24-orientation search on the same running cluster, beside the FFT floor
  of as many single-threaded processes and the ratio of time per correlation to it;
* peak resident memory (RSS) of each worker, sampled every 0.2 s through ``client.run``,
  for a search of 243 and of 20,400 orientations: bounded by a few maps, whatever the
  number of orientations.

Run ``python benchmarks/scaling.py [--workers 1,2] [--repeats 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from throughput import (
    CASES,
    machine_header,
    marginal_rate,
    measure_floor_and_kernel,
    time_match,
    write_match_inputs,
)

#: Orientation grids (psi_step, theta_step) of the memory test: 243 and 20,400 orientations.
MEMORY_GRIDS = {243: (40.0, 40.0), 20400: (9.0, 9.0)}


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_worker_memory(client: Any, config_path: Path) -> dict[str, float]:
    """Run one search while sampling every worker's RSS; peak MiB per worker."""
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            for worker, rss in client.run(_rss).items():
                peaks[worker] = max(peaks.get(worker, 0), rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time_match(config_path, client)
    finally:
        done.set()
        sampler.join()
    return {worker: rss / 2**20 for worker, rss in sorted(peaks.items())}


def steady_rate(client: Any, tiny: Path, full: Path, repeats: int) -> float:
    """Median correlations/s of the full search beyond the fixed cost of a tiny one."""
    rates = []
    for _ in range(repeats):
        rates.append(marginal_rate(time_match(tiny, client), time_match(full, client)))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    from dtm.config import ClusterConfig
    from dtm.runtime.cluster import connect

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    case = CASES["S"]
    header = machine_header()
    result: dict[str, Any] = {"header": header, "rates": {}, "floor": {}, "memory_mib": {}}
    with tempfile.TemporaryDirectory(prefix="dtm-scaling-") as tmp:
        root = Path(tmp)
        full = write_match_inputs(case, root / "full")
        tiny = write_match_inputs(
            case, root / "tiny", orientation_search_config={"psi_step": 90.0, "theta_step": 90.0}
        )
        grids = {
            n: write_match_inputs(
                case,
                root / f"g{n}",
                orientation_search_config={"psi_step": psi, "theta_step": theta},
            )
            for n, (psi, theta) in MEMORY_GRIDS.items()
        }
        for n_workers in (int(x) for x in args.workers.split(",")):
            cluster = ClusterConfig(n_workers=n_workers, threads_per_worker=1)
            with connect(cluster, quiet=True) as client:
                client.wait_for_workers(n_workers)
                rate = steady_rate(client, tiny, full, args.repeats)
                result["rates"][n_workers] = rate
                if n_workers == max(int(x) for x in args.workers.split(",")):
                    for n, path in grids.items():
                        result["memory_mib"][n] = peak_worker_memory(client, path)
            # The FFT floor of as many single-threaded processes, once the cluster is gone.
            floor = measure_floor_and_kernel(n_workers, case, "cpu", args.repeats)["floor"]
            result["floor"][n_workers] = floor["items_per_s"]
            print(f"{n_workers} worker(s) done", file=sys.stderr)
    print(f"machine: {header['machine']}, {header['cores']} cores, load {header['load_average']}")
    print(f"case S ({case.image_size}² micrograph, {case.box_size}³ template), steady state:")
    print("| workers | correlations/s | speed-up | FFT floor corr/s | time ÷ floor |")
    print("|---|---|---|---|---|")
    base = result["rates"][min(result["rates"])]
    for n_workers, rate in result["rates"].items():
        floor = result["floor"][n_workers]
        ratio = floor / rate  # time per correlation ÷ the floor's
        print(f"| {n_workers} | {rate:,.0f} | {rate / base:.2f}× | {floor:,.0f} | {ratio:.2f} |")
    print("\n| orientations | peak RSS per worker (MiB) |\n|---|---|")
    for n, peaks in result["memory_mib"].items():
        print(f"| {n:,} | " + ", ".join(f"{v:,.0f}" for v in peaks.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
