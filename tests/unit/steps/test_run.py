"""`memlens run` refuses, in one line, data it cannot split or score, before any work."""

import json

import pytest

from memlens.cli import main
from memlens.core.errors import DataError
from memlens.steps.run import run, with_dependencies


def test_steps_bring_the_steps_they_read():
    assert [s.NAME for s in with_dependencies(("steering",))] == ["labels", "probes",
                                                                  "steering"]
    assert [s.NAME for s in with_dependencies(("layernorm",))] == ["labels", "layernorm"]
    assert [s.NAME for s in with_dependencies(("unlearn",))] == ["labels", "kfac", "unlearn"]
    assert len(with_dependencies(("audit",))) == 8


def test_one_record_cannot_be_split_into_halves(make_random_model, saved_tokenizer, tmp_path,
                                                capsys):
    model = make_random_model("llama", saved_tokenizer, tmp_path)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "Ann Lee was born in 1990 in Lyon. " * 8}) + "\n")
    with pytest.raises(DataError, match="1 member record.*at least 2"):
        run(model, data, tmp_path / "run", progress=False)
    assert main(["run", "--model", str(model), "--data", str(data), "--out",
                 str(tmp_path / "run2")]) == 2
    assert "at least 2" in capsys.readouterr().err
