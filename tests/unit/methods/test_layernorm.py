"""Norm removal and attribution on random OPT models (Pre-LN and Post-LN)."""

from dataclasses import replace

import pytest
import torch

from memlens import load_model
from memlens.core.errors import ModelLoadError
from memlens.core.modules import norm_modules
from memlens.core.sequences import PiiSpan, Sequence
from memlens.data.organism import PRESETS, model_config
from memlens.methods.layernorm import (
    NormRemoval,
    layer_groups,
    norm_attribution,
    recovery,
)

THREE_BLOCKS = replace(PRESETS["tiny"], n_layers=3)


def _opt_handle(arch, tokenizer, tmp_path, seed=0):
    """A random 3-block OPT with LayerNorm parameters moved away from 1 and 0."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, THREE_BLOCKS, tokenizer))
    with torch.no_grad():
        for m in norm_modules(model).values():
            m.weight.normal_(1.0, 0.3)
            m.bias.normal_(0.0, 0.3)
    out = tmp_path / arch
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return load_model(out)


def test_layer_groups_are_thirds():
    assert layer_groups(6) == {"early": [0, 1], "middle": [2, 3], "late": [4, 5]}
    assert layer_groups(7) == {"early": [0, 1, 2], "middle": [3, 4], "late": [5, 6]}
    with pytest.raises(ValueError, match="tiny-deep"):
        layer_groups(2)


@pytest.mark.parametrize("arch", ["opt", "opt-postln"])
def test_norm_removal_is_exact_and_reversible(arch, saved_tokenizer, tmp_path):
    handle = _opt_handle(arch, saved_tokenizer, tmp_path)
    norms = norm_modules(handle.model, [1])
    assert sorted(n.rsplit(".", 1)[1] for n in norms) == ["final_layer_norm",
                                                          "self_attn_layer_norm"]
    assert all(".layers.1." in n for n in norms)
    ids = torch.tensor([[0, 5, 9, 13, 2, 7]])
    before = handle.model(ids).logits
    state = {k: v.clone() for k, v in handle.model.state_dict().items()}
    with NormRemoval([1]).apply(handle) as edit:
        for m in norms.values():
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
        assert len(edit.edited) == 4
        assert (handle.model(ids).logits - before).abs().max() > 1e-3
    assert all(torch.equal(v, state[k]) for k, v in handle.model.state_dict().items())
    assert torch.equal(handle.model(ids).logits, before)
    with pytest.raises(ValueError, match="blocks 0..2"):
        NormRemoval([3]).edit(handle)
    with torch.no_grad():  # trained-looking parameters, then a quarter of the way removed
        for m in norms.values():
            m.weight.mul_(3.0)
            m.bias.add_(0.4)
    trained = {n: (m.weight.clone(), m.bias.clone()) for n, m in norms.items()}
    with NormRemoval([1], strength=0.25).apply(handle):
        for n, m in norms.items():
            w, b = trained[n]
            torch.testing.assert_close(m.weight, w + 0.25 * (1 - w))
            torch.testing.assert_close(m.bias, 0.75 * b)
    assert all(torch.equal(m.weight, trained[n][0]) for n, m in norms.items())
    with pytest.raises(ValueError, match="strength 0 must lie in"):
        NormRemoval([1], strength=0)


def test_post_ln_final_norm_is_in_the_last_block(saved_tokenizer, tmp_path):
    # Post-LN OPT has no decoder-level final norm; Pre-LN has one, outside every block.
    pre = _opt_handle("opt", saved_tokenizer, tmp_path)
    post = _opt_handle("opt-postln", saved_tokenizer, tmp_path)
    assert pre.model.model.decoder.final_layer_norm is not None
    assert post.model.model.decoder.final_layer_norm is None
    assert len(norm_modules(pre.model)) == len(norm_modules(post.model)) == 6


@pytest.mark.parametrize("arch", ["opt", "opt-postln"])
def test_attribution_matches_autograd_per_token(arch, saved_tokenizer, tmp_path):
    handle = _opt_handle(arch, saved_tokenizer, tmp_path)
    ids = [0, 11, 4, 9, 30, 6, 2, 17]
    got = norm_attribution(handle, [ids], [[3, 6]])
    names = got["names"]
    assert got["grad_norm"].shape == got["scale"].shape == (2, len(names))

    store = {}
    modules = norm_modules(handle.model)
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, n=n: store.__setitem__(n, args[0])) for n, m in modules.items()]
    try:
        for row, t in enumerate([3, 6]):
            handle.model.zero_grad()
            with torch.enable_grad():
                logits = handle.model(torch.tensor([ids])).logits[0]
                for x in store.values():
                    x.retain_grad()
                loss = torch.nn.functional.cross_entropy(logits[t - 1:t], torch.tensor([ids[t]]))
                loss.backward()
            for j, n in enumerate(names):
                assert torch.allclose(got["grad_norm"][row, j], store[n].grad.norm(), rtol=1e-4)
                x = store[n].detach().reshape(len(ids), -1)[t - 1]
                expected = (x.var(unbiased=False) + modules[n].eps).sqrt()
                assert torch.allclose(got["scale"][row, j], expected, rtol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_scale_is_transformer_lens_hook_scale_on_pre_ln(saved_tokenizer, tmp_path):
    handle = _opt_handle("opt", saved_tokenizer, tmp_path)
    ids = [0, 11, 4, 9, 30, 6]
    got = norm_attribution(handle, [ids], [list(range(1, len(ids)))])
    _, cache = handle.bridge.run_with_cache(torch.tensor([ids]))
    for j, name in enumerate(got["names"]):
        layer = int(name.split(".")[-2])
        ln = "ln1" if name.endswith("self_attn_layer_norm") else "ln2"
        scale = cache[f"blocks.{layer}.{ln}.hook_scale"].reshape(-1)[:-1]  # OPT: ln2 is 2-D
        assert torch.allclose(got["scale"][:, j], scale, rtol=1e-4)


def test_bridge_refuses_post_ln_with_a_pointer_to_nnsight(saved_tokenizer, tmp_path):
    handle = _opt_handle("opt-postln", saved_tokenizer, tmp_path)
    with pytest.raises(ModelLoadError, match="nnsight"):
        handle.bridge  # noqa: B018
    with handle.nnsight.trace(torch.tensor([[0, 5, 9]])):
        out = handle.nnsight.model.decoder.layers[0].final_layer_norm.output.save()
    assert out.shape == (1, 3, THREE_BLOCKS.d_model)


def test_recovery_sorts_each_position(saved_tokenizer, tmp_path):
    handle = _opt_handle("opt-postln", saved_tokenizer, tmp_path)
    ids = [0, 11, 4, 9, 30, 6, 2, 17]

    @torch.no_grad()
    def logp():
        return handle.model(torch.tensor([ids])).logits[0].log_softmax(-1)

    ids[3] = logp()[2].argmax().item()            # position 3: predicted (kept)
    ids[5] = (logp()[4].argmax().item() + 1) % 500  # 5: predicts a phone token (recovered)
    ids[6] = (logp()[5].argmax().item() + 1) % 500  # 6: predicts something else (lost)
    final = logp()
    vocab = {"phone": {final[4].argmax().item()}}
    seq = Sequence("s", ids, "abcdefgh", 100, [PiiSpan("phone", 0, 8)],
                   [(i, i + 1) for i in range(len(ids))])
    got = recovery(handle, [seq], [[3, 5, 6]], vocab)
    loss = -sum(final[t - 1, ids[t]].item() for t in (3, 5, 6)) / 3
    assert got.pop("memorized_loss") == pytest.approx(loss, rel=1e-5)
    assert got == {"kept": 1 / 3, "recovered": 1 / 3, "lost": 1 / 3, "n": 3}
    with pytest.raises(ValueError, match="no memorized PII"):
        recovery(handle, [seq], [[]], vocab)
    with pytest.raises(ValueError, match="read_sequences"):
        recovery(handle, [Sequence("t", ids)], [[3]], vocab)
