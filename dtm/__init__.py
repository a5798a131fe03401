"""dtm: 2D template matching for cryo-EM, distributed with Dask.

The public API is importable from the top level; submodules are imported on first use so
that ``import dtm`` (and the ``dtm`` command's start-up) stays light. Type checkers read the
real signatures from ``__init__.pyi``. The version is the installed package's (written once,
in ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

__version__ = importlib.metadata.version("dtm")

_EXPORTS = {
    "match_template": "dtm.programs.match",
    "refine_template": "dtm.programs.refine",
    "simulate_template": "dtm.programs.template",
    "load_match_config": "dtm.config",
    "load_refine_config": "dtm.config",
    "MatchConfig": "dtm.config",
    "RefineConfig": "dtm.config",
    "open_results": "dtm.io.store",
    "peaks_table": "dtm.programs.peaks",
    "peaks_dataframe": "dtm.programs.peaks",
    "threshold": "dtm.search.picking",
    "pick_peaks": "dtm.search.picking",
    "extract_particles": "dtm.programs.particles",
    "ParticleStack": "dtm.programs.particles",
    "read_micrograph": "dtm.io.mrc",
    "read_template": "dtm.io.mrc",
    "write_map": "dtm.io.mrc",
    "read_table": "dtm.io.tables",
    "DtmError": "dtm.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dtm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
