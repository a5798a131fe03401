"""Configuration of dtm's programs: pydantic models of the YAML files, Leopard-EM compatible.

``dtm match`` and ``dtm refine`` read a YAML file validated by :class:`MatchConfig` and
:class:`RefineConfig`. Every Leopard-EM 1.3 key is declared, so a Leopard-EM file loads
unchanged; unknown keys are errors. Leopard-EM settings that dtm does not use are accepted
and, when set to a value other than their default, reported as one-line *notices* by the
``notices`` property of the loaded configuration (the command line prints them).

Relative paths in a file are resolved against the directory of that file, or for a
Leopard-EM file as Leopard-EM does (:mod:`~dtm.config.paths`); relative paths in
command-line overrides against the current directory. Every problem raises
:class:`dtm.errors.ConfigError`: one line ``<file>: <dotted.field>: <problem> (got <value>)``,
or for several problems of a file a summary with each problem on its own line below it.
Field descriptions (attribute docstrings) feed ``model_json_schema`` and the docs.

Modules: :mod:`~dtm.config.base` (base model, field types, YAML loading),
:mod:`~dtm.config.messages` (validation messages), :mod:`~dtm.config.leopard` (Leopard-EM's
programs and files), :mod:`~dtm.config.paths` (the base of relative paths),
:mod:`~dtm.config.search` (optics, defocus, orientations), :mod:`~dtm.config.filters`,
:mod:`~dtm.config.compute` (cluster, Leopard-EM compute resources),
:mod:`~dtm.config.micrographs` (micrograph entries and tables), :mod:`~dtm.config.match`
and :mod:`~dtm.config.refine` (the two programs' files and their loaders).
"""

from dtm.config.base import (
    InputFile,
    NonNegative,
    OutputPath,
    Positive,
    PositiveInt,
    config_hash,
    config_to_dict,
    format_validation_error,
)
from dtm.config.compute import ClusterConfig, ComputationalConfig, SecurityConfig
from dtm.config.filters import (
    ArbitraryCurveFilterConfig,
    BandpassFilterConfig,
    PhaseRandomizationFilterConfig,
    PreprocessingFilters,
    RandomFourierDropoutConfig,
    WhiteningFilterConfig,
)
from dtm.config.match import MatchConfig, MatchTemplateResult, PeaksConfig, load_match_config
from dtm.config.micrographs import MicrographEntry, load_micrograph_table
from dtm.config.refine import (
    DefocusRefinementConfig,
    MovieConfig,
    OrientationRefinementConfig,
    ParticleStackConfig,
    PixelSizeRefinementConfig,
    RefineConfig,
    load_refine_config,
)
from dtm.config.search import (
    DefocusSearchConfig,
    MultipleOrientationConfig,
    OpticsGroup,
    OrientationConfig,
    OrientationSearchConfig,
)

__all__ = [
    "ArbitraryCurveFilterConfig",
    "BandpassFilterConfig",
    "ClusterConfig",
    "ComputationalConfig",
    "DefocusRefinementConfig",
    "DefocusSearchConfig",
    "InputFile",
    "MatchConfig",
    "MatchTemplateResult",
    "MicrographEntry",
    "MovieConfig",
    "MultipleOrientationConfig",
    "NonNegative",
    "OpticsGroup",
    "OrientationConfig",
    "OrientationRefinementConfig",
    "OrientationSearchConfig",
    "OutputPath",
    "ParticleStackConfig",
    "PeaksConfig",
    "PhaseRandomizationFilterConfig",
    "PixelSizeRefinementConfig",
    "Positive",
    "PositiveInt",
    "PreprocessingFilters",
    "RandomFourierDropoutConfig",
    "RefineConfig",
    "SecurityConfig",
    "WhiteningFilterConfig",
    "config_hash",
    "config_to_dict",
    "format_validation_error",
    "load_match_config",
    "load_micrograph_table",
    "load_refine_config",
]
