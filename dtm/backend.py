"""Array backends: NumPy + scipy.fft on the CPU, CuPy + cupyx.scipy.fft on a GPU.

Functions in :mod:`dtm.physics` and :mod:`dtm.search` take their array module from their
inputs (``get_xp(array)``), so the same code runs on either backend. CuPy is imported only
when a CuPy array is seen or the GPU backend is asked for; it is never imported at module
level.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import scipy.fft


def is_cupy_array(array: Any) -> bool:
    """Whether ``array`` is a CuPy array (without importing CuPy)."""
    return type(array).__module__.split(".")[0] == "cupy"


def get_xp(*arrays: Any) -> ModuleType:
    """Array module (``numpy`` or ``cupy``) of the given arrays; numpy when none is CuPy."""
    for array in arrays:
        if is_cupy_array(array):
            import cupy  # noqa: PLC0415  (optional dependency)

            return cupy
    return np


def get_fft(xp: ModuleType) -> ModuleType:
    """FFT module matching the array module: ``scipy.fft`` or ``cupyx.scipy.fft``."""
    if xp is np:
        return scipy.fft
    import cupyx.scipy.fft  # noqa: PLC0415  (optional dependency)

    return cupyx.scipy.fft


def to_numpy(array: Any) -> np.ndarray:
    """Copy a CuPy array to the host; return NumPy arrays unchanged."""
    if is_cupy_array(array):
        return array.get()
    return np.asarray(array)
