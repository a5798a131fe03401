"""The graph of one micrograph: correlate leaves, merge tree, checkpoints."""

from __future__ import annotations

import dask
from dask.utils import key_split

from dtm.runtime.graph import checkpoint_file, leaves_to_compute, search_graph


def _correlate_keys(root) -> list:
    return [key for key in dict(root.__dask_graph__()) if key_split(key) == "correlate-k"]


def test_checkpointed_groups_have_no_correlate_tasks(tmp_path):
    chunks = [(i, i + 1) for i in range(10)]  # groups of 4: 4 + 4 + 2 leaves
    inputs = [dask.delayed(name, name=name) for name in ("image", "template", "space")]

    def graph():
        return search_graph("k", *inputs, chunks, split_every=4, checkpoint_dir=tmp_path)

    assert len(_correlate_keys(graph())) == leaves_to_compute(10, 4, tmp_path) == 10
    checkpoint_file(tmp_path, 1).write_bytes(b"")  # the second group is done
    assert len(_correlate_keys(graph())) == leaves_to_compute(10, 4, tmp_path) == 6
    checkpoint_file(tmp_path, 2).write_bytes(b"")  # and the last, shorter one
    assert len(_correlate_keys(graph())) == leaves_to_compute(10, 4, tmp_path) == 4
    assert leaves_to_compute(10, 4, None) == 10
