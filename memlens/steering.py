"""Steer generation away from memorized text: statically, or per token gated by a probe.

At a site, memorized and clean predictions separate along a direction (the mean difference
of their states, or a probe's weight). Static steering subtracts ``alpha * vector`` at every
position; dynamic steering subtracts ``alpha * p * vector``, with ``p`` the probe's
memorization probability for that position, so clean text is left nearly alone.

Example:
    >>> states = memorization_states(handle, "blocks.2.hook_resid_post", seqs, tokens)
    >>> probe = states.fit_probe()
    >>> with steer(handle, states.site, states.mean_difference(), alpha=1.0, probe=probe):
    ...     handle.model.generate(ids, max_new_tokens=32)      # recites less
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from memlens.capture import run_sites
from memlens.interventions import add_vector
from memlens.labels import Sequence
from memlens.models import ModelHandle
from memlens.probes import Probe, ProbeConfig, _best_threshold, _standardize, fit_sklearn


@dataclass
class States:
    """Activations at ``site`` of positions predicting labeled tokens: x [n, d], y [n]
    (1 = the predicted token is memorized), and the sequence id of each row."""

    site: str
    x: torch.Tensor
    y: torch.Tensor
    ids: list[str]

    def mean_difference(self) -> torch.Tensor:
        """Mean state before memorized tokens minus mean state before the others."""
        return self.x[self.y].mean(0) - self.x[~self.y].mean(0)

    def fit_probe(self, l2: float = 1e-3) -> Probe:
        """A class-balanced logistic probe on these states (``align="predicting"``)."""
        x, y = self.x.numpy(), self.y.numpy().astype(np.int64)
        mean, std = _standardize(x)
        w, b = fit_sklearn((x - mean) / std, y, ProbeConfig(l2=l2))
        probe = Probe([self.site], w, b, mean, std, 0.5, "predicting")
        probe.threshold = _best_threshold(y, probe.score(x))
        return probe


@torch.no_grad()
def memorization_states(handle: ModelHandle, site: str, sequences: list[Sequence],
                        token_labels: pd.DataFrame, start: int = 32,
                        positive: tuple[str, ...] = ("memorized",),
                        negative: tuple[str, ...] = ("generic", "not_memorized"),
                        batch_size: int = 32) -> States:
    """Gather states from a labels token table (``memlens label`` output) for tokens at
    index >= ``start``: the position before each token, the one that predicts it."""
    tok = token_labels[token_labels["label"].isin(positive + negative)
                       & (token_labels["position"] >= start)]
    by_id = {str(s.id): s for s in sequences}
    groups = {str(k): g for k, g in tok.groupby("id")}
    ids = [i for i in by_id if i in groups]
    if not ids:
        raise ValueError(f"no token labeled {positive + negative} at position >= {start} "
                         "belongs to these sequences; label them first (memlens label)")
    xs, ys, rows_id = [], [], []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        width = max(int(groups[c]["position"].max()) for c in chunk) + 1
        pad_ids, mask = handle.pad([by_id[c].token_ids[:width] for c in chunk], side="right")
        acts = run_sites(handle, [site], pad_ids, mask, backend="torch")[site]
        for b, c in enumerate(chunk):
            g = groups[c]
            xs.append(acts[b, torch.as_tensor(g["position"].to_numpy() - 1)].float().cpu())
            ys.append(torch.tensor(g["label"].isin(positive).to_numpy()))
            rows_id += [c] * len(g)
    return States(site, torch.cat(xs), torch.cat(ys), rows_id)


def probe_vector(probe: Probe) -> torch.Tensor:
    """The probe's direction in activation space, scaled to the spread of the states it was
    trained on (the norm of their per-dimension std), so ``alpha = 1`` is one typical spread."""
    return torch.as_tensor(probe.direction()) * float(np.linalg.norm(probe.std))


@contextmanager
def steer(handle: ModelHandle, site: str, vector: torch.Tensor, alpha: float,
          probe: Probe | None = None) -> Iterator[None]:
    """Subtract ``alpha * vector`` at ``site``; with ``probe``, scaled per position by the
    probe's memorization probability there (dynamic steering)."""
    if probe is not None and probe.sites != [site]:
        raise ValueError(f"the probe reads {probe.sites}, not {site!r}; steer at the probe's "
                         "site or pass probe=None for static steering")
    gate = None if probe is None else (lambda x: probe.score(x.float()))
    with add_vector(handle, site, -torch.as_tensor(vector).float(), alpha, gate=gate):
        yield


def generate_side_by_side(handle: ModelHandle, prompts: list[str], steering,
                          max_new_tokens: int = 32) -> pd.DataFrame:
    """Greedy continuations of each prompt without and with ``steering`` (a context
    manager factory, e.g. ``lambda: steer(...)``): columns prompt, plain, steered."""
    ids, mask = handle.tokenize(prompts, side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                  pad_token_id=handle.tokenizer.pad_token_id)
    out = {}
    for name, ctx in (("plain", nullcontext), ("steered", steering)):
        with ctx():
            gen = handle.model.generate(input_ids=ids, **kwargs)[:, ids.shape[1]:]
        out[name] = handle.tokenizer.batch_decode(gen, skip_special_tokens=True)
    return pd.DataFrame({"prompt": prompts, **out})
