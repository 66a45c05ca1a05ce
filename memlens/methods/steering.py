"""Steer generation away from memorized text: statically, or per token gated by a probe.

At a site, memorized and clean predictions separate along a direction (the mean difference
of their states, or a probe's weight). Static steering subtracts ``alpha * vector`` at every
position; dynamic steering subtracts ``alpha * p * vector``, with ``p`` the probe's
memorization probability for that position, so clean text is left nearly alone.

A :class:`Steering` is that setup as data (site, vector, alpha, gate): it saves, loads and
applies in two lines.

Example:
    >>> steering = Steering.from_probe(Probe.load("probes/blocks.1.hook_resid_post"), handle,
    ...                                alpha=4.0, gated=True)
    >>> steering.save("steering/")
    >>> with Steering.load("steering/").apply(handle):
    ...     handle.model.generate(ids, max_new_tokens=32)      # recites less
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import Identity, read_artifact, write_artifact
from memlens.core.model import ModelHandle
from memlens.core.scoring import greedy_continuations
from memlens.core.sequences import Sequence
from memlens.core.sites import run_sites
from memlens.core.storage import atomic_dir, exclusive, prepare_output
from memlens.methods.interventions import add_vector
from memlens.methods.probes import Probe, ProbeConfig, fit_probe

__all__ = ["States", "Steering", "generate_side_by_side", "memorization_states",
           "recitation_side_by_side", "steer", "steering_vector"]


@dataclass
class States:
    """Activations at ``site`` of positions predicting labeled tokens: x [n, d], y [n]
    (1 = the predicted token is memorized), and the sequence id of each row."""

    site: str
    x: torch.Tensor
    y: torch.Tensor
    ids: list[str]
    identity: Identity | None = None

    def mean_difference(self) -> torch.Tensor:
        """Mean state before memorized tokens minus mean state before the others."""
        return self.x[self.y].mean(0) - self.x[~self.y].mean(0)

    def fit_probe(self, l2: float = 1e-3) -> Probe:
        """A class-balanced logistic probe on these states (``align="predicting"``)."""
        return fit_probe(self.site, self.x.numpy(), self.y.numpy().astype(np.int64),
                         ProbeConfig(l2=l2), self.identity)


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
        raise DataError(f"no token labeled {positive + negative} at position >= {start} "
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
    identity = Identity.make("probe", handle, [by_id[i] for i in ids],
                             {"site": site, "start": start, "positive": positive,
                              "negative": negative})
    return States(site, torch.cat(xs), torch.cat(ys), rows_id, identity)


def steering_vector(probe: Probe) -> torch.Tensor:
    """The probe's direction in activation space, scaled to the gap between the mean states
    of its two classes on its training tokens: ``alpha = 1`` moves a state by that gap."""
    if probe.class_gap <= 0:
        raise ConfigError(f"probe {probe.name!r} records no class gap; retrain it with "
                          "memlens probe train")
    return torch.as_tensor(probe.direction()) * probe.class_gap


@contextmanager
def steer(handle: ModelHandle, site: str, vector: torch.Tensor, alpha: float,
          probe: Probe | None = None) -> Iterator[None]:
    """Subtract ``alpha * vector`` at ``site``; with ``probe``, scaled per position by the
    probe's memorization probability there (dynamic steering)."""
    if probe is not None and probe.sites != [site]:
        raise ConfigError(f"the probe reads {probe.sites}, not {site!r}; steer at the probe's "
                          "site or pass probe=None for static steering")
    gate = None if probe is None else (lambda x: probe.score(x.float()))
    with add_vector(handle, site, -torch.as_tensor(vector).float(), alpha, gate=gate):
        yield


@dataclass
class Steering:
    """A steering setup as data: subtract ``alpha * vector`` at ``site``, gated per position
    by ``gate`` (a probe) or everywhere when ``gate`` is None."""

    site: str
    vector: torch.Tensor
    alpha: float
    gate: Probe | None
    identity: Identity

    @classmethod
    def from_probe(cls, probe: Probe, handle: ModelHandle, alpha: float, gated: bool = True
                   ) -> Steering:
        """Steer along ``probe``'s direction (:func:`steering_vector`) at its site; gated by
        the probe itself when ``gated``. Refuses a model the probe was not trained on."""
        if len(probe.sites) != 1:
            raise ConfigError(f"probe {probe.name!r} reads several sites; steer with a "
                              "single-site probe")
        probe.check_model(handle)
        identity = Identity.make("steering", handle, config={
            "site": probe.sites[0], "alpha": alpha, "gated": gated},
            corpus=probe.identity.get("corpus_hash"))
        identity = identity.with_changes(
            inputs={"probe": Identity.from_json(probe.identity, "the probe").digest})
        return cls(probe.sites[0], steering_vector(probe), alpha, probe if gated else None,
                   identity)

    def refit(self, handle: ModelHandle, sequences: list[Sequence],
              token_labels: pd.DataFrame) -> Steering:
        """The same site, alpha and gating on ``handle`` as it is now (e.g. after further
        training), with the probe fitted again on its states of ``sequences``
        (:func:`memorization_states`, labeled by ``token_labels``)."""
        probe = memorization_states(handle, self.site, sequences, token_labels).fit_probe()
        return Steering.from_probe(probe, handle, self.alpha, gated=self.gate is not None)

    @contextmanager
    def apply(self, handle: ModelHandle) -> Iterator[None]:
        """Steer while the block runs (hooks removed after, even on error)."""
        self.identity.check_model(handle, "the steering setup")
        with steer(handle, self.site, self.vector, self.alpha, self.gate):
            yield

    def save(self, out_dir: str | Path) -> Path:
        """``steering.json`` (site, alpha, identity), ``vector.safetensors`` and, when
        gated, the gate probe in ``gate/``."""
        out = prepare_output(out_dir, "steering", marker="steering.json", allowed=("gate",))
        with exclusive(out, "save steering"), atomic_dir(out) as tmp:
            save_file({"vector": self.vector.float().contiguous()}, tmp / "vector.safetensors")
            if self.gate is not None:
                self.gate.save(tmp / "gate")
            write_artifact(tmp, "steering.json", {"site": self.site, "alpha": self.alpha,
                                                  "gated": self.gate is not None},
                           self.identity, files=("vector.safetensors",))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        path = Path(path)
        meta, identity = read_artifact(path, "steering.json", "steering",
                                       "memlens steer --save DIR")
        gate = Probe.load(path / "gate") if meta["gated"] else None
        return cls(meta["site"], load_file(path / "vector.safetensors")["vector"],
                   float(meta["alpha"]), gate, identity)


def recitation_side_by_side(handle: ModelHandle, targets: list[list[int]], prefix: int,
                            steering) -> pd.DataFrame:
    """Greedy continuations of each target's first ``prefix`` tokens without and with
    ``steering`` (a context manager factory), checked token by token against the rest:
    columns prompt, plain, steered, truth (text), plain_exact, steered_exact."""
    prompts = [t[:prefix] for t in targets]
    n_new = max(len(t) - prefix for t in targets)
    truth = [t[prefix:] for t in targets]
    decode = handle.tokenizer.decode
    out = {"prompt": [decode(p, skip_special_tokens=True) for p in prompts]}
    for name, ctx in (("plain", nullcontext), ("steered", steering)):
        with ctx():
            gen = greedy_continuations(handle, prompts, n_new, batch_size=32)
        gen = [g[:len(t)] for g, t in zip(gen, truth, strict=True)]
        out[name] = [decode(g, skip_special_tokens=True) for g in gen]
        out[f"{name}_exact"] = [g == t for g, t in zip(gen, truth, strict=True)]
    out["truth"] = [decode(t, skip_special_tokens=True) for t in truth]
    return pd.DataFrame(out)[["prompt", "plain", "steered", "truth", "plain_exact",
                              "steered_exact"]]


def generate_side_by_side(handle: ModelHandle, prompts: list[str] | list[list[int]],
                          steering, max_new_tokens: int = 32) -> pd.DataFrame:
    """Greedy continuations of each prompt (text, or token ids) without and with
    ``steering`` (a context manager factory, e.g. ``lambda: steer(...)``): columns prompt,
    plain, steered (text)."""
    ids = [p if isinstance(p, list) else handle.tokenizer(p)["input_ids"] for p in prompts]
    prompts = [p if isinstance(p, str) else handle.tokenizer.decode(p, skip_special_tokens=True)
               for p in prompts]
    out = {}
    for name, ctx in (("plain", nullcontext), ("steered", steering)):
        with ctx():
            gen = greedy_continuations(handle, ids, max_new_tokens, batch_size=len(ids))
        out[name] = handle.tokenizer.batch_decode(gen, skip_special_tokens=True)
    return pd.DataFrame({"prompt": prompts, **out})
