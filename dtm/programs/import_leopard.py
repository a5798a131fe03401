"""``dtm import-leopard``: Leopard-EM's results become a dtm output directory.

Leopard-EM's ``match_template`` writes eight maps (``.mrc``, paths of the user's choosing,
named in its configuration and in every row of its results table) and a CSV table of its
peaks. From either the table or the configuration, this program reads the maps of each
micrograph and writes what ``dtm match`` would have written: ``OUTPUT_DIR/results.zarr``
(one dataset, or one group per micrograph), the maps in ``OUTPUT_DIR/maps/`` and a
``job.json`` naming the outputs (so that ``--overwrite`` later removes exactly them). Then
``dtm peaks``, ``dtm report``, ``dtm browse`` and ``dtm refine`` work on it as on a dtm run.

What changes on the way: Leopard-EM's ``correlation_variance`` map holds the standard
deviation; it is recognised (:func:`dtm.io.leopard.holds_std`) and squared into dtm's
variance. Everything else is copied. The datasets' attributes say where they came from
(``imported_from``, ``leopard_em_version``, ``import_source``, ``import_maps``).

Relative paths in a table or configuration are taken from the working directory, as
Leopard-EM takes them; one that names nothing there is taken from the folder of the file
that names it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pydantic
import yaml

import dtm
from dtm.config.filters import PreprocessingFilters
from dtm.config.search import DefocusSearchConfig, OrientationConfig
from dtm.errors import InputError, OutputError
from dtm.io.leopard import MAP_PATH_COLUMNS, RESULT_MAP_FIELDS, holds_std
from dtm.io.mrc import read_shape, read_statistics_map
from dtm.io.rundir import (
    check_inputs_not_outputs,
    check_output_dir,
    check_writable,
    clear_outputs,
    has_results,
    micrograph_outputs,
    read_job,
    write_job,
)
from dtm.io.store import build_dataset, export_maps, write_dataset
from dtm.io.tables import read_table
from dtm.physics.aberrations import as_mag_matrix, as_zernikes
from dtm.schema import JOB_FILE

#: Optics of a micrograph (the seed's columns, Leopard-EM's ``optics_group`` keys) → the
#: default of Leopard-EM's ``OpticsGroup`` (None: required).
OPTICS: dict[str, float | None] = {
    "defocus_u": None,
    "defocus_v": None,
    "astigmatism_angle": None,
    "pixel_size": None,
    "voltage": None,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "phase_shift": 0.0,
    "ctf_B_factor": 0.0,
}


@dataclass(frozen=True)
class LeopardMicrograph:
    """What Leopard-EM's files say about the search of one micrograph."""

    name: str
    micrograph_path: Path
    template_path: Path
    maps: dict[str, Path]  # dtm map name → Leopard-EM's .mrc
    optics: dict[str, Any]  # OPTICS, and the aberrations when set
    total_correlations: int
    source: Path
    leopard_em_version: str = "unknown"
    total_orientations: int | None = None
    total_defocus: int | None = None
    filters: dict[str, Any] | None = None  # preprocessing_filters of a configuration


def _path(text: Any, base: Path, what: str) -> Path:
    """A path of a Leopard-EM file: from the working directory, else from ``base``."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what}: missing (got {text!r})")
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists():
        return path.absolute()
    beside = base / path
    return beside if beside.exists() else path.absolute()


def _optics(values: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """The optics of a table row or an ``optics_group``, aberrations as dict / list."""
    optics: dict[str, Any] = {}
    for name, default in OPTICS.items():
        value = values.get(name)
        try:
            optics[name] = float(default if value is None else value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InputError(f"{source}: {name}: missing or not a number (got {value!r})") from None
    for name in ("even_zernikes", "odd_zernikes"):
        zernikes = as_zernikes(values.get(name), kind=name.split("_")[0])
        if zernikes is not None:
            optics[name] = dict(zernikes)
    mag_matrix = as_mag_matrix(values.get("mag_matrix"))
    if mag_matrix is not None:
        optics["mag_matrix"] = list(mag_matrix)
    return optics


def from_table(path: Path) -> list[LeopardMicrograph]:
    """One :class:`LeopardMicrograph` per micrograph of a Leopard-EM results table."""
    table = read_table(path)
    missing = [name for name in MAP_PATH_COLUMNS if name not in table]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    if table.empty:
        raise InputError(f"{path}: no rows (import the configuration instead)")
    base = path.parent
    found = []
    for _, rows in table.groupby("micrograph_path", sort=False):
        row = rows.iloc[0]
        maps = {
            name: _path(row[column], base, f"{path}: {column}")
            for column, name in MAP_PATH_COLUMNS.items()
        }
        found.append(
            LeopardMicrograph(
                name=str(row["micrograph_name"]),
                micrograph_path=_path(row["micrograph_path"], base, f"{path}: micrograph_path"),
                template_path=_path(row["template_path"], base, f"{path}: template_path"),
                maps=maps,
                optics=_optics(row, path),
                total_correlations=int(row["total_correlations"]),
                source=path,
            )
        )
    return found


def _search_counts(data: Mapping[str, Any], path: Path) -> tuple[int, int]:
    """Orientations and defocus planes of a configuration's search (dtm's grids)."""
    try:
        grid = pydantic.TypeAdapter(OrientationConfig).validate_python(
            data.get("orientation_search_config") or {}
        )
        defocus = DefocusSearchConfig.model_validate(data.get("defocus_search_config") or {})
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InputError(f"{path}: {where}: {first['msg']}") from None
    return len(grid.grid()), len(defocus.values())


def from_config(path: Path) -> list[LeopardMicrograph]:
    """The :class:`LeopardMicrograph` of a Leopard-EM ``match_template`` configuration."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InputError(f"{path}: not a readable YAML file ({error})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a Leopard-EM match_template configuration")
    result = data.get("match_template_result") or {}
    if "hdf5_path" in result and "mip_path" not in result:
        raise InputError(
            f"{path}: match_template_result: HDF5 results are not read by dtm; export the "
            "maps as .mrc (MatchTemplateResultMRC) and import those"
        )
    base = path.parent
    maps = {
        name: _path(result.get(field), base, f"{path}: match_template_result.{field}")
        for field, name in RESULT_MAP_FIELDS.items()
    }
    optics_group = data.get("optics_group") or {}
    total = int(result.get("total_projections") or 0)
    n_orientations, n_defocus = result.get("total_orientations"), result.get("total_defocus")
    if not total:  # written only once Leopard-EM has run: count the grid (dtm's count)
        n_orientations, n_defocus = _search_counts(data, path)
        total = n_orientations * n_defocus
    micrograph = _path(data.get("micrograph_path"), base, f"{path}: micrograph_path")
    filters = data.get("preprocessing_filters")
    return [
        LeopardMicrograph(
            name=micrograph.stem,
            micrograph_path=micrograph,
            template_path=_path(data.get("template_volume_path"), base, f"{path}: template"),
            maps=maps,
            optics=_optics(optics_group, path),
            total_correlations=total,
            source=path,
            leopard_em_version=str(result.get("leopard_em_version") or "unknown"),
            total_orientations=int(n_orientations) if n_orientations else None,
            total_defocus=int(n_defocus) if n_defocus else None,
            filters=filters if isinstance(filters, dict) else None,
        )
    ]


def read_source(path: str | Path) -> list[LeopardMicrograph]:
    """The micrographs named by a Leopard-EM results table (``.csv``) or configuration
    (``.yaml``/``.yml``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        return from_table(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return from_config(path)
    raise InputError(
        f"{path}: expected a Leopard-EM results table (.csv) or match_template configuration "
        "(.yaml)"
    )


def _geometry(item: LeopardMicrograph, shape: tuple[int, ...]) -> dict[str, Any]:
    """Template box, image shape and correlation mode of maps of ``shape``."""
    template = read_shape(item.template_path, "template")
    box = int(template[-1])
    if item.micrograph_path.is_file():
        height, width = (int(n) for n in read_shape(item.micrograph_path, "micrograph")[-2:])
    else:  # Leopard-EM 1.3's maps are valid-mode maps
        height, width = shape[0] + box - 1, shape[1] + box - 1
    if tuple(shape) == (height - box + 1, width - box + 1):
        mode = "valid"
    elif tuple(shape) == (height, width):
        mode = "same"  # Leopard-EM before 1.3 wrote uncropped maps
    else:
        raise InputError(
            f"{item.maps['mip']}: map shape {tuple(shape)} fits neither the valid "
            f"({height - box + 1}, {width - box + 1}) nor the full ({height}, {width}) "
            f"positions of micrograph {item.micrograph_path} with the {box} px template"
        )
    return {
        "template_shape": [box] * 3,
        "image_shape": [height, width],
        "correlation_mode": mode,
    }


def _dtm_filters(item: LeopardMicrograph, out: TextIO) -> dict[str, Any] | None:
    """The configuration's filters as dtm reads them (to remake the search's projections,
    :mod:`dtm.programs.search_model`); None when absent or not readable by dtm."""
    if item.filters is None:
        return None
    try:
        return PreprocessingFilters.model_validate(item.filters).model_dump(mode="json")
    except pydantic.ValidationError as error:
        print(
            f"notice: {item.source}: preprocessing_filters not read by dtm "
            f"({error.errors()[0]['msg']}); its defaults are used to merge side maxima",
            file=out,
        )
        return None


def read_maps(item: LeopardMicrograph) -> tuple[dict[str, np.ndarray], bool]:
    """The eight maps of one micrograph with dtm's meanings, and whether the file of
    ``correlation_variance`` held the standard deviation (then squared)."""
    maps = {name: read_statistics_map(path) for name, path in item.maps.items()}
    shapes = {name: data.shape for name, data in maps.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(
            f"{item.source}: the maps of {item.name} differ in shape "
            + ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        )
    statistic = maps["correlation_variance"]
    std = holds_std(maps["mip"], maps["scaled_mip"], maps["correlation_mean"], statistic)
    if std:
        maps["correlation_variance"] = np.square(statistic, dtype=np.float32)
    return maps, std


def dataset_attrs(
    item: LeopardMicrograph, geometry: dict[str, Any], filters: dict[str, Any] | None
) -> dict[str, Any]:
    """The attributes of a dtm results dataset (docs/architecture.md) for ``item``."""
    pixel_size = float(item.optics["pixel_size"])
    counts = {"total_orientations": item.total_orientations, "total_defocus": item.total_defocus}
    config = {"imported_from": "Leopard-EM", "peaks": {}}
    if filters is not None:
        config["preprocessing_filters"] = filters
    return {
        "micrograph_name": item.name,
        "micrograph_path": str(item.micrograph_path),
        "template_path": str(item.template_path),
        "pixel_size": pixel_size,
        "axis_pixel_size": [pixel_size, pixel_size],
        "original_pixel_size": pixel_size,
        "high_resolution_limit": None,
        **geometry,
        **{name: value for name, value in counts.items() if value is not None},
        "total_correlations": item.total_correlations,
        **item.optics,
        "config": json.dumps(config),
        "dtm_version": dtm.__version__,
        "imported_from": "Leopard-EM",
        "leopard_em_version": item.leopard_em_version,
        "import_source": str(item.source),
        "import_maps": {name: str(path) for name, path in item.maps.items()},
        "import_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_names(items: list[LeopardMicrograph]) -> None:
    seen: dict[str, Path] = {}
    for item in items:
        if item.name in seen:
            raise InputError(
                f"{item.source}: micrograph name {item.name!r} also comes from "
                f"{seen[item.name]} (two micrographs with one file name)"
            )
        seen[item.name] = item.source


def _inputs(sources: Iterable[Path], items: list[LeopardMicrograph]) -> list[Path]:
    paths = list(sources)
    for item in items:
        paths += [item.micrograph_path, item.template_path, *item.maps.values()]
    return paths


def import_leopard(
    sources: list[str | Path],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    out: TextIO = sys.stdout,
) -> list[str]:
    """Turn Leopard-EM's results into a dtm output directory (``dtm import-leopard``).

    Parameters
    ----------
    sources
        Leopard-EM results tables (``.csv``, one or more micrographs each) and/or
        ``match_template`` configurations (``.yaml``).
    output_dir
        The output directory to write (created if missing).
    overwrite
        Replace the results already in ``output_dir`` (only the outputs its ``job.json``
        records are removed).
    out
        Where notices and the summary line are printed.

    Returns
    -------
    list of str
        The imported micrograph names.

    Raises
    ------
    InputError
        A source, map, micrograph or template is missing or does not fit.
    OutputError
        ``output_dir`` holds results and not ``overwrite``, is not writable, or an input
        lies where an output goes.
    """
    paths = [Path(source) for source in sources]
    items = [item for path in paths for item in read_source(path)]
    _check_names(items)
    directory = Path(output_dir)
    check_output_dir(directory)
    single = len(items) == 1
    outputs = [JOB_FILE, "results.zarr" if single else "results.zarr/zarr.json"]
    for item in items:
        outputs += micrograph_outputs(item.name, single)
    inputs = _inputs(paths, items)
    check_inputs_not_outputs(directory, outputs, inputs)
    if has_results(directory) and not overwrite:
        raise OutputError(
            f"output_dir {directory}: holds results already; use --overwrite to replace them"
        )
    check_writable(directory)
    # Everything is read and checked before anything is written or removed.
    loaded = []
    for item in items:
        maps, std = read_maps(item)
        shape = next(iter(maps.values())).shape
        loaded.append((item, maps, std, _geometry(item, shape), _dtm_filters(item, out)))
    if overwrite:
        clear_outputs(directory, read_job(directory), inputs)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"import-leopard": {"sources": [str(p) for p in paths]}}
    write_job(directory, record, {"imported_from": "Leopard-EM"}, outputs)
    for item, maps, std, geometry, filters in loaded:
        prefix = "" if single else f"{item.name}_"
        pixel_size = float(item.optics["pixel_size"])
        attrs = dataset_attrs(item, geometry, filters)
        attrs["map_paths"] = export_maps(
            maps, directory / "maps", pixel_size=pixel_size, prefix=prefix
        )
        dataset = build_dataset(maps, pixel_size=pixel_size, attrs=attrs)
        write_dataset(dataset, directory / "results.zarr", None if single else item.name)
        meaning = "standard deviation, squared" if std else "already the variance, kept"
        print(f"imported {item.name}: correlation_variance {meaning}", file=out)
    print(
        f"{len(items)} micrograph(s) imported from Leopard-EM into {directory}/results.zarr; "
        f"pick peaks with: dtm peaks {directory}",
        file=out,
    )
    return [item.name for item in items]


__all__ = ["LeopardMicrograph", "import_leopard", "read_maps", "read_source"]
