"""Beyond one process and one device: torchrun data parallel (two gloo ranks on the CPU
give what one process gives) and device_map (a model split across devices and disk)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from memlens.cli import main
from memlens.core.model import load_model
from memlens.data.labels import LabelConfig, label, read_sequences
from memlens.data.store import ActivationStore, CaptureConfig, capture
from memlens.methods.curvature import Factors, KFACConfig, collect_factors


def torchrun(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                          "2", "--standalone", "-m", "memlens", *argv],
                         capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def relative_gap(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def single(tiny_organism, tmp_path_factory):
    """The single-process artifacts every torchrun run is compared with."""
    root = tmp_path_factory.mktemp("single")
    org = str(tiny_organism)
    for argv in (["label", "--data", org, "--out", str(root / "labels")],
                 ["capture", "--labels", str(root / "labels"), "--sites",
                  "blocks.*.hook_resid_post", "--shard-sequences", "16", "--out",
                  str(root / "store")],
                 ["kfac", "collect", "--data", org, "--max-tokens", "20000", "--out",
                  str(root / "factors.safetensors")],
                 ["localize", "--labels", str(root / "labels"), "--method",
                  "integrated_gradients", "--steps", "4", "--out", str(root / "neurons")]):
        assert main([*argv[:1 + (argv[0] == "kfac")], "--model", org,
                     *argv[1 + (argv[0] == "kfac"):]]) == 0
    return root


def test_torchrun_label_capture_kfac_localize_equal_one_process(single, tiny_organism,
                                                                 tmp_path):
    org, labels = str(tiny_organism), str(single / "labels")
    torchrun("label", "--model", org, "--data", org, "--out", str(tmp_path / "labels"))
    for table in ("sequences", "tokens"):  # identical, value for value
        pd.testing.assert_frame_equal(pd.read_parquet(single / "labels" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "labels" / f"{table}.parquet"))
    assert (json.loads((tmp_path / "labels" / "summary.json").read_text())["identity"]
            == json.loads((single / "labels" / "summary.json").read_text())["identity"])

    capture = ["capture", "--model", org, "--labels", labels, "--sites",
               "blocks.*.hook_resid_post", "--shard-sequences", "16", "--out",
               str(tmp_path / "store")]
    torchrun(*capture)
    one, two = ActivationStore.open(single / "store"), ActivationStore.open(tmp_path / "store")
    assert len(two.manifest["shards"]) == 7 and two.manifest["complete"]
    assert not list((tmp_path / "store").glob(".manifest.rank*"))
    assert_same_store(one, two)

    torchrun("kfac", "collect", "--model", org, "--data", org, "--max-tokens", "20000",
             "--out", str(tmp_path / "factors.safetensors"))
    f1, f2 = Factors.load(single / "factors.safetensors"), Factors.load(
        tmp_path / "factors.safetensors")
    assert f1.tokens == f2.tokens >= 20000 and f1.layers == f2.layers
    for n in f1.layers:  # sums in another order: equal to float rounding
        assert relative_gap(f1.A[n], f2.A[n]) < 1e-6 and relative_gap(f1.G[n], f2.G[n]) < 1e-6
    assert not list(tmp_path.glob("*.partial"))

    torchrun("localize", "--model", org, "--labels", labels, "--method",
             "integrated_gradients", "--steps", "4", "--out", str(tmp_path / "neurons"))
    s1 = load_file(single / "neurons" / "scores.safetensors")["scores"]
    s2 = load_file(tmp_path / "neurons" / "scores.safetensors")["scores"]
    assert relative_gap(s1, s2) < 1e-6
    pd.testing.assert_frame_equal(pd.read_parquet(single / "neurons" / "neurons.parquet"),
                                  pd.read_parquet(tmp_path / "neurons" / "neurons.parquet"))

    # A killed run: two shards finished only in rank 1's file, one lost, none merged.
    store = tmp_path / "store"
    manifest = json.loads((store / "manifest.json").read_text())
    shards = manifest["shards"]
    (store / ".manifest.rank001.json").write_text(json.dumps(
        {"shapes": manifest["shapes"], "shards": [shards[1], shards[3]]}))
    (store / shards[2]["tokens"]).unlink()
    manifest.update(complete=False, shards=[s for i, s in enumerate(shards) if i not in (1, 3)])
    (store / "manifest.json").write_text(json.dumps(manifest))
    torchrun(*capture)
    assert_same_store(one, ActivationStore.open(store))

    refused = torchrun("kfac", "edit", "--model", org, "--factors",
                       str(tmp_path / "factors.safetensors"), "--rho", "0.9", "--out",
                       str(tmp_path / "edited"), check=False)
    assert refused.returncode != 0 and "run it without torchrun" in refused.stderr
    assert not (tmp_path / "edited").exists()


def assert_same_store(one: ActivationStore, two: ActivationStore) -> None:
    """The same rows (as a set, keyed by sequence and position) with the same values."""
    assert two.manifest["complete"] and one.identity.digest == two.identity.digest
    key = ["id", "position"]
    t1, t2 = one.tokens.reset_index(), two.tokens.reset_index()
    joined = t1.merge(t2, on=key, suffixes=("_1", "_2"), validate="one_to_one")
    assert len(joined) == len(t1) == len(t2)
    assert (joined["label_1"] == joined["label_2"]).all()
    for site in one.sites:
        a = one.array(site)[joined["index_1"].to_numpy()]
        b = two.rows(site, joined["index_2"].to_numpy()).numpy()  # across its shards
        assert np.abs(a - b).max() <= 1e-6


def test_a_model_split_by_device_map_labels_captures_and_collects_the_same(tiny_organism,
                                                                           tmp_path):
    whole = load_model(tiny_organism)
    # 600 KB of CPU memory holds the embedding; the blocks and the head go to disk.
    split = load_model(tiny_organism, device_map="auto", max_memory={"cpu": "600KB"})
    placed = set(split.model.hf_device_map.values())
    assert {"cpu", "disk"} <= placed and split.device.type == "cpu"
    assert split.weights_hash() == whole.weights_hash()
    seqs = read_sequences(tiny_organism, whole.tokenizer, roles=("canary", "nonmember"))[:40]
    cfg = LabelConfig(batch_size=8)
    one, two = label(whole, seqs, cfg, progress=False), label(split, seqs, cfg, progress=False)
    pd.testing.assert_frame_equal(one.tokens, two.tokens)
    assert one.identity == two.identity
    for backend, site in (("torch", "model.layers.1.mlp.down_proj:input"),
                          ("bridge", "blocks.1.hook_resid_post"), ("nnsight", "model.layers.0")):
        cfg = CaptureConfig(sites=[site], backend=backend, batch_size=8)
        a = capture(whole, seqs, cfg, tmp_path / f"{backend}-whole", progress=False)
        b = capture(split, seqs, cfg, tmp_path / f"{backend}-split", progress=False)
        assert np.array_equal(a.array(a.sites[0]), b.array(b.sites[0])), backend
    general = [s.token_ids for s in read_sequences(tiny_organism, whole.tokenizer,
                                                   roles=("general",))][:64]
    cfg = KFACConfig(layers=("mlp", "attn"), batch_size=8)
    f1 = collect_factors(whole, general, cfg, progress=False)
    f2 = collect_factors(split, general, cfg, progress=False)
    for n in f1.layers:
        assert relative_gap(f1.A[n], f2.A[n]) < 1e-6 and relative_gap(f1.G[n], f2.G[n]) < 1e-6
    # The command line takes the same placement.
    assert main(["label", "--model", str(tiny_organism), "--device-map", "auto",
                 "--max-memory", "cpu=600KB", "--data", str(tiny_organism), "--roles",
                 "canary", "--no-generate", "--out", str(tmp_path / "labels")]) == 0
