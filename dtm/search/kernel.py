"""The correlation kernel: one chunk of the search space → partial statistics.

For a batch of orientations the kernel extracts central slices of the template spectrum,
applies every defocus plane's filter, returns to real space to subtract the box's edge mean
and normalise (SPEC §2), transforms the zero-padded projection (only its ``h`` non-zero rows
are transformed along x), multiplies by the micrograph spectrum and folds the inverse
transform into the running statistics. The same code runs on numpy and cupy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dtm.backend import get_fft, get_xp
from dtm.physics.projection import PreparedTemplate, extract_central_slices
from dtm.physics.rotations import euler_to_matrix
from dtm.search.prepare import ImageInputs
from dtm.search.stats import PartialStats, update


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
    slices = extract_central_slices(template, rotations)
    # Negated: density is positive, particles are dark in the micrograph (SPEC §2).
    spectra = slices[:, None] * (-filters[None])
    projections = fft.irfft2(spectra, s=(box, box)).astype(np.float32, copy=False)
    return normalise_projections(projections, image_shape)


def correlate_chunk(
    image: ImageInputs,
    template: PreparedTemplate,
    euler: np.ndarray,
    first_orientation: int,
    *,
    batch_size: int = 4,
    fft_workers: int | None = 1,
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
        Orientations transformed together (memory: ``batch_size × n_defocus`` maps).
    fft_workers : int or None
        Threads of scipy.fft (ignored on GPU).

    Returns
    -------
    PartialStats
        On the device of ``image``.
    """
    xp = get_xp(image.spectrum)
    fft = get_fft(xp)
    options = _fft_options(xp, fft_workers)
    n_defocus = int(image.filters.shape[0])
    fy, fx = image.fft_shape
    hm, wm = image.out_shape
    rotations = xp.asarray(euler_to_matrix(np.asarray(euler, dtype=np.float64)))
    stats = PartialStats.empty(image.out_shape, xp)
    for start in range(0, len(euler), batch_size):
        stop = min(start + batch_size, len(euler))
        projections = filtered_projections(
            template, rotations[start:stop], image.filters, image.image_shape
        )
        # Only the h non-zero rows of the padded projection need the transform along x.
        rows = fft.rfft(projections, n=fx, axis=-1, **options)
        padded = fft.fft(rows, n=fy, axis=-2, **options)
        np.conjugate(padded, out=padded) if xp is np else xp.conj(padded, out=padded)
        padded *= image.spectrum
        correlations = fft.irfft2(padded, s=(fy, fx), **options)[..., :hm, :wm]
        update(
            stats,
            correlations.reshape(-1, hm, wm),
            (first_orientation + start) * n_defocus,
        )
    return stats
