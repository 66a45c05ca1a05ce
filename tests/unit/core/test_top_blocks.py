"""Training the top blocks from their saved input: the same logits and gradients as the
whole model, for a fraction of the cost."""

import pytest
import torch

from memlens.core.errors import ConfigError
from memlens.core.model import load_model
from memlens.core.modules import block_parameters, only_top_blocks
from memlens.core.scoring import forward, token_losses
from memlens.core.sites import block_input


def test_top_blocks_from_their_input_give_the_whole_models_logits_and_gradients(
        make_random_model, saved_tokenizer, tmp_path):
    handle = load_model(make_random_model("llama", saved_tokenizer, tmp_path, seed=3))
    model = handle.model
    ids, mask = handle.pad([[5, 9, 13, 200, 7, 31], [8, 2, 77]])  # right-padded
    top = list(block_parameters(model, [1]).values())

    def loss_and_grads(logits):
        loss, _, valid = token_losses(logits, ids, mask)
        grads = torch.autograd.grad(loss[valid].mean(), top)
        return loss[valid].mean().item(), grads

    full = forward(handle, ids, mask)
    entering = block_input(model, ids, mask, 1)
    with only_top_blocks(model, 1):
        cut = forward(handle, None, mask, inputs_embeds=entering)
    assert len(model.model.layers) == 2  # put back
    keep = mask.bool()
    torch.testing.assert_close(cut[keep], full[keep], atol=1e-5, rtol=1e-5)
    (a, ga), (b, gb) = loss_and_grads(full), loss_and_grads(cut)
    assert a == pytest.approx(b, abs=1e-6)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    assert entering.grad_fn is None  # the frozen part holds no graph


def test_models_that_add_position_embeddings_are_refused(make_random_model, saved_tokenizer,
                                                         tmp_path):
    model = load_model(make_random_model("gpt2", saved_tokenizer, tmp_path)).model
    with pytest.raises(ConfigError, match="position embeddings"):
        with only_top_blocks(model, 1):
            pass
