"""dtm: 2D template matching for cryo-EM, distributed with Dask."""

from __future__ import annotations

__version__ = "0.1.0"
