"""The correlation table of a search: every correlation above a cut-off (``outputs.md``).

While a chunk is searched, :class:`TableCollector` keeps, besides the statistics, each
(position, global search index) whose correlation exceeds the cut-off, without a second
pass over the maps where it can (:func:`dtm.search.stats.update_with_table`):

- with numba, the compiled statistics update also flags each map row that holds a value
  above the cut-off (:func:`dtm.search.fused.numba_update_flagged`), and only the
  flagged rows are read again;
- otherwise (numpy, cupy) the statistics are updated as without a table, and the
  positions whose running MIP now exceeds the cut-off are the only candidates (a value
  above it at ``(y, x)`` raised the MIP there above it too), read back from the batch's
  maps; where the candidates are many (a low cut-off) the batch is thresholded directly.

All give the rows in search order: global index, then ``y``, then ``x``; concatenated over
chunks in search order, the table of a micrograph does not depend on how the search was
split.

The rows travel with the chunk's :class:`~dtm.search.stats.PartialStats` (and its
checkpoints), so resumed and retried searches give the same table; the task that writes a
micrograph's maps writes its table (:func:`dtm.io.correlation_table.write_table`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dtm.backend import get_xp, to_numpy
from dtm.errors import ConfigError
from dtm.search import fused

#: Candidate positions above which a batch is thresholded directly instead (a fraction of
#: the map's positions: gathering scattered values costs several times a streaming pass).
_DIRECT_FRACTION = 1 / 8


@dataclass
class TableRows:
    """Correlations above the cut-off, in search order (global index, ``y``, ``x``).

    Attributes
    ----------
    global_index : array
        int64 global search index ``g = o * n_defocus + d``.
    pos_y, pos_x : array
        int32 position in the map (top-left corner of the template box).
    correlation : array
        float32 correlation value (the same number as the maps').
    """

    global_index: Any
    pos_y: Any
    pos_x: Any
    correlation: Any

    FIELDS = ("global_index", "pos_y", "pos_x", "correlation")
    DTYPES = (np.int64, np.int32, np.int32, np.float32)

    @classmethod
    def empty(cls) -> TableRows:
        return cls(*(np.empty(0, dtype=t) for t in cls.DTYPES))

    def __len__(self) -> int:
        return int(self.global_index.shape[0])

    def to_numpy(self) -> TableRows:
        return TableRows(*(to_numpy(getattr(self, name)) for name in self.FIELDS))

    @classmethod
    def concat(cls, parts: list[TableRows]) -> TableRows:
        """The rows of ``parts`` one after the other (their order is kept)."""
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        xp = get_xp(parts[0].global_index)
        return cls(*(xp.concatenate([getattr(p, name) for p in parts]) for name in cls.FIELDS))

    def arrays(self) -> dict[str, Any]:
        """``{field: array}`` (as saved in checkpoints, prefixed ``table_``)."""
        return {name: getattr(self, name) for name in self.FIELDS}


class TableCollector:
    """Rows above ``cutoff`` of one chunk's maps, at most ``max_rows`` of them.

    Parameters
    ----------
    cutoff : float
        Correlations strictly above it are kept.
    max_rows : int
        More rows than this in the chunk is an error naming ``correlation_table.cutoff``.
    where : str
        The chunk, for that message (e.g. ``orientations 0–99``).
    """

    def __init__(self, cutoff: float, max_rows: int, where: str = "") -> None:
        self.cutoff = float(cutoff)
        self.max_rows = int(max_rows)
        self.where = where
        self._parts: list[TableRows] = []
        self._count = 0

    def add(self, maps: Any, running_mip: Any, first_index: int) -> None:
        """Keep the values above the cut-off of ``maps`` (``(n, Hm, Wm)``, global indices
        ``first_index …``), already folded into ``running_mip`` (the chunk's MIP)."""
        xp = get_xp(maps)
        cutoff = np.float32(self.cutoff)
        ys, xs = xp.nonzero(running_mip > cutoff)
        n_candidates = int(ys.shape[0])
        if n_candidates == 0:
            return
        if n_candidates > _DIRECT_FRACTION * running_mip.size:
            k, y, x = xp.nonzero(maps > cutoff)
            values = maps[k, y, x]
        else:
            gathered = maps[:, ys, xs]  # (n, candidates)
            k, c = xp.nonzero(gathered > cutoff)
            y, x, values = ys[c], xs[c], gathered[k, c]
        self._keep(k, y, x, values, first_index)

    def add_flagged(self, maps: np.ndarray, flags: np.ndarray, first_index: int) -> None:
        """As :meth:`add`, reading only the rows ``flags[k, y]`` marks (numpy maps)."""
        ks, ys = np.nonzero(flags)
        if ks.shape[0] == 0:
            return
        scan = fused.numba_flagged_values()
        cutoff = np.float32(self.cutoff)
        if scan is None:
            rows = maps[ks, ys, :]  # (flagged rows, Wm)
            r, x = np.nonzero(rows > cutoff)
            self._keep(ks[r], ys[r], x, rows[r, x], first_index)
            return
        # In place (no copy of the rows): the flagged rows are still in cache.
        source, width = fused.row_major(maps), int(maps.shape[2])
        ks, ys = ks.astype(np.int64), ys.astype(np.int64)
        capacity = 4 * width
        while True:
            out = (
                np.empty(capacity, np.int64),
                np.empty(capacity, np.int32),
                np.empty(capacity, np.int32),
                np.empty(capacity, np.float32),
            )
            count = scan(source, width, ks, ys, cutoff, *out)
            if count <= capacity:
                break
            capacity = count
        self._keep(out[0][:count], out[1][:count], out[2][:count], out[3][:count], first_index)

    def _keep(self, k: Any, y: Any, x: Any, values: Any, first_index: int) -> None:
        if int(k.shape[0]) == 0:
            return
        self._count += int(k.shape[0])
        if self._count > self.max_rows:
            where = f" ({self.where})" if self.where else ""
            raise ConfigError(
                f"correlation_table.cutoff: more than {self.max_rows:,} correlations above "
                f"{self.cutoff:g} in one task{where}; raise correlation_table.cutoff (or "
                "correlation_table.max_rows_per_task)"
            )
        self._parts.append(
            TableRows(
                k.astype(np.int64) + np.int64(first_index),
                y.astype(np.int32),
                x.astype(np.int32),
                values.astype(np.float32),
            )
        )

    def rows(self) -> TableRows:
        """Every row kept so far, in search order, on the device of the maps."""
        return TableRows.concat(self._parts) if self._parts else TableRows.empty()
