"""K-FAC factors, eigenbasis and edits on random models."""

from dataclasses import replace

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from memlens import load_model
from memlens.core.modules import find_layers, linear_modules, linear_weight
from memlens.core.scoring import sample_labels
from memlens.methods.curvature import (
    Factors,
    KFACConfig,
    batch_seed,
    collect_factors,
    eigenbasis,
    kfac_edit,
    kfac_weights,
    mass_curves,
    memorization_gradient,
    spectra,
    svd_weights,
)
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
