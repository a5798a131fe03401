"""The local search of refine-template: one box of a micrograph × local offsets → best fit.

A particle is re-searched in a box of the *filtered* micrograph (``extracted_box_size``,
larger than the template) around its starting top-left position ``(pos_y, pos_x)``. Every
orientation ``R_start @ R_offset`` and relative defocus ``start + offset`` is projected,
filtered and normalised exactly as the match search does it
(:func:`dtm.search.kernel.filtered_projections`), and correlated with the box in ``valid``
mode: position ``(j, i)`` of the correlation is the template top-left at micrograph pixel
``(top + j, left + i)``, ``(top, left)`` being the box's top-left. The particle's own
position is ``j0 = by // 2 - h // 2`` (the box is centred on ``pos_*_img = pos_* + h // 2``).

Each candidate is scored by the match search's z-score at its position,
``(cc - mean) / sqrt(variance)`` with the global search's per-pixel statistics; the best
candidate (lowest orientation, then defocus, then position index on ties) gives the refined
values. Orientations are transformed in batches (all defocus planes of many orientations per
FFT call), with the batch size bounding the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dtm.backend import get_fft, get_xp
from dtm.physics.projection import PreparedTemplate
from dtm.search.kernel import filtered_projections

#: Bytes of temporaries per FFT batch (projections, their spectra and the correlations).
BATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class ParticleFit:
    """Best candidate of one particle's local search.

    Attributes
    ----------
    scaled_mip : float
        z-score of the best candidate (``-inf`` when no searched position has statistics).
    mip : float
        Its correlation value.
    orientation : int
        Index into the rotations searched.
    defocus : int
        Index into the relative defocus values searched.
    dy, dx : int
        Its position in the correlation of the box (template top-left relative to the box's).
    """

    scaled_mip: float
    mip: float
    orientation: int
    defocus: int
    dy: int
    dx: int


def search_window(
    box_size: tuple[int, int], template_box: tuple[int, int], radius: tuple[int, int]
) -> tuple[slice, slice]:
    """Positions of a box's valid correlation searched: ``j0 ± radius`` clipped to the box.

    Parameters
    ----------
    box_size : tuple of int
        ``(by, bx)`` of the extracted box, pixels.
    template_box : tuple of int
        ``(h, w)`` of the projections, pixels.
    radius : tuple of int
        Position search ``(ry, rx)``, ± pixels.

    Returns
    -------
    tuple of slice
        Rows and columns of the ``(by - h + 1, bx - w + 1)`` valid correlation.
    """
    window = []
    for size, tmpl, r in zip(box_size, template_box, radius, strict=True):
        start = size // 2 - tmpl // 2
        window.append(slice(max(0, start - r), min(size - tmpl + 1, start + r + 1)))
    return window[0], window[1]


def _inverse_std(variance: Any) -> Any:
    """``1 / sqrt(variance)`` where the variance is usable, NaN elsewhere (positions the
    search never scored: outside the map, or a degenerate variance)."""
    xp = get_xp(variance)
    usable = xp.isfinite(variance) & (variance > 0)
    return xp.where(usable, 1.0 / xp.sqrt(xp.where(usable, variance, 1.0)), xp.nan)


def search_particle(
    box: Any,
    template: PreparedTemplate,
    rotations: Any,
    filters: Any,
    norm_shape: tuple[int, int],
    mean: Any,
    variance: Any,
    window: tuple[slice, slice],
    *,
    batch_bytes: int = BATCH_BYTES,
) -> ParticleFit:
    """Best orientation, defocus and position of one particle in its box.

    Parameters
    ----------
    box : array
        ``(by, bx)`` float32, the filtered, normalised micrograph around the particle.
    template : PreparedTemplate
        Template spectrum (same array module as ``box``).
    rotations : array
        ``(m, 3, 3)`` rotation matrices to search.
    filters : array
        ``(n_defocus, h, w // 2 + 1)`` float32: CTF × whitening × band-pass, one plane per
        relative defocus searched, zero at the origin.
    norm_shape : tuple of int
        ``(H, W)`` of the image the box was normalised with: projections get unit variance
        when zero-padded to it (conventions.md#normalisation), so correlations share the
        match search's scale.
    mean, variance : array
        The match search's correlation mean and variance at the searched positions,
        ``(len(window[0]), len(window[1]))``; NaN where the search has no statistics.
    window : tuple of slice
        Searched positions of the valid correlation (:func:`search_window`).
    batch_bytes : int
        Memory bound of the temporaries of one FFT batch.

    Returns
    -------
    ParticleFit
    """
    xp = get_xp(box)
    fft = get_fft(xp)
    by, bx = (int(n) for n in box.shape)
    n_defocus = int(filters.shape[0])
    box_spectrum = fft.rfft2(box)
    inverse_std = _inverse_std(xp.asarray(variance, dtype=np.float64))
    mean = xp.asarray(mean, dtype=np.float64)
    per_orientation = n_defocus * by * bx * 16  # projections, spectra, correlations
    batch = max(1, batch_bytes // per_orientation)
    best = ParticleFit(-np.inf, np.nan, 0, 0, window[0].start, window[1].start)
    for start in range(0, len(rotations), batch):
        stop = min(start + batch, len(rotations))
        projections = filtered_projections(template, rotations[start:stop], filters, norm_shape)
        spectra = fft.rfft2(projections, s=(by, bx))
        spectra = xp.conj(spectra) * box_spectrum
        cc = fft.irfft2(spectra, s=(by, bx))[..., window[0], window[1]]
        scores = (cc - mean) * inverse_std
        # NaN (no statistics) must never win: argmax would return it first.
        scores = xp.where(xp.isnan(scores), -np.inf, scores)
        flat = int(xp.argmax(scores))  # first maximum: lowest orientation, defocus, position
        score = float(scores.reshape(-1)[flat])
        if score > best.scaled_mip:
            o, d, y, x = np.unravel_index(flat, scores.shape)
            best = ParticleFit(
                scaled_mip=score,
                mip=float(cc[o, d, y, x]),
                orientation=start + int(o),
                defocus=int(d),
                dy=window[0].start + int(y),
                dx=window[1].start + int(x),
            )
    return best
