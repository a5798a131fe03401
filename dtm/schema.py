"""Names that every layer shares: the maps of a search, the files of a run, the optics.

The one place where these names are written; every module that reads or writes them
imports them from here (docs/outputs.md describes the files).
"""

from __future__ import annotations

import hashlib

#: The maps of a search, in the order of the results dataset (conventions.md#results).
MAP_NAMES = (
    "mip",
    "scaled_mip",
    "correlation_mean",
    "correlation_variance",
    "phi",
    "theta",
    "psi",
    "defocus",
)

#: Map name → file name of its ``.mrc`` export in ``OUTPUT_DIR/maps/`` (Leopard-EM's names).
MRC_NAMES = {
    "mip": "mip.mrc",
    "scaled_mip": "scaled_mip.mrc",
    "correlation_mean": "correlation_average.mrc",
    "correlation_variance": "correlation_variance.mrc",
    "phi": "orientation_phi.mrc",
    "theta": "orientation_theta.mrc",
    "psi": "orientation_psi.mrc",
    "defocus": "relative_defocus.mrc",
}

#: The microscope and CTF values of one micrograph, as the fields of
#: :class:`dtm.search.prepare.Optics`, the attributes of a results dataset and the columns
#: of a peak table name them (units in conventions.md#ctf).
OPTICS_FIELDS = (
    "pixel_size",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast_ratio",
    "defocus_u",
    "defocus_v",
    "astigmatism_angle",
    "phase_shift",
    "ctf_B_factor",
)
#: Leopard-EM's optional CTF terms, beside the optics fields in tables and attributes
#: (:mod:`dtm.physics.aberrations`).
ABERRATION_FIELDS = ("even_zernikes", "odd_zernikes", "mag_matrix")

# The files and folders of an output directory of ``dtm match``.
#: The results store: the dataset at its root (one micrograph) or one group per micrograph.
RESULTS_STORE = "results.zarr"
#: The ``.mrc`` maps (``[NAME_]`` + :data:`MRC_NAMES`).
MAPS_DIR = "maps"
#: Checkpoints of unfinished micrographs (one folder each: :func:`checkpoint_folder`).
CHECKPOINTS_DIR = "checkpoints"
#: Every parameter of the run, and the outputs it writes.
JOB_FILE = "job.json"
#: Each micrograph's fate, timings and versions.
RUN_FILE = "run.json"
#: Where a run that stopped on a failure writes the traceback (never to the terminal).
LOG_FILE = "dtm-error.log"
#: The lock file that a ``dtm match`` run holds (``fcntl.flock``) in its output directory.
LOCK_FILE = ".dtm-match.lock"
#: Stem of the peak tables: ``peaks.csv``, ``peaks.parquet/``, ``peaks.star``.
PEAKS_STEM = "peaks"
#: The peak tables that are read back, in the order they are looked for.
PEAK_TABLES = (f"{PEAKS_STEM}.csv", f"{PEAKS_STEM}.parquet")
#: Every peak table written.
PEAK_FILES = (*PEAK_TABLES, f"{PEAKS_STEM}.star")
#: Beside the peak tables: the settings that picked them (``dtm peaks`` may change them).
PICKING_FILE = f"{PEAKS_STEM}.json"
#: The correlation table: one parquet file per micrograph.
TABLE_DIR = "correlation_table.parquet"
#: The page of ``dtm report``.
REPORT_FILE = "report.html"
#: The template a search simulates from its atomic model (``template_model_path``).
TEMPLATE_FILE = "template.mrc"


def token(name: str) -> str:
    """A short token for a name, used in task keys and checkpoint folders.

    It always holds a digit, so Dask's ``key_split`` drops it and the dashboard groups the
    tasks by their readable prefix (``correlate``, ``merge``, …).
    """
    return "0" + hashlib.sha1(name.encode()).hexdigest()[:11]


def checkpoint_folder(name: str) -> str:
    """The checkpoints of micrograph ``name``, relative to the output directory."""
    return f"{CHECKPOINTS_DIR}/{token(name)}"
