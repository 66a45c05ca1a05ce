import json

import pytest

from memlens.cli import main
from memlens.core.jsonio import plain
from memlens.core.metrics import Extraction
from memlens.steps.run import STEPS


def test_label_command_writes_results(tiny_organism, tmp_path, capsys):
    out = tmp_path / "labels"
    code = main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(out), "--no-generate", "--roles", "canary"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_sequences"] == 50
    assert "0" not in Extraction.from_json(summary).exact
    assert (out / "tokens.parquet").exists() and (out / "sequences.parquet").exists()
    assert "100x" in capsys.readouterr().out


def test_demo_command_reuses_cached_steps(tiny_run, capsys):
    out, summary = tiny_run
    assert main(["demo", "--preset", "tiny", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": cached") == len(STEPS)
    again = json.loads((out / "summary.json").read_text())
    assert again["probes"] == plain(summary["probes"])
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


def test_a_bug_keeps_its_traceback(monkeypatch, tiny_organism, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug, not a user error")

    monkeypatch.setattr("memlens.steps.label.label", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
              "--out", str(tmp_path / "o"), "--no-generate"])


def test_commands_start_quietly_unless_verbose(tiny_organism, tmp_path):
    """torchao's missing-kernel notices and torch's pytree deprecations stay off stderr;
    ``--verbose`` lets them through (so the check below can fail)."""
    import subprocess
    import sys

    def stderr(*extra):
        run = subprocess.run(
            [sys.executable, "-m", "memlens", *extra, "label", "--model", str(tiny_organism),
             "--data", str(tiny_organism), "--out", str(tmp_path / f"labels{len(extra)}"),
             "--no-generate", "--roles", "canary"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    quiet = stderr()
    for noise in ("Failed to load", "_pytree", "deprecated", "Loading weights"):
        assert noise not in quiet, quiet
    loud = stderr("--verbose")
    assert "Failed to load" in loud or "_pytree" in loud, loud[-2000:]
