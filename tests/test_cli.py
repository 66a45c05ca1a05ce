import json

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


def test_help_gives_examples(capsys):
    for argv in (["--help"], ["label", "--help"], ["organism", "train", "--help"]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0
        assert "example" in capsys.readouterr().out


def test_demo_reuses_the_organism_and_writes_a_summary(tiny_organism, tmp_path, capsys):
    code = main(["demo", "--preset", "tiny", "--out", str(tmp_path / "demo")])
    assert code == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["labels"]["exact_extraction_rate_by_duplication"]["100"] >= 0.9
    assert summary["organism"]["preset"] == "tiny"
    out = capsys.readouterr().out
    assert "non-member" in out and "100x" in out


def test_organism_path_prints_the_cached_directory(tiny_organism, capsys):
    assert main(["organism", "path", "--preset", "tiny", "--arch", "llama"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_organism)
    assert main(["organism", "path", "--preset", "huge"]) == 2
    assert "unknown organism preset 'huge'" in capsys.readouterr().err
