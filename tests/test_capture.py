import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from memlens.core.model import load_model
from memlens.core.sites import UnknownSiteError, resolve_sites, run_sites, site_to_module
from memlens.data.labels import LabelConfig, label, read_sequences
from memlens.data.store import ActivationStore, CaptureConfig, CorruptShardError, capture

SITES = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post", "blocks.0.mlp.hook_post",
         "blocks.1.hook_attn_out"]


@pytest.fixture(scope="module")
def organism(tiny_organism):
    handle = load_model(tiny_organism)
    seqs = read_sequences(tiny_organism, handle.tokenizer, roles=("canary", "nonmember"))
    return handle, seqs


def test_globs_expand_and_unknown_sites_suggest_names(organism):
    handle, _ = organism
    assert resolve_sites(handle, ["blocks.*.hook_resid_post"]) == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(UnknownSiteError, match="did you mean 'blocks.1.mlp.hook_post'"):
        resolve_sites(handle, ["blocks.1.mlp.post"])
    assert site_to_module(handle, "blocks.1.mlp.hook_post") == ("model.layers.1.mlp.down_proj",
                                                                "input")
    with pytest.raises(ValueError, match="backend='bridge'"):
        site_to_module(handle, "blocks.0.ln1.hook_scale")


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2", "organism"])
def test_bridge_nnsight_and_torch_hooks_record_the_same(arch, random_models, organism):
    handle = organism[0] if arch == "organism" else load_model(random_models[arch])
    sites = resolve_sites(handle, SITES)
    ids, mask = handle.tokenize(["Biography. Ann Lee was born on May 1, 1990.", "Hi"],
                                side="left")
    got = {b: run_sites(handle, sites, ids, mask, backend=b) for b in ("bridge", "nnsight",
                                                                       "torch")}
    for site in sites:
        ref = got["torch"][site]
        assert ref.shape[:2] == ids.shape
        for b in ("bridge", "nnsight"):
            torch.testing.assert_close(got[b][site], ref, atol=1e-6, rtol=1e-6)


def test_store_round_trip_is_aligned_with_labels(organism, tmp_path):
    handle, seqs = organism
    seqs = seqs[:24]
    labels = label(handle, seqs, LabelConfig(generate=False), progress=False)
    cfg = CaptureConfig(sites=["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"],
                        positions="suffix", dtype="float16", shard_sequences=10)
    store = capture(handle, seqs, cfg, tmp_path / "store", token_labels=labels.tokens,
                    progress=False)
    store = ActivationStore.open(tmp_path / "store")
    man = store.manifest
    assert man["complete"] and store.identity.model_hash == handle.weights_hash()
    assert store.identity.corpus_hash == labels.identity.corpus_hash
    assert len(man["shards"]) == 3 and man["dtype"] == "float16"
    assert man["shapes"]["blocks.0.mlp.hook_post"] == [handle.config.intermediate_size]
    tokens = store.tokens
    expected_rows = sum(min(len(s.token_ids), 64) - 32 for s in seqs)
    assert store.n_rows == len(tokens) == expected_rows
    assert not tokens.duplicated(["id", "position"]).any()
    arr = store.shards("blocks.1.hook_resid_post")[0]
    assert isinstance(arr, np.memmap)  # lazily read
    # Row by row: the stored activation is the model's at that token.
    by_id = {s.id: s for s in seqs}
    ids, mask = handle.pad([seqs[0].token_ids])
    direct = run_sites(handle, ["blocks.1.hook_resid_post"], ids, mask)["blocks.1.hook_resid_post"]
    first = tokens.index[tokens["id"] == seqs[0].id]
    np.testing.assert_allclose(store.array("blocks.1.hook_resid_post")[first],
                               direct[0, 32:64].numpy(), atol=2e-3, rtol=2e-3)
    assert (tokens["token_id"] == [by_id[i].token_ids[p] for i, p in
                                   zip(tokens["id"], tokens["position"], strict=True)]).all()
    merged = tokens.merge(labels.tokens, on=["id", "position"], suffixes=("", "_labels"))
    assert len(merged) == len(tokens) and (merged["label"] == merged["label_labels"]).all()
    assert {"memorized", "generic"} <= set(tokens["label"])


def test_sampled_positions_and_bfloat16(organism, tmp_path):
    handle, seqs = organism
    cfg = CaptureConfig(sites=["blocks.0.hook_resid_post"], positions="sample:5",
                        dtype="bfloat16")
    store = capture(handle, seqs[:8], cfg, tmp_path / "s", progress=False)
    assert (store.tokens.groupby("id").size() == 5).all()
    again = capture(handle, seqs[:8], cfg, tmp_path / "s2", progress=False)
    assert store.tokens.equals(again.tokens)
    t = store.tensor("blocks.0.hook_resid_post")
    assert t.dtype == torch.float32 and t.shape == (40, handle.config.hidden_size)
    with pytest.raises(ValueError, match="sample:N"):
        CaptureConfig(sites=["x"], positions="some")


def test_a_store_refuses_another_capture(organism, tmp_path):
    handle, seqs = organism
    capture(handle, seqs[:4], CaptureConfig(sites=["blocks.0.hook_resid_post"]), tmp_path,
            progress=False)
    with pytest.raises(ValueError, match="other settings"):
        capture(handle, seqs[:4], CaptureConfig(sites=["blocks.1.hook_resid_post"]), tmp_path,
                progress=False)


KILLER = """
import os, signal, sys
import memlens.data.store as cap
from memlens.data.labels import read_sequences
from memlens.core.model import load_model
calls = 0
write = cap._write_npy
def write_then_die(path, arr):
    global calls
    write(path, arr)
    calls += 1
    if calls == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
cap._write_npy = write_then_die
handle = load_model(sys.argv[1])
seqs = read_sequences(sys.argv[1], handle.tokenizer, roles=("canary", "nonmember"))[:30]
cfg = cap.CaptureConfig(sites=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                        shard_sequences=8)
cap.capture(handle, seqs, cfg, sys.argv[2], progress=False)
"""


def test_capture_killed_mid_run_resumes_without_loss_or_duplicates(organism, tmp_path,
                                                                   tiny_organism):
    handle, seqs = organism
    seqs = seqs[:30]
    cfg = CaptureConfig(sites=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                        shard_sequences=8)
    reference = capture(handle, seqs, cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "killed"
    # Killed after 3 site files: shard 0 complete, shard 1 half written.
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_organism), str(out), "3"],
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    man = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in man["shards"]] == ["shard_00000"] and not man["complete"]
    resumed = capture(handle, seqs, cfg, out, progress=False)
    assert resumed.manifest["complete"]
    assert resumed.tokens.equals(reference.tokens)
    for site in cfg.sites:
        np.testing.assert_array_equal(resumed.array(site), reference.array(site))


def test_corrupt_shard_is_detected_and_redone(organism, tmp_path):
    handle, seqs = organism
    cfg = CaptureConfig(sites=["blocks.1.hook_resid_post"], shard_sequences=6)
    store = capture(handle, seqs[:12], cfg, tmp_path, progress=False)
    good = store.array("blocks.1.hook_resid_post").copy()
    shard = tmp_path / "blocks.1.hook_resid_post" / "shard_00001.npy"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with pytest.raises(CorruptShardError, match="shard_00001.npy"):
        ActivationStore.open(tmp_path)
    capture(handle, seqs[:12], cfg, tmp_path, progress=False)
    np.testing.assert_array_equal(ActivationStore.open(tmp_path).array(
        "blocks.1.hook_resid_post"), good)


def test_capture_command_reads_a_labels_directory(tiny_organism, tmp_path, capsys):
    from memlens.cli import main

    assert main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(tmp_path / "labels"), "--no-generate", "--roles", "canary"]) == 0
    assert main(["capture", "--model", str(tiny_organism), "--labels", str(tmp_path / "labels"),
                 "--sites", "blocks.*.hook_resid_post", "--out", str(tmp_path / "acts"),
                 "--positions", "suffix"]) == 0
    store = ActivationStore.open(tmp_path / "acts")
    assert store.sites == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert "memorized" in set(store.tokens["label"])
    assert main(["capture", "--model", str(tiny_organism), "--labels", str(tmp_path / "labels"),
                 "--sites", "model.layers.1", "--out", str(tmp_path / "paths"),
                 "--positions", "suffix"]) == 0
    np.testing.assert_array_equal(ActivationStore.open(tmp_path / "paths").array(
        "model.layers.1"), store.array("blocks.1.hook_resid_post"))
    assert main(["capture", "--model", str(tiny_organism), "--labels", str(tmp_path / "labels"),
                 "--sites", "blocks.0.mlp.post", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'blocks.0.mlp.hook_post'" in capsys.readouterr().err


def test_forward_stops_after_the_last_site(organism):
    handle, _ = organism
    ids, mask = handle.tokenize("Biography. Ann Lee")
    calls = []
    hook = handle.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    try:
        for backend in ("bridge", "torch", "nnsight"):
            run_sites(handle, ["blocks.0.hook_resid_post"], ids, mask, backend=backend)
        assert calls == []
        handle.model(input_ids=ids)
        assert calls == ["lm_head"]
    finally:
        hook.remove()


def test_nnsight_module_paths_produce_the_same_store(organism, tmp_path):
    handle, seqs = organism
    tl = capture(handle, seqs[:10], CaptureConfig(sites=["blocks.1.hook_resid_post",
                                                         "blocks.0.mlp.hook_post"]),
                 tmp_path / "tl", progress=False)
    nn = capture(handle, seqs[:10], CaptureConfig(
        sites=["model.layers.1", "model.layers.0.mlp.down_proj:input"], backend="nnsight"),
        tmp_path / "nn", progress=False)
    assert nn.tokens.equals(tl.tokens)
    np.testing.assert_array_equal(nn.array("model.layers.1"),
                                  tl.array("blocks.1.hook_resid_post"))
    np.testing.assert_array_equal(nn.array("model.layers.0.mlp.down_proj:input"),
                                  tl.array("blocks.0.mlp.hook_post"))
