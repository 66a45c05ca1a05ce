from dataclasses import replace

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from memlens import load_model, read_sequences
from memlens.cli import main
from memlens.core.metrics import edit_metrics
from memlens.core.modules import find_layers, linear_modules, linear_weight
from memlens.core.scoring import sample_labels
from memlens.methods.audit import mean_losses
from memlens.methods.curvature import (
    Factors,
    KFACConfig,
    batch_seed,
    budget_weights,
    collect_factors,
    component_loading,
    eigenbasis,
    gradient_step_weights,
    kfac_edit,
    kfac_weights,
    mass_curves,
    memorization_gradient,
    spectra,
    svd_weights,
)
from memlens.methods.edits import ParameterEdit, WeightEdit
from memlens.report.figures import mass_curve_figure, spectrum_figure

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 100, 3], [1, 44, 17, 3, 99], [1, 6, 6, 6, 6, 6, 6, 21],
        [1, 250, 251], [1, 8, 77, 12, 9, 41, 40, 3, 2]]


def explicit_factors(handle, seqs, names, mode, seed=0):
    """One sequence at a time, no padding, one token at a time: sum a a^T and g g^T."""
    model, modules = handle.model, linear_modules(handle.model)
    A = {n: 0 for n in names}
    G = {n: 0 for n in names}
    grads = {n: 0 for n in names}
    n_tokens, acts = 0, {}
    for i, seq in enumerate(seqs):
        generator = torch.Generator().manual_seed(batch_seed(seed, i))  # batch i of size 1
        acts.clear()
        hooks = [modules[n].register_forward_hook(
            lambda mod, args, out, n=n: acts.__setitem__(n, (args[0][0], out))) for n in names]
        ids = torch.tensor([seq])
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1]
        for h in hooks:
            h.remove()
        if mode == "empirical":
            labels = ids[0, 1:]
        else:
            labels = sample_labels(logits.detach(), generator)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        outs = [acts[n][1] for n in names]
        gs = torch.autograd.grad(loss, outs, retain_graph=True)
        loss.backward()
        for n, g in zip(names, gs, strict=True):
            a_seq = acts[n][0].detach()
            if modules[n].bias is not None:
                a_seq = torch.cat([a_seq, torch.ones(len(a_seq), 1)], 1)
            for t in range(len(seq) - 1):  # the last position predicts nothing
                a, gt = a_seq[t], g[0, t]
                A[n] = A[n] + torch.outer(a, a)
                G[n] = G[n] + torch.outer(gt, gt)
                grads[n] = grads[n] + torch.outer(gt, a)
            param_grad = modules[n].weight.grad
            param_grad = param_grad.T if isinstance(modules[n], Conv1D) else param_grad
            if modules[n].bias is not None:
                param_grad = torch.cat([param_grad, modules[n].bias.grad[:, None]], 1)
            # per-token g a^T must add up to the autograd weight gradient of the same loss
            assert torch.allclose(grads[n], param_grad, atol=1e-5), n
            grads[n] = 0
        n_tokens += len(seq) - 1
    model.zero_grad()
    return {n: a / n_tokens for n, a in A.items()}, {n: g / n_tokens for n, g in G.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
@pytest.mark.parametrize("mode", ["empirical", "true"])
def test_factors_equal_an_explicit_per_token_computation(arch, mode, random_models):
    handle = load_model(random_models[arch])
    names = find_layers(handle.model, ("mlp", "attn"))
    # batch_size 1: the label sampler draws per sequence, as the explicit loop does
    batch = 1 if mode == "true" else 3
    factors = collect_factors(handle, SEQS, KFACConfig(layers=("mlp", "attn"), mode=mode,
                                                       batch_size=batch), progress=False)
    A, G = explicit_factors(handle, SEQS, names, mode)
    assert factors.tokens == sum(len(s) - 1 for s in SEQS)
    for n in names:  # fp32 sums in another order: equal to 1e-5 of the largest entry
        assert (factors.A[n] - A[n]).abs().max() <= 1e-5 * A[n].abs().max(), n
        assert (factors.G[n] - G[n]).abs().max() <= 1e-5 * G[n].abs().max(), n
    if arch != "llama":  # Conv1D / Linear with bias: the constant input shows up in A
        assert all(factors.A[n][-1, -1] == 1 for n in names)


def test_layers_per_pass_gives_the_same_factors_in_more_passes(random_models, tmp_path):
    handle = load_model(random_models["llama"])
    cfg = KFACConfig(layers=("mlp", "attn"), batch_size=2, seed=1)
    one = collect_factors(handle, SEQS, cfg, progress=False)
    split = collect_factors(handle, SEQS, replace(cfg, layers_per_pass=2), progress=False,
                            out=tmp_path / "f.safetensors")
    assert split.meta["passes"] == -(-len(one.layers) // 2) > 1
    assert split.identity.digest == one.identity.digest and split.tokens == one.tokens
    for n in one.layers:  # the same labels are sampled in every pass
        assert torch.allclose(split.A[n], one.A[n], atol=1e-7)
        assert torch.allclose(split.G[n], one.G[n], rtol=1e-5, atol=1e-9)


def test_sampled_labels_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).log_softmax(-1).expand(40_000, 4)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=4) / len(labels)
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.01)
    assert freq[3] == 0


def test_factors_round_trip_and_resume_after_interrupt(random_models, tmp_path):
    handle = load_model(random_models["gpt2"])
    seqs = SEQS * 4
    cfg = KFACConfig(batch_size=2, mode="true", seed=3)
    full = collect_factors(handle, seqs, cfg, progress=False)
    out = tmp_path / "factors.safetensors"
    forward, calls = handle.model.forward, []

    def dying_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    handle.model.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        collect_factors(handle, seqs, cfg, out=out, progress=False, checkpoint_every=2)
    assert not out.exists() and (tmp_path / "factors.safetensors.partial").exists()
    # 10 batches; killed in the 6th, checkpointed after the 4th: the rerun does the last 6.
    calls.clear()
    handle.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    resumed = collect_factors(handle, seqs, cfg, out=out, progress=False, checkpoint_every=2)
    assert len(calls) == 6
    assert not (tmp_path / "factors.safetensors.partial").exists()
    calls.clear()  # finished: the same collection again is loaded, not redone
    again = collect_factors(handle, seqs, cfg, out=out, progress=False, checkpoint_every=2)
    assert calls == [] and again.tokens == full.tokens
    handle.model.forward = forward
    loaded = Factors.load(out)
    assert loaded.tokens == resumed.tokens == full.tokens
    assert loaded.identity.config["mode"] == "true"
    assert loaded.identity.model_hash == handle.weights_hash()
    for n in full.layers:
        assert torch.allclose(loaded.A[n], full.A[n], atol=1e-6)
        assert torch.allclose(loaded.G[n], full.G[n], atol=1e-8)


def test_memorization_gradient_is_the_weight_gradient_of_the_log_odds(random_models):
    handle = load_model(random_models["neox"])
    names = find_layers(handle.model, "mlp")
    grads = memorization_gradient(handle, SEQS, names, start=3, batch_size=2)
    handle.model.zero_grad()
    for seq in SEQS:
        logits = handle.model(input_ids=torch.tensor([seq])).logits[0, :-1]
        gold = torch.tensor(seq[1:])
        z = logits.gather(-1, gold[:, None])[:, 0]
        odds = z - logits.scatter(-1, gold[:, None], float("-inf")).logsumexp(-1)
        odds[2:].sum().backward()  # predictions of tokens at index >= 3
    for n in names:
        m = linear_modules(handle.model)[n]
        expected = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1)
        assert torch.allclose(grads[n], expected, atol=1e-5), n


def test_keep_mass_masks_and_identity_edits(random_models):
    handle = load_model(random_models["gpt2"])
    factors = collect_factors(handle, SEQS, KFACConfig(), progress=False)
    basis = eigenbasis(factors)
    name = factors.layers[0]
    b = basis[name]
    assert torch.allclose(b.U_A @ torch.diag(b.eig_A) @ b.U_A.T, factors.A[name], atol=1e-5)
    assert (b.eig_G[:-1] >= b.eig_G[1:]).all()
    curv = b.curvature
    for rho in (0.5, 0.9):
        mask = b.keep_mask(rho)
        kept = curv[mask].sum()
        assert kept >= rho * curv.sum() * (1 - 1e-6)
        assert kept - curv[mask].min() < rho * curv.sum()  # no component more than needed
        assert curv[mask].min() >= curv[~mask].max()
    W = linear_weight(linear_modules(handle.model)[name])
    assert torch.allclose(kfac_weights(handle, basis, 1.0)[name], W, atol=1e-5)
    assert torch.allclose(kfac_weights(handle, basis, 0.0)[name], torch.zeros_like(W))
    assert torch.allclose(svd_weights(handle, [name], 1.0)[name], W, atol=1e-5)
    assert torch.linalg.matrix_rank(svd_weights(handle, [name], 0.5)[name]) < min(W.shape)
    with pytest.raises(ValueError, match="rho must lie in"):
        b.keep_mask(1.5)
    with pytest.raises(ValueError, match="exactly one of"):
        kfac_edit(handle, basis)
    with pytest.raises(ValueError, match="no linear layer matches"):
        find_layers(handle.model, "mlp.typo")
    with pytest.raises(ValueError, match="mode='fisher'; choose one of true, empirical"):
        KFACConfig(mode="fisher")
    with pytest.raises(FileNotFoundError, match="memlens kfac collect"):
        Factors.load("nowhere.safetensors")
    assert len(spectrum_figure(spectra(basis)).data) == 2 * len(basis)
    assert len(mass_curve_figure(mass_curves(basis)).data) == len(basis)


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
