"""Correlations per second: the bare kernel, the whole ``dtm match``, and the FFT floor.

For each case (S: 512² micrograph, 64³ template; M: 1024², 128³; L: 4096², 512³, GPU only)
this measures, on all the cores of the machine (one single-threaded process per core, as
the embedded cluster runs):

* the **FFT floor**: one ``rfft2`` + one ``irfft2`` at the padded FFT size, scipy.fft with
  one thread, in a plain process (default malloc settings);
* the **bare kernel**: :func:`dtm.search.kernel.correlate_chunk` over a block of
  orientations × the case's defocus planes, inputs prepared beforehand;
* the **whole** ``dtm match`` (:func:`dtm.programs.match.match_template` on a simulated data set
  written to a temporary directory, embedded ``LocalCluster`` started and closed by the
  call): correlations / wall time of the call, start-up included.

Times are medians of ``--repeats`` runs. ``ratio`` is the kernel's time per correlation
over the floor's (wall clock, and CPU time), the median of the ratios of the repeats: each
repeat times the floor and then the kernel in the same processes, so that the pair sees
the same machine (on a shared VM the speed drifts by ±30 % over minutes).
Run ``python benchmarks/throughput.py [--cases S,M] [--repeats 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import yaml


@dataclass(frozen=True)
class Case:
    """A benchmark problem: micrograph edge, template edge, search grid, defocus planes."""

    name: str
    image_size: int
    box_size: int
    psi_step: float  # degrees, of the whole-match search
    theta_step: float
    n_defocus: int
    kernel_orientations: int  # per process and repeat of the bare kernel
    gpu_only: bool = False


CASES = {
    # 10°/10° is Leopard-EM's reference search: 14,832 orientations × 1 plane.
    "S": Case("S", 512, 64, 10.0, 10.0, 1, 384),
    "M": Case("M", 1024, 128, 15.0, 15.0, 1, 48),
    "L": Case("L", 4096, 512, 15.0, 15.0, 1, 32, gpu_only=True),
}
LEOPARD = {"S": "≈440/s steady, 311/s whole call", "M": "≈94/s", "L": "≈1,650/s (H100)"}


def machine_header() -> dict[str, Any]:
    """Machine, load and library versions, printed above the table."""
    import dask
    import distributed

    import dtm

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "dtm": dtm.__version__,
    }
    try:
        import numba

        versions["numba"] = numba.__version__
    except ImportError:
        versions["numba"] = "absent (numpy fallback)"
    return {
        "machine": f"{platform.node()} {platform.machine()} {cpu}",
        "cores": len(os.sched_getaffinity(0)),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


# --- work run in each benchmark process -----------------------------------------------------

_STATE: dict[str, Any] = {}


def _init_kernel(case: Case, device: str) -> None:
    """Prepare the micrograph and template once per process; warm up (numba compile)."""
    from dtm.physics.orientations import uniform_grid
    from dtm.physics.projection import prepare_template
    from dtm.physics.simulate import simulate_template
    from dtm.search.kernel import correlate_chunk
    from dtm.search.prepare import Optics, prepare_image

    rng = np.random.default_rng(os.getpid())
    micrograph = rng.normal(size=(case.image_size,) * 2).astype(np.float32)
    volume = simulate_template(case.box_size, pixel_size=1.5, n_atoms=2000)
    if device == "gpu":
        import cupy

        micrograph, volume = cupy.asarray(micrograph), cupy.asarray(volume)
    optics = Optics(1.5, 300.0, 2.7, 0.07, 10000.0, 9500.0, 30.0)
    defocus = np.linspace(-1000.0, 1000.0, case.n_defocus) if case.n_defocus > 1 else [0.0]
    image = prepare_image(
        micrograph,
        box_shape=(case.box_size,) * 2,
        optics=optics,
        relative_defocus=np.asarray(defocus),
    )
    template = prepare_template(volume)
    euler = uniform_grid(psi_step=5.0, theta_step=5.0)[: case.kernel_orientations]
    correlate_chunk(image, template, euler[:2], 0)
    _STATE.update(image=image, template=template, euler=euler, device=device)


def _time_kernel(_: int) -> tuple[float, float, int]:
    from dtm.search.kernel import correlate_chunk

    image, euler = _STATE["image"], _STATE["euler"]
    wall, cpu = time.perf_counter(), time.process_time()
    stats = correlate_chunk(image, _STATE["template"], euler, 0)
    if _STATE["device"] == "gpu":
        stats.to_numpy()  # waits for the device
    return time.perf_counter() - wall, time.process_time() - cpu, stats.count


def _init_both(case: Case, device: str, fft_shape: tuple[int, int]) -> None:
    """Prepare the kernel's inputs and the floor's image in one process."""
    _init_kernel(case, device)
    xp = np
    if device == "gpu":
        import cupy as xp  # type: ignore[no-redef]
    _STATE["x"] = xp.asarray(np.random.default_rng(0).normal(size=fft_shape).astype(np.float32))


def _time_floor(n: int) -> tuple[float, float, int]:
    from dtm.backend import get_fft, get_xp

    x = _STATE["x"]
    fft = get_fft(get_xp(x))
    options = {"workers": 1} if _STATE["device"] == "cpu" else {}
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        y = fft.irfft2(fft.rfft2(x, **options), s=x.shape, **options)
    if _STATE["device"] == "gpu":
        float(y[0, 0])  # waits for the device
    return time.perf_counter() - wall, time.process_time() - cpu, n


def measure_floor_and_kernel(n_proc: int, case: Case, device: str, repeats: int) -> dict[str, Any]:
    """Floor and kernel, alternated in the same processes; medians per repeat.

    Each repeat times the floor and then the kernel in every process at once, so both see
    the same machine: on a shared VM the speed of the cores drifts by ±30 % over minutes,
    and the ratio of the pair is much steadier than either figure.
    """
    from dtm.search.prepare import fft_shape_for

    fft_shape = fft_shape_for((case.image_size,) * 2, (case.box_size,) * 2, "valid")
    n_floor = max(4, int(2e8 // (fft_shape[0] * fft_shape[1] * 10)))
    ctx = multiprocessing.get_context("spawn")  # fresh processes: default malloc settings
    runs: dict[str, list] = {"floor": [], "kernel": []}
    ratios_wall, ratios_cpu = [], []
    with ctx.Pool(n_proc, initializer=_init_both, initargs=(case, device, fft_shape)) as pool:
        pool.map(_time_floor, [max(1, n_floor // 8)] * n_proc)  # warm-up
        for _ in range(repeats):
            floor = pool.map(_time_floor, [n_floor] * n_proc)
            kernel = pool.map(_time_kernel, [0] * n_proc)
            for name, results in (("floor", floor), ("kernel", kernel)):
                runs[name].append(
                    (
                        statistics.median(w / n for w, _, n in results),
                        statistics.median(c / n for _, c, n in results),
                        sum(n / w for w, _, n in results),
                    )
                )
            ratios_wall.append(runs["kernel"][-1][0] / runs["floor"][-1][0])
            ratios_cpu.append(runs["kernel"][-1][1] / runs["floor"][-1][1])
    summary = {
        name: {
            "wall_per_item_s": statistics.median(r[0] for r in values),
            "cpu_per_item_s": statistics.median(r[1] for r in values),
            "items_per_s": statistics.median(r[2] for r in values),
        }
        for name, values in runs.items()
    }
    summary["ratio"] = {
        "wall": statistics.median(ratios_wall),
        "cpu": statistics.median(ratios_cpu),
        "wall_all": ratios_wall,
    }
    return summary


# --- the whole dtm match ---------------------------------------------------------------------


def write_match_inputs(case: Case, directory: Path, **overrides: Any) -> Path:
    """Simulated micrograph and template of ``case`` and a match config; its path."""
    from dtm.programs.demo import demo_config, demo_dataset

    (directory / "data").mkdir(parents=True, exist_ok=True)
    data = demo_dataset(
        directory / "data",
        micrograph_shape=(case.image_size,) * 2,
        box_size=case.box_size,
        n_particles=2,
        n_atoms=2000,
    )
    config = demo_config(data, directory / "out", directory)
    config["orientation_search_config"].update(psi_step=case.psi_step, theta_step=case.theta_step)
    if case.n_defocus == 1:
        config["defocus_search_config"] = {"enabled": False}
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def time_match(config_path: Path, client: Any = None, device: str = "cpu") -> dict[str, float]:
    """Wall time and correlations/s of one ``match_template`` call.

    Without ``client`` the call starts and closes its own embedded cluster (the whole
    command); with one, cluster start-up is left out.
    """
    from dtm.config import load_match_config
    from dtm.programs.match import match_template

    config = load_match_config(config_path)
    start = time.perf_counter()
    dataset = match_template(config, client, overwrite=True, device=device, out=io.StringIO())
    wall = time.perf_counter() - start
    n = int(dataset.attrs["total_correlations"])
    return {"wall_s": wall, "correlations": n, "per_s": n / wall}


def time_command(config_path: Path, device: str) -> float:
    """Wall seconds of ``dtm match CONFIG --overwrite`` in a fresh process, shell to shell."""
    command = [sys.executable, "-m", "dtm.cli", "match", str(config_path), "--overwrite"]
    start = time.perf_counter()
    subprocess.run([*command, "--device", device], check=True, capture_output=True)
    return time.perf_counter() - start


def time_first_call(config_path: Path, client: Any, device: str) -> dict[str, float]:
    """The first call on a fresh cluster, split at its first and last correlate task.

    ``to_first_s``: from the call to the end of the first correlate task (reading and
    planning, worker-side imports, preparing the inputs, loading the compiled kernels: with
    the 24-orientation search a task is one orientation, ~1 ms of work); ``wind_down_s``:
    from the end of the last correlate task to the return (merging, writing the maps, the
    zarr store and the peak tables). Worker and client clocks are the same machine's.
    """
    import distributed
    from dask.utils import key_split

    with distributed.get_task_stream(client) as stream:
        called = time.time()
        result = time_match(config_path, client, device)
        returned = time.time()
    spans = [
        (span["start"], span["stop"])
        for record in stream.data
        if key_split(record["key"]) == "correlate"
        for span in record["startstops"]
        if span["action"] == "compute"
    ]
    return {
        **result,
        "to_first_s": min(stop for _, stop in spans) - called,
        "wind_down_s": returned - max(stop for _, stop in spans),
    }


def probe_startup(config_path: Path, device: str) -> dict[str, float]:
    """Start-up of a fresh process, as ``dtm match`` pays it (run by ``--probe-startup``).

    ``imports``: from the creation of this process to ``dtm.programs.match`` and ``dtm.cli``
    imported; ``cluster``: the embedded cluster started with a worker; then
    :func:`time_first_call` of the 24-orientation search on that cold cluster.
    """
    import psutil

    born = psutil.Process().create_time()
    import dtm.cli
    import dtm.programs.match  # noqa: F401
    from dtm.config import ClusterConfig
    from dtm.runtime.cluster import connect

    imported = time.time()
    with connect(ClusterConfig(device=device), quiet=True) as client:
        client.wait_for_workers(1)
        ready = time.time()
        first = time_first_call(config_path, client, device)
    return {"imports": imported - born, "cluster": ready - imported, **first}


def startup_in_fresh_process(config_path: Path, device: str) -> dict[str, float]:
    """:func:`probe_startup` in a new interpreter; its JSON is the last line it prints."""
    command = [sys.executable, __file__, "--probe-startup", str(config_path), "--device", device]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def marginal_rate(small: dict[str, float], big: dict[str, float]) -> float:
    """Correlations/s of ``big`` beyond the fixed cost of ``small`` (two ``time_match``
    results on the same running cluster): ``ΔN / Δt``."""
    elapsed = big["wall_s"] - small["wall_s"]
    if elapsed <= 0:
        raise RuntimeError(
            f"the full search took no longer than the tiny one ({big['wall_s']:.2f} s against "
            f"{small['wall_s']:.2f} s): the machine is too noisy for a steady rate"
        )
    return (big["correlations"] - small["correlations"]) / elapsed


def measure_match(case: Case, repeats: int, device: str) -> dict[str, Any]:
    """Whole-command rate, steady-state rate, start-up and wind-down of ``dtm match``.

    Steady state: ``ΔN / Δt`` between the full search and a 24-orientation search on the
    same running cluster, which cancels every fixed cost. Start-up and wind-down: the
    24-orientation search in a fresh process (:func:`probe_startup`): from the creation of
    the process to the end of the first correlate task, and from the last one to the
    return. ``tiny_command_s``: the same search as a shell command, start to exit.
    """
    from dtm.config import ClusterConfig
    from dtm.runtime.cluster import connect

    with tempfile.TemporaryDirectory(prefix=f"dtm-bench-{case.name}-") as tmp:
        full = write_match_inputs(case, Path(tmp) / "full")
        tiny = write_match_inputs(
            case,
            Path(tmp) / "tiny",
            orientation_search_config={"psi_step": 90.0, "theta_step": 90.0},
        )
        whole = [time_match(full, device=device) for _ in range(repeats)]
        steady = []
        for _ in range(repeats):
            with connect(ClusterConfig(device=device), quiet=True) as client:
                client.wait_for_workers(1)
                small, big = time_match(tiny, client, device), time_match(full, client, device)
            steady.append(marginal_rate(small, big))
        fresh = [startup_in_fresh_process(tiny, device) for _ in range(repeats)]
        command = statistics.median(time_command(tiny, device) for _ in range(repeats))
    return {
        "match_correlations": int(whole[0]["correlations"]),
        "match_wall_s": statistics.median(r["wall_s"] for r in whole),
        "match_per_s": statistics.median(r["per_s"] for r in whole),
        "match_steady_per_s": statistics.median(steady),
        "startup_s": statistics.median(
            r["imports"] + r["cluster"] + r["to_first_s"] for r in fresh
        ),
        "startup_parts_s": {
            "imports": statistics.median(r["imports"] for r in fresh),
            "cluster": statistics.median(r["cluster"] for r in fresh),
            "call_to_first_correlation": statistics.median(r["to_first_s"] for r in fresh),
        },
        "wind_down_s": statistics.median(r["wind_down_s"] for r in fresh),
        "tiny_command_s": command,
    }


def run_case(case: Case, repeats: int, device: str, match: bool) -> dict[str, Any]:
    from dtm.search.prepare import fft_shape_for

    n_proc = 1 if device == "gpu" else len(os.sched_getaffinity(0))
    fft_shape = fft_shape_for((case.image_size,) * 2, (case.box_size,) * 2, "valid")
    row: dict[str, Any] = {
        "case": case.name,
        "image": case.image_size,
        "box": case.box_size,
        "fft_shape": list(fft_shape),
        "processes": n_proc,
    }
    measured = measure_floor_and_kernel(n_proc, case, device, repeats)
    floor, kernel = measured["floor"], measured["kernel"]
    row.update(
        floor_per_s=floor["items_per_s"],
        kernel_per_s=kernel["items_per_s"],
        floor_ms=floor["wall_per_item_s"] * 1e3,
        kernel_ms=kernel["wall_per_item_s"] * 1e3,
        ratio_wall=measured["ratio"]["wall"],
        ratio_cpu=measured["ratio"]["cpu"],
        ratio_wall_per_repeat=measured["ratio"]["wall_all"],
    )
    if match:
        row.update(measure_match(case, repeats, device))
        row["match_over_kernel"] = row["match_per_s"] / row["kernel_per_s"]
        row["steady_over_kernel"] = row["match_steady_per_s"] / row["kernel_per_s"]
    return row


def print_table(header: dict[str, Any], rows: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    print(
        f"machine: {header['machine']}, {header['cores']} cores, load average before "
        f"{header['load_average']}, after {header.get('load_average_after')}",
        file=out,
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()), file=out)
    print(
        "\n| case | FFT size | floor corr/s | kernel corr/s | kernel/floor (wall, cpu) "
        "| dtm match corr/s: whole call (steady) | steady/kernel | start-up s | wind-down s "
        "| 24-orientation command s | Leopard-EM |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        match = (
            f"{r['match_per_s']:,.0f} ({r['match_steady_per_s']:,.0f}) "
            f"| {r['steady_over_kernel']:.0%} | {r['startup_s']:.1f} | {r['wind_down_s']:.1f} "
            f"| {r['tiny_command_s']:.1f}"
            if "match_per_s" in r
            else "– | – | – | – | –"
        )
        print(
            f"| {r['case']}: {r['image']}²/{r['box']}³ | {r['fft_shape'][0]}×{r['fft_shape'][1]} "
            f"| {r['floor_per_s']:,.0f} | {r['kernel_per_s']:,.0f} "
            f"| {r['ratio_wall']:.2f}, {r['ratio_cpu']:.2f} | {match} "
            f"| {LEOPARD[r['case']]} |",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="S,M", help="comma-separated: S, M, L")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--no-match", action="store_true", help="skip the whole dtm match")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--probe-startup", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_startup:
        print(json.dumps(probe_startup(args.probe_startup, args.device)))
        return 0
    names = [name.strip().upper() for name in args.cases.split(",")]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r} (known: {', '.join(CASES)})")
    if args.device == "gpu":
        from dtm.runtime.cluster import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason is not None:
            parser.error(f"--device gpu: no working CUDA GPU ({reason})")
    header = machine_header()
    rows = []
    for name in names:
        case = CASES[name]
        if case.gpu_only and args.device != "gpu":
            print(f"case {case.name}: GPU only (use --device gpu)", file=sys.stderr)
            continue
        rows.append(run_case(case, args.repeats, args.device, not args.no_match))
        print(f"case {case.name} done", file=sys.stderr)
    header["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print_table(header, rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "header": header,
                    "rows": rows,
                    "cases": {r["case"]: asdict(CASES[r["case"]]) for r in rows},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
