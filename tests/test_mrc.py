"""Tests of MRC reading, validation and writing (real files written with mrcfile)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from dtm.errors import InputError, OutputError
from dtm.io.mrc import (
    MrcData,
    check_compatible,
    pixel_sizes_differ,
    read_micrograph,
    read_template,
    summarise_notices,
    write_map,
)


def _write(path: Path, data: np.ndarray, voxel_size: float = 1.5) -> Path:
    """An MRC file written directly with mrcfile (independent of write_map)."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size
    return path


def _image(shape: tuple[int, ...] = (24, 32), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_write_map_round_trip_with_voxel_size(tmp_path):
    image = _image()
    write_map(tmp_path / "sub" / "map.mrc", image.astype(np.float64), pixel_size=1.23)
    with mrcfile.open(tmp_path / "sub" / "map.mrc", permissive=False) as mrc:
        assert mrc.data.dtype == np.float32
        np.testing.assert_array_equal(mrc.data, image)
        assert mrc.voxel_size.x == pytest.approx(1.23)
        assert mrc.voxel_size.y == pytest.approx(1.23)
    read = read_micrograph(tmp_path / "sub" / "map.mrc")
    np.testing.assert_array_equal(read.data, image)
    assert read.pixel_size == pytest.approx(1.23)
    assert read.path == tmp_path / "sub" / "map.mrc"
    # No temporary files are left behind.
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["map.mrc"]


def test_write_map_overwrite_rules(tmp_path):
    target = tmp_path / "map.mrc"
    write_map(target, _image(seed=1), pixel_size=2.0)
    write_map(target, _image(seed=2), pixel_size=2.0)
    np.testing.assert_array_equal(read_micrograph(target).data, _image(seed=2))
    with pytest.raises(OutputError, match="map.mrc"):
        write_map(target, _image(seed=3), pixel_size=2.0, overwrite=False)
    np.testing.assert_array_equal(read_micrograph(target).data, _image(seed=2))


def test_write_map_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "map.mrc"
    write_map(target, _image(seed=1), pixel_size=2.0)
    with pytest.raises(ValueError):
        write_map(target, np.zeros(5), pixel_size=2.0)
    np.testing.assert_array_equal(read_micrograph(target).data, _image(seed=1))
    assert sorted(os.listdir(tmp_path)) == ["map.mrc"]


def test_read_template_round_trip(tmp_path):
    volume = _image((8, 8, 8))
    write_map(tmp_path / "t.mrc", volume, pixel_size=3.0)
    template = read_template(tmp_path / "t.mrc")
    assert isinstance(template, MrcData)
    assert template.data.shape == (8, 8, 8) and template.data.dtype == np.float32
    np.testing.assert_array_equal(template.data, volume)
    assert template.pixel_size == pytest.approx(3.0)


def test_single_section_volume_is_a_micrograph(tmp_path):
    image = _image()
    micrograph = read_micrograph(_write(tmp_path / "m.mrc", image[None]))
    assert micrograph.data.shape == image.shape
    np.testing.assert_array_equal(micrograph.data, image)


def test_integer_modes_are_converted_to_float32(tmp_path):
    image = np.arange(24 * 32, dtype=np.int16).reshape(24, 32)
    micrograph = read_micrograph(_write(tmp_path / "int16.mrc", image))
    assert micrograph.data.dtype == np.float32
    np.testing.assert_array_equal(micrograph.data, image.astype(np.float32))


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothere.mrc.*not found"):
        read_micrograph(tmp_path / "nothere.mrc")
    with pytest.raises(InputError, match="not a file"):
        read_template(tmp_path)


@pytest.mark.parametrize("keep_bytes", [-100, 500])
def test_truncated_file(tmp_path, keep_bytes):
    path = _write(tmp_path / "cut.mrc", _image())
    content = path.read_bytes()
    path.write_bytes(content[:keep_bytes])
    with pytest.raises(InputError, match="cut.mrc"):
        read_micrograph(path)


def test_file_longer_than_its_header_says(tmp_path):
    path = _write(tmp_path / "long.mrc", _image())
    path.write_bytes(path.read_bytes() + bytes(64))
    with pytest.raises(InputError, match="long.mrc.*larger than expected"):
        read_micrograph(path)


def test_not_an_mrc_file(tmp_path):
    path = tmp_path / "text.mrc"
    path.write_text("not an mrc file\n" * 200)
    with pytest.raises(InputError, match="text.mrc.*not a readable MRC"):
        read_template(path)


def test_unsupported_and_complex_modes(tmp_path):
    path = _write(tmp_path / "mode3.mrc", _image())
    content = bytearray(path.read_bytes())
    content[12:16] = struct.pack("<i", 3)  # MODE word: complex int16, refused by mrcfile
    path.write_bytes(bytes(content))
    with pytest.raises(InputError, match="mode3.mrc"):
        read_micrograph(path)
    complex_path = _write(tmp_path / "complex.mrc", _image().astype(np.complex64))
    with pytest.raises(InputError, match="complex.mrc.*complex"):
        read_micrograph(complex_path)


def test_wrong_dimensionality(tmp_path):
    stack = _write(tmp_path / "stack.mrc", _image((3, 24, 32)))
    with pytest.raises(InputError, match="stack.mrc.*2-D"):
        read_micrograph(stack)
    flat = _write(tmp_path / "flat.mrc", _image((16, 16)))
    with pytest.raises(InputError, match="flat.mrc.*cubic"):
        read_template(flat)
    non_cubic = _write(tmp_path / "box.mrc", _image((8, 8, 10)))
    with pytest.raises(InputError, match="box.mrc.*cubic"):
        read_template(non_cubic)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's header stats while writing
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path, bad):
    image = _image()
    image[3, 4] = bad
    with pytest.raises(InputError, match="nonfinite.mrc.*NaN or infinite"):
        read_micrograph(_write(tmp_path / "nonfinite.mrc", image))
    volume = _image((6, 6, 6))
    volume[1, 2, 3] = bad
    with pytest.raises(InputError, match="vol.mrc.*NaN or infinite"):
        read_template(_write(tmp_path / "vol.mrc", volume))


def test_constant_arrays(tmp_path):
    with pytest.raises(InputError, match="flat.mrc.*empty micrograph"):
        read_micrograph(_write(tmp_path / "flat.mrc", np.full((24, 32), 7.0, np.float32)))
    with pytest.raises(InputError, match="zero.mrc.*empty template"):
        read_template(_write(tmp_path / "zero.mrc", np.zeros((6, 6, 6), np.float32)))


def test_missing_pixel_size(tmp_path):
    path = _write(tmp_path / "nopix.mrc", _image(), voxel_size=0.0)
    with pytest.raises(InputError, match="nopix.mrc.*pixel size"):
        read_micrograph(path)
    assert read_micrograph(path, pixel_size=1.1).pixel_size == pytest.approx(1.1)
    with pytest.raises(InputError, match="pixel_size"):
        read_micrograph(path, pixel_size=0.0)
    # A header value wins over the fallback; check_compatible compares them.
    with_header = _write(tmp_path / "pix.mrc", _image(), voxel_size=1.5)
    assert read_micrograph(with_header, pixel_size=1.1).pixel_size == pytest.approx(1.5)


def _pair(tmp_path: Path, mic_pixel: float, tmpl_pixel: float, box: int = 8):
    micrograph = read_micrograph(_write(tmp_path / "mic.mrc", _image((24, 32)), mic_pixel))
    template = read_template(_write(tmp_path / "tmpl.mrc", _image((box, box, box)), tmpl_pixel))
    return micrograph, template


def test_check_compatible_accepts_matching_files(tmp_path):
    micrograph, template = _pair(tmp_path, 1.5, 1.5005)  # 0.03 %: within tolerance
    assert check_compatible(micrograph, template) == []
    assert check_compatible(micrograph, template, pixel_size=1.501, strict=True) == []


def test_template_larger_than_micrograph(tmp_path):
    micrograph, template = _pair(tmp_path, 1.5, 1.5, box=26)
    with pytest.raises(InputError, match="tmpl.mrc.*larger than micrograph.*mic.mrc"):
        check_compatible(micrograph, template)


def test_pixel_size_mismatch_names_both_files_and_values(tmp_path):
    micrograph, template = _pair(tmp_path, 1.5, 1.51)
    with pytest.raises(InputError, match=r"mic.mrc has 1.5 Å.*tmpl.mrc has 1.51 Å"):
        check_compatible(micrograph, template)


@pytest.mark.parametrize("header", [1.0, 1.5])
def test_a_header_pixel_size_that_differs_is_a_notice_and_refused_only_when_strict(
    tmp_path, header
):
    """Headers left at 1.0 are common; Leopard-EM ignores them and so does dtm, saying so."""
    micrograph, template = _pair(tmp_path, header, 1.06)
    notices = check_compatible(micrograph, template, pixel_size=1.06)
    assert notices == [
        f"micrograph {micrograph.path}: header pixel size {header:g} Å differs from the "
        "configuration's pixel_size 1.06 Å by more than 0.1 %; 1.06 Å is used (--strict "
        "refuses it)"
    ]
    with pytest.raises(InputError, match=rf"pixel_size.*1.06 Å.*mic.mrc.*{header:g} Å.*--strict"):
        check_compatible(micrograph, template, pixel_size=1.06, strict=True)


def test_an_unset_header_pixel_size_is_a_notice_even_when_strict(tmp_path):
    micrograph = read_micrograph(
        _write(tmp_path / "mic.mrc", _image((24, 32)), 0.0), pixel_size=1.06
    )
    template = read_template(_write(tmp_path / "t.mrc", _image((8, 8, 8)), 0.0), pixel_size=1.06)
    assert (micrograph.pixel_size, micrograph.header_pixel_size) == (1.06, None)
    notices = check_compatible(micrograph, template, pixel_size=1.06, strict=True)
    assert [line.split(":")[0] for line in notices] == [
        f"micrograph {micrograph.path}",
        f"template {template.path}",
    ]
    assert all(
        "no pixel size (voxel size 0); the configuration's pixel_size 1.06 Å is used" in line
        for line in notices
    )
    # Without any pixel size, neither in the header nor given, a file is still refused.
    with pytest.raises(InputError, match="mic.mrc: the header has no pixel size"):
        read_micrograph(micrograph.path)


def test_many_notices_are_summarised():
    lines = [f"micrograph m{i}.mrc: header unset" for i in range(25)] * 2
    summary = summarise_notices(lines)
    assert summary[:10] == lines[:10]
    assert summary[10:] == ["... and 15 more files like these"]
    assert summarise_notices(lines[:3] * 2) == lines[:3]


def test_pixel_sizes_differ_beyond_a_tenth_of_a_percent_of_the_larger():
    assert not pixel_sizes_differ(1.000, 1.0009) and pixel_sizes_differ(1.000, 1.0011)
    assert pixel_sizes_differ(2.0, 1.0)  # either order
    differ = pixel_sizes_differ(np.array([1.0, 1.0005, 1.5]), 1.0)
    np.testing.assert_array_equal(differ, [False, False, True])
