"""The refine-template program: local refinement of particles, one dask partition per micrograph.

``refine_template`` reads a results table of ``dtm match``/``dtm peaks`` and re-searches every
particle locally (conventions.md#refinement): rotation offsets covering every rotation within the
coarse steps at the fine steps (``R_new = R_start @ R_offset``), relative defocus
offsets around the particle's value, and a few pixels of position. The micrograph is filtered
and normalised as the match search does it, so ``refined_mip`` is on the scale of ``mip`` and
``refined_scaled_mip`` uses the search's per-pixel mean and variance at the refined position.

The table becomes a dask dataframe with one partition per micrograph (each reads and filters
its micrograph once, on a worker); ``map_partitions`` runs
:func:`dtm.programs.refine_partition.refine_partition` with the template prepared once
(a single ``refine-prepare-template`` task whose result every worker fetches).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd

from dtm.config import RefineConfig, load_refine_config
from dtm.errors import ConfigError, InputError, OutputError
from dtm.io.mrc import pixel_sizes_differ, read_template
from dtm.io.rundir import check_writable
from dtm.io.tables import STD_READ, read_table, write_table
from dtm.programs.refine_partition import (
    REFINED_DTYPES,
    RefineSettings,
    refine_partition,
    start_columns,
)
from dtm.runtime import tasks
from dtm.runtime.cluster import session
from dtm.runtime.progress import format_duration

__all__ = [
    "REFINED_DTYPES",
    "refine_dataframe",
    "refine_settings",
    "refine_template",
    "refined_meta",
]


def refine_settings(config: RefineConfig, template_box: int) -> RefineSettings:
    """The local search of a refine configuration for a template of ``template_box`` px
    (read from ``config.template_volume_path``).

    Raises
    ------
    ConfigError
        ``particle_stack.extracted_box_size`` smaller than the template.
    """
    by, bx = (int(n) for n in config.particle_stack.extracted_box_size)
    if by < template_box or bx < template_box:
        raise ConfigError(
            f"{config.template_volume_path}: the template box {template_box} px is larger than "
            f"particle_stack.extracted_box_size ({by}, {bx})"
        )
    # By default every position of the box: ± half the margin around the particle.
    margin = ((by - template_box) // 2, (bx - template_box) // 2)
    wanted = config.position_search_pixels
    radius = margin if wanted is None else (min(wanted, margin[0]), min(wanted, margin[1]))
    orientation = config.orientation_refinement_config
    steps = None
    if orientation.enabled:
        steps = (
            orientation.theta_step_coarse,
            orientation.theta_step_fine,
            orientation.psi_step_coarse,
            orientation.psi_step_fine,
        )
    return RefineSettings(
        box_size=(by, bx),
        radius=radius,
        orientation_steps=steps,
        defocus_offsets=config.defocus_refinement_config.values(),
        filters=config.preprocessing_filters,
        global_filtering=config.apply_global_filtering,
    )


def refined_meta(table: pd.DataFrame) -> pd.DataFrame:
    """Empty frame with the columns and dtypes of the refined table (the dask ``meta``)."""
    kept = table.iloc[:0].drop(columns=[name for name in REFINED_DTYPES if name in table])
    return kept.assign(**{name: pd.Series([], dtype=d) for name, d in REFINED_DTYPES.items()})


def _check_table(table: pd.DataFrame, path: Path, template_pixel_size: float) -> None:
    """Problems the workers would only meet later: missing files, pixel-size mismatch."""
    for column in ("micrograph_path", "correlation_average_path", "correlation_variance_path"):
        files = table[column].fillna("").astype(str)
        empty = files.str.len() == 0
        if empty.any():
            raise InputError(f"{path}: column {column} is empty in row {int(np.argmax(empty))}")
    # (Missing .mrc statistics maps are read from the results.zarr beside them instead.)
    for name in table["micrograph_path"].astype(str).unique():
        if not Path(name).is_file():
            raise InputError(f"{path}: micrograph_path {name}: file not found")
    for name in start_columns(table).values():
        if table[name].isna().any():
            raise InputError(f"{path}: column {name} has missing values")
    pixel_size = table["pixel_size"].to_numpy(dtype=np.float64)
    off = pixel_sizes_differ(pixel_size, template_pixel_size)
    if off.any():
        raise InputError(
            f"{path}: pixel size {pixel_size[off][0]} Å of the particles differs from the "
            f"template's {template_pixel_size} Å (another template, or a search with "
            "high_resolution_limit, whose positions are at the cropped pixel size)"
        )


def _micrograph_partitions(table: pd.DataFrame) -> dd.DataFrame:
    """The table as a dask dataframe, one partition per micrograph (first-seen order)."""
    groups = table.groupby("micrograph_path", sort=False).indices
    parts = [table.iloc[rows] for rows in groups.values()]
    # Keep pandas' own string dtype, as the peak tables do, not dask's pyarrow strings.
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_map(
            _partition, parts, meta=table.iloc[:0], label="refine-particles", enforce_metadata=False
        )


def _partition(part: pd.DataFrame) -> pd.DataFrame:
    return part


def refine_dataframe(
    table: pd.DataFrame, template_path: str | Path, settings: RefineSettings
) -> dd.DataFrame:
    """The lazy refined table: ``map_partitions`` of :func:`refine_partition` per micrograph.

    Parameters
    ----------
    table : pandas.DataFrame
        Peak table (seed columns).
    template_path : str or Path
        Template ``.mrc``; read and prepared by one task, shared by every partition.
    settings : RefineSettings
        The local search.

    Returns
    -------
    dask.dataframe.DataFrame
        One partition per micrograph, columns of :func:`refined_meta`, the table's index.
    """
    template = dask.delayed(tasks.load_template)(
        str(template_path), dask_key_name="refine-prepare-template"
    )
    with dask.config.set({"dataframe.convert-string": False}):
        return _micrograph_partitions(table).map_partitions(
            refine_partition,
            template,
            settings,
            meta=refined_meta(table),
            align_dataframes=False,
            enforce_metadata=False,
        )


def refine_template(
    config: RefineConfig | str | Path,
    client: distributed.Client | None = None,
    *,
    scheduler_address: str | None = None,
    n_workers: int | None = None,
    overwrite: bool = False,
    out: TextIO = sys.stdout,
) -> pd.DataFrame:
    """Refine the particles of a results table on a Dask cluster (``dtm refine``).

    Parameters
    ----------
    config : RefineConfig or path
        Validated configuration, or the path of its YAML file.
    client : distributed.Client, optional
        Client of a running cluster; by default the configuration's ``cluster`` section (an
        embedded ``LocalCluster`` unless it says otherwise) is started and closed here.
    scheduler_address, n_workers
        Overrides of the ``cluster`` section (command-line options).
    overwrite : bool
        Replace refined tables already at ``output_path`` (``--overwrite``).
    out : file
        Where the summary lines are printed.

    Returns
    -------
    pandas.DataFrame
        The input table (same rows, order and index) with :data:`REFINED_DTYPES` appended
        (replacing earlier refined columns). Also written to ``output_path`` and beside it
        (same stem: ``.csv``, ``.parquet/``, ``.star``, replaced together).

    Raises
    ------
    InputError, ConfigError
        Missing or bad table, template or micrograph; template box larger than the boxes.
    OutputError
        ``output_path`` cannot be written, or holds refined tables and not ``overwrite``;
        checked before anything is computed.
    """
    if not isinstance(config, RefineConfig):
        config = load_refine_config(config)
    t0 = time.perf_counter()
    output = Path(config.output_path)
    _check_output(output, overwrite)
    table_path = Path(config.particle_stack.df_path)
    table = read_table(table_path)
    if table.attrs.get(STD_READ):
        print(
            f"notice: {table_path}: correlation_variance holds the standard deviation "
            "(Leopard-EM's convention): read as such",
            file=out,
        )
    template = read_template(config.template_volume_path)
    box = int(template.data.shape[-1])
    settings = refine_settings(config, box)
    _check_table(table, table_path, template.pixel_size)
    n_micrographs = table["micrograph_path"].nunique()
    n_offsets = len(settings.offsets()) * len(settings.defocus_offsets)
    print(
        f"refine: {len(table)} particle(s) in {n_micrographs} micrograph(s); "
        f"{n_offsets:,} orientation × defocus candidates per particle, positions ± "
        f"{settings.radius[0]} px",
        file=out,
    )
    if table.empty:
        result = refined_meta(table)
    else:
        with session(
            client,
            config.cluster,
            out=out,
            scheduler_address=scheduler_address,
            n_workers=n_workers,
        ) as client:
            graph = refine_dataframe(table, config.template_volume_path, settings)
            result = client.compute(graph).result().loc[table.index]
    write_table(result, output.parent, output.stem)
    again = start_columns(table)["pos_y"] == "refined_pos_y" and "refined_scaled_mip" in table
    before = table["refined_scaled_mip" if again else "scaled_mip"]
    _summary(result, before, time.perf_counter() - t0, output, out)
    return result


def _check_output(output: Path, overwrite: bool) -> None:
    """Fail before the search, not after it, on an output path that will not be written."""
    check_writable(output.parent, "output_path")
    earlier = [output.with_suffix(s) for s in (".csv", ".parquet", ".star")]
    existing = [path for path in earlier if path.exists()]
    if existing and not overwrite:
        raise OutputError(
            f"output_path {existing[0]}: refined tables exist; use --overwrite to replace them"
        )


def _summary(
    result: pd.DataFrame, before: pd.Series, wall: float, output: Path, out: TextIO
) -> None:
    """One line: time, median scaled MIP before → after, padded boxes, files written."""
    if result.empty:
        print(f"no particles; wrote {output.with_suffix('.csv')}", file=out)
        return
    print(
        f"refined in {format_duration(wall)}: median scaled MIP {before.median():.2f} → "
        f"{result['refined_scaled_mip'].median():.2f}; "
        f"{int((~result['refined_box_inside']).sum())} box(es) padded at the edge; wrote "
        f"{output.with_suffix('.csv')} (and .parquet, .star)",
        file=out,
    )
