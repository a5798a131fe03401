"""``dtm template``: a template from an atomic model; and the template of a search that names a
model (``template_model_path``).

The model is read by :func:`dtm.io.model.read_model`, its potential computed by
:mod:`dtm.physics.potential` (oversampled, Fourier-cropped), scaled to cisTEM's and ttsim3d's
unit and filtered as asked (:mod:`dtm.physics.exposure`). The atoms are centred on the
model's centre (the mean position of its atoms): the centre lies at voxel ``box // 2``, the
model's x along the array's last axis, as in ttsim3d, so a model placed at pose R in a
micrograph is found at R (``docs/from-a-model.md``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from dtm.errors import ConfigError, InputError, OutputError
from dtm.schema import TEMPLATE_FILE

if TYPE_CHECKING:
    from dtm.config.match import MatchConfig
    from dtm.config.template import TemplateSimulation
    from dtm.io.model import AtomicModel

#: cisTEM and ttsim3d blur each atom by this fraction of its B-factor (kept for agreement).
B_FACTOR_FRACTION = 0.25


def simulate_template(
    model_path: str | os.PathLike[str],
    *,
    pixel_size: float,
    box: int | None = None,
    voltage: float = 300.0,
    settings: TemplateSimulation | None = None,
    executor: Executor | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The template of an atomic model.

    Parameters
    ----------
    model_path
        PDB or mmCIF file (``.gz`` too).
    pixel_size
        Å per voxel.
    box
        Edge of the cubic volume, voxels (default: :func:`dtm.config.template.default_box`).
    voltage
        Electron energy, kV (sets the wavelength in the potential's unit).
    settings
        B-factors, filters, oversampling, waters (:class:`dtm.config.template.TemplateSimulation`).
    executor
        Where the slabs of the fine grid are computed (threads, or a Dask client's
        ``get_executor()``); ``None``: here, one after another.
    threads
        Threads of the transforms here.

    Returns
    -------
    volume : numpy.ndarray
        float32 ``(box, box, box)``, ``[z, y, x]``.
    record : dict
        What was made and how (JSON-safe): model, atoms, centre, box, pixel size, voltage,
        oversampling and the settings.

    Raises
    ------
    InputError
        Unreadable model or curve file, an element without scattering factor, atoms
        outside the box, B-factors so negative that an atom has no width.
    """
    from dtm.config.template import TemplateSimulation, default_box  # noqa: PLC0415
    from dtm.io.model import read_model  # noqa: PLC0415
    from dtm.physics import potential  # noqa: PLC0415

    settings = settings or TemplateSimulation()
    model = read_model(model_path, waters=settings.waters)
    box = box or default_box(model.radius(), pixel_size)
    _check_inside(model, box, pixel_size)
    zyx, a, beta = _atom_arrays(model, settings)
    oversampling = settings.oversampling or potential.default_oversampling(pixel_size, box)
    grid = potential.Grid(box, pixel_size, oversampling)
    spectrum = potential.potential_spectrum(zyx, a, beta, grid, executor=executor, threads=threads)
    spectrum *= potential.potential_scale(voltage, pixel_size)
    for values in _filters(settings, box, pixel_size):
        spectrum *= values
    volume = potential.volume_from_spectrum(spectrum, box, threads)
    record = {
        "model_path": str(model.path),
        "atoms": len(model.xyz),
        "hydrogens_left_out": model.hydrogens,
        "water_atoms": model.waters,
        "centre_angstrom": [round(float(v), 4) for v in model.centre],
        "pixel_size": float(pixel_size),
        "box": int(box),
        "voltage": float(voltage),
        **settings.record(),
        "oversampling": int(oversampling),
    }
    return volume, record


def _check_inside(model: AtomicModel, box: int, pixel_size: float) -> None:
    """Every atom inside the box (its centre at ``box // 2``), or a one-line error."""
    from dtm.config.template import default_box  # noqa: PLC0415

    index = (model.xyz - model.centre) / pixel_size + box // 2
    outside = int(((index < -0.5) | (index >= box - 0.5)).any(axis=1).sum())
    if outside:
        raise InputError(
            f"model {model.path}: {outside} atom(s) lie outside the {box}-voxel box at "
            f"{pixel_size:g} Å/voxel (the model's radius is {model.radius():.1f} Å; the "
            f"default box would be {default_box(model.radius(), pixel_size)})"
        )


def _atom_arrays(
    model: AtomicModel, settings: TemplateSimulation
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``(z, y, x)`` Å from the centre, amplitudes × occupancy, widths ``b + B'``."""
    from dtm.physics.scattering import scattering_coefficients  # noqa: PLC0415

    try:
        a, b = scattering_coefficients(model.elements)
    except InputError as exc:
        raise InputError(f"model {model.path}: {exc}") from None
    blur = B_FACTOR_FRACTION * (
        model.b_factors * settings.b_factor_scaling + settings.additional_b_factor
    )
    beta = b + blur[:, None]
    if not (beta > 0).all():
        worst = float(blur.min() / B_FACTOR_FRACTION)
        raise InputError(
            f"model {model.path}: an atom's B-factor after scaling and adding is {worst:g} Å², "
            "too negative for a Gaussian of positive width; raise additional_b_factor"
        )
    zyx = (model.xyz - model.centre)[:, ::-1]
    return np.ascontiguousarray(zyx), a * model.occupancies[:, None], beta


def _filters(settings: TemplateSimulation, box: int, pixel_size: float) -> list[np.ndarray]:
    """The filters that ``settings`` asks for, on the volume's rfft grid."""
    from dtm.io.curves import read_curve  # noqa: PLC0415
    from dtm.physics import exposure  # noqa: PLC0415

    filters = []
    if settings.dose_weighting is not None:
        start, end = settings.dose_weighting
        filters.append(exposure.dose_filter(box, pixel_size, start, end))
    if settings.mtf_path is not None:
        curve = read_curve(settings.mtf_path, "MTF")
        filters.append(exposure.curve_filter(box, *curve))
    if settings.dqe_path is not None:
        curve = read_curve(settings.dqe_path, "DQE")
        filters.append(np.sqrt(exposure.curve_filter(box, *curve)))
    return filters


def search_template(
    config: MatchConfig,
    *,
    resume: bool,
    overwrite: bool,
    out: TextIO | None = None,
    client: Any = None,
) -> MatchConfig:
    """The configuration a search runs with: its model's template in ``OUTPUT_DIR/template.mrc``.

    Without ``template_model_path`` the configuration is returned as it is. Otherwise the
    template is simulated at the search's pixel size and voltage, in a box of
    ``template_box`` voxels (default from the model's radius), before anything else of the
    run: the search validates, sizes and fingerprints it as any template. The file is written
    only where that is safe: a new output directory, the same template as the earlier run's
    (nothing written), or ``--overwrite``; a changed template refuses ``--resume``. It is
    computed on ``client``'s cluster when the caller gives one (the Python API), otherwise
    with this machine's cores: the run's own cluster does not exist yet.

    Returns
    -------
    MatchConfig
        With ``template_volume_path`` the simulated file, ``template_box`` and
        ``template_simulation.oversampling`` resolved (so that ``job.json`` and the dataset
        attributes record every parameter).
    """
    from dtm.io.mrc import write_map  # noqa: PLC0415
    from dtm.io.rundir import check_output_dir, has_results  # noqa: PLC0415

    if config.template_model_path is None:
        return config
    out = sys.stdout if out is None else out
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    optics = config.optics_group
    simulate = functools.partial(
        simulate_template,
        config.template_model_path,
        pixel_size=optics.pixel_size,
        box=config.template_box,
        voltage=optics.voltage,
        settings=config.template_simulation,
    )
    if client is not None:
        volume, record = simulate(executor=client.get_executor(pure=False))
    else:
        with _threads() as (executor, threads):
            volume, record = simulate(executor=executor, threads=threads)
    path = output_dir / TEMPLATE_FILE
    if path.is_symlink():
        raise OutputError(f"output {path}: is a symbolic link; dtm writes only real files")
    unchanged = _same_template(path, volume, optics.pixel_size)
    if not unchanged:
        if has_results(output_dir) and not overwrite:
            if resume:
                raise ConfigError(
                    f"--resume: the template simulated from {config.template_model_path} "
                    f"differs from {path} of the earlier run (the model or template_simulation "
                    "changed); use --overwrite to start again"
                )
            raise OutputError(
                f"output_dir {output_dir}: holds results of an earlier run; "
                "use --resume to continue it or --overwrite to replace it"
            )
        write_map(path, volume, pixel_size=optics.pixel_size)
    print(
        f"template: {record['atoms']:,} atoms of {config.template_model_path} → {path} "
        f"({record['box']}³ voxels of {record['pixel_size']:g} Å)"
        + (", the same as the earlier run's" if unchanged else ""),
        file=out,
    )
    settings = config.template_simulation.model_copy(
        update={"oversampling": record["oversampling"]}
    )
    return config.model_copy(
        update={
            "template_volume_path": path,
            "template_box": record["box"],
            "template_simulation": settings,
        }
    )


def _same_template(path: Path, volume: np.ndarray, pixel_size: float) -> bool:
    """Whether ``path`` already holds exactly ``volume`` at ``pixel_size``."""
    import mrcfile  # noqa: PLC0415

    if not path.is_file():
        return False
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            same_size = np.isclose(float(mrc.voxel_size.x), pixel_size, rtol=1e-6)
            return bool(same_size and np.array_equal(mrc.data, volume))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _threads() -> Iterator[tuple[Executor | None, int]]:
    """A thread per core for the slabs (``dask.system.CPU_COUNT``, as many as the local
    cluster's workers: the affinity mask and cgroup limits), and the count."""
    import dask.system  # noqa: PLC0415

    cores = int(dask.system.CPU_COUNT)
    if cores == 1:
        yield None, 1
        return
    with ThreadPoolExecutor(cores) as pool:
        yield pool, cores


def template_command(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    pixel_size: float,
    box: int | None,
    voltage: float,
    settings: TemplateSimulation,
    overwrite: bool = False,
    scheduler_address: str | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """``dtm template``: simulate the template of ``model`` and write it to ``output``.

    On this machine's cores, or on the Dask cluster at ``scheduler_address``. Prints one
    line saying what was written; returns the record of :func:`simulate_template`.

    Raises
    ------
    OutputError
        ``output`` exists (without ``overwrite``) or is the model.
    InputError
        As :func:`simulate_template`.
    """
    from dtm.io.mrc import write_map  # noqa: PLC0415

    out = sys.stdout if out is None else out
    output = Path(output)
    if output.exists() and output.resolve() == Path(model).resolve():
        raise OutputError(f"--output {output}: is the model file")
    if output.exists() and not overwrite:
        raise OutputError(f"--output {output}: exists; add --overwrite to replace it")
    simulate = functools.partial(
        simulate_template,
        model,
        pixel_size=pixel_size,
        box=box,
        voltage=voltage,
        settings=settings,
    )
    if scheduler_address:
        from dtm.runtime.cluster import connect  # noqa: PLC0415

        with connect(scheduler_address=scheduler_address, quiet=True) as client:
            volume, record = simulate(executor=client.get_executor(pure=False))
    else:
        with _threads() as (executor, threads):
            volume, record = simulate(executor=executor, threads=threads)
    write_map(output, volume, pixel_size=pixel_size)
    waters = "left out" if not settings.waters else "kept"
    print(
        f"template: {record['atoms']:,} atoms ({record['hydrogens_left_out']} hydrogens left "
        f"out, {record['water_atoms']} water atoms {waters}) → {output}: {record['box']}³ "
        f"voxels of {record['pixel_size']:g} Å, oversampled {record['oversampling']}×",
        file=out,
    )
    return record
