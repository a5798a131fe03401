"""Read and validate micrographs and templates; write maps atomically, with their voxel size.

Every problem with a user's file is an :class:`~dtm.errors.InputError` whose one-line message
names the file and what is wrong with it. Files are opened with ``permissive=False``, and
mrcfile's warnings (for example a file longer than its header says) are errors too: a file
that does not match its own header is corrupt, and searching it would give wrong maps.

Modes: every real MRC mode (int8, int16, uint16, float16, float32) is accepted and converted
to float32; complex modes (3, 4) are rejected.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from dtm.errors import InputError, OutputError
from dtm.io.atomic import write_atomic

# Two pixel sizes are "the same" when they differ by at most this fraction (0.1 %): a 0.1 %
# magnification error costs little SNR (about 20 % at 1.9 %, as measured for 2DTM).
PIXEL_SIZE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class MrcData:
    """An image or volume read from an MRC file.

    Attributes
    ----------
    data
        float32 array, ``(H, W)`` for a micrograph, ``(d, d, d)`` ``[z, y, x]`` for a template.
    pixel_size
        Pixel size in Å: the header's, else the one given to the reader.
    path
        The file it came from.
    header_pixel_size
        The header's pixel size in Å; None where the header has none (voxel size 0).
    """

    data: np.ndarray
    pixel_size: float
    path: Path
    header_pixel_size: float | None = None


def _read(path: str | os.PathLike[str], kind: str) -> tuple[np.ndarray, tuple[float, ...], Path]:
    """Array (native dtype) and header voxel sizes (x, y, z) in Å of an MRC file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{kind} {path}: file not found")
    if not path.is_file():
        raise InputError(f"{kind} {path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _check_header(path, kind)
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                data = np.array(mrc.data)
                voxel = mrc.voxel_size
                voxel_size = (float(voxel.x), float(voxel.y), float(voxel.z))
    except InputError:
        raise
    except (ValueError, RuntimeWarning, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{kind} {path}: not a readable MRC file ({reason})") from error
    if np.iscomplexobj(data):
        raise InputError(f"{kind} {path}: complex MRC mode, expected real values")
    return data, voxel_size, path


def _check_header(path: Path, kind: str) -> None:
    """Compare the data size the header claims with the file's size and with the memory
    of this machine, before any data are read.

    Raises
    ------
    InputError
        The file is shorter than its header says, or its data (read and converted to
        float32) would not fit in memory.
    """
    from distributed.system import MEMORY_LIMIT

    with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
        header = mrc.header
        shape = (int(header.nz), int(header.ny), int(header.nx))
        try:
            itemsize = mrcfile.utils.dtype_from_mode(header.mode).itemsize
        except ValueError as error:
            raise InputError(f"{kind} {path}: not a readable MRC file ({error})") from None
        extended = int(header.nsymbt)
    if min(shape) < 0:
        raise InputError(f"{kind} {path}: negative dimensions {shape[::-1]} in the header")
    count = shape[0] * shape[1] * shape[2]
    claimed = 1024 + extended + count * itemsize
    size = path.stat().st_size
    if claimed > size:
        raise InputError(
            f"{kind} {path}: the header claims {claimed:,} bytes ({shape[2]}×{shape[1]}×"
            f"{shape[0]} values), the file holds {size:,} (truncated or corrupt)"
        )
    needed = count * (itemsize + 4)  # the data as stored and as float32
    if needed > MEMORY_LIMIT:
        raise InputError(
            f"{kind} {path}: {shape[2]}×{shape[1]}×{shape[0]} values need "
            f"{needed / 2**30:,.1f} GiB to read, more than this machine's "
            f"{MEMORY_LIMIT / 2**30:,.1f} GiB"
        )


def _check_values(data: np.ndarray, kind: str, path: Path) -> np.ndarray:
    """float32 copy of ``data``; reject NaN/inf and constant arrays."""
    values = np.asarray(data, dtype=np.float32)
    if not np.isfinite(values).all():
        count = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise InputError(f"{kind} {path}: {count} pixel(s) are NaN or infinite")
    if values.min() == values.max():
        empty = "empty micrograph" if kind == "micrograph" else "empty template"
        raise InputError(f"{kind} {path}: all pixels equal {values.flat[0]:g} ({empty})")
    return values


def _header_pixel_size(
    sizes: tuple[float, ...], fallback: float | None, kind: str, path: Path
) -> tuple[float, float | None]:
    """The pixel size to use and the header's: the one pixel size of the header's axes
    (0 = unknown), or ``fallback`` if none is set (then the header's is None)."""
    if not all(math.isfinite(size) and size >= 0 for size in sizes):
        raise InputError(f"{kind} {path}: invalid voxel size {sizes} Å in the header")
    known = [size for size in sizes if size > 0]
    if known:
        if pixel_sizes_differ(max(known), min(known)):
            raise InputError(
                f"{kind} {path}: voxel sizes differ between axes {tuple(sizes)} Å "
                "(anisotropic pixels are not supported)"
            )
        return known[0], known[0]
    if fallback is None:
        raise InputError(
            f"{kind} {path}: the header has no pixel size (voxel size 0); set it in the file "
            "or give pixel_size in the configuration"
        )
    if not (math.isfinite(fallback) and fallback > 0):
        raise InputError(f"pixel_size: must be a positive number of Å, got {fallback}")
    return float(fallback), None


def read_micrograph(path: str | os.PathLike[str], *, pixel_size: float | None = None) -> MrcData:
    """Read and validate a micrograph.

    Parameters
    ----------
    path
        MRC file holding one 2-D image (a 3-D file with a single section is accepted).
    pixel_size
        Pixel size in Å to use when the header has none (voxel size 0). A pixel size in the
        header is kept; :func:`check_compatible` compares it with the configuration's.

    Returns
    -------
    MrcData
        ``data`` float32 ``(H, W)``.

    Raises
    ------
    InputError
        Missing, unreadable, corrupt or truncated file; complex mode; not a single 2-D image;
        NaN/inf values; constant image; no pixel size anywhere.
    """
    data, sizes, path = _read(path, "micrograph")
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(
            f"micrograph {path}: expected a single 2-D image, got an array of shape {data.shape}"
        )
    values = _check_values(data, "micrograph", path)
    used, header = _header_pixel_size(sizes[:2], pixel_size, "micrograph", path)
    return MrcData(values, used, path, header)


def read_template(path: str | os.PathLike[str], *, pixel_size: float | None = None) -> MrcData:
    """Read and validate a template volume.

    Parameters
    ----------
    path
        MRC file holding a cubic 3-D volume, positive density.
    pixel_size
        Voxel size in Å to use when the header has none (see :func:`read_micrograph`).

    Returns
    -------
    MrcData
        ``data`` float32 ``(d, d, d)`` indexed ``[z, y, x]``.

    Raises
    ------
    InputError
        Missing/unreadable/corrupt file, not a cubic volume, NaN/inf, constant, no pixel size.
    """
    data, sizes, path = _read(path, "template")
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(
            f"template {path}: expected a cubic 3-D volume (d, d, d), got shape {data.shape}"
        )
    values = _check_values(data, "template", path)
    used, header = _header_pixel_size(sizes, pixel_size, "template", path)
    return MrcData(values, used, path, header)


def read_statistics_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one 2-D statistics map (a MIP, an angle map ...) as float32.

    Unlike :func:`read_micrograph` a constant map (one defocus plane) is fine, and the
    header's pixel size is not looked at (Leopard-EM writes none).

    Raises
    ------
    InputError
        Missing, unreadable or corrupt file, complex mode, not a single 2-D image.
    """
    data, _, path = _read(path, "map")
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(f"map {path}: expected a single 2-D image, got shape {data.shape}")
    return np.asarray(data, dtype=np.float32)


def read_shape(path: str | os.PathLike[str], kind: str) -> tuple[int, ...]:
    """``(ny, nx)`` of a 2-D file or ``(nz, ny, nx)`` of a volume, from its header alone.

    Raises
    ------
    InputError
        Missing or unreadable file (``kind`` names it in the message).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{kind} {path}: file not found")
    try:
        with mrcfile.open(path, mode="r", permissive=False, header_only=True) as mrc:
            shape = (int(mrc.header.nz), int(mrc.header.ny), int(mrc.header.nx))
    except (ValueError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{kind} {path}: not a readable MRC file ({reason})") from None
    return shape[1:] if shape[0] == 1 else shape


def pixel_sizes_differ(a: Any, b: Any) -> Any:
    """Whether two pixel sizes (floats or arrays, Å) differ by more than
    :data:`PIXEL_SIZE_TOLERANCE` of the larger."""
    return np.abs(a - b) > PIXEL_SIZE_TOLERANCE * np.maximum(np.abs(a), np.abs(b))


def header_notice(item: MrcData, kind: str, pixel_size: float, strict: bool = False) -> str | None:
    """A one-line notice where the header's pixel size of a file is unset or differs from
    the configuration's by more than :data:`PIXEL_SIZE_TOLERANCE`; None where it agrees.

    The configuration's pixel size is the one used (as in Leopard-EM, which ignores the
    header): headers left at 0 or 1.0 are common.

    Raises
    ------
    InputError
        With ``strict``, where the header has a pixel size that differs.
    """
    header = item.header_pixel_size
    if header is None:
        return (
            f"{kind} {item.path}: the header has no pixel size (voxel size 0); the "
            f"configuration's pixel_size {pixel_size:g} Å is used"
        )
    if not pixel_sizes_differ(header, pixel_size):
        return None
    if strict:
        raise InputError(
            f"pixel_size: configuration says {pixel_size:g} Å but {kind} {item.path} has "
            f"{header:g} Å in its header (tolerance 0.1 %; refused with --strict); fix one "
            "of them"
        )
    return (
        f"{kind} {item.path}: header pixel size {header:g} Å differs from the "
        f"configuration's pixel_size {pixel_size:g} Å by more than 0.1 %; {pixel_size:g} Å "
        "is used (--strict refuses it)"
    )


def check_compatible(
    micrograph: MrcData,
    template: MrcData,
    *,
    pixel_size: float | None = None,
    strict: bool = False,
) -> list[str]:
    """Check that a template can be searched in a micrograph.

    Parameters
    ----------
    micrograph, template
        As returned by :func:`read_micrograph` and :func:`read_template`.
    pixel_size
        The configuration's pixel size in Å, if any: it is used, whatever the headers say
        (a header that is unset or differs gives a notice, see :func:`header_notice`).
        Without it, the two files' pixel sizes must agree.
    strict
        Refuse a header pixel size that differs from ``pixel_size``.

    Returns
    -------
    list of str
        One-line notices, one per file whose header pixel size is unset or differs.

    Raises
    ------
    InputError
        The template box is larger than the micrograph; without ``pixel_size``, the files'
        pixel sizes differ by more than 0.1 %; with ``strict``, a header differs from
        ``pixel_size``.
    """
    box = template.data.shape[-1]
    height, width = micrograph.data.shape
    if box > height or box > width:
        raise InputError(
            f"template {template.path}: box {box} px is larger than micrograph "
            f"{micrograph.path} ({height} x {width} px)"
        )
    if pixel_size is None:
        if pixel_sizes_differ(micrograph.pixel_size, template.pixel_size):
            raise InputError(
                f"pixel sizes differ: micrograph {micrograph.path} has "
                f"{micrograph.pixel_size:g} Å, template {template.path} has "
                f"{template.pixel_size:g} Å (tolerance 0.1 %)"
            )
        return []
    notices = [
        header_notice(item, kind, pixel_size, strict)
        for kind, item in (("micrograph", micrograph), ("template", template))
    ]
    return [line for line in notices if line is not None]


def summarise_notices(lines: list[str], limit: int = 10) -> list[str]:
    """``lines`` without repeats, at most ``limit`` of them, then one line counting the
    rest (a thousand micrographs with unset headers make one screen, not a thousand
    lines)."""
    unique = list(dict.fromkeys(lines))
    if len(unique) <= limit:
        return unique
    rest = len(unique) - limit
    return [*unique[:limit], f"... and {rest} more file{'s' * (rest > 1)} like these"]


def write_map(
    path: str | os.PathLike[str], data: np.ndarray, *, pixel_size: float, overwrite: bool = True
) -> None:
    """Write a 2-D map or 3-D volume as float32 MRC with its voxel size, atomically.

    The data go to a temporary file in the same directory, which then replaces ``path``
    (``os.replace``), so an interrupted write never leaves a half-written map behind.

    Parameters
    ----------
    path
        Destination ``.mrc`` file; missing parent directories are created.
    data
        ``(H, W)`` or ``(d, d, d)`` array, cast to float32.
    pixel_size
        Pixel (voxel) size in Å, > 0.
    overwrite
        Whether an existing file may be replaced.

    Raises
    ------
    OutputError
        The file exists and ``overwrite`` is false, or it cannot be written.
    ValueError
        ``data`` is not 2-D/3-D or ``pixel_size`` is not positive (programming errors).
    """
    path = Path(path)
    values = np.ascontiguousarray(data, dtype=np.float32)
    if values.ndim not in (2, 3):
        raise ValueError(f"write_map: expected a 2-D or 3-D array, got shape {values.shape}")
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"write_map: pixel_size must be > 0, got {pixel_size}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists and overwriting is disabled")

    def write(temporary: str) -> None:
        with mrcfile.new(temporary, overwrite=True) as mrc:
            mrc.set_data(values)
            mrc.voxel_size = pixel_size

    try:
        write_atomic(path, write)
    except OSError as error:
        raise OutputError(f"{path}: cannot write map ({error.strerror or error})") from error
