"""Validation messages: every problem of a configuration, one line each, naming its field.

A file with one problem gives one line, ``<file>: <dotted.field>: <problem> (got <value>)``;
a file with several gives a one-line summary and each problem on its own line below it, so
that a user fixes them all in one go. An unknown key says which key of its section it most
resembles; a required key that a misspelt one explains is not reported twice.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel

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


_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "model_type": "expected a section (a mapping of settings)",
    "model_attributes_type": "expected a section (a mapping of settings)",
    "path_type": "expected a file path",
}

#: Message for a Leopard-EM field that holds data in memory (a tensor), never a setting.
IN_MEMORY = "Leopard-EM's in-memory data, not a setting: only null can be given in a file"


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models mentioned in a type, in order of appearance."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [model for model in models_in(arg) if model not in found]
    return found


def _section_models(root: type[BaseModel] | None, parent: tuple[Any, ...]) -> list[type[BaseModel]]:
    """The models that the section at ``parent`` (a pydantic error location) can be."""
    models = [] if root is None else [root]
    for part in parent:
        if isinstance(part, int) or part in (_ONE_GRID, _SEVERAL_GRIDS):
            continue  # a list item, or the tag of the orientation grid union
        fields = [model.model_fields.get(str(part)) for model in models]
        models = [sub for field in fields if field for sub in models_in(field.annotation)]
    return models


def _unknown_key(
    key: str, models: list[type[BaseModel]], missing: list[str]
) -> tuple[str, str | None]:
    """The message of an unknown key and the key it suggests: Leopard-EM in-memory data, or
    the closest key of its section (the missing keys first: a misspelt required key is the
    likeliest)."""
    if any(key in getattr(model, "leopard_in_memory", ()) for model in models):
        return IN_MEMORY, None
    known = [name for model in models for name in model.model_fields]
    # Any missing key that is somewhat alike, but only a close match among the others.
    close = difflib.get_close_matches(key, missing, n=1) or difflib.get_close_matches(
        key, known, n=1, cutoff=0.75
    )
    if not close:
        return "unknown key", None
    return f"unknown key (did you mean {close[0]}?)", close[0]


def _explained(problems: list[Any], root: type[BaseModel] | None) -> list[Any]:
    """Unknown keys first, each with its suggestion; a missing key that an unknown key's
    suggestion names is dropped (``pixel_sise: unknown key (did you mean pixel_size?)``
    says all there is to say about the missing ``pixel_size``)."""
    missing: dict[tuple[Any, ...], list[str]] = {}
    for problem in problems:
        if problem["type"] == "missing":
            *parent, key = problem["loc"]
            missing.setdefault(tuple(parent), []).append(str(key))
    suggested: set[tuple[Any, ...]] = set()
    ordered = []
    for problem in problems:
        if problem["type"] == "extra_forbidden":
            *parent, key = problem["loc"]
            models = _section_models(root, tuple(parent))
            message, close = _unknown_key(str(key), models, missing.get(tuple(parent), []))
            if close is not None:
                suggested.add((*parent, close))
            kind = "in_memory" if message == IN_MEMORY else "unknown_key"
            problem = {**problem, "msg": message, "type": kind}
        ordered.append(problem)
    kept = [p for p in ordered if not (p["type"] == "missing" and tuple(p["loc"]) in suggested)]
    return sorted(kept, key=lambda problem: problem["type"] not in ("unknown_key", "in_memory"))


def problem_lines(
    err: pydantic.ValidationError, root: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """``(dotted field, "<dotted.field>: <problem> (got <value>)")`` for every problem of
    ``err``, unknown keys first; ``root`` (the validated model) lets unknown keys name the
    key of their section they most resemble."""
    lines = []
    for problem in _explained(list(err.errors()), root):
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
        elif problem["type"] == "in_memory":
            show_value = False
        field = ".".join(loc)
        got = f" (got {_show(value)})" if show_value else ""
        text = message.removeprefix("Value error, ") + got
        lines.append((field, f"{field}: {text}" if field else text))
    return lines


def join_problems(source: str, lines: list[str]) -> str:
    """One line for one problem; else a summary naming ``source`` and each problem on its
    own indented line below it."""
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:" + "".join(f"\n  {line}" for line in lines)


def format_validation_error(
    err: pydantic.ValidationError, source: str, root: type[BaseModel] | None = None
) -> str:
    """Every problem of ``err`` as :func:`join_problems` writes them under ``source``."""
    return join_problems(source, [line for _, line in problem_lines(err, root)])
