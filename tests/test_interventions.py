import pandas as pd
import pytest
import torch

from memlens import load_model, read_sequences
from memlens.core.modules import neuron_sites
from memlens.data.corpus import CorpusConfig, build_corpus
from memlens.methods.interventions import (
    ablate,
    add_vector,
    project_out,
    scale_layernorm,
    site_activations,
)
from memlens.methods.localize import (
    METHODS,
    LocalizeConfig,
    ablate_neurons,
    inject,
    localize,
    recall,
    top_neurons,
)

NEURONS = "model.layers.0.mlp.down_proj:input"
RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    handle = load_model(tiny_organism)
    corpus = tiny_organism / "corpus.jsonl"
    general = [s.token_ids for s in read_sequences(corpus, handle.tokenizer,
                                                   roles=("general",))][:32]
    return handle, general


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def logits(handle, seqs):
    ids, mask = handle.pad(seqs)
    with torch.no_grad():
        return handle.model(input_ids=ids, attention_mask=mask).logits


def test_ablations_set_only_the_chosen_units(tiny):
    handle, seqs = tiny
    base = site_activations(handle, NEURONS, seqs[:4])
    reference = site_activations(handle, NEURONS, seqs[8:16])
    units = [3, 40, 41]
    others = [k for k in range(base.shape[1]) if k not in units]
    with ablate(handle, NEURONS, units):
        zeroed = site_activations(handle, NEURONS, seqs[:4])
    assert (zeroed[:, units] == 0).all() and torch.equal(zeroed[:, others], base[:, others])
    with ablate(handle, NEURONS, units, how="mean", reference=seqs[8:16]):
        meaned = site_activations(handle, NEURONS, seqs[:4])
    assert torch.allclose(meaned[:, units], reference[:, units].mean(0).expand(len(base), 3))
    with ablate(handle, NEURONS, units, how="resample", reference=reference):
        resampled = site_activations(handle, NEURONS, seqs[:4])
    allowed = set(map(tuple, reference[:, units].tolist()))
    assert all(tuple(row) in allowed for row in resampled[:, units].tolist())
    assert len(set(map(tuple, resampled[:, units].tolist()))) > 1  # drawn per position
    with pytest.raises(ValueError, match="needs reference"):
        with ablate(handle, NEURONS, units, how="mean"):
            pass
    with pytest.raises(ValueError, match="not one of"):
        with ablate(handle, NEURONS, units, how="noise"):
            pass


def test_steering_and_projection_change_the_site_by_the_expected_amount(tiny):
    handle, seqs = tiny
    base = site_activations(handle, RESID, seqs[:4])
    v = torch.randn(base.shape[1])
    with add_vector(handle, RESID, v, alpha=2.0):
        steered = site_activations(handle, RESID, seqs[:4])
    assert torch.allclose(steered - base, 2.0 * v.expand_as(base), atol=1e-5)
    with add_vector(handle, RESID, v, alpha=2.0, gate=lambda x: torch.zeros(x.shape[:-1])):
        assert torch.equal(logits(handle, seqs[:4]), logits(handle, seqs[:4]))
        gated = site_activations(handle, RESID, seqs[:4])
    assert torch.allclose(gated, base, atol=1e-6)
    with project_out(handle, RESID, v):
        projected = site_activations(handle, RESID, seqs[:4])
    assert (projected @ (v / v.norm())).abs().max() < 1e-4


def test_interventions_compose_act_in_generate_and_always_clean_up(tiny):
    handle, seqs = tiny
    before_hooks, base = n_hooks(handle.model), logits(handle, seqs[:4])
    ids, mask = handle.pad([seqs[0][:20]], side="left")
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=handle.tokenizer.pad_token_id)
    plain = handle.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    push = 30 * handle.model.get_output_embeddings().weight[7]
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(handle, NEURONS, [1, 2]), add_vector(handle, RESID, push):
            assert n_hooks(handle.model) == before_hooks + 2
            steered = handle.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            raise RuntimeError("boom")
    assert n_hooks(handle.model) == before_hooks
    assert not torch.equal(steered, plain)
    assert torch.equal(logits(handle, seqs[:4]), base)
    with scale_layernorm(handle, "model.layers.1.post_attention_layernorm", 1.0):
        assert torch.allclose(logits(handle, seqs[:4]), base)
    with scale_layernorm(handle, "model.layers.1.post_attention_layernorm", 0.0):
        assert not torch.allclose(logits(handle, seqs[:4]), base)
    with pytest.raises(ValueError, match="not a normalization layer"):
        with scale_layernorm(handle, "model.layers.1.mlp", 0.5):
            pass
    with pytest.raises(ValueError, match="no module"):
        with ablate(handle, "model.layers.9.mlp.down_proj:input", [0]):
            pass


def test_localization_recovers_injected_neurons(tiny):
    handle, general = tiny
    record = build_corpus(CorpusConfig(n_general=0, canaries_per_count=1, n_nonmembers=3,
                                       seed=777)).by_role("nonmember")[0]
    target = [handle.tokenizer(record.text)["input_ids"][:48]]
    original = {k: v.clone() for k, v in handle.model.state_dict().items()}
    lp_before = -torch.nn.functional.cross_entropy(
        logits(handle, target)[0, :-1], torch.tensor(target[0][1:]))
    edit, truth = inject(handle, target, budget=0.01, steps=300, lr=0.03, clean=general)
    try:
        assert len(truth) == 2 * 3  # ceil(1% of 256) per layer, two layers
        lp_after = -torch.nn.functional.cross_entropy(
            logits(handle, target)[0, :-1], torch.tensor(target[0][1:]))
        assert lp_after > lp_before + 1.0  # the sequence was learned
        found = {}
        for method in METHODS:
            scores = localize(handle, target, general, LocalizeConfig(method=method, start=1))
            assert scores.shape == (2, 256)
            found[method] = top_neurons(handle, scores, 0.01)
        rec = {m: recall(t, truth) for m, t in found.items()}
        assert rec["zero_out"] >= 0.8 and rec["hard_concrete"] >= 0.8, rec
        assert rec["integrated_gradients"] >= 0.8, rec
        # Gradient x activation, one backward pass for every block (measured: 1.0).
        assert rec["attribution_patching"] >= 0.8, rec
        assert list(found["zero_out"]["rank"]) == list(range(1, 7))
        assert set(found["zero_out"]["site"]) == set(neuron_sites(handle.model))
        with ablate_neurons(handle, found["zero_out"]):
            lp_ablated = -torch.nn.functional.cross_entropy(
                logits(handle, target)[0, :-1], torch.tensor(target[0][1:]))
        assert lp_ablated < lp_after - 1.0
    finally:
        edit.restore()
    for k, v in handle.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    top_edit, top_only = inject(handle, target, budget=0.01, steps=1, blocks=[1])
    top_edit.restore()
    assert set(top_only["layer"]) == {1} and len(top_only) == 3
    with pytest.raises(ValueError, match="budget"):
        top_neurons(handle, scores, 0.0)
    with pytest.raises(ValueError, match="method='gradients'; choose one of activations"):
        LocalizeConfig(method="gradients")


def test_localize_command_writes_a_neuron_ablation(tiny_organism, tmp_path, capsys):
    from memlens.cli import main
    from memlens.methods.localize import NeuronAblation

    labels = tmp_path / "labels"
    assert main(["label", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(labels), "--no-generate"]) == 0
    out = tmp_path / "neurons"
    assert main(["localize", "--model", str(tiny_organism), "--labels", str(labels),
                 "--method", "activations", "--budget", "0.01", "--out", str(out)]) == 0
    ablation = NeuronAblation.load(out)
    table = ablation.table
    assert len(table) == 6 and list(table["rank"]) == list(range(1, 7))
    assert (table["score"].diff().dropna() <= 0).all()
    assert ablation.scores.shape == (2, 256)
    # Targets are what the labels say the model recites, cut to prefix + suffix.
    recited = pd.read_parquet(labels / "sequences.parquet").query("exact")
    assert ablation.config["n_targets"] == len(recited)
    handle = load_model(tiny_organism)
    ids = torch.tensor([recited["token_ids"].iloc[0][:64].tolist()])
    with torch.no_grad():
        plain = handle.model(input_ids=ids).logits
        with ablation.apply(handle):
            ablated = handle.model(input_ids=ids).logits
    assert not torch.equal(plain, ablated)
    # Scoring one block only: the other block's neurons are never chosen.
    assert main(["localize", "--model", str(tiny_organism), "--labels", str(labels),
                 "--method", "activations", "--budget", "0.01", "--blocks", "1",
                 "--out", str(tmp_path / "block1")]) == 0
    one = NeuronAblation.load(tmp_path / "block1")
    assert set(one.table["layer"]) == {1} and len(one.table) == 3
    assert torch.isnan(one.scores[0]).all()
    assert torch.equal(one.scores[1], ablation.scores[1])
    with pytest.raises(SystemExit) as exc:  # refused while the command line is read
        main(["localize", "--model", str(tiny_organism), "--labels", str(labels),
              "--budget", "5", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--budget: 5 is out of range: give a number > 0 and <= 1" in capsys.readouterr().err
    assert main(["localize", "--model", str(tiny_organism), "--labels", str(labels),
                 "--blocks", "2", "--out", str(tmp_path / "x")]) == 2
    assert "blocks (2,) must name some of the model's blocks 0..1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_balanced_subnet_drops_recitation_and_restores(tiny_organism, tiny):
    from memlens.core.metrics import edit_metrics, exact_extraction
    from memlens.data.labels import LabelConfig
    from memlens.data.splits import Splits
    from memlens.methods.subnet import SubnetConfig, balanced_subnet

    handle, general = tiny
    splits = Splits.from_organism(tiny_organism, handle.tokenizer)
    aim, scored, heldout = splits.calibration, splits.evaluation, splits.nonmembers
    heldout = [s.token_ids for s in heldout]
    recited = [s.token_ids[:64] for s, hit in zip(aim, exact_extraction(handle, aim,
                                                                         LabelConfig()),
                                                   strict=True) if hit]
    original = {k: v.clone() for k, v in handle.model.state_dict().items()}
    before = edit_metrics(handle, scored, heldout, loose=False)
    with balanced_subnet(handle, recited, general, SubnetConfig(ratio=0.03)).apply(handle) as edit:
        after = edit_metrics(handle, scored, heldout, loose=False)
        dropped = sum(int((handle.model.state_dict()[n] == 0).sum()) for n in edit.edited)
        total = sum(original[n].numel() for n in edit.edited)
    assert 0.029 <= dropped / total < 0.035
    assert before.exact["100"] >= 0.8
    assert after.exact["100"] <= 0.4, after
    # Measured on the tiny organism: 100x 1.0 -> 0.0 at +31% perplexity (the small one
    # pays +3%, see experiments/interventions.py).
    assert after.perplexity < 1.4 * before.perplexity, (before, after)
    for k, v in handle.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    with pytest.raises(ValueError, match="fraction of weights dropped"):
        SubnetConfig(ratio=1.5)
