"""Partial statistics of a search, their merge and their final maps (conventions.md#statistics).

A :class:`PartialStats` covers a set of correlations (a chunk, or a merged subtree of
chunks): the per-position maximum with the global search index that produced it, and the
per-position sums of the correlation and its square in float64. The merge is associative and
commutative for the maximum and breaks ties on the lowest index, so any split of the search
and any reduction tree gives the same MIP and angle maps; the float64 sums agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dtm.backend import get_xp, to_numpy
from dtm.schema import MAP_NAMES
from dtm.search import fused
from dtm.search.space import SearchSpace
from dtm.search.table import TableCollector, TableRows


@dataclass
class PartialStats:
    """Statistics of ``count`` correlations at every position of the output map.

    Attributes
    ----------
    mip : array
        ``(Hm, Wm)`` float32, maximum correlation.
    best_index : array
        ``(Hm, Wm)`` int64, global search index of the maximum (lowest on ties).
    total : array
        ``(Hm, Wm)`` float64, sum of the correlations.
    total_sq : array
        ``(Hm, Wm)`` float64, sum of the squared correlations.
    count : int
        Number of correlations summed at every position.
    table : TableRows or None
        The correlations above the correlation table's cut-off, in search order; ``None``
        when the search keeps no table.
    """

    mip: Any
    best_index: Any
    total: Any
    total_sq: Any
    count: int
    table: TableRows | None = None

    @classmethod
    def empty(cls, shape: tuple[int, int], xp: Any = np) -> PartialStats:
        """Statistics of no correlation: the identity of :func:`merge`."""
        return cls(
            mip=xp.full(shape, -np.inf, dtype=np.float32),
            best_index=xp.full(shape, np.iinfo(np.int64).max, dtype=np.int64),
            total=xp.zeros(shape, dtype=np.float64),
            total_sq=xp.zeros(shape, dtype=np.float64),
            count=0,
        )

    def to_numpy(self) -> PartialStats:
        """A host copy (for merging on CPU workers, checkpoints and persistence)."""
        return PartialStats(
            to_numpy(self.mip),
            to_numpy(self.best_index),
            to_numpy(self.total),
            to_numpy(self.total_sq),
            self.count,
            None if self.table is None else self.table.to_numpy(),
        )

    def save(self, path: str) -> None:
        """Write to an ``.npz`` file (callers make it atomic)."""
        host = self.to_numpy()
        table = {} if host.table is None else host.table.arrays()
        with open(path, "wb") as f:
            np.savez(
                f,
                mip=host.mip,
                best_index=host.best_index,
                total=host.total,
                total_sq=host.total_sq,
                count=np.int64(host.count),
                **{f"table_{name}": array for name, array in table.items()},
            )

    @classmethod
    def load(cls, path: str) -> PartialStats:
        with np.load(path) as data:
            table = (
                TableRows(*(data[f"table_{name}"] for name in TableRows.FIELDS))
                if "table_global_index" in data.files
                else None
            )
            return cls(
                data["mip"],
                data["best_index"],
                data["total"],
                data["total_sq"],
                int(data["count"]),
                table,
            )


def update(stats: PartialStats, correlations: Any, first_index: int) -> None:
    """Fold a batch of correlation maps into ``stats`` in place.

    One pass over each map: a fused kernel (:mod:`dtm.search.fused`: CUDA for cupy arrays,
    numba on the CPU when it is installed) or the reference :func:`update_numpy`, which all
    give bit-identical results.

    Parameters
    ----------
    stats : PartialStats
        Running statistics, updated in place.
    correlations : array
        ``(n, Hm, Wm)`` float32, maps with global indices ``first_index + arange(n)``; any
        strides (e.g. a cropped view of an inverse FFT's output).
    first_index : int
        Global search index of ``correlations[0]``; must exceed every index already in
        ``stats`` so that the strict comparison keeps the lowest index on ties.
    """
    state = (stats.mip, stats.best_index, stats.total, stats.total_sq)
    if get_xp(correlations) is not np:
        if fused.cuda_update(correlations, int(first_index), *state):
            stats.count += int(correlations.shape[0])
            return
    elif numba_layout_ok(correlations, state):
        kernel = fused.numba_update()
        if kernel is not None:
            kernel(fused.row_major(correlations), int(first_index), *state)
            stats.count += int(correlations.shape[0])
            return
    update_numpy(stats, correlations, first_index)


def update_with_table(
    stats: PartialStats, correlations: Any, first_index: int, table: TableCollector
) -> None:
    """:func:`update`, keeping the values above ``table``'s cut-off too.

    The statistics are bit-identical to :func:`update`'s.
    """
    state = (stats.mip, stats.best_index, stats.total, stats.total_sq)
    if get_xp(correlations) is np and numba_layout_ok(correlations, state):
        kernel = fused.numba_update_flagged()
        if kernel is not None:
            flags = np.zeros(correlations.shape[:2], dtype=np.uint8)
            rows = fused.row_major(correlations)
            kernel(rows, int(first_index), *state, np.float32(table.cutoff), flags)
            stats.count += int(correlations.shape[0])
            table.add_flagged(correlations, flags, first_index)
            return
    update(stats, correlations, first_index)
    table.add(correlations, stats.mip, first_index)


def numba_layout_ok(correlations: Any, state: tuple[Any, ...]) -> bool:
    """Whether the arrays have the dtypes of the compiled CPU kernel's signature."""
    dtypes = (np.float32, np.int64, np.float64, np.float64)
    return (
        correlations.dtype == np.float32
        and correlations.ndim == 3
        and correlations.shape[1:] == state[0].shape
        and all(
            a.dtype == t and a.flags.c_contiguous and a.flags.writeable
            for a, t in zip(state, dtypes, strict=True)
        )
    )


def update_numpy(stats: PartialStats, correlations: Any, first_index: int) -> None:
    """Reference of :func:`update` in plain array operations (numpy or cupy).

    Map by map in search order: a strict ``>`` keeps the lowest index on ties; the value and
    its exact float64 square are added to the float64 sums.
    """
    xp = get_xp(correlations)
    shape = stats.mip.shape
    better = xp.empty(shape, dtype=bool)
    square = xp.empty(shape, dtype=np.float64)
    for k in range(int(correlations.shape[0])):
        cc = correlations[k]
        xp.greater(cc, stats.mip, out=better)
        xp.copyto(stats.mip, cc, where=better)
        xp.copyto(stats.best_index, np.int64(first_index + k), where=better)
        xp.add(stats.total, cc, out=stats.total)
        xp.multiply(cc, cc, out=square, dtype=np.float64)
        xp.add(stats.total_sq, square, out=stats.total_sq)
    stats.count += int(correlations.shape[0])


def merge(a: PartialStats, b: PartialStats) -> PartialStats:
    """Merge two partial statistics; ties in the maximum go to the lower search index.

    Correlation-table rows are concatenated, ``a``'s first: merging parts in search order
    keeps the rows in search order.
    """
    xp = get_xp(a.mip, b.mip)
    take_b = (b.mip > a.mip) | ((b.mip == a.mip) & (b.best_index < a.best_index))
    tables = [t for t in (a.table, b.table) if t is not None]
    return PartialStats(
        mip=xp.where(take_b, b.mip, a.mip),
        best_index=xp.where(take_b, b.best_index, a.best_index),
        total=a.total + b.total,
        total_sq=a.total_sq + b.total_sq,
        count=a.count + b.count,
        table=TableRows.concat(tables) if tables else None,
    )


def merge_all(parts: list[PartialStats]) -> PartialStats:
    """Merge a list of partial statistics from left to right (a fixed order)."""
    result = parts[0]
    for part in parts[1:]:
        result = merge(result, part)
    return result


def finalise(stats: PartialStats, space: SearchSpace) -> dict[str, np.ndarray]:
    """The eight statistics maps of conventions.md#statistics from complete partial statistics.

    Returns
    -------
    dict of str to numpy.ndarray
        ``(Hm, Wm)`` float32 maps named as :data:`MAP_NAMES`: ``correlation_variance`` is
        the variance (not the standard deviation); angles in degrees, defocus in Å.
    """
    host = stats.to_numpy()
    if host.count != space.n_correlations:
        raise ValueError(
            f"statistics cover {host.count} correlations, the search has {space.n_correlations}"
        )
    mean = host.total / host.count
    variance = np.maximum(host.total_sq / host.count - mean**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(variance > 0, (host.mip - mean) / np.sqrt(variance), 0.0)
    orientation, defocus = space.decode(host.best_index)
    euler = space.euler[orientation]
    maps = {
        "mip": host.mip,
        "scaled_mip": scaled,
        "correlation_mean": mean,
        "correlation_variance": variance,
        "phi": euler[..., 0],
        "theta": euler[..., 1],
        "psi": euler[..., 2],
        "defocus": space.defocus[defocus],
    }
    return {name: np.ascontiguousarray(maps[name], dtype=np.float32) for name in MAP_NAMES}
