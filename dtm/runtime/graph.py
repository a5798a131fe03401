"""The Dask graph of one micrograph's search: correlate leaves and a merge tree.

Leaves ``("correlate-TOKEN", i)`` each compute one chunk. Merges ``("merge-TOKEN", level, i)``
combine ``split_every`` children in a fixed order, so the tree (and therefore every float64
sum) is the same however many workers run it and whether or not it was resumed. The merges
of the first level persist their result as a checkpoint; on resume a finished first-level
group is loaded instead of recomputed. The tree is submitted as one graph so that
``dask.order`` runs it depth first, which keeps worker memory bounded by a few maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
from dask.delayed import Delayed

from dtm.runtime import tasks


def checkpoint_file(checkpoint_dir: Path, group: int) -> Path:
    """Path of the checkpoint of first-level group ``group``."""
    return checkpoint_dir / f"group-{group:06d}.npz"


def leaves_to_compute(n_chunks: int, split_every: int, checkpoint_dir: Path | None) -> int:
    """Correlate tasks that :func:`search_graph` will hold: those without a checkpoint."""
    groups = range(0, n_chunks, split_every)
    return sum(
        min(split_every, n_chunks - first)
        for group, first in enumerate(groups)
        if checkpoint_dir is None or not checkpoint_file(checkpoint_dir, group).exists()
    )


def search_graph(
    key: str,
    image: Any,
    template: Any,
    space: Any,
    chunks: list[tuple[int, int]],
    *,
    split_every: int,
    checkpoint_dir: Path | None,
    device: str = "cpu",
    table: tuple[float, int] | None = None,
) -> Delayed:
    """The merge tree of one micrograph's search.

    Parameters
    ----------
    key : str
        Token of this run and micrograph, used in every task key.
    image, template, space
        Delayed objects or futures of the micrograph inputs, the prepared template and the
        :class:`~dtm.search.space.SearchSpace`.
    chunks : list of (int, int)
        Orientation ranges, one task each.
    split_every : int
        Children per merge (≥ 2).
    checkpoint_dir : Path or None
        Where first-level merges persist their result; existing files are loaded instead of
        recomputed.
    table : (float, int) or None
        ``(cutoff, max_rows)`` of the correlation table, passed to every correlate task
        (the rows then travel with the statistics and their checkpoints).

    Returns
    -------
    Delayed
        The root (complete :class:`~dtm.search.stats.PartialStats`); its correlate tasks,
        those not covered by checkpoints, number :func:`leaves_to_compute`.
    """
    level: list[Delayed] = []
    for group, first in enumerate(range(0, len(chunks), split_every)):
        members = range(first, min(first + split_every, len(chunks)))
        path = None if checkpoint_dir is None else checkpoint_file(checkpoint_dir, group)
        if path is not None and path.exists():
            node = dask.delayed(tasks.load_checkpoint)(
                str(path), dask_key_name=(f"load-{key}", group)
            )
        else:
            leaves = [
                dask.delayed(tasks.correlate)(
                    image,
                    template,
                    space,
                    *chunks[i],
                    device,
                    *(() if table is None else (table,)),
                    dask_key_name=(f"correlate-{key}", i),
                )
                for i in members
            ]
            node = dask.delayed(tasks.merge)(
                *leaves,
                checkpoint=None if path is None else str(path),
                dask_key_name=(f"merge-{key}", 1, group),
            )
        level.append(node)
    depth = 1
    while len(level) > 1:
        depth += 1
        level = [
            dask.delayed(tasks.merge)(
                *level[i : i + split_every], dask_key_name=(f"merge-{key}", depth, i // split_every)
            )
            for i in range(0, len(level), split_every)
        ]
    return level[0]
