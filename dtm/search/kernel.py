"""The correlation kernel: one chunk of the search space → partial statistics.

For a batch of orientations the kernel extracts central slices of the template spectrum,
applies every defocus plane's filter, returns to real space to subtract the box's edge mean
and normalise (conventions.md#normalisation), then correlates the maps with the micrograph
a few at a time:
forward transform of the zero-padded projection (only its ``h`` non-zero rows along x),
transforms along y in reused buffers (on the CPU in whichever of two layouts is faster on
this machine), product with the micrograph spectrum, inverse transform (only the map's rows
along x), and a fused one-pass update of the running statistics. The same code runs on
numpy and cupy arrays; where it costs time against the FFT floor is measured in
``docs/performance.md``.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.fft

from dtm.backend import get_fft, get_xp
from dtm.physics.aberrations import magnified_rotations
from dtm.physics.projection import PreparedTemplate
from dtm.physics.rotations import euler_to_matrix
from dtm.search.fused import central_slices
from dtm.search.prepare import ImageInputs
from dtm.search.stats import PartialStats, update, update_with_table
from dtm.search.table import TableCollector

#: Orientations projected together by default (amortises per-call overheads), at most
#: ``PROJECTION_BYTES`` of box-sized projections (a 512³ template with 13 planes: 2).
DEFAULT_BATCH_SIZE = 32
PROJECTION_BYTES = 32 << 20
#: Bytes of half spectra transformed in one batch of FFTs: 4 maps at 512², 1 at 1024²
#: (measured on 2 EPYC cores: larger batches fall out of cache, smaller ones pay the
#: statistics update's per-call traffic; ``docs/performance.md``).
FFT_BATCH_BYTES = 5 << 20
#: On a GPU, batches large enough to keep cuFFT busy (16 maps at 4096²; not measured here),
#: at most a sixteenth of the device's memory: a running task holds about five batches
#: (the buffer, cuFFT's contiguous copies of its strided input, the maps).
GPU_FFT_BATCH_BYTES = 1 << 30


# Work buffers per thread (a worker may run several kernels at once in its threads).
_THREAD_BUFFERS = threading.local()
#: Complex values added to each row of the transposed buffer (one 64-byte cache line).
_ROW_PAD = 8
#: Per process: the faster CPU layout of the transforms along y for each problem shape.
_CPU_LAYOUT: dict[tuple[Any, ...], Callable[..., Any]] = {}


#: glibc ``mallopt`` parameters: M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_heap_pages() -> bool:
    """Let this process reuse freed heap memory instead of returning it to the system.

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins
    glibc's mmap threshold at 128 KiB: every FFT output is then a fresh mapping whose pages
    are faulted in and zeroed, which doubles the cost of an FFT at 512² (measured:
    ``docs/performance.md``). Arrays up to 32 MiB come from the heap again and freed
    memory up to 256 MiB stays in the process, a bounded amount. Called once per process
    on the CPU path; a no-op (``False``) where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) and libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        )
    except (OSError, AttributeError):
        return False


def _fft_options(xp: Any, workers: int | None) -> dict[str, Any]:
    """``workers=`` for scipy.fft; cupyx.scipy.fft takes no such argument."""
    return {"workers": workers} if (xp is np and workers is not None) else {}


def normalise_projections(projections: Any, image_shape: tuple[int, int]) -> Any:
    """Subtract the box's edge mean and scale to unit variance over the padded image.

    Parameters
    ----------
    projections : array
        ``(..., h, w)`` float32 filtered projections, modified in place and returned.
    image_shape : tuple of int
        ``(H, W)`` of the micrograph the projections are zero-padded to.
    """
    xp = get_xp(projections)
    h, w = projections.shape[-2:]
    edge_sum = (
        projections[..., 0, :].sum(axis=-1)
        + projections[..., -1, :].sum(axis=-1)
        + projections[..., 1:-1, 0].sum(axis=-1)
        + projections[..., 1:-1, -1].sum(axis=-1)
    )
    n_edge = 2 * w + 2 * (h - 2)
    projections -= (edge_sum / n_edge)[..., None, None]
    n_pixels = float(image_shape[0] * image_shape[1])
    mean = projections.sum(axis=(-2, -1), dtype=np.float64) / n_pixels
    mean_sq = xp.square(projections).sum(axis=(-2, -1), dtype=np.float64) / n_pixels
    scale = 1.0 / xp.sqrt(xp.maximum(mean_sq - mean**2, 1e-30))
    projections *= scale.astype(np.float32)[..., None, None]
    return projections


def filtered_projections(
    template: PreparedTemplate, rotations: Any, filters: Any, image_shape: tuple[int, int]
) -> Any:
    """Normalised, CTF-filtered, contrast-inverted projections.

    Returns
    -------
    array
        ``(n_orientations, n_defocus, h, w)`` float32.
    """
    fft = get_fft(get_xp(filters))
    box = template.box_size
    slices = central_slices(template, rotations)
    # Negated: density is positive, particles are dark in the micrograph
    # (conventions.md#projection-and-contrast).
    spectra = slices[:, None] * (-filters[None])
    projections = fft.irfft2(spectra, s=(box, box)).astype(np.float32, copy=False)
    return normalise_projections(projections, image_shape)


def maps_per_fft(fft_shape: tuple[int, int], on_gpu: bool = False) -> int:
    """Correlation maps transformed together: about ``FFT_BATCH_BYTES`` of spectra.

    Small batches keep each map's spectrum in cache between the transforms, the product
    with the micrograph and the statistics update (measured: ``benchmarks/throughput.py``).
    """
    per_map = fft_shape[0] * (fft_shape[1] // 2 + 1) * 8
    return max(1, (_gpu_batch_bytes() if on_gpu else FFT_BATCH_BYTES) // per_map)


@functools.cache
def _gpu_batch_bytes() -> int:
    """``GPU_FFT_BATCH_BYTES`` within a sixteenth of this process's GPU memory.

    From the total, not the free memory, so that a device's batches (and with them the
    maps' bits, should cuFFT's algorithm depend on the batch) never depend on what else
    holds memory at the time.
    """
    import cupy  # noqa: PLC0415 (optional dependency, GPU only)

    return min(GPU_FFT_BATCH_BYTES, int(cupy.cuda.runtime.memGetInfo()[1]) // 16)


def _correlate_maps(
    image: ImageInputs,
    projections: Any,
    stats: PartialStats,
    first_index: int,
    options: dict,
    table: TableCollector | None = None,
) -> None:
    """Correlate ``(m, h, w)`` projections with the micrograph and fold them into ``stats``.

    Correlation as a convolution with the projection reversed in its box, so that no
    conjugate is taken: ``CC(s) = conv(y, p_rev)(s + (h - 1, w - 1))``. The reversed box
    still sits in the first ``h`` rows of the padded array, so only those rows are
    transformed along x; after the inverse transform along y only the ``Hm`` rows of the
    map are transformed back along x. Both shifts stay inside the FFT size (no wrap-around:
    ``fft_shape_for``). With ``table``, the correlations above its cut-off are kept too.
    """
    xp = get_xp(projections)
    fft = get_fft(xp)
    fx = image.fft_shape[1]
    hm, wm = image.out_shape
    w = image.box_shape[1]
    rows = fft.rfft(projections[:, ::-1, ::-1], n=fx, axis=-1, **options)
    along_y = _cpu_layout(image, rows, options) if xp is np else _along_y_strided
    spectra = along_y(image, rows, options)
    maps = fft.irfft(spectra, n=fx, axis=-1, **options)
    if table is None:
        update(stats, maps[:, :, w - 1 : w - 1 + wm], first_index)
    else:
        update_with_table(stats, maps[:, :, w - 1 : w - 1 + wm], first_index, table)


def _cpu_layout(image: ImageInputs, rows: np.ndarray, options: dict) -> Callable[..., Any]:
    """The faster of the two CPU layouts for this problem shape, timed once per process.

    Both give bit-identical maps (tested), so the choice changes only the speed, which
    depends on the CPU: on 2 EPYC cores (512 KiB L2) the transposed layout was 13 % faster
    at 512², on 2 Xeon cores (2 MiB L2, AVX-512) the strided one 9 % (docs/performance.md).
    The best of three runs of each on the first batch decides; the loser's buffer is freed.
    """
    key = (image.fft_shape, image.box_shape, image.out_shape)
    layout = _CPU_LAYOUT.get(key)
    if layout is None:
        best: dict[Callable[..., Any], float] = {}
        for _ in range(3):
            for candidate in (_along_y_transposed, _along_y_strided):
                start = time.perf_counter()
                candidate(image, rows, options)
                elapsed = time.perf_counter() - start
                best[candidate] = min(best.get(candidate, elapsed), elapsed)
        layout = _CPU_LAYOUT[key] = min(best, key=best.__getitem__)
        unused = ("padded",) if layout is _along_y_transposed else ("columns", "map rows")
        for name in unused:
            _THREAD_BUFFERS.__dict__.get("by_name", {}).pop(name, None)
    return layout


def _along_y_strided(image: ImageInputs, rows: Any, options: dict) -> Any:
    """Zero-pad, transform along y, × micrograph, inverse along y: the map's ``Hm`` rows.

    The transforms run along the strided axis of a reused ``(m, Fy, Fx // 2 + 1)`` buffer,
    as batched cuFFT prefers (and some CPUs). Returns a view ``(m, Hm, Fx // 2 + 1)``.
    """
    xp = get_xp(rows)
    fft = get_fft(xp)
    fy, fxh = image.fft_shape[0], image.fft_shape[1] // 2 + 1
    h, hm = image.box_shape[0], image.out_shape[0]
    spectra = _work_buffer(xp, "padded", (int(rows.shape[0]), fy, fxh))
    spectra[:, :h] = rows
    spectra[:, h:] = 0
    # In place (the buffer is contiguous complex64): no fresh pages to fault in per batch.
    spectra = fft.fft(spectra, axis=-2, overwrite_x=True, **options)
    spectra *= image.spectrum
    columns = fft.ifft(spectra, axis=-2, overwrite_x=True, **options)
    return columns[:, h - 1 : h - 1 + hm]


def _along_y_transposed(image: ImageInputs, rows: Any, options: dict) -> Any:
    """As :func:`_along_y_strided`, on columns stored contiguously (a CPU layout).

    pocketfft along a strided axis gathers a few columns at a time and reads each cache
    line twice; with the columns contiguous the transforms along y cost half as much, which
    pays for the two transposes on CPUs with small caches (``docs/performance.md``). The
    transposed buffer's rows are padded by one cache line so that its stride is never a
    power of two (4 KiB strides alias in the cache and made the transpose back 5× slower).
    Returns a contiguous ``(m, Hm, Fx // 2 + 1)`` array, reused by the next batch of this
    thread.
    """
    fy, fxh = image.fft_shape[0], image.fft_shape[1] // 2 + 1
    h, hm = image.box_shape[0], image.out_shape[0]
    m = int(rows.shape[0])
    columns = _work_buffer(np, "columns", (m, fxh, fy + _ROW_PAD))[:, :, :fy]
    columns[:, :, :h] = rows.transpose(0, 2, 1)
    columns[:, :, h:] = 0
    spectra = scipy.fft.fft(columns, axis=-1, overwrite_x=True, **options)
    spectra *= _transposed_spectrum(image)
    spectra = scipy.fft.ifft(spectra, axis=-1, overwrite_x=True, **options)
    out = _work_buffer(np, "map rows", (m, hm, fxh))
    out[...] = spectra[:, :, h - 1 : h - 1 + hm].transpose(0, 2, 1)
    return out


def _work_buffer(xp: Any, name: str, shape: tuple[int, ...]) -> Any:
    """A complex64 array ``name`` of ``shape`` reused by the batches of this thread.

    A buffer with more maps (the first axis) than asked for is sliced, so the shorter last
    batch of a chunk does not reallocate it; another problem size replaces it, which keeps
    the memory bounded.
    """
    buffers = _THREAD_BUFFERS.__dict__.setdefault("by_name", {})
    buffer = buffers.get(name)
    if (
        buffer is None
        or get_xp(buffer) is not xp
        or buffer.shape[1:] != shape[1:]
        or buffer.shape[0] < shape[0]
    ):
        buffer = buffers[name] = xp.empty(shape, dtype=np.complex64)
    return buffer[: shape[0]]


def _transposed_spectrum(image: ImageInputs) -> np.ndarray:
    """``image.spectrum.T`` as a contiguous ``(Fx // 2 + 1, Fy)`` array, kept per thread."""
    cached = getattr(_THREAD_BUFFERS, "spectrum_t", None)
    # Identity, not id(): the cache holds the spectrum, so its address cannot be reused.
    if cached is None or cached[0] is not image.spectrum:
        cached = (image.spectrum, np.ascontiguousarray(image.spectrum.T))
        _THREAD_BUFFERS.spectrum_t = cached
    return cached[1]


def correlate_chunk(
    image: ImageInputs,
    template: PreparedTemplate,
    euler: np.ndarray,
    first_orientation: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fft_workers: int | None = 1,
    table_cutoff: float | None = None,
    max_table_rows: int = 1_000_000,
) -> PartialStats:
    """Partial statistics of a chunk of orientations × every defocus plane.

    Parameters
    ----------
    image : ImageInputs
        Shared inputs of the micrograph (see :func:`dtm.search.prepare.prepare_image`).
    template : PreparedTemplate
        Template spectrum prepared for slicing, on the same device as ``image``.
    euler : numpy.ndarray
        ``(n, 3)`` Euler angles (φ, θ, ψ) in degrees of the chunk's orientations.
    first_orientation : int
        Search index of ``euler[0]``; the chunk covers global indices
        ``first_orientation * n_defocus`` … ``(first_orientation + n) * n_defocus - 1``.
    batch_size : int
        Orientations projected together (``batch_size × n_defocus`` box-sized projections);
        their correlation maps are transformed in groups of :func:`maps_per_fft`.
    fft_workers : int or None
        Threads of scipy.fft (ignored on GPU).
    table_cutoff : float or None
        Also keep every correlation above this value (the correlation table,
        :mod:`dtm.search.table`) in ``PartialStats.table``; ``None``: no table, no cost.
    max_table_rows : int
        More rows than this in the chunk raise :class:`~dtm.errors.ConfigError`.

    Returns
    -------
    PartialStats
        On the device of ``image``. The maximum and its index do not depend on
        ``batch_size`` or on the FFT size; the sums agree to rounding; the table's rows
        are in search order and do not depend on either.
    """
    xp = get_xp(image.spectrum)
    if xp is np:
        keep_heap_pages()
    options = _fft_options(xp, fft_workers)
    n_defocus = int(image.filters.shape[0])
    h, w = image.box_shape
    group = maps_per_fft(image.fft_shape, on_gpu=xp is not np)
    batch_size = max(1, min(batch_size, PROJECTION_BYTES // (n_defocus * h * w * 4)))
    rotations = euler_to_matrix(np.asarray(euler, dtype=np.float64))
    rotations = xp.asarray(magnified_rotations(rotations, image.slice_transform))
    stats = PartialStats.empty(image.out_shape, xp)
    table = (
        None
        if table_cutoff is None
        else TableCollector(
            table_cutoff,
            max_table_rows,
            f"orientations {first_orientation}–{first_orientation + len(euler) - 1}",
        )
    )
    for start in range(0, len(euler), batch_size):
        stop = min(start + batch_size, len(euler))
        projections = filtered_projections(
            template, rotations[start:stop], image.filters, image.image_shape
        ).reshape(-1, h, w)
        # Maps are in search order: orientation-major, defocus fastest (g = o * n_d + d).
        first = (first_orientation + start) * n_defocus
        for offset in range(0, projections.shape[0], group):
            _correlate_maps(
                image, projections[offset : offset + group], stats, first + offset, options, table
            )
    if table is not None:
        stats.table = table.rows()
    return stats
