"""Every key Leopard-EM 1.3 writes loads in dtm; all problems of a file come together; the
random Fourier dropout is Leopard-EM's, bit for bit; relative paths follow Leopard-EM's rule
in Leopard-EM files.

The inputs in ``tests/data/leopard`` (see its README) were written by Leopard-EM 1.3.0 itself
(``to_yaml``) or come from its repository; Leopard-EM is not needed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from dtm.cli import main
from dtm.config import MatchConfig, RefineConfig, load_match_config, load_refine_config
from dtm.config.messages import IN_MEMORY, models_in
from dtm.errors import ConfigError
from dtm.physics.filters import fourier_dropout_mask
from dtm.search.prepare import FilterSettings, Optics, projection_filters

LEOPARD = Path(__file__).parent / "data" / "leopard"


def _copy(name: str, folder: Path, files: tuple[str, ...] = ()) -> Path:
    """A Leopard-EM file in ``folder``, with empty placeholders for its input files."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    shutil.copy(LEOPARD / name, path)
    for file in files:
        (folder / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / file).write_bytes(b"")
    return path


def _error(load: Any, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


# --- every key that Leopard-EM 1.3 writes -------------------------------------------------


def test_the_match_template_file_leopard_em_writes_loads(tmp_path, monkeypatch) -> None:
    path = _copy("match_template_to_yaml.yaml", tmp_path, ("micrograph.mrc", "template.mrc"))
    monkeypatch.chdir(tmp_path)
    config = load_match_config(path)
    result = config.match_template_result
    assert result is not None and result.leopard_em_version == "1.3.0"
    assert result.map_paths()["mip"] == tmp_path / "out" / "output_mip.mrc"
    assert config.table_settings() is None  # correlation_table_path: null
    assert config.preprocessing_filters.settings(1.06).dropout_fraction == 0.0  # disabled
    # Leopard-EM's defaults (total_* 0, filters off) say nothing; only the GPU kernel does.
    assert [line.split(":")[0] for line in config.notices] == ["computational_config.backend"]


def test_the_hdf5_result_and_dropout_that_leopard_em_writes_take_effect(
    tmp_path, monkeypatch
) -> None:
    path = _copy("match_template_hdf5_to_yaml.yaml", tmp_path, ("micrograph.mrc", "template.mrc"))
    monkeypatch.chdir(tmp_path)
    config = load_match_config(path)
    settings = config.preprocessing_filters.settings(1.06)
    assert (settings.dropout_fraction, settings.dropout_seed) == (0.2, 7)
    # correlation_table_path turns dtm's correlation table on, at Leopard-EM's cut-off 5.5.
    assert config.table_settings() == (5.5, 1_000_000)
    notices = dict(line.split(": ", 1) for line in config.notices)
    assert notices["match_template_result.hdf5_path"].startswith(
        "accepted, has no effect in dtm (dtm writes results.zarr and maps/*.mrc in output_dir"
    )
    assert "parquet" in notices["match_template_result.correlation_table_path"]
    assert "match_template_result.compress" not in notices  # at Leopard-EM's default


def test_the_refine_template_file_leopard_em_writes_loads(tmp_path, monkeypatch) -> None:
    """Its tuples are tagged !!python/tuple, which a safe YAML loader refuses."""
    path = _copy("refine_template_to_yaml.yaml", tmp_path, ("template.mrc", "particles.csv"))
    assert "!!python/tuple" in path.read_text()
    monkeypatch.chdir(tmp_path)
    config = load_refine_config(path)
    assert config.particle_stack.extracted_box_size == (528, 528)
    assert config.particle_stack.leopard_em_version == "1.3.0"
    assert config.pixel_size_refinement_config.skip_enforce_zero is False
    assert "particle_stack.original_template_size" in "\n".join(config.notices)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("example_match_template_manager_example.yaml", ("dummy_micrograph.mrc",)),
        ("example_02_extract_peak_info_config.yaml", ("dummy_micrograph.mrc",)),
    ],
)
def test_leopard_ems_example_files_load(tmp_path, monkeypatch, name: str, files) -> None:
    """Its examples, the first one with the keys of an older version (zernike_moments...)."""
    template = yaml.safe_load((LEOPARD / name).read_text())["template_volume_path"]
    path = _copy(name, tmp_path, (*files, template))
    monkeypatch.chdir(tmp_path)
    assert load_match_config(path).optics_group.label


def _program_model(program: str) -> type:
    return MatchConfig if program == "match_template" else RefineConfig


def _models_at(root: type, section: str) -> list[type]:
    models = [root]
    for part in filter(None, section.replace("[]", "").split(".")):
        fields = [model.model_fields.get(part) for model in models]
        models = [sub for field in fields if field for sub in models_in(field.annotation)]
    return models


def test_every_field_of_leopard_ems_models_is_declared() -> None:
    """Against the fields of Leopard-EM 1.3.0's own pydantic models (recorded from them)."""
    inventory = json.loads((LEOPARD / "leopard_em_1.3.0_fields.json").read_text())
    checked = 0
    for program, sections in inventory["programs"].items():
        for section, fields in sections.items():
            models = _models_at(_program_model(program), section)
            assert models, f"{program}: no dtm section for {section!r}"
            declared = {name for model in models for name in model.model_fields}
            in_memory = {name for model in models for name in model.leopard_in_memory}
            for name in fields["settings"]:
                assert name in declared, f"{program}: {section}.{name} not declared"
            for name in fields["in_memory"]:
                assert name in in_memory, f"{program}: {section}.{name} not known as in-memory"
            checked += len(fields["settings"]) + len(fields["in_memory"])
    assert checked > 150


def test_in_memory_fields_load_as_null_and_nothing_else(tmp_path, monkeypatch) -> None:
    path = _copy("match_template_to_yaml.yaml", tmp_path, ("micrograph.mrc", "template.mrc"))
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["micrograph"] = None
    data["match_template_result"]["mip"] = None
    path.write_text(yaml.safe_dump(data))
    assert "micrograph" not in load_match_config(path).model_dump()
    data["match_template_result"]["mip"] = [[1.0, 2.0]]
    path.write_text(yaml.safe_dump(data))
    assert _error(load_match_config, path) == f"{path}: match_template_result.mip: {IN_MEMORY}"


def test_files_of_other_leopard_em_programs_are_refused_as_a_whole(tmp_path) -> None:
    for name, program in [
        ("constrained_search_to_yaml.yaml", "constrained search"),
        ("optimize_template_to_yaml.yaml", "optimize template"),
    ]:
        path = _copy(name, tmp_path)
        for load in (load_match_config, load_refine_config):
            message = _error(load, path)
            assert "\n" not in message
            assert message.startswith(f"{path}: a Leopard-EM {program.replace(' ', '_')} file (")
            assert f"dtm has no {program} program" in message
    match_file = _copy("match_template_to_yaml.yaml", tmp_path)
    assert _error(load_refine_config, match_file).endswith(
        "not a refine one: run it with dtm match"
    )


def test_an_hdf5_particle_stack_is_refused_with_what_to_give(tmp_path, monkeypatch) -> None:
    path = _copy("refine_template_to_yaml.yaml", tmp_path, ("template.mrc",))
    monkeypatch.chdir(tmp_path)
    path.write_text(path.read_text().replace("df_path: particles.csv", "hdf5_path: stack.h5"))
    assert _error(load_refine_config, path) == (
        f"{path}: particle_stack.hdf5_path: dtm does not read Leopard-EM's HDF5 particle "
        "stacks; give df_path, the particles' CSV table (got 'stack.h5')"
    )


# --- all problems of a file together ------------------------------------------------------


def test_every_problem_of_a_file_is_reported_at_once(tmp_path, monkeypatch, capsys) -> None:
    path = _copy("match_template_to_yaml.yaml", tmp_path, ("template.mrc",))
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["preprocessing_filters"]["random_fourier_dropuot"] = data["preprocessing_filters"].pop(
        "random_fourier_dropout"
    )
    data["optics_group"]["voltage"] = "high"
    data["orientation_search_config"]["psi_step"] = -1
    data["favourite_colour"] = "red"
    path.write_text(yaml.safe_dump(data))
    expected = [
        f"{path}: 5 problems:",
        "  preprocessing_filters.random_fourier_dropuot: unknown key (did you mean "
        "random_fourier_dropout?)",
        "  favourite_colour: unknown key (got 'red')",
        f"  micrograph_path: file not found (got {tmp_path / 'micrograph.mrc'})",
        "  optics_group.voltage: Input should be a valid number, unable to parse string as a "
        "number (got 'high')",
        "  orientation_search_config.psi_step: Input should be greater than 0 (got -1)",
    ]
    assert _error(load_match_config, path).splitlines() == expected
    assert main(["match", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["dtm: error: " + expected[0], *expected[1:]]
    assert "Traceback" not in err


def test_a_single_problem_stays_one_line(tmp_path, monkeypatch) -> None:
    path = _copy("match_template_to_yaml.yaml", tmp_path, ("micrograph.mrc", "template.mrc"))
    monkeypatch.chdir(tmp_path)
    path.write_text(path.read_text().replace("psi_step: 1.5", "psi_stepp: 1.5"))
    assert _error(load_match_config, path) == (
        f"{path}: orientation_search_config.psi_stepp: unknown key (did you mean psi_step?)"
    )


# --- random Fourier dropout ---------------------------------------------------------------

_MASKS = json.loads((LEOPARD / "dropout_masks.json").read_text())["cases"]


@pytest.mark.parametrize("case", _MASKS, ids=[str(case["seed"]) for case in _MASKS])
def test_dropout_mask_is_leopard_ems_bit_for_bit(case: dict[str, Any]) -> None:
    ny, nx = case["shape"]
    expected = np.unpackbits(np.frombuffer(bytes.fromhex(case["mask_packbits_hex"]), np.uint8))
    expected = expected[: ny * (nx // 2 + 1)].reshape(ny, nx // 2 + 1)
    mask = fourier_dropout_mask((ny, nx), case["dropout_fraction"], case["seed"])
    assert mask.dtype == np.float32 and mask.shape == expected.shape
    np.testing.assert_array_equal(mask, expected)


def test_dropout_masks_the_projection_filters_only_in_the_search() -> None:
    optics = Optics(1.06, 300, 2.7, 0.07, 12000, 11500, 30)
    defocus = np.array([-200.0, 0.0, 200.0])
    plain = projection_filters((64, 64), optics, defocus, FilterSettings(whitening=False), None)
    dropped = projection_filters(
        (64, 64),
        optics,
        defocus,
        FilterSettings(whitening=False, dropout_fraction=0.1, dropout_seed=0),
        None,
    )
    # The (64, 64) case of Leopard-EM's masks: fraction 0.1, seed 0.
    (case,) = [c for c in _MASKS if c["shape"] == [64, 64]]
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(case["mask_packbits_hex"]), np.uint8))
    np.testing.assert_array_equal(dropped, plain * bits[: 64 * 33].reshape(1, 64, 33))
    assert 0.05 < 1 - bits[: 64 * 33].mean() < 0.15


def test_dropout_settings_in_match_and_refine(tmp_path, monkeypatch) -> None:
    match = _copy("match_template_hdf5_to_yaml.yaml", tmp_path, ("micrograph.mrc", "template.mrc"))
    refine = _copy("refine_template_to_yaml.yaml", tmp_path, ("particles.csv",))
    monkeypatch.chdir(tmp_path)
    text = refine.read_text().replace(
        "    enabled: false\n    seed: 0", "    enabled: true\n    seed: 7"
    )
    refine.write_text(text)
    config = load_refine_config(refine)
    # Leopard-EM refines without the dropout; so does dtm, and says so.
    assert config.preprocessing_filters.settings(1.06).dropout_fraction == 0.0
    assert any(
        line.startswith("preprocessing_filters.random_fourier_dropout: accepted, has no effect")
        for line in config.notices
    )
    assert load_match_config(match).preprocessing_filters.settings(1.06).dropout_fraction == 0.2
    for bad, problem in [
        ("dropout_fraction: 0.2", "dropout_fraction: 1.0"),
        ("seed: 7", "seed: 0.5"),
        ("    seed: 7\n", ""),
    ]:
        match.write_text(
            (LEOPARD / "match_template_hdf5_to_yaml.yaml").read_text().replace(bad, problem)
        )
        message = _error(load_match_config, match)
        assert "preprocessing_filters.random_fourier_dropout." in message, message


# --- relative paths -----------------------------------------------------------------------


def _leopard_match(folder: Path) -> Path:
    return _copy("match_template_to_yaml.yaml", folder)


def _inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("micrograph.mrc", "template.mrc"):
        (folder / name).write_bytes(b"")


def test_a_leopard_em_file_resolves_from_the_working_directory(tmp_path, monkeypatch) -> None:
    """As Leopard-EM: inputs and outputs (its map paths, dtm's default output_dir)."""
    path = _leopard_match(tmp_path / "configs")
    run = tmp_path / "run"
    _inputs(run)
    monkeypatch.chdir(run)
    config = load_match_config(path)
    assert config.micrograph_path == run / "micrograph.mrc"
    assert config.match_template_result is not None
    assert config.match_template_result.map_paths()["mip"] == run / "out" / "output_mip.mrc"
    assert config.output_dir == run / "dtm-out"
    assert config.notices[0] == (
        f"relative paths are resolved from the working directory {run}, as Leopard-EM does "
        "(match_template_to_yaml.yaml is a Leopard-EM file: it records leopard_em_version "
        "'1.3.0')"
    )
    # Found from both folders: Leopard-EM's rule still decides.
    _inputs(tmp_path / "configs")
    assert load_match_config(path).micrograph_path == run / "micrograph.mrc"


def test_command_line_overrides_leave_a_leopard_em_file_leopard_em_s(tmp_path, monkeypatch) -> None:
    """--output-dir and --cluster add dtm keys to the file's settings, not to the file."""
    path = _copy("example_match_template_manager_example.yaml", tmp_path / "configs")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("dummy_micrograph.mrc", "dummy_template_volume.mrc"):
        (run / name).write_bytes(b"")
    monkeypatch.chdir(run)
    config = load_match_config(path, {"output_dir": "results", "cluster.kind": "local"})
    assert config.micrograph_path == run / "dummy_micrograph.mrc"
    assert config.output_dir == run / "results"


def test_a_leopard_em_file_beside_its_inputs_runs_from_anywhere(tmp_path, monkeypatch) -> None:
    path = _leopard_match(tmp_path / "project")
    _inputs(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_match_config(path)
    assert config.template_volume_path == tmp_path / "project" / "template.mrc"
    assert config.output_dir == tmp_path / "project" / "dtm-out"
    assert config.notices[0] == (
        f"relative paths are resolved from the configuration's folder {tmp_path / 'project'}: "
        "match_template_to_yaml.yaml is a Leopard-EM file (it records leopard_em_version "
        f"'1.3.0'), but its micrograph_path micrograph.mrc is not in the working directory "
        f"{elsewhere}"
    )


def test_a_file_found_nowhere_is_reported_from_the_working_directory(tmp_path, monkeypatch) -> None:
    path = _leopard_match(tmp_path / "configs")
    (tmp_path / "configs" / "micrograph.mrc").write_bytes(b"")  # not the template
    monkeypatch.chdir(tmp_path)
    message = _error(load_match_config, path)
    assert f"template_volume_path: file not found (got {tmp_path / 'template.mrc'})" in message


def test_leopard_em_keys_only_make_a_leopard_em_file_too(tmp_path, monkeypatch) -> None:
    """Without leopard_em_version: every section Leopard-EM requires, no dtm key."""
    path = _copy("example_match_template_manager_example.yaml", tmp_path / "configs")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("dummy_micrograph.mrc", "dummy_template_volume.mrc"):
        (run / name).write_bytes(b"")
    monkeypatch.chdir(run)
    config = load_match_config(path)
    assert config.micrograph_path == run / "dummy_micrograph.mrc"
    assert "it has Leopard-EM's keys only" in config.notices[0]


def test_a_dtm_file_resolves_from_its_folder_whatever_the_working_directory(
    tmp_path, monkeypatch
) -> None:
    path = _leopard_match(tmp_path / "configs")
    data = yaml.safe_load(path.read_text())
    del data["match_template_result"]["leopard_em_version"]
    data["output_dir"] = "results"  # a dtm key: dtm's rule
    path.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    _inputs(run)
    monkeypatch.chdir(run)
    message = _error(load_match_config, path)
    assert f"micrograph_path: file not found (got {tmp_path / 'configs' / 'micrograph.mrc'})" in (
        message
    )
    _inputs(tmp_path / "configs")
    config = load_match_config(path)
    assert config.output_dir == tmp_path / "configs" / "results"
    assert not any("relative paths" in line for line in config.notices)


def test_no_notice_where_both_rules_agree(tmp_path, monkeypatch) -> None:
    path = _leopard_match(tmp_path)
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert not any("relative paths" in line for line in load_match_config(path).notices)


def test_a_refine_file_follows_the_same_rule(tmp_path, monkeypatch) -> None:
    path = _copy("refine_template_to_yaml.yaml", tmp_path / "configs")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("template.mrc", "particles.csv"):
        (run / name).write_bytes(b"")
    monkeypatch.chdir(run)
    config = load_refine_config(path)
    assert config.particle_stack.df_path == run / "particles.csv"
    assert config.output_path == run / "refined.csv"
    assert config.notices[0].startswith(
        f"relative paths are resolved from the working directory {run}"
    )
