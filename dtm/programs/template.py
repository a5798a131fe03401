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

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from dtm.errors import ConfigError, InputError, OutputError

if TYPE_CHECKING:
    from dtm.config.match import MatchConfig
    from dtm.config.template import TemplateSimulation
    from dtm.io.model import AtomicModel

#: The file a search simulates its template into, in its output directory.
TEMPLATE_FILE = "template.mrc"
#: cisTEM and ttsim3d blur each atom by this fraction of its B-factor (kept for agreement).
B_FACTOR_FRACTION = 0.25


def simulate_template(
    model_path: str | os.PathLike[str],
    *,
    pixel_size: float,
    box: int | None = None,
    voltage: float = 300.0,
    settings: TemplateSimulation | None = None,
    client: Any = None,
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
    client
        A ``distributed.Client`` to compute on (slabs of the fine grid as tasks), or None.
    threads
        Slabs computed at once here when there is no client.

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
    spectrum = potential.potential_spectrum(zyx, a, beta, grid, client=client, threads=threads)
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
    config: MatchConfig, *, resume: bool, overwrite: bool, out: TextIO | None = None
) -> MatchConfig:
    """The configuration a search runs with: its model's template in ``OUTPUT_DIR/template.mrc``.

    Without ``template_model_path`` the configuration is returned as it is. Otherwise the
    template is simulated at the search's pixel size and voltage, in a box of
    ``template_box`` voxels (default from the model's radius), before anything else of the
    run: the search validates, sizes and fingerprints it as any template. The file is written
    only where that is safe: a new output directory, the same template as the earlier run's
    (nothing written), or ``--overwrite``; a changed template refuses ``--resume``.

    Returns
    -------
    MatchConfig
        With ``template_volume_path`` the simulated file, ``template_box`` and
        ``template_simulation.oversampling`` resolved (so that ``job.json`` and the dataset
        attributes record every parameter).
    """
    from dtm.io.mrc import write_map  # noqa: PLC0415
    from dtm.jobfile import check_output_dir, has_results  # noqa: PLC0415

    if config.template_model_path is None:
        return config
    out = sys.stdout if out is None else out
    output_dir = Path(config.output_dir)
    check_output_dir(output_dir)
    optics = config.optics_group
    volume, record = simulate_template(
        config.template_model_path,
        pixel_size=optics.pixel_size,
        box=config.template_box,
        voltage=optics.voltage,
        settings=config.template_simulation,
        threads=_cores(),
    )
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


def _cores() -> int:
    from dtm.deployments import available_cpus  # noqa: PLC0415

    return available_cpus()


# ---------------------------------------------------------------------------------- command


def add_parser(sub: Any) -> None:
    """Add ``dtm template`` to the ``dtm`` command's subparsers."""
    from dtm.cli import _at_least, _number  # noqa: PLC0415

    parser = sub.add_parser(
        "template",
        help="simulate a template from an atomic model (PDB or mmCIF)",
        description="Simulate a template from an atomic model: the electrostatic potential "
        "from 5-Gaussian scattering factors (Peng 1996) with each atom's B-factor, centred "
        "on the model's centre (see docs/from-a-model.md).",
    )
    parser.add_argument("model", help="PDB or mmCIF file (.gz too)")
    parser.add_argument(
        "--pixel-size", type=_number(above=0), required=True, metavar="Å", help="voxel size"
    )
    parser.add_argument(
        "--box",
        type=_at_least(8),
        metavar="N",
        help="edge of the volume (default: the model's diameter plus 20 Å, even)",
    )
    parser.add_argument("--output", required=True, metavar="MRC", help="template file to write")
    parser.add_argument(
        "--voltage", type=_number(above=0), default=300.0, metavar="KV", help="default 300"
    )
    parser.add_argument(
        "--b-factor-scale", type=_number(), metavar="S", help="multiply the B-factors (1)"
    )
    parser.add_argument(
        "--add-b-factor", type=_number(), metavar="Å²", help="add to the B-factors (0)"
    )
    parser.add_argument(
        "--dose-weighting",
        type=_number(),
        nargs=2,
        metavar=("START", "END"),
        help="weight by the signal left over this exposure, e⁻/Å² (Grant & Grigorieff 2015)",
    )
    parser.add_argument("--mtf", metavar="FILE", help="multiply by this detector MTF (STAR)")
    parser.add_argument("--dqe", metavar="FILE", help="weight by √DQE of this curve")
    parser.add_argument(
        "--oversampling", type=_at_least(1), metavar="U", help="fine grid factor (auto)"
    )
    parser.add_argument("--no-waters", action="store_true", help="leave out water molecules")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", help="compute on this running dask scheduler"
    )
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> None:
    """``dtm template``: simulate and write the template; one line on what was written."""
    from dtm.config.base import validate_options  # noqa: PLC0415
    from dtm.config.template import TemplateSimulation  # noqa: PLC0415
    from dtm.io.mrc import write_map  # noqa: PLC0415

    given = {
        "b_factor_scaling": args.b_factor_scale,
        "additional_b_factor": args.add_b_factor,
        "dose_weighting": args.dose_weighting,
        "mtf_path": args.mtf and str(Path(args.mtf).absolute()),
        "dqe_path": args.dqe and str(Path(args.dqe).absolute()),
        "oversampling": args.oversampling,
        "waters": False if args.no_waters else None,
    }
    settings = validate_options(
        TemplateSimulation, {key: value for key, value in given.items() if value is not None}
    )
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        raise OutputError(f"--output {output}: exists; add --overwrite to replace it")
    if output.exists() and output.resolve() == Path(args.model).resolve():
        raise OutputError(f"--output {output}: is the model file")
    kwargs = {"pixel_size": args.pixel_size, "box": args.box, "voltage": args.voltage}
    if args.scheduler:
        from dtm.cluster import connect  # noqa: PLC0415

        with connect(scheduler_address=args.scheduler, quiet=True) as client:
            volume, record = simulate_template(
                args.model, **kwargs, settings=settings, client=client
            )
    else:
        volume, record = simulate_template(
            args.model, **kwargs, settings=settings, threads=_cores()
        )
    write_map(output, volume, pixel_size=args.pixel_size)
    print(
        f"template: {record['atoms']:,} atoms ({record['hydrogens_left_out']} hydrogens left "
        f"out, {record['water_atoms']} water atoms {'left out' if args.no_waters else 'kept'}) → "
        f"{output}: {record['box']}³ voxels of {record['pixel_size']:g} Å, oversampled "
        f"{record['oversampling']}×"
    )
