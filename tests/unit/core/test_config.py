"""Config fields carry their help and range: the checks, the TOML loader and the command
line all come from one definition."""

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from memlens.cli import add_options, build
from memlens.core.config import (
    COUNT,
    FRACTION,
    Config,
    Number,
    from_mapping,
    nested,
    option,
    to_json,
)
from memlens.core.errors import ConfigError


@dataclass
class Inner(Config):
    rate: float = option(0.5, "a rate", FRACTION)
    mode: str = option("a", "a mode", choices=("a", "b"))


@dataclass(kw_only=True)
class Outer(Config):
    out: Path = option(help="where")
    sizes: tuple[int, ...] = option((1, 2), "sizes", COUNT)
    inner: Inner = nested(Inner)


def test_number_ranges_and_their_words():
    assert Number(int, lo=1).ok(3) and not Number(int, lo=1).ok(0)
    assert not Number(int, lo=1).ok(2.5) and not Number(int, lo=0).ok(True)
    assert FRACTION.ok(1.0) and not FRACTION.ok(0.0) and not FRACTION.ok(float("nan"))
    assert FRACTION.describe() == "a number > 0 and <= 1"
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not a whole number"):
        COUNT("x")


def test_a_field_out_of_range_is_refused_by_name_with_the_range():
    with pytest.raises(ConfigError, match=r"rate=2 is out of range: give a number > 0"):
        Inner(rate=2)
    with pytest.raises(ConfigError, match="mode='c'; choose one of a, b"):
        Inner(mode="c")
    with pytest.raises(ConfigError, match="sizes=0 is out of range"):  # element by element
        Outer(out=Path("o"), sizes=(1, 0))


def test_toml_tables_load_into_the_dataclasses_and_unknown_keys_are_refused():
    cfg = from_mapping(Outer, {"out": "x", "sizes": [3, 4], "inner": {"mode": "b"}}, "f.toml")
    assert cfg == Outer(out=Path("x"), sizes=(3, 4), inner=Inner(mode="b"))
    assert to_json(cfg) == {"out": "x", "sizes": [3, 4], "inner": {"rate": 0.5, "mode": "b"}}
    with pytest.raises(ConfigError, match=r"unknown key 'rat' in \[inner\] of f.toml; did "
                                          r"you mean 'rate'\?"):
        from_mapping(Outer, {"out": "x", "inner": {"rat": 1}}, "f.toml")
    with pytest.raises(ConfigError, match="unknown key 'size' in f.toml"):
        from_mapping(Outer, {"out": "x", "size": [1]}, "f.toml")


def test_a_nested_table_overrides_the_fields_default_not_the_class_default():
    @dataclass(kw_only=True)
    class WithDefault(Config):
        inner: Inner = nested(Inner, factory=lambda: Inner(mode="b"))

    cfg = from_mapping(WithDefault, {"inner": {"rate": 0.25}}, "f.toml")
    assert cfg.inner == Inner(rate=0.25, mode="b")


def test_the_command_line_is_generated_from_the_fields_and_builds_them_back():
    parser = argparse.ArgumentParser()
    add_options(parser, Outer)
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings[1:2] == []
             and a.option_strings}
    assert {"--out", "--sizes", "--rate", "--mode"} <= set(flags)
    assert flags["--out"].required and flags["--rate"].type is FRACTION
    assert "(default 0.5)" in flags["--rate"].help
    args = parser.parse_args(["--out", "o", "--sizes", "5", "--rate", "0.1"])
    assert build(Outer, args) == Outer(out=Path("o"), sizes=(5,), inner=Inner(rate=0.1))
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "o", "--rate", "1.5"])

    @dataclass
    class Unbounded(Config):
        n: int = option(3, "a number with no range")

    with pytest.raises(TypeError, match="needs its range"):
        add_options(argparse.ArgumentParser(), Unbounded)
