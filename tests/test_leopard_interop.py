"""Leopard-EM in both directions, without Leopard-EM: dtm's tables carry what its
ParticleStack needs; its tables and maps (standard deviation under the name
``correlation_variance``) are read with their meaning, refined and imported.

The Leopard-EM files here are written from dtm's own runs on simulated data in Leopard-EM's
format: the column set and order of ``data/leopard_results.csv`` (a table Leopard-EM 1.3.0
wrote), its index column, empty aberration cells, maps without a pixel size, and the
standard deviation in ``correlation_variance``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pandas as pd
import pytest
from datasets import (
    BOX,
    DEFOCUS,
    OPTICS,
    PIXEL_SIZE,
    PSI_STEP,
    THETA_STEP,
    match_config,
    write_config,
    write_dataset,
)
from distributed import Client
from synthetic_results import synthetic_dataset

from dtm.cli import main
from dtm.config import MatchConfig
from dtm.config.match import PeaksConfig
from dtm.io.leopard import PARTICLE_STACK_COLUMNS, holds_std
from dtm.io.mrc import write_map
from dtm.io.store import MRC_NAMES, build_dataset, open_results
from dtm.io.tables import STD_READ, read_table, write_table
from dtm.physics.orientations import uniform_grid
from dtm.physics.simulate import random_particles, simulate_micrograph, simulate_template
from dtm.programs.import_leopard import import_leopard
from dtm.programs.match import match_template
from dtm.programs.peaks import peaks_table, repick
from dtm.programs.refine import refine_template
from dtm.programs.report import write_report

DATA = Path(__file__).parent / "data"
#: A results table that Leopard-EM 1.3.0 wrote (``results_to_dataframe().to_csv()``).
LEOPARD_TABLE = DATA / "leopard_results.csv"
ABERRATIONS = {
    "odd_zernikes": {"Z31c": 2000.0, "Z33s": 1000.0},
    "even_zernikes": {"Z44c": 8000.0},
    "mag_matrix": [1.06, 0.02, -0.01, 0.95],
}


def _leopard_reads(value: Any) -> Any:
    """How Leopard-EM 1.3 parses an aberration cell of a CSV read by pandas
    (``utils/ctf_utils.py``): NaN → None, a list's text split at commas, a dict's JSON."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if value.startswith("["):
        return [float(x) for x in value.strip("[]").split(",")]
    return json.loads(value)


# ---------------------------------------------------------------- tables, without a search


def test_particle_stack_columns_are_those_leopard_em_writes() -> None:
    header = pd.read_csv(LEOPARD_TABLE, nrows=0).columns
    assert list(header[1:]) == PARTICLE_STACK_COLUMNS
    assert header[0].startswith("Unnamed")  # its index column


def test_peak_tables_carry_particle_stack_columns_with_leopard_meanings(tmp_path: Path) -> None:
    maps, attrs = synthetic_dataset("m1")
    ds = build_dataset(maps, pixel_size=2.0, attrs={**attrs, **ABERRATIONS})
    peaks = peaks_table(ds, PeaksConfig(metric="scaled_mip"))
    assert len(peaks) >= 3
    write_table(peaks, tmp_path, "peaks")
    csv = pd.read_csv(tmp_path / "peaks.csv")  # as Leopard-EM's ParticleStack reads it
    assert [name for name in PARTICLE_STACK_COLUMNS if name not in csv] == []
    assert (csv["refined_pixel_size"] == csv["pixel_size"]).all()
    for name in ("even_zernikes", "odd_zernikes", "mag_matrix"):
        assert csv[name].nunique() == 1  # Leopard-EM asserts one value per stack
        assert _leopard_reads(csv[name].iloc[0]) == ABERRATIONS[name]
    # Without aberrations the cells are empty: None for Leopard-EM.
    plain = build_dataset(maps, pixel_size=2.0, attrs=attrs)
    write_table(peaks_table(plain, PeaksConfig(metric="scaled_mip")), tmp_path, "plain")
    plain = pd.read_csv(tmp_path / "plain.csv")
    assert all(_leopard_reads(plain[name].iloc[0]) is None for name in ABERRATIONS)
    # The three formats read back the same.
    tables = [read_table(tmp_path / f"peaks.{kind}") for kind in ("csv", "parquet", "star")]
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table.reset_index(drop=True), tables[0])


def test_statistics_tell_standard_deviation_from_variance() -> None:
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 0.1, 50)
    variance = rng.uniform(0.8, 4.0, 50)
    mip = mean + rng.uniform(3, 12, 50) * np.sqrt(variance)
    scaled = ((mip - mean) / np.sqrt(variance)).astype(np.float32)
    assert holds_std(mip, scaled, mean, np.sqrt(variance))
    assert not holds_std(mip, scaled, mean, variance)
    # A variance of 1 reads the same either way: nothing to tell, kept as it is.
    assert not holds_std(mip, mip - mean, mean, np.ones(50))
    assert not holds_std(mip, scaled, mean, np.full(50, np.nan))


def test_a_leopard_table_is_read_with_its_meaning() -> None:
    raw = pd.read_csv(LEOPARD_TABLE)
    table = read_table(LEOPARD_TABLE)
    assert table.attrs[STD_READ]
    np.testing.assert_allclose(table["correlation_variance"], raw["correlation_variance"] ** 2)
    assert not any(name.startswith("Unnamed") for name in table.columns)
    assert set(table["micrograph_name"]) == {"micrograph"}
    assert (table["even_zernikes"] == "").all()


# ----------------------------------------------- dtm's own run, and its Leopard-EM twin


@pytest.fixture(scope="module")
def dtm_run(tmp_path_factory: pytest.TempPathFactory, two_workers: Client) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("leopard")
    data = write_dataset(root / "data", shape=(256, 256), n_particles=3, seed=4)
    out = root / "dtm"
    config = match_config(data["micrograph_path"], data["template_path"], out)
    match_template(MatchConfig.model_validate(config), client=two_workers)
    repick(out, client=two_workers)
    return {"root": root, "out": out, "config": config, **data}


def _write_leopard_copy(run: dict[str, Any], folder: Path) -> Path:
    """dtm's maps and peak table in Leopard-EM's format; returns the table."""
    folder.mkdir()
    paths = {}
    for name, file in MRC_NAMES.items():
        data = mrcfile.read(run["out"] / "maps" / file)
        if name == "correlation_variance":
            data = np.sqrt(data)  # Leopard-EM's map of that name: the standard deviation
        paths[name] = folder / f"output_{file}"
        with mrcfile.new(paths[name]) as mrc:  # no pixel size, as Leopard-EM writes them
            mrc.set_data(np.asarray(data, dtype=np.float32))
    peaks = pd.read_csv(run["out"] / "peaks.csv", keep_default_na=False)
    table = peaks[PARTICLE_STACK_COLUMNS].copy()  # every column is in dtm's table
    table["correlation_variance"] = np.sqrt(table["correlation_variance"])
    for column, name in {
        "mip_path": "mip",
        "scaled_mip_path": "scaled_mip",
        "psi_path": "psi",
        "theta_path": "theta",
        "phi_path": "phi",
        "defocus_path": "defocus",
        "correlation_average_path": "correlation_mean",
        "correlation_variance_path": "correlation_variance",
    }.items():
        table[column] = str(paths[name])
    for name in ("even_zernikes", "odd_zernikes", "mag_matrix"):
        table[name] = None  # Leopard-EM writes None: an empty cell
    path = folder / "results.csv"
    table.to_csv(path, index=True)
    return path


@pytest.fixture(scope="module")
def leopard_copy(dtm_run: dict[str, Any]) -> Path:
    return _write_leopard_copy(dtm_run, dtm_run["root"] / "leopard")


def _refine(
    run: dict[str, Any], table: Path, name: str, client: Client
) -> tuple[pd.DataFrame, str]:
    config = {
        "template_volume_path": str(run["template_path"]),
        "particle_stack": {"df_path": str(table), "extracted_box_size": [72, 72]},
        "defocus_refinement_config": {"defocus_min": -200, "defocus_max": 200, "defocus_step": 200},
        "orientation_refinement_config": {
            "theta_step_coarse": 7.5,
            "theta_step_fine": 3.75,
            "psi_step_coarse": 7.5,
            "psi_step_fine": 3.75,
        },
        "output_path": str(run["root"] / f"{name}.csv"),
    }
    path = write_config(run["root"] / f"{name}.yaml", config)
    printed = io.StringIO()
    return refine_template(path, client=client, out=printed), printed.getvalue()


@pytest.mark.slow
def test_refine_of_a_leopard_table_equals_refine_of_dtms(
    dtm_run: dict[str, Any], leopard_copy: Path, two_workers: Client
) -> None:
    own, _ = _refine(dtm_run, dtm_run["out"] / "peaks.csv", "own", two_workers)
    leopard, printed = _refine(dtm_run, leopard_copy, "leopard", two_workers)
    assert "correlation_variance holds the standard deviation" in printed
    assert len(own) == len(leopard) >= 3
    for name in ("refined_phi", "refined_theta", "refined_psi", "refined_pos_x", "refined_pos_y"):
        np.testing.assert_array_equal(leopard[name], own[name])
    relative = np.abs(leopard["refined_scaled_mip"] / own["refined_scaled_mip"] - 1)
    assert relative.max() < 0.02, relative
    print(f"\nrefined_scaled_mip, Leopard-EM table / dtm table - 1: max {relative.max():.1e}")
    # Reading the standard deviation as a variance (the bug) is far off at the particles,
    # whose correlations raise the variance well above 1.
    std = mrcfile.read(leopard_copy.parent / "output_correlation_variance.mrc")
    mean = mrcfile.read(leopard_copy.parent / "output_correlation_average.mrc")
    y, x = leopard["refined_pos_y"].to_numpy(), leopard["refined_pos_x"].to_numpy()
    naive = (leopard["refined_mip"] - mean[y, x]) / np.sqrt(std[y, x])
    assert np.abs(naive / own["refined_scaled_mip"] - 1).max() > 0.25
    # The refined table is a dtm table: its correlation_variance is the variance.
    np.testing.assert_allclose(
        leopard["correlation_variance"], own["correlation_variance"], rtol=1e-5
    )


def _same_peaks(imported: pd.DataFrame, own: pd.DataFrame) -> None:
    assert len(imported) == len(own) >= 3
    for name in ("pos_x", "pos_y", "phi", "theta", "psi", "relative_defocus", "total_correlations"):
        np.testing.assert_array_equal(imported[name], own[name])
    for name in ("mip", "scaled_mip", "correlation_mean"):
        np.testing.assert_array_equal(imported[name], own[name])
    for name in ("correlation_variance", "detection_z", "neg_log_pvalue"):
        np.testing.assert_allclose(imported[name], own[name], rtol=1e-5)


@pytest.mark.slow
def test_import_gives_dtms_own_peaks(
    dtm_run: dict[str, Any], leopard_copy: Path, two_workers: Client, tmp_path: Path
) -> None:
    own = pd.read_csv(dtm_run["out"] / "peaks.csv")
    out = tmp_path / "imported"
    printed = io.StringIO()
    assert import_leopard([leopard_copy], out, out=printed) == ["micrograph"]
    assert "correlation_variance standard deviation, squared" in printed.getvalue()
    [ds] = open_results(out).values()
    [mine] = open_results(dtm_run["out"]).values()
    np.testing.assert_allclose(ds["correlation_variance"], mine["correlation_variance"], rtol=1e-6)
    assert ds.attrs["imported_from"] == "Leopard-EM"
    assert ds.attrs["import_source"] == str(leopard_copy)
    assert ds.attrs["correlation_mode"] == "valid"
    assert ds.attrs["template_shape"] == [BOX] * 3
    assert sorted((out / "maps").iterdir()) == sorted(out / "maps" / f for f in MRC_NAMES.values())
    _same_peaks(repick(out, client=two_workers), own)
    assert (out / write_report(out).name).is_file()  # dtm report works on it

    # The same micrographs from Leopard-EM's configuration (the eight paths, its optics).
    config = {
        "micrograph_path": str(dtm_run["micrograph_path"]),
        "template_volume_path": str(dtm_run["template_path"]),
        "optics_group": {"label": "test", "pixel_size": PIXEL_SIZE, **OPTICS},
        "defocus_search_config": dtm_run["config"]["defocus_search_config"],
        "orientation_search_config": dtm_run["config"]["orientation_search_config"],
        "match_template_result": {
            field: str(leopard_copy.parent / f"output_{file}")
            for field, file in {
                "mip_path": "mip.mrc",
                "scaled_mip_path": "scaled_mip.mrc",
                "correlation_average_path": "correlation_average.mrc",
                "correlation_variance_path": "correlation_variance.mrc",
                "orientation_psi_path": "orientation_psi.mrc",
                "orientation_theta_path": "orientation_theta.mrc",
                "orientation_phi_path": "orientation_phi.mrc",
                "relative_defocus_path": "relative_defocus.mrc",
            }.items()
        },
        "computational_config": {"gpu_ids": "cpu"},
    }
    yaml_path = write_config(tmp_path / "match_template.yaml", config)
    import_leopard([yaml_path], tmp_path / "from_yaml", out=io.StringIO())
    _same_peaks(repick(tmp_path / "from_yaml", client=two_workers), own)


@pytest.mark.slow
def test_import_command_refuses_to_replace_and_names_the_problem(
    dtm_run: dict[str, Any], leopard_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(["import-leopard", str(leopard_copy), "--output-dir", str(out)]) == 0
    assert main(["import-leopard", str(leopard_copy), "--output-dir", str(out)]) == 2
    assert "holds results already; use --overwrite" in capsys.readouterr().err
    assert main(["import-leopard", str(leopard_copy), "--output-dir", str(out), "--overwrite"]) == 0
    # A missing map: one line naming the file, nothing written.
    broken = tmp_path / "broken"
    shutil.copytree(leopard_copy.parent, broken)
    (broken / "output_scaled_mip.mrc").unlink()
    table = pd.read_csv(broken / "results.csv", index_col=0)
    table["scaled_mip_path"] = str(broken / "output_scaled_mip.mrc")
    table.to_csv(broken / "results.csv")
    capsys.readouterr()
    assert (
        main(["import-leopard", str(broken / "results.csv"), "--output-dir", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "output_scaled_mip.mrc: file not found" in err
    assert not (tmp_path / "x").exists()
    # Leopard-EM's maps lying where the import would write: refused, not overwritten.
    inside = tmp_path / "inside"
    (inside / "maps").mkdir(parents=True)
    shutil.copy(leopard_copy.parent / "output_mip.mrc", inside / "maps" / "mip.mrc")
    table = pd.read_csv(leopard_copy, index_col=0)
    table["mip_path"] = str(inside / "maps" / "mip.mrc")
    table.to_csv(inside / "results.csv")
    assert main(["import-leopard", str(inside / "results.csv"), "--output-dir", str(inside)]) == 2
    assert "an input of this run lies where it writes maps/mip.mrc" in capsys.readouterr().err


# ------------------------------------------------- aberrations take effect in the search


@pytest.mark.slow
def test_match_with_aberrations_finds_particles_imaged_with_them(
    tmp_path: Path, two_workers: Client
) -> None:
    """Planted truth: particles imaged with coma, four-fold astigmatism and anisotropic
    magnification (the simulator applies the magnification in real space) correlate best
    with the search that models all of them."""
    template = simulate_template(BOX, pixel_size=PIXEL_SIZE, n_atoms=4000, seed=1)
    write_map(tmp_path / "template.mrc", template, pixel_size=PIXEL_SIZE)
    grid = uniform_grid(psi_step=PSI_STEP, theta_step=THETA_STEP)
    particles = random_particles(
        3, (256, 256), BOX, orientations=grid, defocus_values=DEFOCUS, min_separation=77, seed=3
    )
    image = simulate_micrograph(
        template,
        (256, 256),
        particles,
        pixel_size=PIXEL_SIZE,
        signal_scale=18.0,
        low_frequency_noise=5.0,
        seed=7,
        aberrations=ABERRATIONS,
        **OPTICS,
    )
    write_map(tmp_path / "micrograph.mrc", image, pixel_size=PIXEL_SIZE)
    zernikes = {key: value for key, value in ABERRATIONS.items() if key != "mag_matrix"}
    mips = {}
    for label, optics in (("all", ABERRATIONS), ("zernikes", zernikes), ("none", {})):
        config = match_config(
            tmp_path / "micrograph.mrc",
            tmp_path / "template.mrc",
            tmp_path / label,
            optics_group=optics,
        )
        ds = match_template(MatchConfig.model_validate(config), client=two_workers)
        at = [(p.pos_y, p.pos_x) for p in particles]
        mips[label] = np.array([float(ds["mip"].values[y, x]) for y, x in at])
        if label == "all":
            found = [
                tuple(float(ds[n].values[y, x]) for n in ("phi", "theta", "psi")) for y, x in at
            ]
            assert found == [(p.phi, p.theta, p.psi) for p in particles]
            assert ds.attrs["mag_matrix"] == ABERRATIONS["mag_matrix"]
    print({label: np.round(values, 2).tolist() for label, values in mips.items()})
    assert (mips["all"] > mips["zernikes"]).all()
    assert (mips["zernikes"] > mips["none"]).all()
    assert (mips["all"] > 1.05 * mips["none"]).all()
