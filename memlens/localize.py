"""Localize memorized sequences in MLP neurons: score every neuron, rank, pick a budget.

A neuron is unit k of the input to a block's MLP output projection (``down_proj``,
``c_proj``, ``dense_4h_to_h``, ``fc2``). Methods, after Chang et al. (2024):

- ``activations``: mean |activation| on the target tokens minus that on clean tokens;
- ``zero_out``: rise of the target loss when the neuron alone is zeroed;
- ``integrated_gradients``: activation x path-integrated gradient of the target log-prob;
- ``slimming``: a mask per neuron, initialised at 1, trained to keep the target loss low
  under an L1 penalty; neurons the target still needs keep a high mask;
- ``hard_concrete``: the same with stochastic hard-concrete gates and an L0 penalty.

Example:
    >>> scores = localize(handle, targets, clean, LocalizeConfig(method="hard_concrete"))
    >>> top = top_neurons(scores, budget=0.01)     # ranked table, budget per layer
    >>> with ablate_neurons(handle, top):
    ...     edit_metrics(handle, canaries, heldout)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from memlens.edits import (
    WeightEdit,
    linear_modules,
    linear_weight,
    mlp_output_layers,
    tracking_gradients,
)
from memlens.interventions import ablate, edit_site
from memlens.models import ModelHandle

METHODS = ("activations", "zero_out", "integrated_gradients", "slimming", "hard_concrete")


@dataclass
class LocalizeConfig:
    """method: one of METHODS. start: score target tokens at index >= start (e.g. the suffix
    of a canary; 1 scores every token). steps: integration steps (IG) or optimisation steps
    (slimming, hard concrete); lr and penalty for the last two."""

    method: str = "hard_concrete"
    start: int = 1
    steps: int = 200
    lr: float = 0.01
    penalty: float = 300.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"localization method {self.method!r} is not one of {METHODS}")
        if self.method == "integrated_gradients" and self.steps > 64:
            self.steps = 16  # integration points, not optimisation steps


def neuron_sites(handle: ModelHandle) -> list[str]:
    """One site per block: the input of the MLP output projection."""
    return [f"{name}:input" for name in mlp_output_layers(handle.model)]


def _batches(handle: ModelHandle, seqs: list[list[int]], batch_size: int):
    for i in range(0, len(seqs), batch_size):
        yield handle.pad(seqs[i:i + batch_size], side="right")


def _target_logprob(handle: ModelHandle, ids, mask, start: int) -> torch.Tensor:
    """Summed log-prob of the tokens at index >= start, per sequence [batch]."""
    logits = handle.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = mask[:, 1:].bool()
    keep[:, :max(start - 1, 0)] = False
    return (lp * keep).sum(-1)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero while the block runs. Optimizer states of tiny masked
    gradients go denormal, and CPU arithmetic on denormals is 10x+ slower."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def _scaled(handle: ModelHandle, sites: list[str], factors: list[torch.Tensor]) -> Iterator[None]:
    """Multiply the neurons at each site by a factor (a tensor broadcast over [..., d])."""
    with ExitStack() as stack:
        for site, f in zip(sites, factors, strict=True):
            stack.enter_context(edit_site(handle, site, lambda x, f=f: x * f.to(x.dtype)))
        yield


@torch.no_grad()
def _mean_abs(handle, sites, seqs, cfg, start) -> torch.Tensor:
    from memlens.capture import run_sites

    total, n = 0, 0
    for ids, mask in _batches(handle, seqs, cfg.batch_size):
        # The positions that predict scored tokens: a next token exists, index >= start.
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[:, :-1] = mask[:, 1:].bool() & mask[:, :-1].bool()
        keep[:, :max(start - 1, 0)] = False
        acts = run_sites(handle, sites, ids, mask, backend="torch")
        total = total + torch.stack([acts[s][keep].abs().float().sum(0) for s in sites])
        n += int(keep.sum())
    return total / max(n, 1)


def _activations(handle, sites, targets, clean, cfg):
    score = _mean_abs(handle, sites, targets, cfg, cfg.start)
    if clean:
        score = score - _mean_abs(handle, sites, clean, cfg, cfg.start)
    return score


@torch.no_grad()
def _zero_out(handle, sites, targets, cfg, width):
    base = torch.cat([_target_logprob(handle, i, m, cfg.start)
                      for i, m in _batches(handle, targets, cfg.batch_size)]).sum()
    scores = torch.zeros(len(sites), width)
    for layer, site in enumerate(tqdm(sites, desc="zero-out", unit="layer", leave=False)):
        for k in range(width):
            with ablate(handle, site, [k]):
                lp = sum(_target_logprob(handle, i, m, cfg.start).sum()
                         for i, m in _batches(handle, targets, cfg.batch_size))
            scores[layer, k] = float(base - lp)
    return scores


def _integrated_gradients(handle, sites, targets, cfg, width):
    scores = torch.zeros(len(sites), width)
    alphas = (torch.arange(cfg.steps) + 0.5) / cfg.steps  # midpoint rule on (0, 1]
    for layer, site in enumerate(tqdm(sites, desc="integrated gradients", unit="layer",
                                      leave=False)):
        for ids, mask in _batches(handle, targets, cfg.batch_size):
            for alpha in alphas:
                scale = torch.full((width,), float(alpha), device=handle.device,
                                   requires_grad=True)
                with torch.enable_grad(), _scaled(handle, [site], [scale]):
                    lp = _target_logprob(handle, ids, mask, cfg.start).sum()
                    (grad,) = torch.autograd.grad(lp, scale)
                # d lp / d scale_k = sum_t a_k(t) * dlp/d(alpha a_k(t)): IG summand
                scores[layer] += grad.detach().cpu() / cfg.steps
    return scores


@flush_denormals()
def _train_masks(handle, sites, targets, cfg, width, hard: bool):
    """Slimming (hard=False) or hard-concrete gates (hard=True): keep the target loss low
    with as few neurons as possible; returns each neuron's kept mass in [0, 1]."""
    torch.manual_seed(cfg.seed)
    dev = handle.device
    left, right, beta = -0.1, 1.1, 2 / 3
    init = 1.0 if not hard else 3.0  # hard concrete: log-alpha, gates start nearly open
    params = torch.full((len(sites), width), init, device=dev, requires_grad=True)
    opt = torch.optim.Adam([params], lr=cfg.lr)
    batches = list(_batches(handle, targets, cfg.batch_size))
    n_tokens = sum(int(m[:, max(cfg.start, 1):].sum()) for _, m in batches)
    with tracking_gradients(handle.model, []):
        for step in tqdm(range(cfg.steps), desc=cfg.method, leave=False):
            ids, mask = batches[step % len(batches)]
            if hard:
                u = torch.rand_like(params).clamp(1e-4, 1 - 1e-4)
                s = torch.sigmoid((u.log() - (-u).log1p() + params) / beta)
                gates = (s * (right - left) + left).clamp(0, 1)
                penalty = torch.sigmoid(params - beta * math.log(-left / right)).mean()
            else:
                gates = params.clamp(0, 1)
                penalty = params.abs().mean()
            with torch.enable_grad(), _scaled(handle, sites, list(gates)):
                loss = -_target_logprob(handle, ids, mask, cfg.start).sum() * len(batches)
                loss = loss / max(n_tokens, 1) + cfg.penalty * penalty
                opt.zero_grad()
                loss.backward()
            opt.step()
    # Unclamped parameters rank the neurons (a clamped mask ties every dropped neuron at 0).
    return params.detach().cpu()


def localize(handle: ModelHandle, targets: list[list[int]], clean: list[list[int]] | None = None,
             cfg: LocalizeConfig | None = None) -> torch.Tensor:
    """Score every MLP neuron for the target sequences: [n_layers, d_mlp], higher = more
    responsible. ``clean`` (token ids) is used by ``activations`` only."""
    cfg = cfg or LocalizeConfig()
    if not targets:
        raise ValueError("localize needs at least one target sequence (token ids)")
    sites = neuron_sites(handle)
    module = linear_modules(handle.model)[sites[0].split(":")[0]]
    width = linear_weight(module).shape[1] - (module.bias is not None)
    handle.model.eval()
    if cfg.method == "activations":
        return _activations(handle, sites, targets, clean, cfg).cpu()
    if cfg.method == "zero_out":
        return _zero_out(handle, sites, targets, cfg, width)
    if cfg.method == "integrated_gradients":
        return _integrated_gradients(handle, sites, targets, cfg, width)
    return _train_masks(handle, sites, targets, cfg, width, hard=cfg.method == "hard_concrete")


def top_neurons(handle: ModelHandle, scores: torch.Tensor, budget: float) -> pd.DataFrame:
    """The ``ceil(budget * d_mlp)`` highest-scoring neurons of every layer, ranked overall:
    columns layer, site, neuron, score, rank."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget is a fraction of each layer's neurons in (0, 1], got {budget}")
    sites = neuron_sites(handle)
    k = math.ceil(budget * scores.shape[1])
    rows = []
    for layer, site in enumerate(sites):
        vals, idx = scores[layer].topk(k)
        rows += [dict(layer=layer, site=site, neuron=int(i), score=float(v))
                 for v, i in zip(vals, idx, strict=True)]
    table = pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True)
    table["rank"] = range(1, len(table) + 1)
    return table


@contextmanager
def ablate_neurons(handle: ModelHandle, table: pd.DataFrame, how: str = "zero",
                   reference: list[list[int]] | None = None) -> Iterator[None]:
    """Ablate every neuron in a :func:`top_neurons` table while the block runs."""
    with ExitStack() as stack:
        for site, group in table.groupby("site"):
            stack.enter_context(ablate(handle, site, group["neuron"].tolist(), how, reference))
        yield


@flush_denormals()
def inject(handle: ModelHandle, seqs: list[list[int]], budget: float, steps: int = 300,
           lr: float = 0.01, seed: int = 0, clean: list[list[int]] | None = None,
           progress: bool = False) -> tuple[WeightEdit, pd.DataFrame]:
    """Ground truth for localization: teach the model ``seqs`` by training only the output
    rows of ``ceil(budget * d_mlp)`` random neurons per layer. With ``clean`` sequences, their
    loss is kept low too, so the injection does not break the model.

    Returns the edit (``restore()`` undoes the injection) and the injected neurons as a
    table like :func:`top_neurons`.
    """
    gen = torch.Generator().manual_seed(seed)
    names = mlp_output_layers(handle.model)
    modules = linear_modules(handle.model)
    edit = WeightEdit(handle)
    rows, weights, masks = [], [], []
    for layer, name in enumerate(names):
        m = modules[name]
        width = linear_weight(m).shape[1] - (m.bias is not None)
        chosen = torch.randperm(width, generator=gen)[:math.ceil(budget * width)]
        rows += [dict(layer=layer, site=f"{name}:input", neuron=int(k)) for k in chosen]
        edit.set(f"{name}.weight", m.weight.detach())  # remember the original
        mask = torch.zeros_like(m.weight)
        if isinstance(m, Conv1D):  # [in, out]: a neuron's output row is a row
            mask[chosen] = 1
        else:
            mask[:, chosen] = 1
        weights.append(m.weight)
        masks.append(mask)
    opt = torch.optim.Adam(weights, lr=lr)
    ids, mask = handle.pad(seqs, side="right")
    clean_batches = list(_batches(handle, clean, 16)) if clean else []
    with tracking_gradients(handle.model, weights):
        for step in tqdm(range(steps), desc="inject", disable=not progress):
            with torch.enable_grad():
                target = -_target_logprob(handle, ids, mask, 1).sum() / int(mask[:, 1:].sum())
                loss = target
                if clean_batches:
                    c_ids, c_mask = clean_batches[step % len(clean_batches)]
                    loss = loss - _target_logprob(handle, c_ids, c_mask, 1).sum() / int(
                        c_mask[:, 1:].sum())
                opt.zero_grad()
                loss.backward()
            for w, m in zip(weights, masks, strict=True):
                w.grad *= m
            opt.step()
            if target.item() < 0.01:
                break
    for w in weights:
        w.grad = None
    handle.reset_views()
    return edit, pd.DataFrame(rows)


def recall(found: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Fraction of the ``truth`` neurons (layer, neuron) that ``found`` contains."""
    key = ["layer", "neuron"]
    hits = truth[key].merge(found[key].drop_duplicates(), on=key, how="inner")
    return len(hits) / max(len(truth), 1)
