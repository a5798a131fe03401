"""dtm.schema is the one place of the shared names: the modules that use them agree with it."""

from __future__ import annotations

import dataclasses

from dtm.config.base import _MAP_FIELDS
from dtm.io.rundir import FIXED_OUTPUTS, run_outputs
from dtm.io.tables import PEAK_COLUMNS
from dtm.programs.browse import MAPS
from dtm.schema import (
    ABERRATION_FIELDS,
    CHECKPOINTS_DIR,
    MAP_NAMES,
    MRC_NAMES,
    OPTICS_FIELDS,
    PEAK_FILES,
    RESULTS_STORE,
    checkpoint_folder,
    token,
)
from dtm.search.prepare import Optics


def test_every_map_has_one_file_and_one_leopard_field():
    assert tuple(MRC_NAMES) == MAP_NAMES
    assert len(set(MRC_NAMES.values())) == len(MAP_NAMES)
    assert set(_MAP_FIELDS) == set(MAP_NAMES)
    assert sorted(MAPS) == sorted(MAP_NAMES) and MAPS[0] == "scaled_mip"


def test_optics_fields_are_those_of_optics_and_of_the_peak_table():
    names = tuple(field.name for field in dataclasses.fields(Optics))
    assert names == OPTICS_FIELDS + ABERRATION_FIELDS
    assert set(OPTICS_FIELDS + ABERRATION_FIELDS) <= set(PEAK_COLUMNS)


def test_a_run_records_every_file_it_writes():
    outputs = run_outputs(["a", "b"])
    assert set(PEAK_FILES) <= set(FIXED_OUTPUTS) <= set(outputs)
    assert f"{RESULTS_STORE}/a" in outputs
    assert f"{CHECKPOINTS_DIR}/{token('b')}" == checkpoint_folder("b") in outputs
    assert [f"maps/a_{MRC_NAMES[name]}" in outputs for name in MAP_NAMES] == [True] * 8


def test_token_is_short_stable_and_holds_a_digit():
    assert token("m1") == token("m1") != token("m2")
    assert len(token("m1")) == 12 and any(c.isdigit() for c in token("m1"))
