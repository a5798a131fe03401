"""The search space of one match: orientations × relative defocus planes.

A search index ``g`` enumerates every correlation of the search: ``g = o * n_defocus + d``
for orientation ``o`` and defocus plane ``d`` (defocus fastest). The MIP keeps the lowest
``g`` on ties, so any split of the search gives the same maps. Work is cut along the
orientation axis: one chunk is a contiguous range of orientations × all defocus planes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dtm.errors import ConfigError


@dataclass(frozen=True)
class SearchSpace:
    """Orientations and relative defocus values of a search.

    Attributes
    ----------
    euler : numpy.ndarray
        ``(n_orientations, 3)`` Euler angles (φ, θ, ψ) in degrees, in search order.
    defocus : numpy.ndarray
        ``(n_defocus,)`` relative defocus in Å, in search order.
    """

    euler: np.ndarray
    defocus: np.ndarray

    @property
    def n_orientations(self) -> int:
        return int(self.euler.shape[0])

    @property
    def n_defocus(self) -> int:
        return int(self.defocus.shape[0])

    @property
    def n_correlations(self) -> int:
        return self.n_orientations * self.n_defocus

    def chunks(self, chunk_size: int) -> list[tuple[int, int]]:
        """Contiguous orientation ranges ``[start, stop)`` of at most ``chunk_size``."""
        if chunk_size < 1:
            raise ConfigError(f"cluster.chunk_size: must be >= 1 (got {chunk_size})")
        starts = range(0, self.n_orientations, chunk_size)
        return [(s, min(s + chunk_size, self.n_orientations)) for s in starts]

    def encode(self, orientation: np.ndarray | int, defocus: np.ndarray | int) -> np.ndarray:
        """Global search index of (orientation index, defocus index)."""
        return np.asarray(orientation, dtype=np.int64) * self.n_defocus + np.asarray(
            defocus, dtype=np.int64
        )

    def decode(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(orientation index, defocus index) of global search indices."""
        index = np.asarray(index, dtype=np.int64)
        return index // self.n_defocus, index % self.n_defocus
