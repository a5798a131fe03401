"""Shared machinery of the configuration models: the base model, field types, YAML reading,
loading (with :mod:`~dtm.config.messages`, :mod:`~dtm.config.leopard` and
:mod:`~dtm.config.paths`), command-line overrides and hashing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar

import pydantic
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dtm.config.leopard import Program, other_program
from dtm.config.messages import _ONE_GRID as _ONE_GRID  # re-exported for the sections
from dtm.config.messages import _SEVERAL_GRIDS as _SEVERAL_GRIDS
from dtm.config.messages import _Problem as _Problem
from dtm.config.messages import _show as _show
from dtm.config.messages import format_validation_error as format_validation_error
from dtm.config.messages import join_problems, problem_lines
from dtm.config.paths import relative_base
from dtm.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


def _existing_file(path: Path, info: ValidationInfo) -> Path:
    path = _resolve(path, info)
    if not path.is_file():
        raise _Problem("file not found", value=path)
    return path


InputFile = Annotated[Path, AfterValidator(_existing_file)]
OutputPath = Annotated[Path, AfterValidator(_resolve)]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


#: Why a Leopard-EM setting has no effect, where its model gives no reason of its own.
_UNUSED = "a Leopard-EM setting that dtm does not use"


class _Model(BaseModel):
    """Base of all sections: unknown keys are errors.

    ``leopard_unused`` lists the Leopard-EM fields that dtm accepts but ignores (a notice
    when not at their default), as names or as a mapping of name to the reason;
    ``leopard_in_memory`` the fields where Leopard-EM's models hold data in memory
    (tensors, tables), which a file can only set to null: such a null is dropped.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)
    leopard_unused: ClassVar[tuple[str, ...] | dict[str, str]] = ()
    leopard_in_memory: ClassVar[frozenset[str]] = frozenset()
    _source_path: Path | None = PrivateAttr(None)
    _load_notices: list[str] = PrivateAttr(default_factory=list)

    @property
    def source_path(self) -> Path | None:
        """The YAML file this configuration was loaded from (None if built in code)."""
        return self._source_path

    @model_validator(mode="before")
    @classmethod
    def _drop_null_in_memory(cls, data: Any) -> Any:
        """Leopard-EM's in-memory fields given as null are no settings: drop them (any other
        value stays, and is refused as not a setting)."""
        if isinstance(data, dict) and cls.leopard_in_memory:
            return {
                key: value
                for key, value in data.items()
                if not (key in cls.leopard_in_memory and value is None)
            }
        return data


def _notices(model: BaseModel, prefix: str = "") -> list[str]:
    """One line per ignored Leopard-EM setting that is not at its default, recursively."""
    lines = []
    for name, field in type(model).model_fields.items():
        value, dotted = getattr(model, name), prefix + name
        unused = getattr(model, "leopard_unused", ())
        if name in unused:
            if value != field.get_default(call_default_factory=True):
                reason = unused.get(name, _UNUSED) if isinstance(unused, dict) else _UNUSED
                lines.append(
                    f"{dotted}: accepted, has no effect in dtm ({reason}; got {_show(value)})"
                )
        elif isinstance(value, BaseModel):
            lines += _notices(value, dotted + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    lines += _notices(item, f"{dotted}.{i}.")
    return lines


def _ordered(low: str, high: str, strict: bool = False) -> Any:
    """A field validator for ``high`` checking ``low <= high`` (``<`` when strict)."""

    def check(cls: type, value: float | None, info: ValidationInfo) -> float | None:
        lower = info.data.get(low)
        if value is not None and lower is not None and (value < lower or strict and value == lower):
            raise ValueError(f"must be {'>' if strict else '>='} {low} ({lower})")
        return value

    return field_validator(high)(check)


def _unsupported(what: str) -> Any:
    """A validator rejecting ``enabled: true`` for a Leopard-EM feature that dtm lacks."""

    def check(cls: type, value: bool) -> bool:
        if value:
            raise ValueError(f"{what} is not supported by dtm; set enabled: false")
        return value

    return field_validator("enabled")(check)


def _no_cartesian() -> Any:
    def check(cls: type, value: str) -> str:
        if value == "cartesian":
            raise ValueError("the cartesian grid is not supported by dtm; use uniform or healpix")
        return value

    return field_validator("base_grid_method")(check)


# map name in results.zarr → Leopard-EM match_template_result field of its .mrc path
_MAP_FIELDS = {
    "mip": "mip_path",
    "scaled_mip": "scaled_mip_path",
    "correlation_mean": "correlation_average_path",
    "correlation_variance": "correlation_variance_path",
    "psi": "orientation_psi_path",
    "theta": "orientation_theta_path",
    "phi": "orientation_phi_path",
    "defocus": "relative_defocus_path",
}


_PATH_KEYS = frozenset(
    {
        "micrograph_path",
        "micrograph_table",
        "template_volume_path",
        "template_model_path",
        "mtf_path",
        "dqe_path",
        "output_dir",
        "output_path",
        "df_path",
        "correlation_table_path",
        "hdf5_path",
        *_MAP_FIELDS.values(),
    }
)


class _YamlRefused(Exception):
    """A construct dtm refuses in configuration files (a duplicate key, an alias)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (the last would win silently) and
    aliases (``*name``: nested ones expand a few hundred bytes into gigabytes)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _YamlRefused(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                "allowed in dtm configuration files; write the values out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first is not None:
                    raise _YamlRefused(
                        f"duplicate key {_show(key)} at lines {first} and {line}; keep one"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _python_tuple(loader: yaml.SafeLoader, node: Any) -> list[Any]:
    """``!!python/tuple [...]``, which Leopard-EM's ``to_yaml`` writes for its tuples
    (``extracted_box_size``): read as the plain sequence it holds."""
    return list(loader.construct_sequence(node, deep=True))


_StrictLoader.add_constructor("tag:yaml.org,2002:python/tuple", _python_tuple)


#: Characters refused in every string of a configuration: C0 and C1 control characters
#: (newline, tab, NUL, escape, ...) and the Unicode line and paragraph separators.
_CONTROL = frozenset(
    [chr(code) for code in range(0x20)] + [chr(code) for code in range(0x7F, 0xA0)]
) | {"\u2028", "\u2029"}


def control_character(text: str) -> str | None:
    """The first control character in ``text`` (as Python writes it), or None."""
    for char in text:
        if char in _CONTROL:
            return repr(char)[1:-1]
    return None


def check_strings(data: Any, source: str, where: str = "") -> None:
    """Raise :class:`ConfigError` naming the field of the first string (key or value)
    in ``data`` that holds a control character."""
    items: Any = ()
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    elif isinstance(data, str):
        char = control_character(data)
        if char is not None:
            raise ConfigError(
                f"{source}: {where or 'value'}: control character {char} in a string "
                f"(got {_show(data)})"
            )
    for key, value in items:
        dotted = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and control_character(key) is not None:
            raise ConfigError(
                f"{source}: {where or 'top level'}: control character "
                f"{control_character(key)} in a key (got {_show(key)})"
            )
        check_strings(value, source, dotted)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (safe loader)
    except _YamlRefused as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {exc.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of settings (got {_show(data)})"
        )
    check_strings(data, str(path))
    return data


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set dotted keys in ``data``; relative paths become absolute against the cwd."""
    for key, value in overrides.items():
        *sections, leaf = key.split(".")
        node = data
        for section in sections:
            child = node.setdefault(section, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"command line: {key}: {section} is not a section (got {_show(child)})"
                )
            node = child
        if leaf in _PATH_KEYS and isinstance(value, str | Path):
            value = str(Path(value).absolute())
        node[leaf] = value


def _load(
    model: type[Any], program: Program, path: str | Path, overrides: dict[str, Any] | None
) -> Any:
    """Read, check and validate a configuration file of ``program``; every problem of the
    file in one :class:`ConfigError` (:func:`join_problems`)."""
    path, overrides = Path(path), overrides or {}
    data = _read_yaml(path)
    check_strings(overrides, "command line")
    wrong = other_program(data, program)
    if wrong is not None:
        raise ConfigError(f"{path}: {wrong}")
    # The file decides its rule, not the command line's additions (--output-dir, --cluster).
    base, notice = relative_base(data, path, program)
    _apply_overrides(data, overrides)
    try:
        config = model.model_validate(data, context={"base_dir": base})
    except pydantic.ValidationError as err:
        lines = []
        for field, line in problem_lines(err, model):
            overridden = any(field == key or field.startswith(key + ".") for key in overrides)
            lines.append(f"command line: {line}" if overridden else line)
        if len(lines) == 1 and lines[0].startswith("command line: "):
            raise ConfigError(lines[0]) from None
        raise ConfigError(join_problems(str(path), lines)) from None
    config._source_path = path.absolute()
    config._load_notices = [notice] if notice else []
    return config


def validate_options(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """``model`` from command-line options: a bad value is one line naming the option's
    field, as for a file (``command line: false_positives: ...``)."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, "command line")) from None


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The configuration as JSON-safe builtins (paths as strings), defaults included."""
    data: dict[str, Any] = config.model_dump(mode="json")
    return data


def config_hash(config: BaseModel, keys: list[str] | None = None) -> str:
    """SHA-256 (hex) of the configuration's JSON, or of its top-level ``keys`` only."""
    data = config_to_dict(config)
    if keys is not None:
        data = {key: data.get(key) for key in keys}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
