"""refine-template end to end: simulated particles off the search grid, a real coarse match,
then local refinement on a LocalCluster of worker processes.

The coarse search combines a sparse grid over all of SO(3) (30°/30°, for realistic
correlation statistics) with a 10°/10° grid around the planted poses; each planted pose is
3–6° (geodesic) from every grid point and 120 Å off the only searched defocus (0 Å). At
3 Å/pixel the simulated molecule (σ = 1.8 Å atoms) carries little defocus information, so the
particles are strong (``signal_scale`` 150) and the defocus low (5000 Å: less CTF
delocalisation cut off by the template box) for the defocus to be measurable at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from distributed import Client, LocalCluster
from scipy.spatial.transform import Rotation

from dtm.config.match import PeaksConfig
from dtm.errors import ConfigError, InputError, OutputError
from dtm.io.mrc import write_map
from dtm.io.tables import read_table, write_table
from dtm.physics.orientations import uniform_grid
from dtm.physics.simulate import PlantedParticle, simulate_micrograph, simulate_template
from dtm.programs.match import match_template
from dtm.programs.peaks import peaks_table
from dtm.programs.refine import REFINED_DTYPES, refine_template

PIXEL_SIZE = 3.0
BOX = 64
SHAPE = (256, 256)
OPTICS = {
    "voltage": 300.0,
    "spherical_aberration": 2.7,
    "amplitude_contrast_ratio": 0.07,
    "defocus_u": 5000.0,
    "defocus_v": 4800.0,
    "astigmatism_angle": 30.0,
    "phase_shift": 0.0,
}
LOCAL_RANGES = {
    "phi_min": 0.0,
    "phi_max": 60.0,
    "theta_min": 40.0,
    "theta_max": 80.0,
    "psi_min": 0.0,
    "psi_max": 60.0,
}
#: Top-left corners; the last one's 80 px box leaves the micrograph (top row -4).
POSITIONS = [(20, 30), (40, 150), (150, 40), (140, 170), (4, 96)]
DEFOCUS = [120.0, -120.0, 120.0, -120.0, 120.0]
THETA_FINE, PSI_FINE, DEFOCUS_STEP = 2.5, 2.5, 100.0


def _rotation(phi: float, theta: float, psi: float) -> Rotation:
    """ZYZ intrinsic (conventions.md#orientations), from scipy: independent of dtm's code."""
    return Rotation.from_euler("ZYZ", [phi, theta, psi], degrees=True)


def _angle(a: Rotation, b: Rotation) -> float:
    return float(np.rad2deg((a.inv() * b).magnitude()))


def _search_grid() -> np.ndarray:
    sparse = uniform_grid(psi_step=30.0, theta_step=30.0)
    return np.concatenate([sparse, uniform_grid(psi_step=10.0, theta_step=10.0, **LOCAL_RANGES)])


def _off_grid_poses(grid: np.ndarray, n: int, seed: int = 3) -> list[np.ndarray]:
    """Poses 3–6° from every grid point, tilted off a grid point of the local region."""
    rng = np.random.default_rng(seed)
    grid_rotations = Rotation.from_euler("ZYZ", grid, degrees=True)
    poses: list[np.ndarray] = []
    while len(poses) < n:
        start = grid[rng.integers(len(grid))]
        axis = rng.normal(size=3)
        tilt = Rotation.from_rotvec(np.deg2rad(rng.uniform(4.0, 5.5)) * axis / np.linalg.norm(axis))
        pose = _rotation(*start) * tilt
        nearest = np.rad2deg((grid_rotations.inv() * pose).magnitude()).min()
        euler = pose.as_euler("ZYZ", degrees=True)
        if 3.0 <= nearest <= 6.0 and 45.0 < euler[1] < 75.0:
            poses.append(euler)
    return poses


@pytest.fixture(scope="module")
def client() -> Any:
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def coarse(tmp_path_factory: pytest.TempPathFactory, client: Client) -> dict[str, Any]:
    """Planted particles, a coarse match, and its peaks at the planted positions (two
    micrographs: the second a copy of the first, so that the table has two partitions)."""
    directory = tmp_path_factory.mktemp("refine")
    grid = _search_grid()
    particles = [
        PlantedParticle(y, x, *map(float, pose), defocus)
        for (y, x), pose, defocus in zip(POSITIONS, _off_grid_poses(grid, 5), DEFOCUS, strict=True)
    ]
    template = simulate_template(BOX, pixel_size=PIXEL_SIZE, n_atoms=4000, seed=1)
    micrograph = simulate_micrograph(
        template,
        SHAPE,
        particles,
        pixel_size=PIXEL_SIZE,
        signal_scale=150.0,
        low_frequency_noise=5.0,
        seed=7,
        **OPTICS,
    )
    write_map(directory / "a.mrc", micrograph, pixel_size=PIXEL_SIZE)
    write_map(directory / "template.mrc", template, pixel_size=PIXEL_SIZE)
    config = {
        "micrograph_path": str(directory / "a.mrc"),
        "template_volume_path": str(directory / "template.mrc"),
        "output_dir": str(directory / "match"),
        "optics_group": {"label": "sim", "pixel_size": PIXEL_SIZE, "ctf_B_factor": 0.0, **OPTICS},
        "defocus_search_config": {"enabled": False},
        "orientation_search_config": {
            "orientation_configs": [
                {"psi_step": 30.0, "theta_step": 30.0},
                {"psi_step": 10.0, "theta_step": 10.0, **LOCAL_RANGES},
            ]
        },
        "cluster": {"chunk_size": 60},
    }
    (directory / "match.yaml").write_text(yaml.safe_dump(config))
    ds = match_template(directory / "match.yaml", client=client)
    peaks = peaks_table(ds, PeaksConfig(metric="scaled_mip", z_score_cutoff=5.0))
    rows = []
    for p in particles:
        distance = np.hypot(peaks["pos_y"] - p.pos_y, peaks["pos_x"] - p.pos_x)
        assert distance.min() <= 1.0, f"coarse match missed the particle at {p.pos_y, p.pos_x}"
        rows.append(int(np.argmin(distance)))
    first = peaks.iloc[rows]
    shutil.copy(directory / "a.mrc", directory / "b.mrc")
    second = first.assign(micrograph_path=str(directory / "b.mrc"), micrograph_name="b")
    table = pd.concat([first, second], ignore_index=True)
    write_table(table, directory, "peaks")
    return {"dir": directory, "particles": particles, "table": table}


def _refine_config(
    coarse: dict[str, Any], name: str, df_path: Path | None = None, **extra: Any
) -> Path:
    directory = coarse["dir"]
    config: dict[str, Any] = {
        "template_volume_path": str(directory / "template.mrc"),
        "particle_stack": {
            "df_path": str(df_path or directory / "peaks.csv"),
            "extracted_box_size": [80, 80],
        },
        "defocus_refinement_config": {
            "defocus_min": -300,
            "defocus_max": 300,
            "defocus_step": DEFOCUS_STEP,
        },
        "orientation_refinement_config": {
            "theta_step_coarse": 7.5,
            "theta_step_fine": THETA_FINE,
            "psi_step_coarse": 7.5,
            "psi_step_fine": PSI_FINE,
        },
        "preprocessing_filters": {"whitening_filter": {"enabled": True}},
        "output_path": str(directory / f"{name}.csv"),
    }
    config.update(extra)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def refined(coarse: dict[str, Any], client: Client) -> pd.DataFrame:
    return refine_template(_refine_config(coarse, "refined"), client=client)


def test_refine_recovers_off_grid_particles(coarse: dict[str, Any], refined: pd.DataFrame) -> None:
    table = coarse["table"]
    assert list(refined.index) == list(table.index)
    pd.testing.assert_frame_equal(refined[table.columns], table)
    assert list(refined.columns[len(table.columns) :]) == list(REFINED_DTYPES)
    print("\nparticle  angle° before→after  defocus error Å before→after  scaled MIP before→after")
    for k, particle in enumerate(coarse["particles"]):
        row = refined.iloc[k]
        truth = _rotation(particle.phi, particle.theta, particle.psi)
        before = _angle(truth, _rotation(row.phi, row.theta, row.psi))
        after = _angle(truth, _rotation(row.refined_phi, row.refined_theta, row.refined_psi))
        defocus_before = abs(row.relative_defocus - particle.relative_defocus)
        defocus_after = abs(row.refined_relative_defocus - particle.relative_defocus)
        print(
            f"{k}  {before:5.2f} → {after:4.2f}   {defocus_before:5.0f} → {defocus_after:4.0f}"
            f"   {row.scaled_mip:6.2f} → {row.refined_scaled_mip:6.2f}"
        )
        assert 3.0 <= before and after <= THETA_FINE
        assert defocus_before == pytest.approx(120.0) and defocus_after <= DEFOCUS_STEP
        assert row.refined_scaled_mip > row.scaled_mip
        assert row.refined_mip > row.mip
        assert (row.refined_pos_y, row.refined_pos_x) == (particle.pos_y, particle.pos_x)
        assert row.refined_pos_y_img == particle.pos_y + BOX // 2
        assert row.refined_pos_x_img_angstrom == pytest.approx((particle.pos_x + BOX // 2) * 3.0)
    # The two micrographs are the same image: their particles refine identically.
    half = len(coarse["particles"])
    for name in REFINED_DTYPES:
        np.testing.assert_array_equal(refined[name].iloc[:half], refined[name].iloc[half:])


def test_edge_particle_is_padded_and_flagged(refined: pd.DataFrame) -> None:
    inside = refined["refined_box_inside"].to_numpy()
    assert inside.dtype == bool
    np.testing.assert_array_equal(inside, [True, True, True, True, False] * 2)
    assert np.isfinite(refined["refined_scaled_mip"]).all()


def test_outputs_written_and_readable(coarse: dict[str, Any], refined: pd.DataFrame) -> None:
    from_csv = read_table(coarse["dir"] / "refined.csv")
    np.testing.assert_allclose(from_csv["refined_scaled_mip"], refined["refined_scaled_mip"])
    from_parquet = read_table(coarse["dir"] / "refined.parquet")
    assert set(REFINED_DTYPES) <= set(from_parquet.columns)
    assert len(from_parquet) == len(refined)


def test_one_and_three_workers_give_identical_results(
    coarse: dict[str, Any], client: Client
) -> None:
    small = {
        "orientation_refinement_config": {
            "theta_step_coarse": 5.0,
            "theta_step_fine": 2.5,
            "psi_step_coarse": 5.0,
            "psi_step_fine": 2.5,
        },
        "defocus_refinement_config": {"defocus_min": -100, "defocus_max": 100},
    }
    one = refine_template(_refine_config(coarse, "one", **small), client=client)
    with (
        LocalCluster(
            n_workers=3, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        three = refine_template(_refine_config(coarse, "three", **small), client=c)
    pd.testing.assert_frame_equal(three, one)


def test_refining_the_refined_table_keeps_or_improves(
    coarse: dict[str, Any], refined: pd.DataFrame, client: Client
) -> None:
    path = _refine_config(coarse, "again", df_path=coarse["dir"] / "refined.csv")
    again = refine_template(path, client=client)
    assert list(again.columns) == list(refined.columns)  # refined columns replaced, not added
    assert (again["refined_scaled_mip"] >= refined["refined_scaled_mip"] - 1e-4).all()
    # It started from the refined values: the original columns are untouched.
    np.testing.assert_array_equal(again["scaled_mip"], refined["scaled_mip"])


def test_no_offsets_reproduce_the_match_values(coarse: dict[str, Any], client: Client) -> None:
    """Same filtering and normalisation as the match: at the match's own pose, defocus and
    position the correlation and z-score are the match's MIP and scaled MIP."""
    path = _refine_config(
        coarse,
        "same",
        position_search_pixels=0,
        orientation_refinement_config={"enabled": False},
        defocus_refinement_config={"enabled": False},
    )
    same = refine_template(path, client=client)
    np.testing.assert_allclose(same["refined_mip"], same["mip"], rtol=1e-4)
    np.testing.assert_allclose(same["refined_scaled_mip"], same["scaled_mip"], rtol=1e-4)
    np.testing.assert_array_equal(same["refined_pos_x"], same["pos_x"])


def test_bad_inputs_raise_one_line_errors(coarse: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="df_path: file not found"):
        refine_template(_refine_config(coarse, "missing", df_path=tmp_path / "none.csv"))
    small = _refine_config(
        coarse,
        "small",
        particle_stack={
            "df_path": str(coarse["dir"] / "peaks.csv"),
            "extracted_box_size": [48, 48],
        },
    )
    with pytest.raises(ConfigError) as small_error:
        refine_template(small)
    assert str(small_error.value).startswith(
        f"{coarse['dir'] / 'template.mrc'}: the template box {BOX} px"
    )
    assert "extracted_box_size (48, 48)" in str(small_error.value)
    other = tmp_path / "template.mrc"
    write_map(other, simulate_template(BOX, pixel_size=2.0, n_atoms=50), pixel_size=2.0)
    mismatch = _refine_config(coarse, "mismatch", template_volume_path=str(other))
    with pytest.raises(InputError, match="differs from the template"):
        refine_template(mismatch)
    moved = coarse["table"].assign(micrograph_path=str(tmp_path / "moved.mrc"))
    moved.to_csv(tmp_path / "moved.csv", index=False)
    with pytest.raises(InputError) as missing:
        refine_template(_refine_config(coarse, "moved", df_path=tmp_path / "moved.csv"))
    assert str(missing.value) == (
        f"{tmp_path / 'moved.csv'}: micrograph_path {tmp_path / 'moved.mrc'}: file not found"
    )
    partial = coarse["table"].drop(columns=["psi"])
    partial.to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(InputError, match="psi"):
        refine_template(_refine_config(coarse, "partial", df_path=tmp_path / "partial.csv"))


def test_statistics_maps_come_from_the_store_when_their_mrc_files_are_gone(
    coarse: dict[str, Any], refined: pd.DataFrame, client: Client, tmp_path: Path
) -> None:
    shutil.copytree(coarse["dir"] / "match", tmp_path / "match")
    shutil.rmtree(tmp_path / "match" / "maps")
    table = coarse["table"].copy()
    for column in ("correlation_average_path", "correlation_variance_path"):
        table[column] = table[column].str.replace(str(coarse["dir"]), str(tmp_path))
    table.to_csv(tmp_path / "no-maps.csv", index=False)
    config = _refine_config(coarse, "from-store", df_path=tmp_path / "no-maps.csv")
    from_store = refine_template(config, client=client)
    for name in ("refined_scaled_mip", "refined_pos_x", "refined_pos_y", "refined_psi"):
        np.testing.assert_array_equal(from_store[name], refined[name], err_msg=name)


def test_output_path_is_checked_before_refining(
    coarse: dict[str, Any], refined: pd.DataFrame, tmp_path: Path
) -> None:
    earlier = coarse["dir"] / "refined.csv"
    before = earlier.read_bytes()
    # No cluster is given: a check made after the search would start one and fail later.
    with pytest.raises(OutputError, match=r"^output_path .*refined\.csv: refined tables exist"):
        refine_template(_refine_config(coarse, "refined"))
    assert earlier.read_bytes() == before
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    inside_a_file = _refine_config(coarse, "blocked", output_path=str(blocker / "refined.csv"))
    with pytest.raises(OutputError, match=r"^output_path .*a-file: not writable"):
        refine_template(inside_a_file)
