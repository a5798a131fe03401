"""The correlation table on disk: one parquet file per micrograph, read as a dask dataframe.

``OUTPUT_DIR/correlation_table.parquet/`` is a parquet dataset with one file per micrograph
(``NAME.parquet``), written by the task that writes the micrograph's maps from the rows its
search tasks collected (:mod:`dtm.search.table`). :func:`read_correlation_table` opens it as
a dask dataframe (one partition per micrograph); :func:`export_correlation_table` merges it
into the single file of Leopard-EM's ``match_template_result.correlation_table_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtm.io.atomic import write_atomic
from dtm.schema import TABLE_DIR

if TYPE_CHECKING:
    import dask.dataframe as dd
    import pyarrow as pa

    from dtm.search.space import SearchSpace
    from dtm.search.table import TableRows

#: The dataset's folder in the output directory.
#: Columns, in order: positions in map pixels (top-left corner of the template box, as the
#: maps' ``y``/``x``), angles in degrees, relative defocus in Å, the correlation, and the
#: global search index ``g = orientation * n_defocus + defocus plane``.
COLUMNS = (
    "micrograph_name",
    "pos_y",
    "pos_x",
    "phi",
    "theta",
    "psi",
    "relative_defocus",
    "correlation",
    "global_index",
)


def schema() -> pa.Schema:
    """The parquet schema of the table (pyarrow, imported on first use)."""
    import pyarrow as pa  # noqa: PLC0415 (only where a table is written or read)

    types = (pa.string(), pa.int32(), pa.int32(), *[pa.float32()] * 5, pa.int64())
    return pa.schema(list(zip(COLUMNS, types, strict=True)))


def table_file(output_dir: str | Path, name: str) -> Path:
    """The file of micrograph ``name`` in the dataset."""
    return Path(output_dir) / TABLE_DIR / f"{name}.parquet"


def write_table(rows: TableRows, space: SearchSpace, name: str, path: str | Path) -> None:
    """Write one micrograph's rows, with their angles and defocus, atomically to ``path``."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    host = rows.to_numpy()
    orientation, defocus = space.decode(host.global_index)
    euler = space.euler[orientation].astype(np.float32)
    columns = {
        "micrograph_name": pa.array([name] * len(host), type=pa.string()),
        "pos_y": host.pos_y,
        "pos_x": host.pos_x,
        "phi": euler[:, 0],
        "theta": euler[:, 1],
        "psi": euler[:, 2],
        "relative_defocus": space.defocus[defocus].astype(np.float32),
        "correlation": host.correlation,
        "global_index": host.global_index,
    }
    table = pa.table(columns, schema=schema())
    write_atomic(Path(path), lambda tmp: pq.write_table(table, tmp))


def table_files(output_dir: str | Path) -> list[Path]:
    """The dataset's files, sorted by micrograph name."""
    folder = Path(output_dir) / TABLE_DIR
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def count_rows(path: str | Path) -> int:
    """Rows of one parquet file, from its footer (nothing else is read)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    return int(pq.ParquetFile(path).metadata.num_rows)


def read_correlation_table(output_dir: str | Path) -> dd.DataFrame:
    """The correlation table of a ``dtm match`` run as a lazy dask dataframe.

    Parameters
    ----------
    output_dir
        The run's output directory.

    Returns
    -------
    dask.dataframe.DataFrame
        One partition per micrograph (sorted by name) with the columns of :data:`COLUMNS`;
        within a micrograph, rows in search order (global index, then ``pos_y``, ``pos_x``).

    Raises
    ------
    FileNotFoundError
        The run kept no correlation table.
    """
    import dask.dataframe as dd  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    files = table_files(output_dir)
    if not files:
        raise FileNotFoundError(f"{Path(output_dir) / TABLE_DIR}: no correlation table")
    meta = schema().empty_table().to_pandas()
    return dd.from_map(pd.read_parquet, [str(f) for f in files], meta=meta)


def export_correlation_table(output_dir: str | Path, path: str | Path) -> int:
    """Merge the dataset into one parquet file at ``path``, a micrograph at a time.

    Returns the number of rows written. Memory holds one micrograph's rows at a time.
    """
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    frame = read_correlation_table(output_dir)
    table_schema = schema()
    written: list[int] = []

    def write(tmp: str) -> None:
        written.clear()
        with pq.ParquetWriter(tmp, table_schema) as writer:
            for part in frame.to_delayed():
                chunk = part.compute(scheduler="sync")
                writer.write_table(
                    pa.Table.from_pandas(chunk, preserve_index=False).cast(table_schema)
                )
                written.append(len(chunk))

    write_atomic(Path(path), write)
    return sum(written)
