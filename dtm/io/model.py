"""Atomic models (PDB, mmCIF, their gzipped forms) read with gemmi.

What a template is made of (``docs/from-a-model.md``): the first model of the file; every atom
but hydrogens (H and D: most models have none, and cisTEM and ttsim3d leave them out too);
waters unless asked to drop them; each atom weighted by its occupancy (the alternative
conformations of a residue share one atom's worth), with its isotropic B-factor (anisotropic
ones are not used). The centre is the mean position of every atom of that model as read —
hydrogens and waters included, as ttsim3d centres — so that dropping waters does not move
the template.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtm.errors import InputError


@dataclass(frozen=True)
class AtomicModel:
    """The atoms of a model that a template is made of.

    Attributes
    ----------
    path
        The file read.
    xyz
        ``(n, 3)`` float64 positions ``(x, y, z)``, Å, in the file's frame.
    elements
        ``(n,)`` upper-case element symbols.
    b_factors
        ``(n,)`` float64 isotropic B-factors, Å².
    occupancies
        ``(n,)`` float64.
    centre
        ``(3,)`` float64 ``(x, y, z)``, Å: mean position of every atom of the model.
    hydrogens, waters
        Hydrogen atoms left out, and water atoms (kept, or left out with ``waters=False``).
    """

    path: Path
    xyz: np.ndarray
    elements: np.ndarray
    b_factors: np.ndarray
    occupancies: np.ndarray
    centre: np.ndarray
    hydrogens: int
    waters: int

    def radius(self) -> float:
        """Largest distance of an atom from the centre, Å."""
        return float(np.linalg.norm(self.xyz - self.centre, axis=1).max())


def read_model(path: str | os.PathLike[str], *, waters: bool = True) -> AtomicModel:
    """Read the atoms of a PDB or mmCIF file (``.gz`` too).

    Parameters
    ----------
    path
        The model file.
    waters
        Keep water molecules (``False``: leave them out; the centre stays where it was).

    Returns
    -------
    AtomicModel

    Raises
    ------
    InputError
        Missing or unreadable file, a file gemmi cannot parse, a model without atoms (after
        hydrogens are left out), or an atom without coordinates.
    """
    import gemmi  # noqa: PLC0415 (only the template commands need it)

    path = Path(path)
    if not path.is_file():
        raise InputError(f"model {path}: file not found")
    try:
        structure = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"model {path}: not a PDB or mmCIF model gemmi can read ({reason})"
        ) from None
    if len(structure) == 0:
        raise InputError(f"model {path}: holds no model (no atoms)")
    xyz, elements, b_factors, occupancies, water = [], [], [], [], []
    for chain in structure[0]:
        for residue in chain:
            is_water = residue.is_water()
            for atom in residue:
                xyz.append(atom.pos.tolist())
                elements.append(atom.element.name.upper())
                b_factors.append(atom.b_iso)
                occupancies.append(atom.occ)
                water.append(is_water)
    if not xyz:
        raise InputError(f"model {path}: its first model has no atoms")
    positions = np.asarray(xyz, dtype=np.float64)
    if not np.isfinite(positions).all():
        raise InputError(f"model {path}: an atom has no finite coordinates")
    names = np.asarray(elements, dtype=str)
    water_atom = np.asarray(water, dtype=bool)
    hydrogen = np.isin(names, ["H", "D"])
    keep = ~hydrogen & (waters | ~water_atom)
    if not keep.any():
        raise InputError(f"model {path}: no atoms left without hydrogens (and waters)")
    return AtomicModel(
        path=path,
        xyz=positions[keep],
        elements=names[keep],
        b_factors=np.asarray(b_factors, dtype=np.float64)[keep],
        occupancies=np.asarray(occupancies, dtype=np.float64)[keep],
        centre=positions.mean(axis=0),
        hydrogens=int(hydrogen.sum()),
        waters=int((water_atom & ~hydrogen).sum()),
    )
