"""The logit lens: the model's final norm and unembedding on a residual-stream state; on
the last block's output it is the model's own next-token distribution."""

import pytest
import torch

from memlens.core.model import load_model
from memlens.core.modules import final_norm
from memlens.core.scoring import forward, logit_lens
from memlens.core.sites import run_sites


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "opt"])
def test_the_lens_on_the_last_block_is_the_models_distribution(arch, make_random_model,
                                                                saved_tokenizer, tmp_path):
    handle = load_model(make_random_model(arch, saved_tokenizer, tmp_path, seed=1))
    ids, mask = handle.pad([[5, 9, 13, 200, 7, 31], [8, 2, 77]])
    last = f"blocks.{handle.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        resid = run_sites(handle, [last], ids, mask, backend="torch")[last]
        want = forward(handle, ids, mask).float().log_softmax(-1)
    keep = mask.bool()
    torch.testing.assert_close(logit_lens(handle, resid)[keep], want[keep], atol=1e-4,
                               rtol=1e-4)
    assert final_norm(handle.model) is not None
    # An earlier block's state gives another distribution.
    first = run_sites(handle, ["blocks.0.hook_resid_post"], ids, mask, backend="torch")
    assert not torch.allclose(logit_lens(handle, first["blocks.0.hook_resid_post"])[keep],
                              want[keep], atol=1e-3)
