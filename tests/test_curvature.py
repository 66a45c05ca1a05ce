import pytest
import torch

from memlens import load_model, read_sequences
from memlens.cli import main
from memlens.core.metrics import edit_metrics
from memlens.core.modules import linear_modules, linear_weight
from memlens.methods.audit import mean_losses
from memlens.methods.curvature import (
    Factors,
    KFACConfig,
    budget_weights,
    collect_factors,
    component_loading,
    eigenbasis,
    gradient_step_weights,
    kfac_edit,
    memorization_gradient,
)
from memlens.methods.edits import ParameterEdit, WeightEdit


@pytest.fixture(scope="module")
def tiny(tiny_organism):
    handle = load_model(tiny_organism)
    corpus = tiny_organism / "corpus.jsonl"
    general = [s.token_ids for s in read_sequences(corpus, handle.tokenizer, roles=("general",))]
    canaries = read_sequences(corpus, handle.tokenizer, roles=("canary",))
    heldout = [s.token_ids for s in read_sequences(corpus, handle.tokenizer,
                                                   roles=("nonmember",))]
    factors = collect_factors(handle, general[:400], KFACConfig(), progress=False)
    return handle, factors, canaries, heldout


def test_edit_removes_recitation_and_restores_bit_exactly(tiny, tmp_path):
    handle, factors, canaries, heldout = tiny
    basis = eigenbasis(factors)
    original = {k: v.clone() for k, v in handle.model.state_dict().items()}
    before = edit_metrics(handle, canaries, heldout, loose=False)
    assert before.exact["100"] >= 0.9
    with kfac_edit(handle, basis, rho=0.8).apply(handle) as edit:
        after = edit_metrics(handle, canaries, heldout, loose=False)
        edit.save(tmp_path / "edited", metadata={"rho": 0.8})
        ids = torch.tensor([canaries[-1].token_ids[:40]])
        edited_logits = handle.model(input_ids=ids).logits
    assert after.exact["100"] <= 0.1
    assert after.perplexity < 1.5 * before.perplexity
    for k, v in handle.model.state_dict().items():
        assert torch.equal(v, original[k]), k
    reloaded = load_model(tmp_path / "edited")
    assert torch.allclose(reloaded.model(input_ids=ids).logits, edited_logits, atol=1e-4)
    with pytest.raises(RuntimeError, match="boom"):
        with WeightEdit(handle) as edit:
            edit.set("model.layers.0.mlp.up_proj.weight",
                     torch.zeros_like(original["model.layers.0.mlp.up_proj.weight"]))
            raise RuntimeError("boom")
    assert torch.equal(handle.model.state_dict()["model.layers.0.mlp.up_proj.weight"],
                       original["model.layers.0.mlp.up_proj.weight"])


def test_memorized_tokens_load_more_on_low_curvature(tiny):
    handle, factors, canaries, heldout = tiny
    basis = eigenbasis(factors)
    memorized = [s.token_ids for s in canaries if s.duplication == 100]
    mem = component_loading(handle, basis, memorized, start=32).groupby("bin").loading.mean()
    clean = component_loading(handle, basis, heldout, start=32).groupby("bin").loading.mean()
    assert abs(mem.sum() - 1) < 1e-4 and abs(clean.sum() - 1) < 1e-4
    assert mem[0] < clean[0]  # less on the highest-curvature tenth
    assert mem[9] > clean[9]  # more on the lowest


def test_kfac_commands(tiny_organism, tmp_path, capsys):
    factors = tmp_path / "f.safetensors"
    assert main(["kfac", "collect", "--model", str(tiny_organism), "--data", str(tiny_organism),
                 "--out", str(factors), "--max-tokens", "3000"]) == 0
    assert Factors.load(factors).tokens >= 3000
    assert main(["kfac", "edit", "--model", str(tiny_organism), "--factors", str(factors),
                 "--rho", "0.7", "--out", str(tmp_path / "edited")]) == 0
    assert (tmp_path / "edited" / "memlens_edit.json").is_file()
    assert main(["kfac", "edit", "--model", str(tiny_organism), "--factors", str(factors),
                 "--rho", "1.7", "--out", str(tmp_path / "bad")]) == 2
    assert "rho must lie in [0, 1], got 1.7" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_aimed_edit_removes_what_holds_up_recitation_not_the_opposite(tiny):
    """budget_weights with a memorization gradient drops the components that hold up the
    aimed canaries' recitation (C * D > 0). The same budget spent the other way (the
    gradient negated: a sign-flipped selection) leaves them recited. Measured here, in
    sample, on the tiny organism's even-half 100x canaries; on its odd half the aimed edit
    does not transfer at these budgets (5 canaries; the small organism's held-out figure,
    100% -> 0% at +0.9%, is checked by test_readme)."""
    from memlens.core.metrics import ExtractionConfig, exact_extraction

    handle, factors, canaries, heldout = tiny
    basis = eigenbasis(factors)
    aimed = [s for s in canaries if s.duplication == 100][0::2]
    grads = memorization_gradient(handle, [s.token_ids[:64] for s in aimed], factors.layers,
                                  start=32)
    flipped = {k: -v for k, v in grads.items()}
    cfg = ExtractionConfig()

    def recited(weights) -> float:
        with ParameterEdit(weights).apply(handle):
            return sum(exact_extraction(handle, aimed, cfg)) / len(aimed)

    assert recited({}) == 1.0
    got = {b: (recited(budget_weights(handle, basis, b, grads)),
               recited(budget_weights(handle, basis, b, flipped))) for b in (0.01, 0.03)}
    assert got[0.03][0] <= 0.2 and got[0.03][1] >= got[0.03][0] + 0.4, got
    assert got[0.01][0] < got[0.01][1], got


def test_the_controls_spend_the_same_predicted_kl(tiny):
    """The random-order removal and the gradient step cost the budget they are given under
    the K-FAC quadratic model, so they compare with the aimed edit at equal predicted KL."""
    handle, factors, canaries, _ = tiny
    basis = eigenbasis(factors)
    aimed = [s for s in canaries if s.duplication == 100][0::2]
    grads = memorization_gradient(handle, [s.token_ids[:64] for s in aimed], factors.layers,
                                  start=32)
    modules = linear_modules(handle.model)

    def predicted_kl(weights) -> float:
        return sum(float((0.5 * b.curvature * (b.project(weights[n])
                                               - b.project(linear_weight(modules[n]))) ** 2)
                         .sum()) for n, b in basis.items())

    budget = 0.01
    step = gradient_step_weights(handle, basis, budget, grads)
    assert predicted_kl(step) == pytest.approx(budget, rel=1e-3)
    shuffled = budget_weights(handle, basis, budget, shuffle=0)
    cheapest = budget_weights(handle, basis, budget)
    # Removal stops at the last component within budget: a little under it, never over.
    assert 0.9 * budget < predicted_kl(shuffled) <= budget
    removed = {n: (shuffled[n] - linear_weight(modules[n])).abs().sum() > 0 for n in basis}
    assert sum(removed.values()) == len(basis)  # random components fall in every layer
    assert not all(torch.equal(shuffled[n], cheapest[n]) for n in basis)
    assert torch.equal(budget_weights(handle, basis, budget, shuffle=0)[factors.layers[0]],
                       shuffled[factors.layers[0]])  # the seed fixes the order
    # The step lowers the aimed canaries' log-odds: their suffix loss rises.
    ids = [s.token_ids[:64] for s in aimed]
    before = mean_losses(handle, ids, start=32).mean()
    with ParameterEdit(step).apply(handle):
        assert mean_losses(handle, ids, start=32).mean() > before
