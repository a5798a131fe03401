"""CSV / parquet / STAR tables: round trips, RELION labels, errors, atomic writes."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
import starfile

import dtm
from dtm.errors import InputError
from dtm.io.tables import (
    PEAK_COLUMNS,
    PEAK_DTYPES,
    read_star,
    read_table,
    to_star,
    write_star,
    write_table,
)


def make_table(rows_per_micrograph: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """A peak table with awkward values: 1/3-like floats, paths with spaces, empty paths."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, n in rows_per_micrograph.items():
        part = {}
        for column, dtype in PEAK_DTYPES.items():
            if dtype == "float64":
                part[column] = rng.standard_normal(n) * 1000 / 3
            elif dtype == "int64":
                part[column] = rng.integers(0, 4000, n)
            else:
                part[column] = [f"/data/{name} dir/{column}.mrc"] * n
        part["micrograph_name"] = [name] * n
        part["particle_index"] = np.arange(n)
        part["micrograph_pixel_size"] = part["pixel_size"]  # a search without cropping
        part["mip_path"] = [""] * n  # maps not exported
        part["template_path"] = ["007"] * n  # looks like a number, must stay text
        parts.append(pd.DataFrame(part))
    table = pd.concat(parts, ignore_index=True)
    return table.astype({c: t for c, t in PEAK_DTYPES.items()})


def test_write_and_read_every_format_round_trips(tmp_path):
    table = make_table({"mic_b": 3, "mic_a": 2, "mic_c": 1})
    paths = write_table(table, tmp_path / "out")
    assert set(paths) == {"csv", "parquet", "star"}
    partitions = sorted(p.name for p in paths["parquet"].iterdir())
    assert partitions == ["micrograph_name=mic_a", "micrograph_name=mic_b", "micrograph_name=mic_c"]
    pd.testing.assert_frame_equal(read_table(paths["csv"]), table)
    pd.testing.assert_frame_equal(read_table(paths["star"]), table)
    # Parquet partitions come back grouped by micrograph name.
    by_name = table.sort_values(["micrograph_name", "particle_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(read_table(paths["parquet"]), by_name)
    assert list(read_table(paths["csv"]).columns) == PEAK_COLUMNS
    assert dtm.read_table is read_table  # the documented top-level name


def test_dask_table_is_written_once_and_fully(tmp_path):
    table = make_table({"m1": 2, "m2": 3})
    frame = dd.from_pandas(table, npartitions=2)
    paths = write_table(frame, tmp_path, stem="picks")
    assert paths["csv"].name == "picks.csv"
    pd.testing.assert_frame_equal(read_table(paths["csv"]), table)


def test_star_uses_relion_labels_and_conventions(tmp_path):
    table = make_table({"m1": 4})
    write_star(table, tmp_path / "p.star")
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    particles = blocks["particles"]
    np.testing.assert_array_equal(particles["rlnCoordinateX"], table["pos_x_img"])
    np.testing.assert_array_equal(particles["rlnCoordinateY"], table["pos_y_img"])
    np.testing.assert_allclose(particles["rlnAngleRot"], table["phi"])
    np.testing.assert_allclose(particles["rlnAngleTilt"], table["theta"])
    np.testing.assert_allclose(particles["rlnAnglePsi"], table["psi"])
    np.testing.assert_allclose(
        particles["rlnDefocusU"], table["defocus_u"] + table["relative_defocus"]
    )
    np.testing.assert_allclose(
        particles["rlnDefocusV"], table["defocus_v"] + table["relative_defocus"]
    )
    np.testing.assert_allclose(particles["rlnDefocusAngle"], table["astigmatism_angle"])
    np.testing.assert_allclose(particles["rlnAutopickFigureOfMerit"], table["scaled_mip"])
    np.testing.assert_allclose(particles["rlnMicrographPixelSize"], table["pixel_size"])
    np.testing.assert_allclose(particles["rlnVoltage"], table["voltage"])
    assert (particles["rlnMicrographName"] == table["micrograph_path"]).all()
    assert list(to_star(table).columns)[:3] == [
        "rlnMicrographName",
        "rlnCoordinateX",
        "rlnCoordinateY",
    ]
    # A single particle still round-trips (one-row blocks).
    one = table.iloc[:1]
    write_star(one, tmp_path / "one.star")
    pd.testing.assert_frame_equal(read_star(tmp_path / "one.star"), one)


def test_star_coordinates_of_a_cropped_search_are_in_micrograph_pixels():
    # high_resolution_limit 10 Å on a 2.5 Å micrograph: maps and pos_* at 5 Å per pixel.
    # The cropped micrograph's own pixel: 5.04 Å along y, 4.98 Å along x (even sizes).
    table = make_table({"m1": 2}).assign(
        pos_x_img=[25, 40],
        pos_y_img=[85, 7],
        pos_x_img_angstrom=[25 * 4.98, 40 * 4.98],
        pos_y_img_angstrom=[85 * 5.04, 7 * 5.04],
        pixel_size=5.0,
        micrograph_pixel_size=2.5,
    )
    particles = to_star(table)
    assert particles["rlnCoordinateX"].tolist() == [50, 80]  # 49.8, 79.7 rounded
    assert particles["rlnCoordinateY"].tolist() == [171, 14]  # 171.4, 14.1
    assert particles["rlnMicrographPixelSize"].tolist() == [2.5, 2.5]
    older = table.drop(columns=["micrograph_pixel_size"])  # written before the column
    assert to_star(older)["rlnCoordinateX"].tolist() == [25, 40]


def test_plain_relion_star_maps_back_to_dtm_names(tmp_path):
    table = make_table({"m1": 2})
    starfile.write({"particles": to_star(table)}, tmp_path / "relion.star")
    back = read_star(tmp_path / "relion.star")
    np.testing.assert_array_equal(back["pos_x_img"], table["pos_x_img"])
    np.testing.assert_allclose(back["phi"], table["phi"], rtol=1e-5)
    np.testing.assert_allclose(
        back["defocus_u"], table["defocus_u"] + table["relative_defocus"], rtol=1e-5
    )
    assert (back["relative_defocus"] == 0).all()
    with pytest.raises(InputError, match="missing required column"):
        read_table(tmp_path / "relion.star")


def test_read_table_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown table format"):
        read_table(tmp_path / "t.xlsx")
    make_table({"m": 2}).drop(columns=["mip", "psi"]).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="mip, psi"):
        read_table(tmp_path / "t.csv")


def test_leopard_style_table_gets_ids(tmp_path):
    table = make_table({"m": 3}).drop(columns=["micrograph_name", "particle_index"])
    table["micrograph_path"] = "/data/grid1_0042.mrc"
    table["refined_mip"] = [1.0, 2.0, 3.0]
    table.to_csv(tmp_path / "leopard.csv", index=False)
    back = read_table(tmp_path / "leopard.csv")
    assert back["micrograph_name"].tolist() == ["grid1_0042"] * 3
    assert back["particle_index"].tolist() == [0, 1, 2]
    assert back["refined_mip"].tolist() == [1.0, 2.0, 3.0]  # extra columns kept, at the end
    assert list(back.columns) == [*PEAK_COLUMNS, "refined_mip"]


def test_failed_write_leaves_earlier_tables_untouched(tmp_path):
    write_table(make_table({"m": 2}), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    broken = make_table({"m": 3}).drop(columns=["defocus_u"])  # STAR export needs it
    with pytest.raises(InputError):
        write_table(broken, tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "peaks.csv",
        "peaks.parquet",
        "peaks.star",
    ]
