"""Concurrency, faults and hostile input: each case fails loudly, names the file or value,
loses nothing, and never overwrites what it should not."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from memlens.cli import main
from memlens.core.errors import DataError, ModelLoadError
from memlens.core.model import load_model
from memlens.core.storage import BusyError, exclusive
from memlens.data.labels import read_sequences
from memlens.data.store import ActivationStore
from memlens.methods.curvature import Factors, KFACConfig, collect_factors
from memlens.methods.probes import Probe

MICRO = """
import sys
from memlens.data.corpus import CorpusConfig
from memlens.data.organism import PRESETS, OrganismPreset, organism_path
PRESETS["micro"] = OrganismPreset(
    corpus=CorpusConfig(n_general=120, canaries_per_count=1, duplication_counts=(1, 5),
                        n_nonmembers=4),
    vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_mlp=64, epochs=2, max_len=48)
print(organism_path("micro", progress=False))
"""


def _env(tmp_path):
    return {**os.environ, "MEMLENS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def test_two_processes_wanting_one_organism_share_it(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", MICRO], env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    path = paths.pop()
    entries = os.listdir(os.path.dirname(path))
    assert [e for e in entries if e.endswith(".partial")] == []
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


HOLDER = """
import sys, time
from memlens.core.storage import exclusive
with exclusive(sys.argv[1], "a long capture"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def labeled(tiny_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "labels"
    assert main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(out), "--no-generate", "--roles", "canary"]) == 0
    return out


def test_a_second_writer_is_refused_by_name_and_a_killed_one_leaves_no_lock(
        tiny_organism, labeled, tmp_path, capsys):
    store = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["capture", "--model", str(tiny_organism), "--labels", str(labeled),
                     "--sites", "blocks.1.hook_resid_post", "--out", str(store)]) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and "a long capture" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without cleaning up: its OS lock went with it.
    assert main(["capture", "--model", str(tiny_organism), "--labels", str(labeled),
                 "--sites", "blocks.1.hook_resid_post", "--out", str(store)]) == 0
    assert ActivationStore.open(store).manifest["complete"]
    with exclusive(store, "test"), pytest.raises(BusyError, match="being written"):
        with exclusive(store, "another"):
            pass


def test_two_captures_racing_into_one_directory_end_with_one_store_and_one_refusal(
        tiny_organism, labeled, tmp_path):
    store = tmp_path / "store"
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    procs = [subprocess.Popen([sys.executable, "-m", "memlens", "capture", "--model",
                               str(tiny_organism), "--labels", str(labeled), "--sites", site,
                               "--out", str(store)],
                              env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
             for site in sites]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], errs
    winner, loser = codes.index(0), codes.index(2)
    # Overlapping, the loser meets the lock; after the winner, its finished store.
    assert ("is being written by process" in errs[loser]
            or "holds a capture with other" in errs[loser]), errs[loser]
    assert "Traceback" not in errs[loser]
    opened = ActivationStore.open(store)
    assert opened.manifest["complete"] and opened.sites == [sites[winner]]
    assert opened.verify() == []


def test_outputs_are_checked_before_any_work(tiny_organism, labeled, tmp_path, capsys):
    org = str(tiny_organism)
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text('{"mine": true}')
    for argv in (["label", "--model", org, "--data", org, "--out", str(a_file)],
                 ["label", "--model", org, "--data", org, "--out", str(foreign)],
                 ["capture", "--model", org, "--labels", str(labeled), "--sites",
                  "blocks.0.hook_resid_post", "--out", str(a_file)],
                 ["localize", "--model", org, "--labels", str(labeled), "--out", str(foreign)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "memlens: error:" in err and "Traceback" not in err, argv
    with pytest.raises(SystemExit) as exc:  # a number out of range: refused as it is read
        main(["label", "--model", org, "--data", org, "--out", str(tmp_path / "b"),
              "--batch-size", "0"])
    assert exc.value.code == 2
    assert "--batch-size: 0 is out of range" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"
    assert (foreign / "summary.json").read_text() == '{"mine": true}'
    assert not (tmp_path / "b").exists()


def test_a_read_only_place_is_refused_before_any_work(tiny_organism, tmp_path, monkeypatch,
                                                      capsys):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    access = os.access
    # As root every directory is writable; a read-only mount answers access() like this.
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if str(p) == str(read_only) and mode & os.W_OK else access(p, mode, **kw)))
    monkeypatch.setattr("memlens.steps.label.label", lambda *a, **k: pytest.fail("labeled"))
    org = str(tiny_organism)
    assert main(["label", "--model", org, "--data", org, "--out",
                 str(read_only / "labels")]) == 2
    assert f"{read_only} is not writable" in capsys.readouterr().err
    assert list(read_only.iterdir()) == []


def test_a_factor_file_never_replaces_a_model_and_an_edit_never_its_source(
        tiny_organism, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_organism, model)
    before = (model / "model.safetensors").read_bytes()
    assert main(["kfac", "collect", "--model", str(model), "--data", str(model),
                 "--out", str(model / "model.safetensors"), "--max-tokens", "500"]) == 2
    assert "is not a memlens factor file" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before
    factors = tmp_path / "f.safetensors"
    assert main(["kfac", "collect", "--model", str(model), "--data", str(model),
                 "--out", str(factors), "--max-tokens", "500"]) == 0
    assert main(["kfac", "edit", "--model", str(model), "--factors", str(factors),
                 "--rho", "0.9", "--out", str(model)]) == 2
    assert "is the model being edited" in capsys.readouterr().err
    assert (model / "model.safetensors").read_bytes() == before


def test_broken_model_weights_are_refused(tiny_organism, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_organism, renamed)
    weights = load_file(renamed / "model.safetensors")
    save_file({f"x.{k}": v for k, v in weights.items()}, renamed / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="weights .* are missing"):
        load_model(renamed)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_organism, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_model(truncated)
    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_organism, flipped)
    if "weights_hash" not in json.loads((flipped / "memlens.json").read_text()):
        pytest.fail("the organism records no weights hash; retrain it")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-100] ^= 0x40
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="do not match the hash"):
        load_model(flipped)


BAD_LINES = {
    "null_text": {"text": None},
    "list_text": {"text": ["a", "b"]},
    "int_token_ids": {"token_ids": 12},
    "bool_token_ids": {"token_ids": [1, True, False]},
    "string_span": {"text": "Phone 555", "spans": [{"field": "phone", "start": "6",
                                                     "end": 9}]},
    "float_span": {"text": "Phone 555", "spans": [{"field": "phone", "start": 6.0,
                                                    "end": 9}]},
    "surrogate": {"text": "Phone \ud800 555"},
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_lines_name_file_line_and_value(tiny_organism, tmp_path, case):
    handle = load_model(tiny_organism)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(BAD_LINES[case]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: "):
        read_sequences(path, handle.tokenizer)


def test_binary_input_and_long_lines(tiny_organism, tmp_path, monkeypatch):
    handle = load_model(tiny_organism)
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00binary')
    with pytest.raises(DataError, match=r"weights.jsonl:2: not UTF-8"):
        read_sequences(binary, handle.tokenizer)
    # A 5 MB line: only what the first 64 tokens need is tokenized.
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "Biography of Ann. " * 300_000}) + "\n")
    seen = []
    tokenize = type(handle.tokenizer).__call__
    monkeypatch.setattr(type(handle.tokenizer), "__call__",
                        lambda self, text, **kw: seen.append(len(text)) or tokenize(self, text,
                                                                                      **kw))
    (seq,) = read_sequences(long, handle.tokenizer, max_tokens=64)
    assert len(seq.token_ids) == 64 and max(seen) < 10_000


def test_corrupted_artifacts_are_detected_naming_the_file(tiny_organism, labeled, tmp_path):
    handle = load_model(tiny_organism)
    seqs = [s.token_ids for s in read_sequences(tiny_organism, handle.tokenizer,
                                                roles=("general",))[:40]]
    out = tmp_path / "f.safetensors"
    collect_factors(handle, seqs, KFACConfig(max_tokens=300), out=out, progress=False)
    data = bytearray(out.read_bytes())
    data[-12] ^= 0x10
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(DataError, match="flipped.safetensors does not match its checksum"):
        Factors.load(tmp_path / "flipped.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[:len(data) // 3]))
    with pytest.raises(DataError, match="cut.safetensors is not a readable"):
        Factors.load(tmp_path / "cut.safetensors")
    # A checkpoint cut short by a crash is dropped, not fatal.
    shutil.copy(tmp_path / "cut.safetensors", tmp_path / "g.safetensors.partial")
    collect_factors(handle, seqs, KFACConfig(max_tokens=300), out=tmp_path / "g.safetensors",
                    progress=False)
    assert Factors.load(tmp_path / "g.safetensors").tokens >= 300

    probe_dir = tmp_path / "probe"
    assert main(["probe", "train", "--model", str(tiny_organism), "--labels", str(labeled),
                 "--sites", "blocks.1.hook_resid_post", "--out", str(probe_dir),
                 "--n-bootstrap", "5"]) == 0
    good = probe_dir / "probes" / "blocks.1.hook_resid_post"
    Probe.load(good)
    for name, change in (("flip", "bytes"), ("nan", "bias"), ("extra", "key")):
        bad = tmp_path / name
        shutil.copytree(good, bad)
        meta = json.loads((bad / "probe.json").read_text())
        if change == "bytes":
            data = bytearray((bad / "probe.safetensors").read_bytes())
            data[-5] ^= 0x01
            (bad / "probe.safetensors").write_bytes(bytes(data))
        elif change == "bias":
            meta["bias"] = float("nan")
        else:
            meta["surprise"] = 1
        if change != "bytes":
            (bad / "probe.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=name):
            Probe.load(bad)

    store = probe_dir / "store"
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] = "../../outside/evil.parquet"
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="outside the store"):
        ActivationStore.open(store)


def test_interrupted_labels_leave_the_old_artifact_whole(tiny_organism, labeled, tmp_path):
    out = tmp_path / "labels"
    shutil.copytree(labeled, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import memlens.data.labels as labels_module

    labels = labels_module.Labels.load(out)
    original = labels.tokens.to_parquet

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    labels.tokens.to_parquet = die
    with pytest.raises(KeyboardInterrupt):
        labels.save(out)
    labels.tokens.to_parquet = original
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture(scope="module")
def artifacts(tiny_organism, labeled, tmp_path_factory):
    """One of every artifact kind, made through the command line."""
    root = tmp_path_factory.mktemp("artifacts")
    org = str(tiny_organism)
    assert main(["probe", "train", "--model", org, "--labels", str(labeled), "--sites",
                 "blocks.0.hook_resid_post", "--out", str(root / "probes"),
                 "--n-bootstrap", "5"]) == 0
    probe = root / "probes" / "probes" / "blocks.0.hook_resid_post"
    assert main(["steer", "--model", org, "--probe", str(probe), "--alpha", "2", "--dynamic",
                 "--save", str(root / "steering"), "--prompt", "Biography."]) == 0
    assert main(["localize", "--model", org, "--labels", str(labeled), "--method",
                 "activations", "--out", str(root / "neurons")]) == 0
    assert main(["kfac", "collect", "--model", org, "--data", org, "--out",
                 str(root / "f.safetensors"), "--max-tokens", "300"]) == 0
    assert main(["kfac", "edit", "--model", org, "--factors", str(root / "f.safetensors"),
                 "--rho", "0.9", "--out", str(root / "edited")]) == 0
    return {"labels": labeled, "store": root / "probes" / "store", "probe": probe,
            "steering": root / "steering", "ablation": root / "neurons",
            "factors": root / "f.safetensors", "edit": root / "edited"}


def _load(kind, path):
    from memlens.data.labels import Labels
    from memlens.methods.localize import NeuronAblation
    from memlens.methods.steering import Steering

    loaders = {"labels": Labels.load, "store": ActivationStore.open, "probe": Probe.load,
               "steering": Steering.load, "ablation": NeuronAblation.load,
               "factors": Factors.load, "edit": load_model}
    return loaders[kind](path)


FILES = [("labels", "sequences.parquet"), ("labels", "tokens.parquet"),
         ("labels", "summary.json"), ("store", "blocks.0.hook_resid_post/shard_00000.npy"),
         ("store", "tokens/shard_00000.parquet"), ("store", "manifest.json"),
         ("probe", "probe.safetensors"), ("probe", "probe.json"),
         ("steering", "vector.safetensors"), ("steering", "steering.json"),
         ("steering", "gate/probe.safetensors"), ("ablation", "neurons.parquet"),
         ("ablation", "scores.safetensors"), ("ablation", "ablation.json"),
         ("factors", ""), ("edit", "model.safetensors")]


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
@pytest.mark.parametrize("kind,name", FILES, ids=[f"{k}:{n}" for k, n in FILES])
def test_every_artifact_kind_detects_damage_naming_the_file(artifacts, tmp_path, kind, name,
                                                            damage):
    source = artifacts[kind]
    copy = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    _load(kind, copy)  # intact: loads
    target = copy / name if name else copy
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) * 3 // 4] ^= 0x20
    target.write_bytes(bytes(data))
    with pytest.raises((DataError, ModelLoadError)) as err:
        _load(kind, copy)
    assert target.name in str(err.value) or str(copy) in str(err.value), str(err.value)
