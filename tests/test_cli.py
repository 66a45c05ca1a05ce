import json

import pytest

from memlens.cli import main


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
    assert capsys.readouterr().out.count(": cached") == 6
    again = json.loads((out / "summary.json").read_text())
    assert again["probes"] == json.loads(json.dumps(summary["probes"], default=float))
    assert again["organism"]["preset"] == "tiny"


def test_organism_path_prints_the_cached_directory(tiny_organism, capsys):
    assert main(["organism", "path", "--preset", "tiny", "--arch", "llama"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_organism)
    assert main(["organism", "path", "--preset", "huge"]) == 2
    assert "unknown organism preset 'huge'" in capsys.readouterr().err
