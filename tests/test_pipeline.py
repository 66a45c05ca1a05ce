"""The artifact chain from the command line: label -> capture -> probe train -> steer, each
step reading the one before it (nothing relabeled or recaptured), and artifacts refused by
name when the model or corpus behind them changed."""

import json
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import memlens.data.labels
import memlens.data.store
from memlens.cli import main
from memlens.data.labels import Labels


@pytest.fixture(scope="module")
def chain(tiny_organism, tmp_path_factory):
    """label -> capture -> probe train -> steer, with labeling and capture counted."""
    out = tmp_path_factory.mktemp("chain")
    calls = {"label": 0, "capture": 0}
    label, capture = memlens.data.labels.label, memlens.data.store.capture

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    mp = pytest.MonkeyPatch()
    mp.setattr("memlens.steps.label.label", counted("label", label))
    mp.setattr("memlens.data.labels.label", counted("label", label))
    mp.setattr("memlens.data.store.capture", counted("capture", capture))
    mp.setattr("memlens.steps.capture.capture", counted("capture", capture))
    org = str(tiny_organism)
    try:
        assert main(["label", "--model", org, "--data", org, "--out", str(out / "labels"),
                     "--no-generate"]) == 0
        assert main(["capture", "--model", org, "--labels", str(out / "labels"),
                     "--sites", "blocks.*.hook_resid_post", "--out", str(out / "store")]) == 0
        after_capture = dict(calls)
        assert main(["probe", "train", "--labels", str(out / "labels"), "--store",
                     str(out / "store"), "--out", str(out / "probes"),
                     "--n-bootstrap", "20"]) == 0
        assert main(["steer", "--model", org, "--probe",
                     str(out / "probes" / "probes" / "blocks.0.hook_resid_post"),
                     "--alpha", "4", "--dynamic", "--labels", str(out / "labels"),
                     "--save", str(out / "steering"), "--out", str(out / "gen.csv")]) == 0
    finally:
        mp.undo()
    return out, after_capture, dict(calls)


def test_each_step_reads_the_artifact_before_it(chain, tiny_organism):
    out, after_capture, calls = chain
    assert after_capture == {"label": 1, "capture": 1}
    assert calls == {"label": 1, "capture": 1}  # probe train and steer redid neither
    labels = Labels.load(out / "labels")
    store = json.loads((out / "store" / "manifest.json").read_text())["identity"]
    assert store["inputs"] == {"labels": labels.identity.digest}
    assert store["corpus_hash"] == labels.identity.corpus_hash
    probe = json.loads((out / "probes" / "probes" / "blocks.0.hook_resid_post" /
                        "probe.json").read_text())
    assert probe["identity"]["kind"] == "probe"
    assert probe["identity"]["model_hash"] == labels.identity.model_hash
    assert set(probe["identity"]["inputs"]) == {"labels", "store"}
    steering = json.loads((out / "steering" / "steering.json").read_text())
    assert steering["gated"] and steering["alpha"] == 4.0
    results = json.loads((out / "probes" / "results.json").read_text())
    assert results["best_token_auroc"] > 0.85
    # Steering was tried on the prefixes of what the labels say the model recites.
    gen = pd.read_csv(out / "gen.csv")
    assert len(gen) == labels.sequences["exact"].sum() > 10
    assert gen["plain_exact"].all()  # unsteered, every one is recited
    assert gen["steered_exact"].mean() < 0.5


def _changed_model(tiny_organism, dest):
    """A copy of the organism with one weight nudged, as a user's fine-tune would be: other
    weights, same everything else (and no record of memlens having written it)."""
    shutil.copytree(tiny_organism, dest)
    (dest / "memlens.json").unlink()
    weights = load_file(dest / "model.safetensors")
    name = next(k for k in weights if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 1e-3 * torch.ones_like(weights[name])
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_changed_model_is_refused_by_name(chain, tiny_organism, tmp_path, capsys):
    out, _, _ = chain
    other = str(_changed_model(tiny_organism, tmp_path / "other"))
    capsys.readouterr()
    assert main(["capture", "--model", other, "--labels", str(out / "labels"),
                 "--sites", "blocks.0.hook_resid_post", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'labels'} was made with model weights" in err and "model changed" in err
    assert not (tmp_path / "s").exists()
    assert main(["steer", "--model", other, "--probe",
                 str(out / "probes" / "probes" / "blocks.0.hook_resid_post"), "--alpha", "4",
                 "--prompt", "Biography."]) == 2
    assert "the model changed" in capsys.readouterr().err
    assert main(["steer", "--model", other, "--steering", str(out / "steering"),
                 "--prompt", "Biography."]) == 2
    assert "the steering setup was made with model weights" in capsys.readouterr().err
    assert main(["localize", "--model", other, "--labels", str(out / "labels"),
                 "--out", str(tmp_path / "n")]) == 2
    assert "model changed" in capsys.readouterr().err


def test_a_changed_corpus_is_refused_by_name(chain, tiny_organism, tmp_path, capsys):
    out, _, _ = chain
    org = str(tiny_organism)
    # Labels of the canaries only: other sequences than the store was captured from.
    assert main(["label", "--model", org, "--data", org, "--out", str(tmp_path / "canaries"),
                 "--roles", "canary", "--no-generate"]) == 0
    capsys.readouterr()
    assert main(["probe", "train", "--labels", str(tmp_path / "canaries"), "--store",
                 str(out / "store"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "the corpus changed" in err and str(tmp_path / "canaries") in err
    assert main(["probe", "train", "--labels", str(out / "store"), "--store",
                 str(out / "store"), "--out", str(tmp_path / "p")]) == 2
    assert "holds no labels" in capsys.readouterr().err
