# The types of dtm's top-level API (dtm/__init__.py loads these names lazily): what type
# checkers and IDEs read. tests/test_api.py checks that it names exactly dtm.__all__.
from dtm.config import MatchConfig as MatchConfig
from dtm.config import RefineConfig as RefineConfig
from dtm.config import load_match_config as load_match_config
from dtm.config import load_refine_config as load_refine_config
from dtm.errors import DtmError as DtmError
from dtm.io.mrc import read_micrograph as read_micrograph
from dtm.io.mrc import read_template as read_template
from dtm.io.mrc import write_map as write_map
from dtm.io.store import open_results as open_results
from dtm.io.tables import read_table as read_table
from dtm.programs.match import match_template as match_template
from dtm.programs.particles import ParticleStack as ParticleStack
from dtm.programs.particles import extract_particles as extract_particles
from dtm.programs.peaks import peaks_dataframe as peaks_dataframe
from dtm.programs.peaks import peaks_table as peaks_table
from dtm.programs.refine import refine_template as refine_template
from dtm.programs.template import simulate_template as simulate_template
from dtm.search.picking import pick_peaks as pick_peaks
from dtm.search.picking import threshold as threshold

__version__: str
__all__: list[str]
