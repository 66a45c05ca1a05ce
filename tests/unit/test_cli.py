"""The command line: generated from the step configs, one-line errors, ranges checked first."""

import pytest

from memlens.cli import main


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def test_bad_model_dir_is_a_clear_error(tmp_path, capsys):
    code = main(["label", "--model", str(tmp_path / "nope"), "--data", "x.jsonl",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_every_command_says_what_goes_in_and_out_with_an_example(capsys):
    commands = [[], ["organism"], ["organism", "train"], ["organism", "path"], ["label"],
                ["capture"], ["probe"], ["probe", "train"], ["kfac"], ["kfac", "collect"],
                ["kfac", "edit"], ["localize"], ["steer"], ["demo"]]
    for argv in commands:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "example" in text, argv
        assert len(text) > 300, argv


def test_every_cli_default_is_its_config_default():
    """Options are generated from the step configs: each option's default is its field's
    (nested configs included), and the command's config comes back from the line."""
    import dataclasses
    import typing

    from memlens.cli import _parser, build, commands

    def defaults(cls, skip=()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            if f.metadata.get("nested"):
                yield from defaults(hints[f.name], f.metadata.get("skip", ()))
            elif f.default is not dataclasses.MISSING:
                yield f.name, f.default
            elif f.default_factory is not dataclasses.MISSING:
                yield f.name, f.default_factory()

    checked = 0
    table = commands()
    for sub in _subparsers(_parser()):
        name = sub._defaults.get("_command")
        if name is None:
            continue
        actions = {a.dest: a for a in sub._actions}
        for dest, default in defaults(table[name][0]):
            assert actions[dest].default == default, (sub.prog, dest)
            checked += 1
    assert checked >= 100  # every field of every step's configs
    import inspect

    from memlens.methods.localize import LocalizeConfig
    from memlens.steps.localize import localize_step

    localize = next(s for s in _subparsers(_parser()) if s.prog.endswith("localize"))
    budget = next(a for a in localize._actions if a.dest == "budget")
    assert budget.default == inspect.signature(localize_step).parameters["budget"].default
    assert LocalizeConfig().start == 32
    args = _parser().parse_args(["localize", "--model", "m", "--labels", "l", "--out", "o",
                                 "--method", "zero_out", "--blocks", "2", "3"])
    cmd = build(table["localize"][0], args)
    assert (cmd.localize.method, cmd.localize.blocks, cmd.budget) == ("zero_out", (2, 3), 0.01)


def test_every_numeric_option_is_range_checked_before_any_work(capsys):
    """A number out of range (``--max-tokens -5``) stops the command while its line is read,
    in one line naming the option, the value and what to give; an option typed as a bare
    int or float would accept it, so none is."""
    from memlens.cli import Number, _parser

    checked = []
    for sub in [_parser(), *_subparsers(_parser())]:
        path = sub.prog.split()[1:]
        for action in sub._actions:
            assert action.type not in (int, float), (sub.prog, action.dest)
            if not isinstance(action.type, Number) or not action.option_strings:
                continue
            t = action.type
            bad = (t.lo - 1 if t.lo is not None else t.above if t.above is not None
                   else float("nan"))
            flag = action.option_strings[0]
            with pytest.raises(SystemExit) as exc:
                main([*path, flag, str(bad)])
            assert exc.value.code == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert flag in err and str(bad) in err and t.describe() in err, err
            checked.append(" ".join([*path, flag]))
    # every command's numbers, e.g. kfac collect's --max-tokens and localize's --budget
    assert {"kfac collect --max-tokens", "localize --budget", "steer --max-new-tokens",
            "audit --relearn-steps", "label --min-k", "demo --seed"} <= set(checked)
    assert len(checked) >= 30
    with pytest.raises(SystemExit):
        main(["localize", "--budget", "1.5"])
    assert "give a number > 0 and <= 1" in capsys.readouterr().err


def test_a_misspelt_config_key_is_one_line_naming_key_section_and_the_nearest(tmp_path,
                                                                             capsys):
    from memlens.steps.probe import load_config

    shipped = load_config("organism")
    assert shipped.probe.positive == ("memorized",)  # the shipped config passes
    assert "last_resid+confidence" in shipped.combos and shipped.labels.generate is False
    config = tmp_path / "probes.toml"
    config.write_text('[model]\norganism = "tiny"\n\n[probe]\npositiv = ["memorized"]\n')
    assert main(["probe", "train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("memlens: error: unknown key 'positiv' in [probe] of probes.toml; "
                          "did you mean 'positive'?"), err
    assert len(err.splitlines()) == 1
    config.write_text('[modle]\norganism = "tiny"\n')
    assert main(["probe", "train", "--config", str(config)]) == 2
    assert "unknown key 'modle' in probes.toml; did you mean 'model'?" in capsys.readouterr().err
    config.write_text('[capture]\nsites = ["blocks.0.hook_resid_post"]\nbatch = 4\n')
    assert main(["probe", "train", "--config", str(config)]) == 2
    assert "'batch' in [capture] of probes.toml; did you mean 'batch_size'?" in (
        capsys.readouterr().err)
