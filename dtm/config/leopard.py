"""What dtm knows of Leopard-EM's configuration files as a whole (versions 1.0 to 1.3).

The keys of each section are declared on dtm's models (:mod:`dtm.config`); this module knows
the files: which program a file is for (Leopard-EM has four: ``match_template``,
``refine_template``, ``optimize_template`` and ``constrained_search``), and whether a file
is Leopard-EM's own, which decides where its relative paths are resolved from
(:mod:`dtm.config.paths`).
"""

from __future__ import annotations

from typing import Any, Literal

from dtm.config.messages import _show

Program = Literal["match", "refine"]

#: Top-level keys of Leopard-EM's ``match_template`` and ``refine_template`` files (every
#: version), with their in-memory fields, which only ``null`` can fill in a file.
LEOPARD_TOP_LEVEL: dict[Program, frozenset[str]] = {
    "match": frozenset(
        {
            "micrograph_path",
            "template_volume_path",
            "optics_group",
            "defocus_search_config",
            "orientation_search_config",
            "preprocessing_filters",
            "match_template_result",
            "computational_config",
            "micrograph",
            "template_volume",
        }
    ),
    "refine": frozenset(
        {
            "template_volume_path",
            "particle_stack",
            "defocus_refinement_config",
            "pixel_size_refinement_config",
            "orientation_refinement_config",
            "preprocessing_filters",
            "computational_config",
            "movie_config",
            "apply_global_filtering",
            "template_volume",
        }
    ),
}

#: The top-level keys that every version of Leopard-EM requires in a file of the program.
LEOPARD_REQUIRED: dict[Program, frozenset[str]] = {
    "match": LEOPARD_TOP_LEVEL["match"] - {"micrograph", "template_volume"},
    "refine": LEOPARD_TOP_LEVEL["refine"]
    - {"movie_config", "apply_global_filtering", "template_volume"},
}

#: Keys that only a file of one program has: they tell which program a file is for.
_DISTINCTIVE = {
    "optimize_template": ("pixel_size_coarse_search", "pixel_size_fine_search", "simulator"),
    "constrained_search": (
        "particle_stack_reference",
        "particle_stack_constrained",
        "center_vector",
    ),
    "match_template": (
        "micrograph_path",
        "micrographs",
        "micrograph_table",
        "optics_group",
        "orientation_search_config",
        "match_template_result",
    ),
    "refine_template": ("particle_stack", "pixel_size_refinement_config", "movie_config"),
}

_OWN: dict[Program, str] = {"match": "match_template", "refine": "refine_template"}
_DTM = {"match_template": "match", "refine_template": "refine"}


def other_program(data: dict[str, Any], program: Program) -> str | None:
    """Why a file is not one of ``program``, or None.

    A file with keys that only ``optimize_template`` or ``constrained_search`` files have
    (dtm has neither program), or with keys of the other dtm program's files and none of
    its own (a match configuration given to ``dtm refine``, or the reverse), is refused as a
    whole, in one line that says which program it is for.
    """
    own = [key for key in _DISTINCTIVE[_OWN[program]] if key in data]
    for name, keys in _DISTINCTIVE.items():
        found = ", ".join(key for key in keys if key in data)
        if name == _OWN[program] or not found or (own and name in _DTM):
            continue
        if name in _DTM:
            return (
                f"a {_DTM[name]} configuration ({found}), not a {program} one: run it with "
                f"dtm {_DTM[name]}"
            )
        return (
            f"a Leopard-EM {name} file ({found}): dtm has no {name.replace('_', ' ')} "
            "program (dtm match reads match_template files, dtm refine refine_template files)"
        )
    return None


def leopard_version(data: dict[str, Any]) -> str | None:
    """The ``leopard_em_version`` a file records (Leopard-EM 1.3 writes it in
    ``match_template_result`` and ``particle_stack``), or None."""
    for section in ("match_template_result", "particle_stack"):
        value = data.get(section)
        if isinstance(value, dict) and value.get("leopard_em_version") is not None:
            return str(value["leopard_em_version"])
    return None


def leopard_file_reason(data: dict[str, Any], program: Program) -> str | None:
    """Why a file counts as Leopard-EM's own, or None when it is dtm's.

    A file is Leopard-EM's when it records ``leopard_em_version``, or when Leopard-EM could
    run it as it is: it has every top-level key Leopard-EM requires and none that only dtm
    knows.
    """
    version = leopard_version(data)
    if version is not None:
        return f"it records leopard_em_version {_show(version)}"
    keys = set(data)
    if LEOPARD_REQUIRED[program] <= keys and keys <= LEOPARD_TOP_LEVEL[program]:
        return "it has Leopard-EM's keys only"
    return None
