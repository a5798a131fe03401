"""ParticleStack: boxes equal the micrograph's pixels at the expected offsets, with padding."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

import dtm.programs.particles
from dtm.errors import ConfigError, InputError
from dtm.programs.particles import extract_particles

TEMPLATE = 8
BOX = (12, 10)


def write_mrc(path, data, pixel_size=1.5):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = pixel_size
    return str(path)


def reference_pixel(image, y, x, pad_mode, pad_value=0.0):
    """Pixel (y, x) of ``image`` extended beyond its edges, written out case by case."""
    height, width = image.shape
    if 0 <= y < height and 0 <= x < width:
        return image[y, x]
    if pad_mode == "constant":
        return pad_value
    if pad_mode == "edge":
        return image[min(max(y, 0), height - 1), min(max(x, 0), width - 1)]
    # reflect: mirror about the edge pixel without repeating it (one reflection suffices here)
    y = -y if y < 0 else (2 * (height - 1) - y if y >= height else y)
    x = -x if x < 0 else (2 * (width - 1) - x if x >= width else x)
    return image[y, x]


@pytest.fixture
def micrographs(tmp_path):
    rng = np.random.default_rng(5)
    images, rows = {}, []
    # centres: inside, touching the top-left, beyond the bottom-right edges
    centres = {"m1": [(20, 25), (3, 2), (38, 47)], "m2": [(10, 30), (0, 0)]}
    for name, points in centres.items():
        image = rng.standard_normal((40, 50)).astype(np.float32)
        path = write_mrc(tmp_path / f"{name}.mrc", image)
        mean_map = rng.standard_normal((33, 43)).astype(np.float32)  # valid mode: 40-8+1
        var_map = rng.random((33, 43)).astype(np.float32) + 1.0
        mean_path = write_mrc(tmp_path / f"{name}_mean.mrc", mean_map)
        var_path = write_mrc(tmp_path / f"{name}_var.mrc", var_map)
        images[path] = (image, mean_map, var_map)
        for index, (cy, cx) in enumerate(points):
            rows.append(
                {
                    "micrograph_name": name,
                    "particle_index": index,
                    "micrograph_path": path,
                    "correlation_average_path": mean_path,
                    "correlation_variance_path": var_path,
                    "pos_y": cy - TEMPLATE // 2,
                    "pos_x": cx - TEMPLATE // 2,
                    "pos_y_img": cy,
                    "pos_x_img": cx,
                    "pixel_size": 1.5,
                }
            )
    # Interleave micrographs so the stack must keep the table's row order.
    table = pd.DataFrame(rows).iloc[[0, 3, 1, 4, 2]].reset_index(drop=True)
    return table, images


@pytest.mark.parametrize("pad_mode", ["constant", "reflect", "edge"])
def test_boxes_match_micrograph_pixels_with_padding(micrographs, pad_mode):
    table, images = micrographs
    stack = extract_particles(table, BOX, pad_mode=pad_mode, pad_value=-7.0)
    assert stack.images.shape == (5, *BOX) and stack.images.dtype == np.float32
    for k, row in table.iterrows():
        image = images[row["micrograph_path"]][0]
        top, left = row["pos_y_img"] - BOX[0] // 2, row["pos_x_img"] - BOX[1] // 2
        expected = np.array(
            [
                [reference_pixel(image, top + j, left + i, pad_mode, -7.0) for i in range(BOX[1])]
                for j in range(BOX[0])
            ]
        )
        np.testing.assert_array_equal(stack.images[k], expected)
        # The particle's centre pixel sits at the box centre.
        assert (
            stack.images[k][BOX[0] // 2, BOX[1] // 2] == image[row["pos_y_img"], row["pos_x_img"]]
        )
    inside = [True, True, False, False, False]  # rows: (20,25) (10,30) (3,2) (0,0) (38,47)
    assert stack.box_inside.tolist() == inside
    assert stack.table["box_inside"].tolist() == inside


def test_statistic_windows_cover_template_positions_in_the_box(micrographs):
    table, images = micrographs
    stack = extract_particles(table, BOX, template_box=TEMPLATE, with_statistics=True)
    window = (BOX[0] - TEMPLATE + 1, BOX[1] - TEMPLATE + 1)
    assert stack.correlation_mean.shape == (5, *window)
    for k, row in table.iterrows():
        _, mean_map, var_map = images[row["micrograph_path"]]
        top, left = row["pos_y_img"] - BOX[0] // 2, row["pos_x_img"] - BOX[1] // 2
        for stat, source in (
            (stack.correlation_mean, mean_map),
            (stack.correlation_variance, var_map),
        ):
            for j in range(window[0]):
                for i in range(window[1]):
                    y, x = top + j, left + i  # template top-left = map pixel
                    inside = 0 <= y < source.shape[0] and 0 <= x < source.shape[1]
                    if inside:
                        assert stat[k, j, i] == source[y, x]
                    else:
                        assert np.isnan(stat[k, j, i])
        # The window position of the particle's own template box is its (pos_y, pos_x).
        j0, i0 = BOX[0] // 2 - TEMPLATE // 2, BOX[1] // 2 - TEMPLATE // 2
        if stack.box_inside[k]:
            assert stack.correlation_mean[k, j0, i0] == mean_map[row["pos_y"], row["pos_x"]]


def test_refined_positions_are_used_when_present(micrographs):
    table, images = micrographs
    refined = table.assign(refined_pos_y_img=table["pos_y_img"] + 1, refined_pos_x_img=25)
    stack = extract_particles(refined, BOX)
    original = extract_particles(refined, BOX, positions="original")
    image = images[table["micrograph_path"][0]][0]
    assert stack.images[0][BOX[0] // 2, BOX[1] // 2] == image[21, 25]
    assert original.images[0][BOX[0] // 2, BOX[1] // 2] == image[20, 25]
    with pytest.raises(InputError):
        extract_particles(table, BOX, positions="refined")


def test_each_micrograph_is_read_once(micrographs, monkeypatch):
    table, _ = micrographs
    reads: list[str] = []
    real_read = dtm.programs.particles.read_micrograph

    def counting_read(path, **kwargs):
        reads.append(str(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(dtm.programs.particles, "read_micrograph", counting_read)
    extract_particles(table, BOX)
    assert sorted(reads) == sorted(set(table["micrograph_path"]))


def test_to_xarray_and_bad_options(micrographs):
    table, _ = micrographs
    stack = extract_particles(table, 9, template_box=(8, 8), with_statistics=True)
    ds = stack.to_xarray()
    assert ds["images"].dims == ("particle", "y", "x")
    assert ds["images"].shape == (5, 9, 9)
    assert ds["correlation_variance"].dims == ("particle", "stat_y", "stat_x")
    assert ds["micrograph_name"].values.tolist() == table["micrograph_name"].tolist()
    np.testing.assert_array_equal(ds["images"].values, stack.images)
    with pytest.raises(ConfigError):
        extract_particles(table, BOX, pad_mode="wrap")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        extract_particles(table, BOX, with_statistics=True)
    with pytest.raises(InputError, match="not found"):
        extract_particles(table.assign(micrograph_path="/nowhere/x.mrc"), BOX)
