"""The ``--config`` TOML file, checked against a schema built from the command's own flags.

Each long flag of the command is a key of the file (``dry-run``, ``allow-insecure-http``,
``format``...). The schema is a pydantic model made from the flags' argparse declarations, so
it always matches the command line: ``store_true`` flags take a TOML boolean (never a string:
``"false"`` is refused, not read as true), ``choices`` are an enum, ``type=int``/``float`` and
:class:`fhirmatch.options.Number` give numbers with their ranges, ``nargs`` gives a list. A file
with a wrong value is refused as a whole, naming the key, the value and what is expected, before
the command does anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

from ..errors import ConfigurationError
from ..options import IsoDate, Number

#: config keys that would put a secret in a file that is not a secret file
FORBIDDEN_CONFIG_KEYS = frozenset({"token", "password", "client-secret", "private-key"})

#: flags that make no sense in a config file
_NOT_CONFIGURABLE = frozenset({"help", "config", "version"})


@dataclass(frozen=True)
class _Key:
    dest: str
    flag: str  # the long flag name without dashes: the key in the file
    expected: str
    annotation: Any


def _scalar(action: argparse.Action) -> tuple[Any, str]:
    """The pydantic type of one value of ``action`` and what it is, in words."""
    if action.choices is not None:
        choices = tuple(action.choices)
        listed = ", ".join(f'"{c}"' if isinstance(c, str) else str(c) for c in choices)
        return Literal[choices], f"one of {listed}"
    kind: Any = action.type
    if isinstance(kind, Number):
        base = StrictInt if kind.kind is int else StrictFloat | StrictInt
        check = kind.check
        return Annotated[base, _after(check)], kind.expected()
    if kind is int:
        return StrictInt, "an integer"
    if kind is float:
        return StrictFloat | StrictInt, "a number"
    if isinstance(kind, IsoDate):
        return Annotated[dt.date, BeforeValidator(_date)], kind.expected()
    if kind is Path:
        return Annotated[StrictStr, _after(_path)], "a path (a string)"
    if kind is None or kind is str:
        return StrictStr, "a string"
    if callable(kind):
        # any other argparse type callable: the file gives its text, parsed the same way
        return Annotated[StrictStr, _after(_call_type(kind))], "a string"
    raise TypeError(f"no config schema for the type of {action.dest}")  # pragma: no cover


def _after(func: Callable[[Any], Any]) -> Any:
    return AfterValidator(func)


def _path(text: str) -> Path:
    return Path(text)


def _call_type(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    return parse


def _date(value: Any) -> Any:
    """A TOML date (``as-of = 2026-11-01``) or its text (``as-of = "2026-11-01"``)."""
    if isinstance(value, dt.datetime):
        raise PydanticCustomError("date_type", "a date without a time")
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise PydanticCustomError("date_parsing", "not a date") from None
    raise PydanticCustomError("date_type", "not a date")


def _one_or_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _keys(parser: argparse.ArgumentParser) -> list[_Key]:
    keys: list[_Key] = []
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in _NOT_CONFIGURABLE or action.dest.startswith("_"):
            continue
        flag = longs[0][2:]
        if isinstance(
            action,
            argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction,
        ):
            annotation: Any = StrictBool
            expected = "true or false (a TOML boolean, without quotes)"
        elif isinstance(action, argparse._StoreAction):
            annotation, expected = _scalar(action)
            if action.nargs in ("+", "*"):
                min_len = 1 if action.nargs == "+" else 0
                annotation = Annotated[
                    list[annotation],
                    BeforeValidator(_one_or_list),
                    Field(min_length=min_len),
                ]
                expected = f"a list of {_plural(expected)} (or one)"
        else:
            continue  # version, help, counters: not configuration
        keys.append(_Key(action.dest, flag, expected, annotation))
    return keys


def _plural(expected: str) -> str:
    for article in ("an ", "a "):
        if expected.startswith(article):
            noun, _, rest = expected[len(article) :].partition(" ")
            return f"{noun}s {rest}".strip()
    return f"values: {expected}"


def config_schema(parser: argparse.ArgumentParser) -> type[BaseModel]:
    """A pydantic model of ``parser``'s long flags; field aliases are the flag names."""
    fields: dict[str, Any] = {
        key.dest: (key.annotation | None, Field(default=None, alias=key.flag))
        for key in _keys(parser)
    }
    return create_model(
        f"{parser.prog.replace(' ', '_')}_config",
        __config__=ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True),
        **fields,
    )


def load_config(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read and check a TOML config for ``parser``; returns argparse defaults (dest -> value).

    Keys are long flag names (dashes or underscores). Any wrong key or value raises
    :class:`ConfigurationError` naming the key, the value and what is expected.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from None
    keys = {k.flag: k for k in _keys(parser)}
    normalised: dict[str, Any] = {}
    for key, value in data.items():
        flag = key.replace("_", "-")
        if flag in FORBIDDEN_CONFIG_KEYS:
            raise ConfigurationError(
                f"config file {path}: secrets do not belong in the config; use "
                f"{flag}-file or {flag}-env"
            )
        if flag not in keys:
            raise ConfigurationError(
                f"config file {path}: unknown key {key!r} (keys are the long flag names of "
                f"'{parser.prog}')"
            )
        if flag in normalised:
            raise ConfigurationError(f"config file {path}: key {key!r} is given twice")
        normalised[flag] = value
    try:
        model = config_schema(parser).model_validate(normalised)
    except ValidationError as exc:
        raise ConfigurationError(_describe(path, exc, keys, normalised)) from None
    return {dest: getattr(model, dest) for dest in model.model_fields_set}


def _describe(
    path: Path, exc: ValidationError, keys: dict[str, _Key], given: dict[str, Any]
) -> str:
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        flag = str(err["loc"][0]) if err["loc"] else "?"
        if flag in seen:
            continue  # one line per key, even when a union reports each of its members
        seen.add(flag)
        key = keys.get(flag)
        value = given.get(flag, err.get("input"))
        expected = key.expected if key else err["msg"]
        problems.append(f"{flag} = {_toml(value)} is not valid; expected {expected}")
    return f"config file {path}: " + "; ".join(problems)


def _toml(value: Any) -> str:
    """``value`` written as in the file, so a string shows its quotes."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return str(value)
