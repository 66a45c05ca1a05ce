import json

import pytest

from memlens.cli import main
from memlens.demo import STEPS


def test_label_command_writes_results(tiny_organism, tmp_path, capsys):
    out = tmp_path / "labels"
    code = main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(out), "--no-generate", "--roles", "canary"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_sequences"] == 50
    assert "0" not in summary["exact_extraction_rate_by_duplication"]
    assert (out / "tokens.parquet").exists() and (out / "sequences.parquet").exists()
    assert "100x" in capsys.readouterr().out


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


def test_demo_command_reuses_cached_steps(tiny_demo, capsys):
    out, summary = tiny_demo
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": cached") == len(STEPS)
    again = json.loads((out / "summary.json").read_text())
    assert again["probes"] == json.loads(json.dumps(summary["probes"], default=float))
    assert again["organism"]["preset"] == "tiny"


def test_organism_path_prints_the_cached_directory(tiny_organism, capsys):
    assert main(["organism", "path", "--preset", "tiny", "--arch", "llama"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_organism)
    assert main(["organism", "path", "--preset", "huge"]) == 2
    assert "unknown organism preset 'huge'" in capsys.readouterr().err


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def test_every_cli_default_is_its_config_default():
    import dataclasses

    from memlens.cli import _parser

    checked = 0
    for sub in _subparsers(_parser()):
        configs = [v for k, v in sub._defaults.items() if k.startswith("_config_")]
        for cls, names in configs:
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING
                        else f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else None for f in dataclasses.fields(cls)}
            for action in sub._actions:
                if action.dest in names and not action.required:
                    assert action.default == defaults[action.dest], (sub.prog, action.dest)
                    checked += 1
    assert checked >= 25  # label, capture, probe train, kfac collect and localize options
    import inspect

    from memlens.localize import LocalizeConfig
    from memlens.pipeline import localize_step

    localize = next(s for s in _subparsers(_parser()) if s.prog.endswith("localize"))
    budget = next(a for a in localize._actions if a.dest == "budget")
    assert budget.default == inspect.signature(localize_step).parameters["budget"].default
    assert LocalizeConfig().start == 32


def test_a_bug_keeps_its_traceback(monkeypatch, tiny_organism, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr("memlens.pipeline.label", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
              "--out", str(tmp_path / "o"), "--no-generate"])
