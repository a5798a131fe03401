"""The last task of a micrograph's search: finalise its statistics and write its results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dtm.io.correlation_table import write_table
from dtm.io.store import build_dataset, export_maps, write_dataset
from dtm.search.space import SearchSpace
from dtm.search.stats import PartialStats, finalise
from dtm.search.table import TableRows


def persist(
    stats: PartialStats,
    space: SearchSpace,
    *,
    output_dir: str,
    group: str | None,
    prefix: str,
    pixel_size: float,
    attrs: dict[str, Any],
    extra_paths: dict[str, str] | None = None,
    table_path: str | None = None,
) -> None:
    """Finalise the maps, write the `.mrc` files and the zarr dataset.

    With ``table_path``, the correlation table's rows that came with ``stats`` are written
    there first (:func:`dtm.io.correlation_table.write_table`), so that a micrograph whose
    maps are written always has its table.
    """
    maps = finalise(stats, space)
    out = Path(output_dir)
    if table_path is not None:
        rows = stats.table if stats.table is not None else TableRows.empty()
        write_table(rows, space, str(attrs["micrograph_name"]), table_path)
    map_paths = export_maps(
        maps, out / "maps", pixel_size=pixel_size, prefix=prefix, extra_paths=extra_paths
    )
    attrs = {**attrs, "map_paths": map_paths, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    dataset = build_dataset(maps, pixel_size=pixel_size, attrs=attrs)
    write_dataset(dataset, out / "results.zarr", group)
