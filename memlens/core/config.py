"""Config dataclasses that describe themselves: each field carries its help text and its
range, so one definition gives the library's checks, the command line's options and the
TOML loader.

    @dataclass
    class LocalizeConfig(Config):
        method: str = option("zero_out", "how neurons are scored", choices=METHODS)
        budget: float = option(0.01, "fraction of neurons kept per layer", check=FRACTION)

``LocalizeConfig(budget=2)`` raises one :class:`~memlens.core.errors.ConfigError` naming
the field, the value and the range; :func:`from_mapping` builds a config from a TOML
table and refuses unknown keys; ``memlens.cli`` turns every field into ``--FIELD``.
A field whose type is itself a config is nested: its fields are options of the outer one.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

from memlens.core.errors import ConfigError, check_keys

__all__ = ["COUNT", "FRACTION", "INDEX", "NONNEGATIVE", "POSITIVE", "REAL", "REQUIRED", "UNIT",
           "Config", "Number", "check_fields", "field_kind", "from_mapping", "nested",
           "option", "to_json"]


class Number:
    """A number of ``kind`` (int or float) in a range: checks config fields and reads
    command-line text (``Number(int, lo=1)("0")`` raises naming the range)."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None,
                 above: float | None = None):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above
        self.__name__ = "whole number" if kind is int else "number"  # argparse's messages

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        low = (f"> {self.above:g}" if self.above is not None else
               f">= {self.lo:g}" if self.lo is not None else None)
        if low and self.hi is not None:
            return f"{what} {low} and <= {self.hi:g}"
        return f"{what} {low}" if low else f"{what} <= {self.hi:g}" if self.hi else what

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not float(value).is_integer():
            return False
        return (math.isfinite(value) and (self.lo is None or value >= self.lo)
                and (self.above is None or value > self.above)
                and (self.hi is None or value <= self.hi))

    def __call__(self, text: str):
        """Command-line text to a number, or ``argparse.ArgumentTypeError``."""
        import argparse

        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {self.describe()}")
        return value


COUNT, INDEX = Number(int, lo=1), Number(int, lo=0)
POSITIVE, NONNEGATIVE, REAL = Number(float, above=0), Number(float, lo=0), Number(float)
FRACTION, UNIT = Number(float, above=0, hi=1), Number(float, lo=0, hi=1)

REQUIRED = dataclasses.MISSING


def option(default=REQUIRED, help: str = "", check: Number | None = None,  # noqa: A002
           choices: tuple | None = None, flag: str | None = None, factory=None,
           cli: bool = True):
    """A config field with its help text; ``check`` (a :class:`Number`) or ``choices``
    bound its values. ``flag`` names the command-line option where ``--FIELD`` would not
    do; ``cli=False`` keeps a field off the command line (set from Python or TOML)."""
    meta = {"help": help, "check": check, "choices": choices, "flag": flag, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls, help: str = "", skip: tuple[str, ...] = (), factory=None):  # noqa: A002
    """A field holding another config: ``factory()`` (default ``cls()``) unless given, and
    what a TOML table for it overrides. The command line offers its fields but those in
    ``skip`` (they keep their defaults)."""
    return dataclasses.field(default_factory=factory or cls,
                             metadata={"help": help, "nested": True, "skip": skip})


def check_fields(cfg) -> None:
    """Check every field of ``cfg`` against its ``check`` / ``choices``; tuples and lists
    element by element. Raises one ConfigError naming the field."""
    for f in dataclasses.fields(cfg):
        check, choices = f.metadata.get("check"), f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if value is None or (check is None and choices is None):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if check is not None and not check.ok(v):
                raise ConfigError(f"{f.name}={v!r} is out of range: give {check.describe()}")
            if choices is not None and v not in choices:
                raise ConfigError(f"{f.name}={v!r}; choose one of {', '.join(map(str, choices))}")


class Config:
    """Base of memlens' config dataclasses: fields are checked when the config is made
    (a subclass's ``__post_init__`` calls ``super().__post_init__()`` first)."""

    def __post_init__(self):
        check_fields(self)


def field_kind(cls, f: dataclasses.Field):
    """(the type the field holds, whether it holds several, whether it may be None)."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    many = typing.get_origin(hint) in (list, tuple)
    if many:
        hint = typing.get_args(hint)[0]
    return hint, many, optional


def from_mapping(cls, data: dict, where: str, base=None):
    """``cls`` built from a TOML table (or dict): unknown keys refused by name, nested
    configs from sub-tables (over the field's default), lists to tuples where the field
    holds a tuple, paths to :class:`~pathlib.Path`. With ``base`` (a ``cls``), the table
    overrides its values."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(data, fields, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        if f.metadata.get("nested"):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} in {where} is a table of settings, got {value!r}")
            kwargs[name] = from_mapping(hints[name], value, f"[{name}] of {where}",
                                        base=f.default_factory())
            continue
        kind, many, _ = field_kind(cls, f)
        if many and isinstance(value, list) and typing.get_origin(
                typing.get_type_hints(cls)[name]) is not list:
            value = tuple(value)
        if kind is Path and value is not None:
            value = tuple(map(Path, value)) if many else Path(value)
        kwargs[name] = value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def to_json(cfg) -> dict:
    """The config as JSON-ready values (tuples as lists, paths as strings)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
