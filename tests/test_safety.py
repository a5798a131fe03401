"""Safe by default (issue 15): names, paths, --overwrite, locks, search size, YAML text,
atomic replacement. Every refusal through the CLI: one line, exit 2, nothing touched."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from datasets import match_config, write_config, write_dataset

from dtm.cli import main
from dtm.errors import OutputError
from dtm.io.atomic import check_inside, remove_output, replace_atomic
from dtm.io.rundir import LOCK_FILE, output_lock
from dtm.io.store import build_dataset, open_results
from dtm.io.store import write_dataset as write_zarr


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_dataset(tmp_path_factory.mktemp("data"), shape=(160, 160), n_particles=1)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expect: str) -> str:
    """Run ``dtm`` in-process: exit 2, one ``dtm: error:`` line holding ``expect``, no
    cluster started, no traceback; returns the line."""
    status = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured.err + captured.out
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dtm: error: "), lines[0]
    for text in expect:
        assert text in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert "dashboard" not in captured.out  # refused before any cluster started
    return lines[0]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


# --- 1. names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../victim", "/tmp/victim", "a/b", "a\\b", ".hidden", "#comment", "=x", "x" * 101],
)
def test_bad_micrograph_name_in_the_configuration(name, data, tmp_path, capsys):
    victim = _victim(tmp_path)
    out = tmp_path / "work" / "out"
    entries = [
        {"micrograph_path": str(data["micrograph_path"]), "defocus_u": 1e4, "defocus_v": 1e4},
        {
            "micrograph_path": str(data["micrograph_path"]),
            "defocus_u": 1e4,
            "defocus_v": 1e4,
            "name": name,
        },
    ]
    cfg = match_config(None, data["template_path"], out, micrographs=entries)
    config = write_config(tmp_path / "c.yaml", cfg)
    _refused(["match", str(config), "--overwrite"], capsys, str(config), "micrographs.1.name")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not out.exists()


def test_bad_micrograph_name_in_a_table_names_the_row(data, tmp_path, capsys):
    victim = _victim(tmp_path)
    row = {"micrograph_path": str(data["micrograph_path"]), "defocus_u": 1e4, "defocus_v": 1e4}
    rows = [row | {"astigmatism_angle": 0.0}] * 2
    table = tmp_path / "micrographs.csv"
    pd.DataFrame(rows).assign(name=["first", "../victim"]).to_csv(table, index=False)
    cfg = match_config(None, data["template_path"], tmp_path / "out", micrograph_table=str(table))
    config = write_config(tmp_path / "c.yaml", cfg)
    _refused(["match", str(config)], capsys, str(table), "row 2", "name", "'../victim'")
    assert (victim / "precious.txt").read_text() == "keep me"


def test_a_name_from_the_file_name_is_checked_too(data, tmp_path, capsys):
    odd = tmp_path / "my micrograph.mrc"
    odd.write_bytes(Path(data["micrograph_path"]).read_bytes())
    config = write_config(
        tmp_path / "c.yaml", match_config(odd, data["template_path"], tmp_path / "out")
    )
    _refused(["match", str(config)], capsys, str(odd), "rename the file", "'my micrograph'")


def test_every_written_or_deleted_path_stays_inside_its_root(tmp_path):
    victim = _victim(tmp_path)
    store = tmp_path / "out" / "results.zarr"
    maps = {"mip": np.ones((8, 8), np.float32)}
    dataset = build_dataset(maps, pixel_size=1.0, attrs={"micrograph_name": "x"})
    with pytest.raises(OutputError, match="outside"):
        write_zarr(dataset, store, "../../victim")
    with pytest.raises(OutputError, match="outside"):
        remove_output(tmp_path / "out" / ".." / "victim", tmp_path / "out")
    # A link inside the root that points out of it is outside too.
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "link").symlink_to(victim)
    with pytest.raises(OutputError, match="outside"):
        check_inside(tmp_path / "out" / "link" / "precious.txt", tmp_path / "out")
    remove_output(tmp_path / "out" / "link", tmp_path / "out")  # the link, not its target
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "out" / "link").exists()


# --- 2. --overwrite --------------------------------------------------------------------


def test_overwrite_removes_only_what_dtm_recorded(data, tmp_path, capsys):
    """output_dir: . beside the configuration, the template in maps/: a second run with
    --overwrite removes the first run's outputs (two micrographs: their maps, groups and
    report) and nothing else."""
    (tmp_path / "maps").mkdir()
    template = tmp_path / "maps" / "my_template.mrc"
    template.write_bytes(Path(data["template_path"]).read_bytes())
    (tmp_path / "maps" / "NOTES.txt").write_text("my notes")
    (tmp_path / "results-notes.txt").write_text("mine too")
    entries = [
        {"micrograph_path": str(data["micrograph_path"]), "defocus_u": 1e4, "defocus_v": 1e4}
        | {"name": name}
        for name in ("first", "second")
    ]
    cfg = match_config(None, template, Path("."), micrographs=entries)
    config = write_config(tmp_path / "c.yaml", cfg)
    assert main(["match", str(config), "--workers", "1"]) == 0
    assert (tmp_path / "maps" / "first_mip.mrc").exists()
    assert main(["report", str(tmp_path)]) == 0
    job = json.loads((tmp_path / "job.json").read_text())
    assert "maps/first_mip.mrc" in job["outputs"] and "results.zarr/second" in job["outputs"]
    assert "report.html" in job["outputs"]

    cfg = match_config(data["micrograph_path"], template, Path("."))
    write_config(config, cfg)
    capsys.readouterr()
    assert main(["match", str(config), "--overwrite", "--workers", "1"]) == 0
    assert template.read_bytes() == Path(data["template_path"]).read_bytes()
    assert (tmp_path / "maps" / "NOTES.txt").read_text() == "my notes"
    assert (tmp_path / "results-notes.txt").read_text() == "mine too"
    assert config.exists()
    assert not (tmp_path / "maps" / "first_mip.mrc").exists()
    assert not (tmp_path / "report.html").exists()
    assert (tmp_path / "maps" / "mip.mrc").exists()
    assert list(open_results(tmp_path)) == ["micrograph"]
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize("where", ["root", "home"])
def test_root_and_home_are_refused_as_output_dir(where, data, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = "/" if where == "root" else str(home)
    config = write_config(
        tmp_path / "c.yaml", match_config(data["micrograph_path"], data["template_path"], out)
    )
    _refused(["match", str(config), "--overwrite"], capsys, "output_dir", "choose a directory")
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("link", ["output_dir", "dangling", "loop", "maps"])
def test_symlinked_outputs_are_refused_before_a_cluster_starts(link, data, tmp_path, capsys):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if link == "output_dir":
        out.symlink_to(elsewhere)
    else:
        out.mkdir()
        target = {"dangling": tmp_path / "missing", "loop": out / "maps", "maps": elsewhere}
        (out / "maps").symlink_to(target[link])
    config = write_config(
        tmp_path / "c.yaml", match_config(data["micrograph_path"], data["template_path"], out)
    )
    _refused(["match", str(config)], capsys, "symbolic link", "loop" if link == "loop" else "")
    assert list(elsewhere.iterdir()) == []


def test_an_input_where_the_run_writes_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    row = {"micrograph_path": str(data["micrograph_path"]), "defocus_u": 1e4, "defocus_v": 1e4}
    row["astigmatism_angle"] = 0.0
    pd.DataFrame([row]).to_csv(out / "peaks.csv", index=False)  # a table named like an output
    cfg = match_config(None, data["template_path"], out, micrograph_table=str(out / "peaks.csv"))
    config = write_config(tmp_path / "c.yaml", cfg)
    _refused(["match", str(config)], capsys, "an input of this run", "peaks.csv")
    assert (out / "peaks.csv").exists() and sorted(p.name for p in out.iterdir()) == ["peaks.csv"]


def test_a_leopard_map_path_on_an_input_is_refused(data, tmp_path, capsys):
    template = tmp_path / "template.mrc"
    template.write_bytes(Path(data["template_path"]).read_bytes())
    cfg = match_config(data["micrograph_path"], template, tmp_path / "out")
    cfg["match_template_result"] = {"mip_path": str(template), "allow_file_overwrite": True}
    config = write_config(tmp_path / "c.yaml", cfg)
    _refused(["match", str(config), "--overwrite"], capsys, "an input of this run", "template")
    assert template.read_bytes() == Path(data["template_path"]).read_bytes()


# --- 7. one run per output_dir --------------------------------------------------------


def test_a_second_match_on_the_same_output_dir_is_refused(data, tmp_path, capsys):
    out = tmp_path / "out"
    slow = {"psi_step": 2.0, "theta_step": 2.0}  # runs long enough to be caught running
    cfg = match_config(
        data["micrograph_path"], data["template_path"], out, orientation_search_config=slow
    )
    config = write_config(tmp_path / "c.yaml", cfg)
    first = subprocess.Popen(
        [sys.executable, "-m", "dtm.cli", "match", str(config), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert first.stdout is not None
    try:
        for line in first.stdout:
            if line.startswith("search:"):  # printed while it holds the lock
                break
        coarse = {"psi_step": 20.0, "theta_step": 20.0}
        other = write_config(tmp_path / "other.yaml", {**cfg, "orientation_search_config": coarse})
        _refused(["match", str(other), "--overwrite"], capsys, "another dtm match", str(out))
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # killed: no chance to clean up
        first.communicate()
    # The kernel released the lock with the process: nothing stale blocks the next run.
    with output_lock(out):
        pass


# --- 3. search size -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "expect"),
    [
        ("orientation_search_config", "psi_step", 0.0001, "psi_step"),
        ("orientation_search_config", "theta_step", 1e-7, "psi_step or theta_step"),
        ("defocus_search_config", "defocus_step", 1e-9, "defocus_step"),
        ("cluster", "memory_limit", "1MiB", "cluster.memory_limit"),
    ],
)
def test_absurd_searches_are_refused_within_seconds(
    section, key, value, expect, data, tmp_path, capsys
):
    cfg = match_config(
        data["micrograph_path"], data["template_path"], tmp_path / "out", **{section: {key: value}}
    )
    config = write_config(tmp_path / "c.yaml", cfg)
    start = time.monotonic()
    _refused(["match", str(config)], capsys, expect, "more than")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def _header_claiming(path: Path, source: Path, nx: int, ny: int) -> Path:
    data = bytearray(source.read_bytes())
    data[0:12] = struct.pack("<3i", nx, ny, 1)
    path.write_bytes(bytes(data))
    return path


def test_mrc_header_claiming_more_than_the_file_is_one_line(data, tmp_path, capsys):
    bad = _header_claiming(tmp_path / "claims.mrc", Path(data["micrograph_path"]), 9000, 9000)
    config = write_config(
        tmp_path / "c.yaml", match_config(bad, data["template_path"], tmp_path / "out")
    )
    _refused(["match", str(config)], capsys, "claims.mrc", "the header claims", "file holds")


def test_mrc_larger_than_memory_is_refused_before_reading(data, tmp_path, capsys):
    big = _header_claiming(tmp_path / "huge.mrc", Path(data["micrograph_path"]), 400000, 400000)
    with open(big, "r+b") as f:  # sparse: the header's size without using the disk
        f.truncate(1024 + 4 * 400000 * 400000)
    config = write_config(
        tmp_path / "c.yaml", match_config(big, data["template_path"], tmp_path / "out")
    )
    _refused(["match", str(config)], capsys, "huge.mrc", "GiB to read", "more than")


# --- 6. configuration text -------------------------------------------------------------


def _text_config(tmp_path: Path, data: dict, text: str) -> Path:
    cfg = match_config(data["micrograph_path"], data["template_path"], tmp_path / "out")
    path = write_config(tmp_path / "c.yaml", cfg)
    path.write_text(path.read_text() + text)
    return path


def test_duplicate_keys_are_refused_with_both_lines(data, tmp_path, capsys):
    path = _text_config(tmp_path, data, f"output_dir: {tmp_path / 'other'}\n")
    lines = path.read_text().splitlines()
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("output_dir:"))
    _refused(
        ["match", str(path)],
        capsys,
        "duplicate key 'output_dir'",
        f"lines {first} and {len(lines)}",
    )


def test_yaml_aliases_are_refused(data, tmp_path, capsys):
    billion = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    path = _text_config(tmp_path, data, billion)
    _refused(["match", str(path)], capsys, "aliases", "line")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('  account: "lab\\n#SBATCH --wrap=rm"\n', "cluster.account"),
        ('  job_extra_directives: ["--qos=x\\nrm -rf ~"]\n', "cluster.job_extra_directives.0"),
        ('  label: "a\\u0000b"\n', "optics_group.label"),
        ('  label: "tab\\there"\n', "optics_group.label"),
    ],
)
def test_control_characters_are_refused_naming_the_field(text, field, data, tmp_path, capsys):
    cfg = match_config(data["micrograph_path"], data["template_path"], tmp_path / "out")
    section, key = field.split(".")[:2]
    cfg[section] = {name: value for name, value in cfg.get(section, {}).items() if name != key}
    body = {name: value for name, value in cfg.items() if name != section}
    path = write_config(tmp_path / "c.yaml", body)
    rest = write_config(tmp_path / "part.yaml", {section: cfg[section]})
    path.write_text(path.read_text() + rest.read_text() + text)
    _refused(["match", str(path)], capsys, field, "control character")


def test_control_characters_on_the_command_line(data, tmp_path, capsys):
    cfg = match_config(data["micrograph_path"], data["template_path"], tmp_path / "out")
    config = write_config(tmp_path / "c.yaml", cfg)
    _refused(["match", str(config), "--output-dir", "out\nx"], capsys, "command line", "output_dir")


# --- 7. atomic replacement -------------------------------------------------------------


def test_a_failed_replacement_leaves_the_old_result(tmp_path):
    store = tmp_path / "results.zarr"
    old = build_dataset(
        {"mip": np.full((8, 8), 1.0, np.float32)}, pixel_size=1.0, attrs={"micrograph_name": "a"}
    )
    write_zarr(old, store, "a")

    class Boom(Exception):
        pass

    def half_then_fail(tmp: str) -> None:
        Path(tmp).mkdir()
        (Path(tmp) / "zarr.json").write_text("{}")
        raise Boom

    with pytest.raises(Boom):
        replace_atomic(store / "a", half_then_fail, root=store)
    assert float(open_results(store)["a"]["mip"].values.max()) == 1.0
    new = old.assign(mip=old["mip"] * 0 + 2.0)
    write_zarr(new, store, "a")
    assert float(open_results(store)["a"]["mip"].values.max()) == 2.0
    leftovers = [p.name for p in [*tmp_path.iterdir(), *store.iterdir()] if p.name[0] == "."]
    assert leftovers == []
