"""Shared machinery of the configuration models: the base model, field types, one-line
validation messages, YAML reading, command-line overrides and hashing."""

from __future__ import annotations

import difflib
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
)

from dtm.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

_ONE_GRID, _SEVERAL_GRIDS = "one-grid", "several-grids"  # union tags, hidden from messages


class _Problem(ValueError):
    """A validation problem that names its own field (dotted, relative) and value."""

    def __init__(self, message: str, field: str = "", value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def _show(value: Any) -> str:
    """One-line rendering of a user value for messages; long values other than paths are
    shortened."""
    if isinstance(value, Path):
        return str(value)
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


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


class _Model(BaseModel):
    """Base of all sections: unknown keys are errors; ``leopard_unused`` lists the
    Leopard-EM fields that dtm accepts but ignores (a notice when not at their default)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)
    leopard_unused: ClassVar[tuple[str, ...]] = ()
    _source_path: Path | None = PrivateAttr(None)

    @property
    def source_path(self) -> Path | None:
        """The YAML file this configuration was loaded from (None if built in code)."""
        return self._source_path


def _notices(model: BaseModel, prefix: str = "") -> list[str]:
    """One line per ignored Leopard-EM setting that is not at its default, recursively."""
    lines = []
    for name, field in type(model).model_fields.items():
        value, dotted = getattr(model, name), prefix + name
        if name in getattr(model, "leopard_unused", ()):
            if value != field.get_default(call_default_factory=True):
                lines.append(
                    f"{dotted}: Leopard-EM setting not used by dtm, ignored (got {_show(value)})"
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


_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "model_type": "expected a section (a mapping of settings)",
    "model_attributes_type": "expected a section (a mapping of settings)",
    "path_type": "expected a file path",
}


def _unknown_keys_first(problems: list[Any]) -> list[Any]:
    """Unknown keys first, each with the missing key of its section it most resembles.

    A misspelt required key gives two problems, the unknown key and the missing one; the
    unknown key is the one that says what to fix (``pixel_sise: unknown key (did you mean
    pixel_size?)``).
    """
    missing: dict[tuple[Any, ...], list[str]] = {}
    for problem in problems:
        if problem["type"] == "missing":
            *parent, key = problem["loc"]
            missing.setdefault(tuple(parent), []).append(str(key))
    ordered = []
    for problem in problems:
        if problem["type"] == "extra_forbidden":
            *parent, key = problem["loc"]
            close = difflib.get_close_matches(str(key), missing.get(tuple(parent), []), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problem = {**problem, "msg": "unknown key" + hint, "type": "unknown_key"}
        ordered.append(problem)
    return sorted(ordered, key=lambda problem: problem["type"] != "unknown_key")


def format_validation_error(err: pydantic.ValidationError, source: str) -> str:
    """One line ``<source>: <dotted.field>: <problem> (got <value>)`` describing the first
    problem of ``err`` (unknown keys first), with the number of further problems."""
    lines = []
    for problem in _unknown_keys_first(list(err.errors())):
        loc = [str(part) for part in problem["loc"] if part not in (_ONE_GRID, _SEVERAL_GRIDS)]
        cause = problem.get("ctx", {}).get("error")
        message, value, show_value = problem["msg"], problem.get("input"), True
        if isinstance(cause, _Problem):
            loc += [part for part in cause.field.split(".") if part]
            message, value, show_value = str(cause), cause.value, cause.value is not None
        elif problem["type"] in _PLAIN_MESSAGES:
            message = _PLAIN_MESSAGES[problem["type"]]
        elif problem["type"] == "missing":
            message, show_value = "required setting missing", False
        elif problem["type"] == "unknown_key":
            show_value = "did you mean" not in message
        where = f"{source}: {'.'.join(loc)}: " if loc else f"{source}: "
        got = f" (got {_show(value)})" if show_value else ""
        lines.append(where + message.removeprefix("Value error, ") + got)
    more = len(lines) - 1
    return lines[0] + (f" [and {more} more problem{'s' * (more > 1)}]" if more else "")


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


def _load(model: type[Any], path: str | Path, overrides: dict[str, Any] | None) -> Any:
    path, overrides = Path(path), overrides or {}
    data = _read_yaml(path)
    check_strings(overrides, "command line")
    _apply_overrides(data, overrides)
    try:
        config = model.model_validate(data, context={"base_dir": path.parent.absolute()})
        config._source_path = path.absolute()
        return config
    except pydantic.ValidationError as err:
        line = format_validation_error(err, str(path)).removeprefix(f"{path}: ")
        field = line.split(":")[0]
        overridden = any(field == key or field.startswith(key + ".") for key in overrides)
        raise ConfigError(f"{'command line' if overridden else path}: {line}") from None


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
