"""Capture on random models: padded batches record what unpadded runs do."""

import pytest
import torch

from memlens.core.model import load_model
from memlens.core.sites import resolve_sites, run_sites


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_padded_batches_match_unpadded_sequences(arch, random_models):
    handle = load_model(random_models[arch])
    sites = resolve_sites(handle, ["blocks.*.hook_resid_post", "blocks.1.mlp.hook_post"])
    texts = ["Biography. Ann Lee was born on May 1, 1990.", "Phone 555-123-4567.", "Hi"]
    alone = []
    for t in texts:
        ids, mask = handle.tokenize(t)
        alone.append(run_sites(handle, sites, ids, mask))
    for side in ("left", "right"):
        ids, mask = handle.tokenize(texts, side=side)
        batch = run_sites(handle, sites, ids, mask)
        for row in range(len(texts)):
            valid = mask[row].bool()
            for s in sites:
                # Documented tolerance: 1e-5 absolute (fp32 reductions over padded rows).
                torch.testing.assert_close(batch[s][row, valid], alone[row][s][0],
                                           atol=1e-5, rtol=1e-5)
