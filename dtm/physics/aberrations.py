"""Higher-order aberrations and anisotropic magnification, in Leopard-EM's conventions.

Leopard-EM 1.3 (through the ``torch-ctf`` package, 0.6) describes them with an optics
group's ``even_zernikes`` and ``odd_zernikes`` (dicts of named coefficients) and
``mag_matrix`` (four numbers). Their meaning there, reproduced here
(``conventions.md#aberrations``):

- ``mag_matrix = [a0, a1, a2, a3]`` is the real-space matrix ``A = [[a0, a1], [a2, a3]]``
  acting on ``(y, x)`` vectors: the recorded image is ``p(A·r)`` for an ideal image ``p``,
  so its spectrum is sampled at ``k' = (A⁻¹)ᵀ k``, ``k = (ky, kx)``. Both the CTF and the
  template's projections are evaluated at ``k'`` (Leopard-EM resamples its projections; dtm
  cuts the template's central slice at ``k'`` directly, :func:`slice_transform`).
- With ``ρ = |k'|`` in Å⁻¹ and ``θ = atan2(k'y, k'x)``, the even coefficients (radians per
  Å⁻ⁿ) add to the CTF's phase χ: ``Z42c ρ⁴ cos 2θ``, ``Z42s ρ⁴ sin 2θ``, ``Z44c ρ⁴ cos 4θ``,
  ``Z44s ρ⁴ sin 4θ``, ``Z60 ρ⁶``; the odd ones make an antisymmetric phase
  ``χ_odd = Z31c ρ³ cos θ + Z31s ρ³ sin θ + Z33c ρ³ cos 3θ + Z33s ρ³ sin 3θ`` and the CTF
  becomes complex: ``−sin(χ) · exp(i χ_odd)``.

The coefficients are stored in tables and results as compact JSON text (``{"Z31c":1.5}``,
``[1.0,0.0,0.0,1.0]``; empty text: none), which Leopard-EM's readers parse.
"""

from __future__ import annotations

import json
import math
from types import ModuleType
from typing import Any

import numpy as np

from dtm.errors import ConfigError

#: Even Zernike coefficient → (radial power n, angular order m, cos or sin).
EVEN_ZERNIKES: dict[str, tuple[int, int, str]] = {
    "Z42c": (4, 2, "cos"),
    "Z42s": (4, 2, "sin"),
    "Z44c": (4, 4, "cos"),
    "Z44s": (4, 4, "sin"),
    "Z60": (6, 0, "cos"),
}
#: Odd Zernike coefficient → (radial power n, angular order m, cos or sin).
ODD_ZERNIKES: dict[str, tuple[int, int, str]] = {
    "Z31c": (3, 1, "cos"),
    "Z31s": (3, 1, "sin"),
    "Z33c": (3, 3, "cos"),
    "Z33s": (3, 3, "sin"),
}

#: Canonical forms: sorted ``(name, value)`` pairs, and the four numbers of ``mag_matrix``.
Zernikes = tuple[tuple[str, float], ...]
MagMatrix = tuple[float, float, float, float]


def _missing(value: Any) -> bool:
    """None, NaN (an empty cell of a table) or empty text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def as_zernikes(value: Any, *, kind: str) -> Zernikes | None:
    """Canonical Zernike coefficients from a dict, JSON text or pairs; None when absent.

    Parameters
    ----------
    value
        ``{"Z31c": 1.5}``, its JSON text (a table cell), ``(("Z31c", 1.5),)``, or None /
        NaN / ``""`` for none.
    kind
        ``"even"`` or ``"odd"``: which names are allowed (:data:`EVEN_ZERNIKES`,
        :data:`ODD_ZERNIKES`).

    Raises
    ------
    ConfigError
        Unknown name, a value that is not a finite number, or unreadable text.
    """
    if _missing(value):
        return None
    field = f"{kind}_zernikes"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{field}: not a JSON object of coefficients: {value!r}") from None
    try:
        items = [(name, float(number)) for name, number in dict(value).items()]
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: expected name: number pairs, got {value!r}") from None
    known = EVEN_ZERNIKES if kind == "even" else ODD_ZERNIKES
    for name, number in items:
        if name not in known:
            raise ConfigError(f"{field}: unknown coefficient {name!r} (known: {', '.join(known)})")
        if not math.isfinite(number):
            raise ConfigError(f"{field}.{name}: must be a finite number, got {number}")
    pairs = [(str(name), number) for name, number in items]
    return tuple(sorted(pairs)) or None


def as_mag_matrix(value: Any) -> MagMatrix | None:
    """The four numbers of ``mag_matrix`` from a list, its text (``"[1.0, 0.0, 0.0, 1.0]"``,
    as both Leopard-EM and dtm write it) or a 2×2 array; None when absent.

    Raises
    ------
    ConfigError
        Not four finite numbers, or a singular matrix.
    """
    if _missing(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"mag_matrix: not a list of four numbers: {value!r}") from None
    try:
        numbers = [float(x) for x in np.asarray(value, dtype=np.float64).ravel()]
    except (TypeError, ValueError):
        raise ConfigError(f"mag_matrix: not a list of four numbers: {value!r}") from None
    if len(numbers) != 4 or not all(math.isfinite(x) for x in numbers):
        raise ConfigError(f"mag_matrix: expected four finite numbers, got {value!r}")
    if abs(numbers[0] * numbers[3] - numbers[1] * numbers[2]) < 1e-6:
        raise ConfigError(f"mag_matrix: singular matrix {numbers}")
    return (numbers[0], numbers[1], numbers[2], numbers[3])


def zernikes_text(zernikes: Zernikes | None) -> str:
    """Compact JSON of the coefficients for a table cell (``""`` when none)."""
    if not zernikes:
        return ""
    return json.dumps(dict(zernikes), separators=(",", ":"))


def mag_matrix_text(mag_matrix: MagMatrix | None) -> str:
    """Compact JSON of ``mag_matrix`` for a table cell (``""`` when none)."""
    return "" if mag_matrix is None else json.dumps(list(mag_matrix), separators=(",", ":"))


def frequency_transform(mag_matrix: MagMatrix) -> np.ndarray:
    """``(A⁻¹)ᵀ``, ``(2, 2)`` float64 on ``(ky, kx)``: where a recorded frequency samples
    the ideal image's spectrum."""
    matrix = np.asarray(mag_matrix, dtype=np.float64).reshape(2, 2)
    return np.linalg.inv(matrix).T


def transformed_frequencies(ky: Any, kx: Any, mag_matrix: MagMatrix | None) -> tuple[Any, Any]:
    """``(k'y, k'x) = (A⁻¹)ᵀ (ky, kx)`` (the arrays unchanged without a matrix)."""
    if mag_matrix is None:
        return ky, kx
    (byy, byx), (bxy, bxx) = frequency_transform(mag_matrix)
    return byy * ky + byx * kx, bxy * ky + bxx * kx


def slice_transform(mag_matrix: MagMatrix | None) -> np.ndarray | None:
    """``(3, 3)`` matrix ``M`` such that the central slice cut with ``R @ M`` samples the
    template's spectrum at ``R · (k'x, k'y, 0)``: the projection ``p(A·r)`` of Leopard-EM's
    magnified templates. The slicers use only the first two columns of a rotation, so ``M``
    holds ``(A⁻¹)ᵀ`` in ``(x, y)`` order there and 1 on the z axis. None without a matrix.
    """
    if mag_matrix is None:
        return None
    (byy, byx), (bxy, bxx) = frequency_transform(mag_matrix)
    return np.array([[bxx, bxy, 0.0], [byx, byy, 0.0], [0.0, 0.0, 1.0]])


def magnified_rotations(rotations: np.ndarray, transform: np.ndarray | None) -> np.ndarray:
    """``rotations @ transform`` (``(n, 3, 3)``): what the slicers cut for a magnified
    template (:func:`slice_transform`); the rotations themselves when there is none."""
    return rotations if transform is None else rotations @ transform


def zernike_phase(
    zernikes: Zernikes | None, rho: Any, theta: Any, *, kind: str, xp: ModuleType = np
) -> Any:
    """Σ coefficient · ρⁿ · cos/sin(m θ) over ``zernikes`` (0 when None).

    Parameters
    ----------
    zernikes
        Canonical coefficients (:func:`as_zernikes`), radians per Å⁻ⁿ.
    rho, theta
        ``|k'|`` in Å⁻¹ and ``atan2(k'y, k'x)`` in radians, same shape.
    kind
        ``"even"`` or ``"odd"``.
    """
    known = EVEN_ZERNIKES if kind == "even" else ODD_ZERNIKES
    phase = xp.zeros_like(rho)
    for name, coefficient in zernikes or ():
        power, order, trig = known[name]
        angular = xp.cos(order * theta) if trig == "cos" else xp.sin(order * theta)
        phase = phase + coefficient * rho**power * angular
    return phase


__all__ = [
    "EVEN_ZERNIKES",
    "ODD_ZERNIKES",
    "MagMatrix",
    "Zernikes",
    "as_mag_matrix",
    "as_zernikes",
    "frequency_transform",
    "magnified_rotations",
    "mag_matrix_text",
    "slice_transform",
    "transformed_frequencies",
    "zernike_phase",
    "zernikes_text",
]
