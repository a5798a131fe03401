"""Compiled kernels: the fused statistics update, one pass over each correlation map (numba
on CPU, CUDA on GPU), and the central-slice extraction (numba, :func:`central_slices`).

:func:`dtm.search.stats.update_numpy` is the reference: per map, in search order, a strict
``>`` against the running maximum (so ties keep the lowest index) and float64 sums of the
value and of its square. The kernels here do exactly the same arithmetic in the same order
per position, reading each map once and keeping the running statistics of a position in
registers; their results are bit-identical to the reference (the square of a float32 in
float64 is exact, so fused multiply-adds cannot change it).

numba and cupy are optional: :func:`numba_update` returns ``None`` when numba cannot be
imported or ``DTM_NO_NUMBA`` is set, and the caller falls back to the reference.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from dtm.physics.projection import extract_central_slices

# The CUDA kernel: one thread per map position, looping over the batch of maps in order.
_CUDA_SOURCE = r"""
extern "C" __global__ void dtm_update_stats(
    const float* cc, const long long n, const long long height, const long long width,
    const long long stride_map, const long long stride_row, const long long first_index,
    float* mip, long long* best_index, double* total, double* total_sq)
{
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= height * width) return;
    const long long i = p / width, j = p - (p / width) * width;
    const float* src = cc + i * stride_row + j;
    float m = mip[p];
    long long b = best_index[p];
    double s = total[p], s2 = total_sq[p];
    for (long long k = 0; k < n; ++k) {
        const float v = src[k * stride_map];
        if (v > m) { m = v; b = first_index + k; }
        const double w = (double)v;
        s += w;
        s2 += w * w;
    }
    mip[p] = m; best_index[p] = b; total[p] = s; total_sq[p] = s2;
}
"""
_CUDA_BLOCK = 256


@cache
def numba_update() -> Callable[..., None] | None:
    """The compiled CPU kernel ``f(cc, first_index, mip, best_index, total, total_sq)``.

    ``cc`` is C-contiguous ``(n, ≥ Hm, ≥ Wm)`` float32 (see :func:`row_major`), the
    statistics C-contiguous ``(Hm, Wm)`` arrays of :class:`~dtm.search.stats.PartialStats`.

    Compiled on first use (about a second, then cached on disk); ``None`` without numba or
    when the environment variable ``DTM_NO_NUMBA`` is set.
    """
    if os.environ.get("DTM_NO_NUMBA"):
        return None
    try:
        import numba  # noqa: PLC0415 (optional, compiled lazily)
    except ImportError:
        return None

    # C layout lets LLVM vectorise along a row; rows may be longer than the map (a cropped
    # inverse FFT's output, see ``row_major``): the map is ``cc[:, :Hm, :Wm]``.
    signature = (
        "void(float32[:, :, ::1], int64, float32[:, ::1], int64[:, ::1], float64[:, ::1], "
        "float64[:, ::1])"
    )

    @numba.njit(signature, cache=True, nogil=True, error_model="numpy")
    def fused(
        cc: Any, first: int, mip: Any, best: Any, total: Any, total_sq: Any
    ) -> None:  # pragma: no cover (compiled)
        height, width = mip.shape
        for i in range(height):
            # One row of the statistics stays in L1 while the batch's maps stream past.
            m, b, s, s2 = mip[i], best[i], total[i], total_sq[i]
            for k in range(cc.shape[0]):
                row = cc[k, i]
                index = first + k
                for j in range(width):
                    v = row[j]
                    better = v > m[j]
                    m[j] = v if better else m[j]
                    b[j] = index if better else b[j]
                    w = np.float64(v)
                    s[j] += w
                    s2[j] += w * w

    return fused


@cache
def numba_update_flagged() -> Callable[..., None] | None:
    """:func:`numba_update` that also flags the rows holding a value above a cut-off.

    ``f(cc, first_index, mip, best_index, total, total_sq, cutoff, flags)``: the same
    statistics, bit for bit, and ``flags[k, i] = any(cc[k, i, :Wm] > cutoff)`` for the
    ``(n, Hm)`` uint8 array ``flags`` (the correlation table, :mod:`dtm.search.table`, then
    reads only the flagged rows). The flag is an OR reduction in the vectorised loop, which
    costs next to nothing beside the memory traffic. ``None`` where :func:`numba_update` is.
    """
    if numba_update() is None:
        return None
    import numba  # noqa: PLC0415 (optional, compiled lazily)

    signature = (
        "void(float32[:, :, ::1], int64, float32[:, ::1], int64[:, ::1], float64[:, ::1], "
        "float64[:, ::1], float32, uint8[:, ::1])"
    )

    @numba.njit(signature, cache=True, nogil=True, error_model="numpy")
    def fused_flagged(
        cc: Any, first: int, mip: Any, best: Any, total: Any, total_sq: Any, cutoff: Any, flags: Any
    ) -> None:  # pragma: no cover (compiled)
        height, width = mip.shape
        for i in range(height):
            m, b, s, s2 = mip[i], best[i], total[i], total_sq[i]
            for k in range(cc.shape[0]):
                row = cc[k, i]
                index = first + k
                hit = False
                for j in range(width):
                    v = row[j]
                    better = v > m[j]
                    m[j] = v if better else m[j]
                    b[j] = index if better else b[j]
                    w = np.float64(v)
                    s[j] += w
                    s2[j] += w * w
                    hit = hit | (v > cutoff)
                flags[k, i] = hit

    return fused_flagged


@cache
def numba_flagged_values() -> Callable[..., int] | None:
    """Compiled ``f(cc, width, ks, ys, cutoff, out_k, out_y, out_x, out_v) -> count``.

    Scans the rows ``cc[ks[r], ys[r], :width]`` (C-contiguous ``cc`` of :func:`row_major`)
    in order and writes each value above ``cutoff`` with its ``(k, y, x)`` to the output
    arrays, as many as they hold; returns how many there are (which may exceed their
    length: the caller then calls again with longer arrays). ``None`` without numba.
    """
    if numba_update() is None:
        return None
    import numba  # noqa: PLC0415 (optional, compiled lazily)

    signature = (
        "int64(float32[:, :, ::1], int64, int64[::1], int64[::1], float32, int64[::1], "
        "int32[::1], int32[::1], float32[::1])"
    )

    @numba.njit(signature, cache=True, nogil=True, error_model="numpy")
    def flagged_values(
        cc: Any,
        width: int,
        ks: Any,
        ys: Any,
        cutoff: Any,
        out_k: Any,
        out_y: Any,
        out_x: Any,
        out_v: Any,
    ) -> int:  # pragma: no cover (compiled)
        count = 0
        capacity = out_v.shape[0]
        for r in range(ks.shape[0]):
            row = cc[ks[r], ys[r]]
            for j in range(width):
                v = row[j]
                if v > cutoff:
                    if count < capacity:
                        out_k[count] = ks[r]
                        out_y[count] = ys[r]
                        out_x[count] = j
                        out_v[count] = v
                    count += 1
        return count

    return flagged_values


def row_major(correlations: np.ndarray) -> np.ndarray:
    """A C-contiguous ``(n, Hm, row)`` array whose ``[:, :, :Wm]`` is ``correlations``.

    ``correlations`` is typically ``maps[:, :, a : a + Wm]``, a crop of C-contiguous maps;
    the result re-reads the same memory with the parent's row length, so that the compiled
    kernel sees unit strides. Only its first ``Wm`` columns may be read: past them, the last
    row runs beyond the parent array. A copy when the layout does not allow this.
    """
    item = correlations.itemsize
    n, height, width = correlations.shape
    map_stride, row_stride, col_stride = correlations.strides
    if (
        col_stride == item
        and row_stride % item == 0
        and row_stride >= width * item
        and map_stride == row_stride * height
    ):
        return np.lib.stride_tricks.as_strided(
            correlations, shape=(n, height, row_stride // item), strides=correlations.strides
        )
    return np.ascontiguousarray(correlations)


@cache
def numba_slicer() -> Callable[..., None] | None:
    """Compiled central-slice extraction ``f(spectrum, rotations, kx, ky, phase, out)``.

    The same trilinear interpolation as :func:`dtm.physics.projection.extract_central_slices`
    (its reference, against which it is tested), without the numpy temporaries that make
    the reference cost ~0.1 µs per coefficient; ``None`` where :func:`numba_update` is.
    """
    if numba_update() is None:
        return None
    import numba  # noqa: PLC0415 (optional, compiled lazily)

    signature = (
        "void(complex64[:, :, ::1], float32[:, :, :], float32[::1], float32[::1], "
        "complex64[:, ::1], complex64[:, :, ::1])"
    )

    @numba.njit(signature, cache=True, nogil=True, error_model="numpy")
    def slicer(
        spectrum: Any, rotations: Any, kx: Any, ky: Any, phase: Any, out: Any
    ) -> None:  # pragma: no cover (compiled)
        size = spectrum.shape[0]
        half = np.float32(size / 2)
        for n in range(rotations.shape[0]):
            r = rotations[n]
            for iy in range(ky.shape[0]):
                for ix in range(kx.shape[0]):
                    qx = r[0, 0] * kx[ix] + r[0, 1] * ky[iy]
                    qy = r[1, 0] * kx[ix] + r[1, 1] * ky[iy]
                    qz = r[2, 0] * kx[ix] + r[2, 1] * ky[iy]
                    if abs(qx) > half or abs(qy) > half or abs(qz) > half:
                        out[n, iy, ix] = 0
                        continue
                    fx, fy, fz = np.floor(qx), np.floor(qy), np.floor(qz)
                    tx, ty, tz = qx - fx, qy - fy, qz - fz
                    # |q| <= size / 2: one conditional add wraps an index (no division).
                    x0, y0, z0 = int(fx), int(fy), int(fz)
                    x0 += size if x0 < 0 else 0
                    y0 += size if y0 < 0 else 0
                    z0 += size if z0 < 0 else 0
                    x1 = x0 + 1 if x0 + 1 < size else 0
                    y1 = y0 + 1 if y0 + 1 < size else 0
                    z1 = z0 + 1 if z0 + 1 < size else 0
                    ux, uy, uz = 1 - tx, 1 - ty, 1 - tz
                    value = uz * (
                        uy * (ux * spectrum[z0, y0, x0] + tx * spectrum[z0, y0, x1])
                        + ty * (ux * spectrum[z0, y1, x0] + tx * spectrum[z0, y1, x1])
                    ) + tz * (
                        uy * (ux * spectrum[z1, y0, x0] + tx * spectrum[z1, y0, x1])
                        + ty * (ux * spectrum[z1, y1, x0] + tx * spectrum[z1, y1, x1])
                    )
                    out[n, iy, ix] = value * phase[iy, ix]

    return slicer


def central_slices(template: Any, rotations: Any) -> Any:
    """Central slices by the compiled slicer where it applies, else by the reference.

    Parameters
    ----------
    template : PreparedTemplate
        From :func:`dtm.physics.projection.prepare_template`.
    rotations : array, shape (n, 3, 3)
        Rotation matrices.

    Returns
    -------
    array, shape (n, d, d // 2 + 1), complex64
        As :func:`dtm.physics.projection.extract_central_slices`.
    """
    spectrum = template.spectrum
    slicer = numba_slicer() if isinstance(spectrum, np.ndarray) else None
    if slicer is None or spectrum.dtype != np.complex64 or not spectrum.flags.c_contiguous:
        return extract_central_slices(template, rotations)
    box = template.box_size
    size = np.float32(spectrum.shape[0])
    # Frequencies in index units of the padded grid, as the reference scales them.
    scaled = np.ascontiguousarray(np.asarray(rotations, dtype=np.float32) * size)
    kx = np.fft.rfftfreq(box).astype(np.float32)
    ky = np.fft.fftfreq(box).astype(np.float32)
    phase = np.ascontiguousarray(template.centring_phase, dtype=np.complex64)
    out = np.empty((scaled.shape[0], box, box // 2 + 1), dtype=np.complex64)
    slicer(spectrum, scaled, kx, ky, phase, out)
    return out


@cache
def _cuda_kernel() -> Any:
    import cupy  # noqa: PLC0415 (optional dependency, GPU only)

    return cupy.RawKernel(_CUDA_SOURCE, "dtm_update_stats")


def cuda_update(
    correlations: Any, first_index: int, mip: Any, best_index: Any, total: Any, total_sq: Any
) -> bool:
    """Fold ``(n, Hm, Wm)`` float32 cupy maps into the statistics with one kernel launch.

    Returns ``False`` (nothing done) when the arrays do not suit the kernel, which reads
    them without bounds checks: maps whose last axis is not contiguous, statistics arrays
    that are not C-contiguous cupy arrays of the map's shape and of the dtypes of
    :class:`~dtm.search.stats.PartialStats`.
    """
    import cupy  # noqa: PLC0415 (optional dependency, GPU only)

    if correlations.dtype != np.float32 or correlations.ndim != 3:
        return False
    item = correlations.itemsize
    n, height, width = (int(s) for s in correlations.shape)
    stride_map, stride_row, stride_col = (int(s) // item for s in correlations.strides)
    state = (mip, best_index, total, total_sq)
    dtypes = (np.float32, np.int64, np.float64, np.float64)
    if stride_col != 1 or not all(
        isinstance(a, cupy.ndarray)
        and a.dtype == dtype
        and a.shape == (height, width)
        and a.flags.c_contiguous
        for a, dtype in zip(state, dtypes, strict=True)
    ):
        return False
    size = height * width
    grid = (-(-size // _CUDA_BLOCK),)
    _cuda_kernel()(
        grid,
        (_CUDA_BLOCK,),
        (
            correlations,
            cupy.int64(n),
            cupy.int64(height),
            cupy.int64(width),
            cupy.int64(stride_map),
            cupy.int64(stride_row),
            cupy.int64(first_index),
            mip,
            best_index,
            total,
            total_sq,
        ),
    )
    return True
