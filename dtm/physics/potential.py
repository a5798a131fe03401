"""The electrostatic potential of an atomic model on a cubic grid.

Each atom contributes the inverse Fourier transform of its scattering factor blurred by its
B-factor (``dtm.physics.scattering``): ``Σ_k a_k (4π/β_k)^{3/2} exp(−4π² r²/β_k)``,
``β_k = b_k + B``. A 3-D Gaussian is a product of three 1-D ones, so its integral over a voxel
is a product of three differences of error functions: every voxel value is the exact integral
of the potential over the voxel (as in cisTEM's ``simulate`` and ttsim3d), here over all
voxels within :data:`TRUNCATION_SIGMAS` standard deviations of the atom's widest Gaussian.

The integration runs on a grid ``u`` times finer than the one wanted (``oversampling``), whose
spectrum is then cropped to the wanted grid's band: detail finer than the wanted pixel is
dropped, not folded back (aliased) into the template. The fine grid is never held whole: it is
made in slabs of planes along z, each transformed along x and y and cropped at once, so memory
stays at a slab per thread plus the cropped spectrum of the fine z axis (``4 u n³`` bytes for
a box of ``n``). Slabs are independent: they run on threads, or on the workers of a Dask
cluster through its client's ``concurrent.futures`` executor.

Conventions (``docs/conventions.md``): the volume is indexed ``[z, y, x]``; a position
``(x, y, z)`` Å from the model's centre lies at index ``n // 2 + (z, y, x) / pixel_size``;
the potential is positive. Every voxel receives its atoms' contributions in one order (by
truncation radius, then by atom) whatever the slabs: the slab size and the number of
threads or workers never change the volume. The sums are float64; the transforms, after
them, float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import scipy.fft
import scipy.special

from dtm.physics.ctf import electron_wavelength

#: cisTEM's and ttsim3d's correction of the isolated-atom potential for chemical bonding.
BOND_SCALING = 1.043
#: Each atom is integrated over the voxels within this many standard deviations of its
#: widest Gaussian, along each axis (the mass left out is below 2×10⁻⁴ of that Gaussian's).
TRUNCATION_SIGMAS = 4.0
#: The default oversampling makes the fine voxel at most this size (Å), as ttsim3d's does.
FINE_PIXEL = 0.75
#: The default oversampling keeps the fine grid at most this many voxels along an edge.
MAX_FINE_SIZE = 1536
#: Atoms whose cubes are computed together (bounds a batch's memory: 14 MB at width 19).
_BATCH = 256


@dataclass(frozen=True)
class Grid:
    """The wanted grid and its oversampled one.

    Attributes
    ----------
    box
        Edge ``n`` of the cubic volume, voxels.
    pixel_size
        Å per voxel.
    oversampling
        ``u``: the fine grid has ``u n`` voxels of ``pixel_size / u`` along each edge.
    """

    box: int
    pixel_size: float
    oversampling: int

    @property
    def fine_size(self) -> int:
        return self.box * self.oversampling

    @property
    def fine_pixel(self) -> float:
        return self.pixel_size / self.oversampling

    @property
    def fine_centre(self) -> int:
        """Fine index of the model's centre: ``u (n // 2)``, which the crop keeps at ``n // 2``."""
        return self.oversampling * (self.box // 2)


def default_oversampling(pixel_size: float, box: int) -> int:
    """``ceil(pixel_size / 0.75 Å)``, at most what keeps the fine grid ≤ 1536 voxels (≥ 1).

    ttsim3d's rule gives the same factor (2) from 0.75 to 1.5 Å per pixel, the usual range.
    """
    wanted = max(1, math.ceil(pixel_size / FINE_PIXEL - 1e-9))
    return max(1, min(wanted, MAX_FINE_SIZE // box))


def potential_scale(voltage: float, pixel_size: float) -> float:
    """Factor from voxel integrals of ``Σ a_k G_k`` (Å) to the template's values.

    ``1.043 λ / p²`` (λ the electron wavelength, p the pixel size, Å): cisTEM's and ttsim3d's
    unit, in which the sum of a volume along z is the phase shift (radians) that the specimen
    gives the electron wave in each pixel, before the relativistic mass correction.
    """
    return BOND_SCALING * electron_wavelength(voltage) / pixel_size**2


def truncation_radii(beta: np.ndarray, fine_pixel: float) -> np.ndarray:
    """Half-width (fine voxels) of each atom's cube: ``ceil(4 σ / p_f)``, σ of its widest
    Gaussian (``σ² = max_k β_k / 8π²``, Å). ``beta`` is ``(n, 5)``, Å²; returns int64 ``(n,)``."""
    sigma = np.sqrt(beta.max(axis=1) / (8.0 * math.pi**2))
    return np.ceil(TRUNCATION_SIGMAS * sigma / fine_pixel).astype(np.int64)


def _kept(size: int, kept: int) -> np.ndarray:
    """FFT indices of the ``kept`` lowest frequencies of a ``size``-point transform: ``0 …
    ceil(kept/2) − 1`` and the last ``kept // 2`` (the negative ones; the −kept/2 of an even
    ``kept`` is kept, as ttsim3d's crop does)."""
    return np.concatenate([np.arange((kept + 1) // 2), np.arange(size - kept // 2, size)])


def _profiles(
    centre: np.ndarray, first: np.ndarray, width: int, scale: np.ndarray, fine_pixel: float
) -> np.ndarray:
    """1-D voxel integrals of unit Gaussians along one axis.

    ``centre`` (m,) atom positions and ``first`` (m,) first voxels, in fine voxels; ``scale``
    (m, 5) is ``2π / sqrt(β)`` (Å⁻¹). Returns (m, 5, width): ``½ [erf(s e₁) − erf(s e₀)]`` over
    each voxel's edges ``e₀, e₁`` (Å from the atom).
    """
    edges = (first[:, None] + np.arange(width + 1) - 0.5 - centre[:, None]) * fine_pixel
    values = scipy.special.erf(scale[:, :, None] * edges[:, None, :])
    return np.asarray(0.5 * np.diff(values, axis=-1))


def _cubes(
    zyx: np.ndarray, a: np.ndarray, beta: np.ndarray, first: np.ndarray, width: int, grid: Grid
) -> np.ndarray:
    """Voxel integrals of ``Σ_k a_k G_k`` over each atom's (width)³ cube, (m, w, w, w) float64."""
    scale = 2.0 * math.pi / np.sqrt(beta)
    gz, gy, gx = (
        _profiles(zyx[:, axis], first[:, axis], width, scale, grid.fine_pixel) for axis in range(3)
    )
    # Σ_k a_k gz_k ⊗ gy_k ⊗ gx_k: the (z, y) plane of each term, then one small matmul over k.
    zy = (a[:, :, None, None] * gz[:, :, :, None] * gy[:, :, None, :]).reshape(len(a), 5, -1)
    return np.matmul(zy.transpose(0, 2, 1), gx).reshape(len(a), width, width, width)


def add_cubes_numpy(slab: np.ndarray, z0: int, cubes: np.ndarray, first: np.ndarray) -> None:
    """Add each cube ``cubes[i]`` (w, w, w) at fine voxel ``first[i]`` (z, y, x) to ``slab``
    (its planes from ``z0``), clipped to the slab and the grid, atom after atom.

    The reference of :func:`numba_add_cubes`, which does the same additions in the same order.
    """
    planes, n_fine, width = slab.shape[0], slab.shape[1], cubes.shape[1]
    lo = np.maximum(first, [z0, 0, 0])
    hi = np.minimum(first + width, [z0 + planes, n_fine, n_fine])
    for i in range(len(cubes)):
        (z, y, x), (zz, yy, xx), (fz, fy, fx) = lo[i], hi[i], first[i]
        if z < zz and y < yy and x < xx:
            slab[z - z0 : zz - z0, y:yy, x:xx] += cubes[
                i, z - fz : zz - fz, y - fy : yy - fy, x - fx : xx - fx
            ]


@cache
def numba_add_cubes() -> Callable[..., None] | None:
    """:func:`add_cubes_numpy` compiled (numba, ~5× faster: no Python per atom); ``None``
    without numba or with ``DTM_NO_NUMBA`` set. Bit-identical: the same float64 additions."""
    if os.environ.get("DTM_NO_NUMBA"):
        return None
    try:
        import numba  # noqa: PLC0415 (optional, compiled lazily)
    except ImportError:
        return None

    signature = "void(float64[:, :, ::1], int64, float64[:, :, :, ::1], int64[:, ::1])"

    @numba.njit(signature, cache=True, nogil=True)
    def add(slab: Any, z0: int, cubes: Any, first: Any) -> None:  # pragma: no cover (compiled)
        planes, n_fine, width = slab.shape[0], slab.shape[1], cubes.shape[1]
        for i in range(cubes.shape[0]):
            fz, fy, fx = first[i, 0], first[i, 1], first[i, 2]
            z, zz = max(fz, z0), min(fz + width, z0 + planes)
            y, yy = max(fy, 0), min(fy + width, n_fine)
            x, xx = max(fx, 0), min(fx + width, n_fine)
            if z >= zz or y >= yy or x >= xx:
                continue  # outside the slab (a negative slice end would wrap around)
            for k in range(z, zz):
                plane, block = slab[k - z0], cubes[i, k - fz]
                for j in range(y, yy):
                    # Views indexed from 0: no negative-index handling, a vectorised loop.
                    row, values = plane[j, x:xx], block[j - fy, x - fx : xx - fx]
                    for m in range(row.shape[0]):
                        row[m] += values[m]

    return add


def _accumulate(
    slab: np.ndarray,
    z0: int,
    zyx: np.ndarray,
    a: np.ndarray,
    beta: np.ndarray,
    grid: Grid,
    compiled: bool = True,
) -> None:
    """Add every atom's cube to ``slab`` (float64, fine planes ``z0 …``), clipped to the grid.

    Atoms are taken by radius, then in their given order: the order in which each voxel
    receives its sums does not depend on which slab it lies in.
    """
    add = (numba_add_cubes() if compiled else None) or add_cubes_numpy
    radii = truncation_radii(beta, grid.fine_pixel)
    nearest = np.rint(zyx).astype(np.int64)
    for radius in np.unique(radii).tolist():
        width = 2 * radius + 1
        members = np.flatnonzero(radii == radius)
        for start in range(0, len(members), _BATCH):
            batch = members[start : start + _BATCH]
            first = np.ascontiguousarray(nearest[batch] - radius)
            cubes = _cubes(zyx[batch], a[batch], beta[batch], first, width, grid)
            add(slab, z0, cubes, first)


def slab_spectrum(
    zyx: np.ndarray,
    a: np.ndarray,
    beta: np.ndarray,
    grid: Grid,
    z0: int,
    z1: int,
    compiled: bool = True,
) -> np.ndarray:
    """Fine planes ``z0 … z1 − 1`` of the potential, transformed along x and y and cropped.

    Parameters
    ----------
    zyx
        ``(m, 3)`` float64 atom positions in fine voxels of ``grid`` (the atoms near the slab;
        others add nothing).
    a, beta
        ``(m, 5)`` float64: amplitudes (Å, occupancy included) and widths ``b_k + B`` (Å²).
    grid
        The grid.
    z0, z1
        The slab's fine planes.
    compiled
        Use the numba kernel when there is one (``False``: the numpy reference).

    Returns
    -------
    numpy.ndarray
        ``(z1 − z0, n, n // 2 + 1)`` complex64: each plane's 2-D spectrum at the ``n × n``
        lowest frequencies (rfft layout along x), unnormalised.
    """
    n, n_fine = grid.box, grid.fine_size
    slab = np.zeros((z1 - z0, n_fine, n_fine), dtype=np.float64)
    _accumulate(slab, z0, zyx, a, beta, grid, compiled)
    # Single precision from here: the sums are done, and a float32 transform is exact to
    # ~1e-7 of the largest coefficient (the volume is written as float32).
    spectrum = scipy.fft.rfft(slab.astype(np.float32), axis=2)[:, :, : n // 2 + 1]
    del slab
    spectrum = scipy.fft.fft(spectrum, axis=1, overwrite_x=True)
    return spectrum[:, _kept(n_fine, n), :]


def _slabs(
    zyx: np.ndarray, radii: np.ndarray, n_fine: int, planes: int
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(z0, z1, atom indices)`` of each slab: the atoms whose cubes reach its planes."""
    nearest = np.rint(zyx[:, 0]).astype(np.int64)
    for z0 in range(0, n_fine, planes):
        z1 = min(z0 + planes, n_fine)
        near = np.flatnonzero((nearest + radii >= z0) & (nearest - radii < z1))
        yield z0, z1, near


def potential_spectrum(
    zyx: np.ndarray,
    a: np.ndarray,
    beta: np.ndarray,
    grid: Grid,
    *,
    slab_planes: int = 32,
    executor: Executor | None = None,
    threads: int = 1,
    compiled: bool = True,
) -> np.ndarray:
    """The spectrum of the potential on ``grid`` (rfft layout), from atoms in Å.

    Parameters
    ----------
    zyx
        ``(m, 3)`` float64 positions ``(z, y, x)`` in Å from the model's centre.
    a, beta
        ``(m, 5)`` float64 amplitudes (Å, occupancy included) and widths ``b_k + B`` (Å²,
        all > 0).
    grid
        The grid and its oversampling.
    slab_planes
        Fine planes per slab: one call of :func:`slab_spectrum` each.
    executor
        Where the slabs run: a ``concurrent.futures`` executor (threads: numpy, scipy and
        the numba kernel release the GIL; or a Dask client's ``get_executor()``, whose
        workers get each slab's atoms); ``None``: here, one after another.
    threads
        Threads of the last transforms (along z), here.
    compiled
        Use the numba kernel where there is one (``False``: the numpy reference).

    Returns
    -------
    numpy.ndarray
        ``(n, n, n // 2 + 1)`` complex64, ``scipy.fft.rfftn`` layout: ``irfftn(s=(n,)*3)``
        of it is the volume, each voxel the integral of ``Σ a_k G_k`` over it (Å).
    """
    n, n_fine = grid.box, grid.fine_size
    fine = zyx / grid.fine_pixel + grid.fine_centre
    radii = truncation_radii(beta, grid.fine_pixel)
    columns = np.zeros((n_fine, n, n // 2 + 1), dtype=np.complex64)
    jobs = [
        (fine[near], a[near], beta[near], grid, z0, z1, compiled)
        for z0, z1, near in _slabs(fine, radii, n_fine, max(1, slab_planes))
    ]
    if executor is None:
        for job in jobs:
            columns[job[4] : job[5]] = slab_spectrum(*job)
    else:
        if compiled:
            numba_add_cubes()  # compiled once, before the threads want it
        pending = {executor.submit(slab_spectrum, *job): job[4:6] for job in jobs}
        for future in as_completed(pending):
            z0, z1 = pending.pop(future)
            columns[z0:z1] = future.result()
    # The z axis last, a block of rows at a time (the full transform would double memory).
    kept = _kept(n_fine, n)
    spectrum = np.empty((n, n, n // 2 + 1), dtype=np.complex64)
    step = max(1, (1 << 26) // (8 * n_fine * (n // 2 + 1)))
    for y0 in range(0, n, step):
        block = scipy.fft.fft(columns[:, y0 : y0 + step], axis=0, workers=threads)
        spectrum[:, y0 : y0 + step] = block[kept]
    return spectrum


def volume_from_spectrum(spectrum: np.ndarray, box: int, threads: int = 1) -> np.ndarray:
    """The real volume ``(n, n, n)`` float32 of a spectrum in ``rfftn`` layout."""
    return scipy.fft.irfftn(spectrum, s=(box,) * 3, workers=threads).astype(np.float32)
