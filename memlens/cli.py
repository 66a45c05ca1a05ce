"""The ``memlens`` command line: one subcommand per step of the artifact chain.

Each command is a step's config dataclass (``memlens.steps.label.LabelCommand``, ...) and
the function that runs it: the options, their help, defaults and ranges are generated from
the dataclass's fields (nested configs included), and the command's help from its
docstring. Bad input (a :class:`~memlens.core.errors.UserError`) prints one line and exits
2; anything else is a bug and keeps its traceback.

Adding a command: write its config dataclass and ``main`` in a step module and add one
line to :func:`commands`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import typing
from pathlib import Path

from memlens.core.config import REQUIRED, Number, field_kind

__all__ = ["GROUPS", "Number", "Parser", "add_options", "build", "commands", "main"]

# Commands with subcommands: their one-line help.
GROUPS = {"organism": "train or find the memorization organism",
          "probe": "train memorization probes",
          "kfac": "K-FAC curvature factors and memorization edits"}


def commands() -> dict[str, tuple[type, typing.Callable]]:
    """Command name -> (its config dataclass, the function that runs it)."""
    from memlens.steps import (
        audit,
        capture,
        demo,
        kfac,
        label,
        localize,
        organism,
        probe,
        run,
        steer,
    )

    return {"organism train": (organism.TrainCommand, organism.train),
            "organism path": (organism.PathCommand, organism.path),
            "label": (label.LabelCommand, label.main),
            "capture": (capture.CaptureCommand, capture.main),
            "probe train": (probe.ProbeCommand, probe.main),
            "kfac collect": (kfac.CollectCommand, kfac.collect),
            "kfac edit": (kfac.EditCommand, kfac.edit),
            "localize": (localize.LocalizeCommand, localize.main),
            "steer": (steer.SteerCommand, steer.main),
            "layernorm": (run.LayernormCommand, run.layernorm_main),
            "audit": (audit.AuditCommand, audit.main),
            "run": (run.RunCommand, run.main),
            "demo": (demo.DemoCommand, demo.main)}


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line: what is wrong, and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is REQUIRED else f.default


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """``--FIELD`` for every field of config ``cls`` (and of the configs nested in it): its
    help, its default, its range (a numeric field without one is refused)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        if meta.get("nested"):
            add_options(parser, hints[f.name], meta.get("skip", ()))
            continue
        kind, many, _ = field_kind(cls, f)
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "help": meta.get("help", "").replace("%", "%%")}
        if f.default is REQUIRED and f.default_factory is REQUIRED:
            kw["required"] = True
        else:
            kw["default"] = _default(f)
            if kw["default"] is not None and kind is not bool:
                shown = (" ".join(map(str, kw["default"])) if many else kw["default"])
                kw["help"] += f" (default {shown})"
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if kind in (int, float) and meta.get("check") is None:
                raise TypeError(f"{cls.__name__}.{f.name}: a numeric option needs its range "
                                "(option(..., check=...))")
            kw["type"] = meta.get("check") or (Path if kind is Path else str)
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if many:
                kw["nargs"] = "+"
        parser.add_argument(flag, **kw)


def build(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    """The ``cls`` config back from the options :func:`add_options` added."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or not meta.get("cli", True):
            continue
        if meta.get("nested"):
            kwargs[f.name] = build(hints[f.name], args, meta.get("skip", ()))
            continue
        value = getattr(args, f.name)
        if isinstance(value, list) and typing.get_origin(hints[f.name]) is not list:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _parser() -> Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    table = commands()
    examples = "\n".join(f"  {cls.EXAMPLE}" for cls, _ in table.values())
    p = Parser(prog="memlens", formatter_class=fmt,
               description="Locate, prove and remove memorization in transformer language "
                           "models.", epilog="examples:\n" + examples)
    p.add_argument("--verbose", action="store_true",
                   help="show third-party notices and Hugging Face's loading bars")
    sub = p.add_subparsers(dest="command", required=True)
    groups = {}
    for name, (cls, _) in table.items():
        group, _, leaf = name.partition(" ")
        parent = sub
        if leaf:
            if group not in groups:
                shown = [c.EXAMPLE for n, (c, _) in table.items() if n.startswith(group + " ")]
                g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group],
                                   formatter_class=fmt, epilog="examples:\n" + "\n".join(
                                       f"  {e}" for e in shown) + "\n")
                groups[group] = g.add_subparsers(dest=f"{group}_command", required=True)
            parent = groups[group]
        doc = inspect.cleandoc(cls.__doc__ or name)
        help_, _, description = doc.partition("\n")
        c = parent.add_parser(leaf or group, help=help_, formatter_class=fmt,
                              description=f"{help_}.\n\n{description.strip()}".strip(),
                              epilog=f"example:\n  {cls.EXAMPLE}\n")
        c.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)  # also after the command's name
        add_options(c, cls)
        c.set_defaults(_command=name)
    return p


def main(argv: list[str] | None = None) -> int:
    from memlens.core import distributed
    from memlens.core.errors import UserError
    from memlens.core.storage import disk_error

    if "--verbose" in (sys.argv[1:] if argv is None else argv):
        from memlens.core import logs

        logs.verbose()
    else:  # read when Hugging Face's libraries are first imported (building the parser)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = _parser().parse_args(argv)
    cls, run = commands()[args._command]
    try:
        if distributed.init():
            _check_distributed(args._command, cls)
        run(build(cls, args))
    except UserError as exc:
        print(f"memlens: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = disk_error(exc)
        if reason is None:
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"memlens: error: {reason}{where}; free space or choose another output, then "
              "rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memlens: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
    return 0


def _check_distributed(name: str, cls) -> None:
    """Under torchrun: refuse commands that do not shard; let rank 0 alone print."""
    from memlens.core import distributed
    from memlens.core.errors import ConfigError

    if not getattr(cls, "DISTRIBUTED", False):
        shard = [n for n, (c, _) in commands().items() if getattr(c, "DISTRIBUTED", False)]
        raise ConfigError(f"memlens {name} runs in one process; run it without torchrun "
                          f"(torchrun runs: {', '.join(shard)})")
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


if __name__ == "__main__":
    sys.exit(main())
