"""The correlation table: every correlation above a cut-off, against the maps it came with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import match_config, write_config, write_dataset
from distributed import Client, LocalCluster

import dtm.runtime.persist
from dtm.config import MatchConfig, load_match_config
from dtm.errors import ConfigError, OutputError
from dtm.io.correlation_table import COLUMNS, read_correlation_table, table_files
from dtm.programs.match import match_template
from dtm.search import fused
from dtm.search.stats import PartialStats, update_numpy, update_with_table
from dtm.search.table import TableCollector, TableRows

#: Low enough that thousands of noise correlations and whole particle footprints pass it.
CUTOFF = 4.0


def _collect_by_hand(batches: list[np.ndarray], cutoff: float) -> pd.DataFrame:
    """Every (global index, y, x, value) above the cut-off, by thresholding every map."""
    maps = np.concatenate(batches)
    k, y, x = np.nonzero(maps > np.float32(cutoff))
    return pd.DataFrame({"g": k, "y": y, "x": x, "v": maps[k, y, x]})


@pytest.mark.parametrize("cutoff", [3.0, 0.5])  # sparse candidates; the direct pass
def test_collector_keeps_exactly_the_values_above_the_cutoff_in_search_order(cutoff):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 30, 40), dtype=np.float32) for _ in range(6)]
    stats = PartialStats.empty((30, 40))
    collector = TableCollector(cutoff, max_rows=10**6)
    first = 0
    for batch in batches:
        cropped = np.pad(batch, ((0, 0), (0, 0), (2, 3)))[:, :, 2:42]  # a strided view
        update_numpy(stats, cropped, first)
        collector.add(cropped, stats.mip, first)
        first += batch.shape[0]
    rows = collector.rows()
    expected = _collect_by_hand(batches, cutoff)
    assert len(rows) == len(expected) > 0
    np.testing.assert_array_equal(rows.global_index, expected.g)
    np.testing.assert_array_equal(rows.pos_y, expected.y)
    np.testing.assert_array_equal(rows.pos_x, expected.x)
    np.testing.assert_array_equal(rows.correlation, expected.v)
    assert [a.dtype for a in rows.arrays().values()] == list(TableRows.DTYPES)


@pytest.mark.parametrize("cutoff", [4.5, 0.0])  # few rows; more than the first buffer holds
def test_compiled_flags_give_the_same_rows_and_bit_identical_statistics(cutoff):
    assert fused.numba_update_flagged() is not None  # numba is a dependency
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((3, 25, 33), dtype=np.float32) * 2 for _ in range(5)]
    compiled, reference = PartialStats.empty((25, 33)), PartialStats.empty((25, 33))
    flagged, candidates = TableCollector(cutoff, 10**6), TableCollector(cutoff, 10**6)
    first = 0
    for batch in batches:
        cropped = np.pad(batch, ((0, 0), (0, 0), (1, 6)))[:, :, 1:34]
        update_with_table(compiled, cropped, first, flagged)
        update_numpy(reference, cropped, first)
        candidates.add(cropped, reference.mip, first)
        first += batch.shape[0]
    for name in ("mip", "best_index", "total", "total_sq"):
        np.testing.assert_array_equal(getattr(compiled, name), getattr(reference, name))
    assert compiled.count == reference.count
    rows, expected = flagged.rows(), candidates.rows()
    assert len(rows) == len(_collect_by_hand(batches, cutoff)) > 0
    for name in TableRows.FIELDS:
        np.testing.assert_array_equal(getattr(rows, name), getattr(expected, name))


def test_collector_stops_with_a_line_naming_the_cutoff():
    maps = np.full((2, 3, 3), 9.0, dtype=np.float32)
    collector = TableCollector(5.5, max_rows=10, where="orientations 0–1")
    with pytest.raises(ConfigError, match=r"^correlation_table\.cutoff: more than 10 .*0–1"):
        collector.add(maps, maps.max(axis=0), 0)


def test_checkpoints_keep_the_rows(tmp_path):
    stats = PartialStats.empty((2, 2))
    stats.table = TableRows(
        np.array([3, 5], np.int64),
        np.array([0, 1], np.int32),
        np.array([1, 0], np.int32),
        np.array([6.0, 7.5], np.float32),
    )
    stats.save(str(tmp_path / "c.npz"))
    loaded = PartialStats.load(str(tmp_path / "c.npz"))
    assert loaded.table is not None
    for name in TableRows.FIELDS:
        np.testing.assert_array_equal(getattr(loaded.table, name), getattr(stats.table, name))
    PartialStats.empty((2, 2)).save(str(tmp_path / "none.npz"))
    assert PartialStats.load(str(tmp_path / "none.npz")).table is None


def test_configuration_keys(tmp_path):
    for name in ("t.mrc", "m.mrc"):
        (tmp_path / name).touch()
    base = match_config(tmp_path / "m.mrc", tmp_path / "t.mrc", tmp_path / "out")

    def load(**extra: object) -> MatchConfig:
        return load_match_config(write_config(tmp_path / "c.yaml", {**base, **extra}))

    assert load().table_settings() is None  # off by default
    assert load(correlation_table={"enabled": True}).table_settings() == (5.5, 1_000_000)
    leopard = load(match_template_result={"correlation_table_path": "ct.parquet"})
    assert leopard.table_settings() == (5.5, 1_000_000)
    assert leopard.match_template_result.correlation_table_path == tmp_path / "ct.parquet"
    with pytest.raises(ConfigError, match=r"correlation_table\.enabled: false, but"):
        load(
            correlation_table={"enabled": False},
            match_template_result={"correlation_table_path": "ct.parquet"},
        )
    with pytest.raises(ConfigError, match=r"correlation_table\.cutoff: "):
        load(correlation_table={"enabled": True, "cutoff": -1})


# --- end to end ---------------------------------------------------------------------------


def _assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal rows in the same order, the same numeric dtypes (string dtypes may differ
    between pandas and dask)."""
    pd.testing.assert_frame_equal(
        a.astype({"micrograph_name": object}).reset_index(drop=True),
        b.astype({"micrograph_name": object}).reset_index(drop=True),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("data"), shape=(192, 192), n_particles=3, seed=4)


def _config(dataset: dict, out: Path, **extra: object) -> MatchConfig:
    table = {"enabled": True, "cutoff": CUTOFF, **extra.pop("correlation_table", {})}  # type: ignore[dict-item]
    extra["correlation_table"] = table
    return MatchConfig.model_validate(
        match_config(dataset["micrograph_path"], dataset["template_path"], out, **extra)
    )


@pytest.fixture(scope="module")
def in_process() -> Client:
    """One worker with two threads in this process (so that a test may patch a task)."""
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def reference(dataset: dict, two_workers: Client, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("reference")
    printed = io.StringIO()
    ds = match_template(_config(dataset, out), client=two_workers, out=printed).load()
    return out, ds, read_correlation_table(out).compute(), printed.getvalue()


@pytest.mark.slow
def test_table_maximum_per_position_is_the_mip_with_its_pose(reference):
    out, ds, table, printed = reference
    assert list(table.columns) == list(COLUMNS)
    assert [f.name for f in table_files(out)] == ["micrograph.parquet"]
    assert f"correlation table: {len(table):,} correlations above 4 in" in printed
    assert (table.micrograph_name == "micrograph").all()
    assert (table.correlation > CUTOFF).all()
    mip = ds.mip.values
    above = np.argwhere(mip > CUTOFF)
    assert 1000 < len(table) and len(above) > 100  # noise and particles both pass 4.0
    # Rows in search order: the first maximum of a position is the lowest global index.
    order = table.sort_values(["global_index", "pos_y", "pos_x"], kind="stable")
    pd.testing.assert_frame_equal(order, table)
    best = table.loc[table.groupby(["pos_y", "pos_x"], sort=True).correlation.idxmax()]
    assert best[["pos_y", "pos_x"]].to_numpy().tolist() == above.tolist()
    y, x = best.pos_y.to_numpy(), best.pos_x.to_numpy()
    np.testing.assert_array_equal(best.correlation.to_numpy(), mip[y, x])
    for column, name in (("phi", "phi"), ("theta", "theta"), ("psi", "psi")):
        np.testing.assert_array_equal(best[column].to_numpy(), ds[name].values[y, x])
    np.testing.assert_array_equal(best.relative_defocus.to_numpy(), ds.defocus.values[y, x])
    assert table.global_index.max() < ds.attrs["total_correlations"]


@pytest.mark.slow
def test_other_chunks_workers_and_leopard_path_give_the_same_table(
    dataset, reference, in_process, tmp_path
):
    _, _, table, _ = reference
    leopard = tmp_path / "leopard" / "table.parquet"
    config = _config(
        dataset,
        tmp_path / "out",
        cluster={"chunk_size": 7, "split_every": 3},
        match_template_result={"correlation_table_path": str(leopard)},
    )
    match_template(config, client=in_process, out=io.StringIO())
    _assert_same_table(read_correlation_table(tmp_path / "out").compute(), table)
    _assert_same_table(pd.read_parquet(leopard), table)


@pytest.mark.slow
def test_resume_from_checkpoints_gives_the_same_table(
    dataset, reference, in_process, tmp_path, monkeypatch
):
    _, _, table, _ = reference
    out = tmp_path / "out"
    config = _config(dataset, out, cluster={"chunk_size": 7, "split_every": 3})

    def fail(*args: object, **kwargs: object) -> None:
        raise OutputError("interrupted by the test")

    monkeypatch.setattr(dtm.runtime.persist, "export_maps", fail)
    # A cluster of its own, as a killed run's would be: its scheduler forgets the run.
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
        pytest.raises(OutputError, match="interrupted"),
    ):
        match_template(config, client=client, out=io.StringIO())
    monkeypatch.undo()
    checkpoints = sorted((out / "checkpoints").rglob("group-*.npz"))
    assert len(checkpoints) > 4
    for path in checkpoints[::2]:  # half of the groups are searched again
        path.unlink()
    for path in table_files(out):
        path.unlink()
    printed = io.StringIO()
    match_template(config, client=in_process, resume=True, out=printed)
    assert "restored from checkpoints" in printed.getvalue()
    _assert_same_table(read_correlation_table(out).compute(), table)
    other_cutoff = _config(
        dataset, out, cluster={"chunk_size": 7, "split_every": 3}, correlation_table={"cutoff": 5}
    )
    with pytest.raises(ConfigError, match="correlation_table_cutoff changed"):
        match_template(other_cutoff, client=in_process, resume=True, out=io.StringIO())


@pytest.mark.slow
def test_too_many_rows_stop_the_search_with_a_line_naming_the_key(dataset, in_process, tmp_path):
    config = _config(dataset, tmp_path, correlation_table={"max_rows_per_task": 5})
    with pytest.raises(ConfigError, match=r"^correlation_table\.cutoff: more than 5 "):
        match_template(config, client=in_process, out=io.StringIO())
