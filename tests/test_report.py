"""``dtm report``: survival statistics against independent references, and the HTML file."""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from pathlib import Path

import fsspec
import matplotlib.image
import numpy as np
import pytest
import scipy.stats
from synthetic_results import write_results

from dtm.config.match import PeaksConfig
from dtm.errors import InputError
from dtm.io.results import open_micrographs
from dtm.io.tables import read_table
from dtm.programs.peaks import read_picking, repick
from dtm.programs.report import expected_survival, report_threshold, survival_curves, write_report
from dtm.search.picking import threshold


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results(tmp_path_factory.mktemp("report") / "run", names=("m1", "m2"))


def test_expected_survival_is_that_of_the_max_of_n_normals() -> None:
    z = np.array([-1.0, 0.0, 1.5, 3.0])
    # Small N: the textbook formula directly.
    np.testing.assert_allclose(expected_survival(z, 7), 1 - scipy.stats.norm.cdf(z) ** 7)
    # Large N far in the tail: 1 - (1 - p)^N = 1 - exp(N log1p(-p)), p = Q(z), in float64
    # where Φ(z)^N itself would round to 1.
    n, z_tail = 10**9, np.array([7.0, 8.0, 9.0])
    p = scipy.stats.norm.sf(z_tail)
    np.testing.assert_allclose(expected_survival(z_tail, n), -np.expm1(n * np.log1p(-p)), rtol=1e-9)


def test_observed_survival_counts_positions_at_or_above_z() -> None:
    values = np.array([[1.0, 2.0, 2.0], [3.0, np.nan, 5.0]])
    z, observed, _ = survival_curves(values, 10, z=np.array([0.0, 2.0, 2.5, 5.0, 6.0]))
    np.testing.assert_allclose(observed, [5 / 5, 4 / 5, 2 / 5, 1 / 5, 0.0])


def test_survival_of_simulated_noise_maxima_follows_the_expectation() -> None:
    rng = np.random.default_rng(3)
    n_correlations, n_positions = 40, 20_000
    maxima = rng.standard_normal((n_positions, n_correlations)).max(axis=1)
    z = np.array([1.5, 2.0, 2.5, 3.0])
    _, observed, expected = survival_curves(maxima, n_correlations, z=z)
    sigma = np.sqrt(expected * (1 - expected) / n_positions)  # binomial standard error
    assert np.all(np.abs(observed - expected) < 5 * sigma)


def test_threshold_comes_from_the_run_configuration(results: Path) -> None:
    micrograph = open_micrographs(results)[0]
    dataset = micrograph.dataset
    cutoff, label = report_threshold(dataset)
    n_positions = dataset.sizes["y"] * dataset.sizes["x"]  # valid mode: every map pixel
    assert cutoff == pytest.approx(threshold(n_positions, dataset.attrs["total_correlations"]))
    assert "1 false positive" in label
    fixed = dataset.assign_attrs(config=json.dumps({"peaks": {"z_score_cutoff": 7.25}}))
    assert report_threshold(fixed)[0] == 7.25


def test_report_shows_the_threshold_of_the_last_pick(tmp_path: Path) -> None:
    run = write_results(tmp_path / "run")
    repick(run, PeaksConfig(false_positives=100.0))
    picking = read_picking(run)
    assert picking is not None and picking["options"]["false_positives"] == 100.0
    dataset = open_micrographs(run)[0].dataset
    cutoff, label = report_threshold(dataset, picking)
    n_positions = dataset.sizes["y"] * dataset.sizes["x"]
    assert cutoff == threshold(n_positions, dataset.attrs["total_correlations"], 100.0)
    assert picking["thresholds"] == {"micrograph": cutoff}  # the z* applied, recorded
    page = write_report(run).read_text()
    assert label == f"z* = {cutoff:.2f} (100 false positives per micrograph)" and label in page
    repick(run, PeaksConfig(z_score_cutoff=8.5))
    assert "z* = 8.50 (fixed)" in write_report(run).read_text()
    (run / "peaks.json").write_text("[1, 2")  # damaged: a one-line error, not a traceback
    with pytest.raises(InputError, match=r"peaks\.json: unreadable picking settings"):
        write_report(run)


def _images(page: str) -> list[np.ndarray]:
    encoded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(e)), format="png") for e in encoded]


def test_report_is_one_self_contained_file_with_figures_and_tables(results: Path) -> None:
    path = write_report(results)
    assert path == results / "report.html"
    page = path.read_text()
    # Nothing fetched from elsewhere: every image is inline.
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert page.count("<img") == 4
    images = _images(page)
    assert len(images) == 4
    for image in images:
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.05  # a drawn figure, not a blank canvas
    # The MIP figures carry red circles (#ff3b30) for the peaks.
    mip = images[0][..., :3]
    red = (mip[..., 0] > 0.9) & (mip[..., 1] < 0.4) & (mip[..., 2] < 0.4)
    assert red.sum() > 50

    peaks = read_table(results / "peaks.csv")
    for name in ("m1", "m2"):
        section = page.split(f'<section id="{name}">')[1].split("</section>")[0]
        table = section.split('class="dataframe peaks">')[1]
        rows = table.split("<tbody>")[1].count("<tr>")
        mine = peaks[peaks["micrograph_name"] == name]
        assert rows == len(mine) > 0
        for _, peak in mine.iterrows():
            cells = rf"<td>{peak['pos_x']}</td>\s*<td>{peak['pos_y']}</td>"
            assert re.search(cells, table)


def test_report_of_a_remote_store(results: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/dtm-report-{uuid.uuid4().hex}"
    fs.put(str(results), root, recursive=True)
    try:
        path = write_report(f"memory://{root}", out=tmp_path / "remote.html")
    finally:
        fs.rm(root, recursive=True)
    assert path.exists()
    assert path.read_text().count("<section") == 2


def test_report_of_a_missing_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no dtm results store"):
        write_report(tmp_path / "nothing")
