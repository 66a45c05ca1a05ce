"""The logit lens as probe features: how each layer's residual stream, read through the
model's own final norm and unembedding, already predicts the token the model will predict.

A memorized value is recalled where the memory is: its prediction forms late, in the blocks
that hold it, while a value the model can infer (the rest of a word, a common domain) is
predicted early. The model's final confidence cannot tell the two apart; the layer-by-layer
trajectory can. Per token and per residual site (the state at the predicting position):
the lens's log-prob of the model's final prediction, its max log-prob, its entropy, and
whether its top token is that prediction.

Example:
    >>> data = ProbeData.from_store(store, labels)
    >>> data = data.with_features(LENS, lens_features(handle, data))
    >>> probe_sweep(data, combos={"lens+confidence": [LENS, CONFIDENCE]})
"""

from __future__ import annotations

import numpy as np
import torch

from memlens.core.errors import ConfigError
from memlens.core.model import ModelHandle
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import logit_lens
from memlens.methods.probes.data import ProbeData

__all__ = ["LENS", "LENS_COLUMNS", "lens_features", "residual_sites"]

LENS = "lens"  # pseudo-site
LENS_COLUMNS = ("logprob_of_prediction", "max_logprob", "entropy", "agrees")


def residual_sites(sites: list[str]) -> list[str]:
    """The residual-stream sites (``blocks.N.hook_resid_post``) among ``sites``, by block."""
    resid = [s for s in sites if s.startswith("blocks.") and s.endswith(".hook_resid_post")]
    return sorted(resid, key=lambda s: int(s.split(".")[1]))


def lens_features(handle: ModelHandle, data: ProbeData, chunk: int = 2048,
                  progress: bool = True) -> np.ndarray:
    """[tokens, 4 x residual sites] float32: :data:`LENS_COLUMNS` per captured residual
    site, in block order, for every token of ``data`` (read at the predicting position)."""
    if data.config.align != "predicting":
        raise ConfigError("lens features read the state that predicts the token; use "
                          "align='predicting'")
    sites = residual_sites(list(getattr(data.features, "sites", data.features)))
    if not sites:
        raise ConfigError("lens features need captured residual streams "
                          "(blocks.*.hook_resid_post)")
    n = len(data.tokens)
    prediction = torch.tensor(data.tokens["argmax_id"].to_numpy(), dtype=torch.long)
    out = np.zeros((n, len(sites), len(LENS_COLUMNS)), dtype=np.float32)
    for j, site in enumerate(progress_bar(sites, desc="logit lens", unit="site",
                                          disable=not progress)):
        for start in range(0, n, chunk):
            index = np.arange(start, min(start + chunk, n))
            x = torch.from_numpy(np.asarray(data.features.rows(site, index), np.float32))
            lp = logit_lens(handle, x).cpu()
            pred = prediction[index]
            out[index, j] = torch.stack([
                lp.gather(1, pred[:, None])[:, 0], lp.max(-1).values,
                -(lp.exp() * lp).sum(-1), (lp.argmax(-1) == pred).float()], 1).numpy()
    return out.reshape(n, -1)
