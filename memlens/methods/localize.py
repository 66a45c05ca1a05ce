"""Localize memorized sequences in MLP neurons: score every neuron, rank, pick a budget.

A neuron is unit k of the input to a block's MLP output projection (``down_proj``,
``c_proj``, ``dense_4h_to_h``, ``fc2``). Methods, after Chang et al. (2024):

- ``activations``: mean |activation| on the target tokens minus that on clean tokens;
- ``zero_out``: rise of the target loss when the neuron alone is zeroed;
- ``integrated_gradients``: activation x path-integrated gradient of the target log-prob;
- ``attribution_patching``: activation x gradient of the target log-prob (Syed et al.,
  2023), the first-order estimate of ``zero_out`` for every neuron of every block from one
  backward pass per batch (the cheap choice on a large model);
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
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from memlens.core import distributed
from memlens.core.config import COUNT, INDEX, NONNEGATIVE, POSITIVE, Config, option
from memlens.core.errors import ConfigError, DataError
from memlens.core.identity import Identity, read_artifact, write_artifact
from memlens.core.model import ModelHandle
from memlens.core.modules import (
    flush_denormals,
    linear_modules,
    linear_weight,
    mlp_output_layers,
    neuron_sites,
    neuron_width,
    tracking_gradients,
)
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import batches, forward, predicts, sequence_logprob
from memlens.core.sites import run_sites
from memlens.core.storage import atomic_dir, exclusive, prepare_output
from memlens.methods.edits import WeightEdit
from memlens.methods.interventions import ablate, edit_site

__all__ = ["METHODS", "SUMMED", "LocalizeConfig", "NeuronAblation", "ablate_neurons",
           "check_budget", "find_neurons", "inject", "localize", "recall", "top_neurons"]

METHODS = ("activations", "zero_out", "integrated_gradients", "attribution_patching",
           "slimming", "hard_concrete")
# Scores that are sums over the targets: under torchrun each rank takes its share of the
# batches and the sums are all-reduced (the same scores as one process, to float rounding).
# The mask methods are optimisations: there each step averages the gradients of one batch
# per rank, so N ranks see N batches per step (a different run from one process).
SUMMED = ("activations", "zero_out", "integrated_gradients", "attribution_patching")


@dataclass
class LocalizeConfig(Config):
    """method: one of METHODS. start: score target tokens at index >= start (e.g. the suffix
    of a canary; 1 scores every token). steps: integration steps (IG) or optimisation steps
    (slimming, hard concrete); lr and penalty for the last two. blocks: score only these
    blocks' neurons (the others get NaN and are never selected); None scores every block."""

    method: str = option("hard_concrete", "how neurons are scored", choices=METHODS)
    start: int = option(32, "score target tokens from this index (the suffix)", COUNT)
    steps: int = option(200, "integration or optimisation steps", COUNT)
    lr: float = option(0.01, "learning rate of slimming and hard concrete", POSITIVE)
    penalty: float = option(300.0, "sparsity penalty of slimming and hard concrete",
                            NONNEGATIVE)
    batch_size: int = option(16, "sequences per pass", COUNT)
    seed: int = option(0, "seed", INDEX)
    blocks: tuple[int, ...] | None = option(None, "score only these blocks' neurons, e.g. "
                                            "the blocks a fine-tune changed (default: every "
                                            "block)", INDEX)

    def __post_init__(self):
        if self.blocks is not None:
            self.blocks = tuple(self.blocks)
        super().__post_init__()
        if self.method == "integrated_gradients" and self.steps > 64:
            self.steps = 16  # integration points, not optimisation steps


def _batches(handle: ModelHandle, seqs: list[list[int]], batch_size: int):
    for _, ids, mask in batches(handle, seqs, batch_size):
        yield ids, mask


def _target_logprob(handle: ModelHandle, ids, mask, start: int) -> torch.Tensor:
    """Summed log-prob of the tokens at index >= start, per sequence [batch]."""
    return sequence_logprob(forward(handle, ids, mask), ids, predicts(mask, start))


@contextmanager
def _scaled(handle: ModelHandle, sites: list[str], factors: list[torch.Tensor]) -> Iterator[None]:
    """Multiply the neurons at each site by a factor (a tensor broadcast over [..., d])."""
    with ExitStack() as stack:
        for site, f in zip(sites, factors, strict=True):
            stack.enter_context(edit_site(handle, site, lambda x, f=f: x * f.to(x.dtype)))
        yield


@torch.no_grad()
def _mean_abs(handle, sites, seqs, cfg, start) -> torch.Tensor:
    total, n = 0, 0
    for ids, mask in _batches(handle, seqs, cfg.batch_size):
        # The positions that predict scored tokens (the last position predicts nothing).
        keep = torch.cat([predicts(mask, start), torch.zeros_like(mask[:, :1], dtype=bool)], 1)
        acts = run_sites(handle, sites, ids, mask, backend="torch")
        total = total + torch.stack([acts[s][keep].abs().float().sum(0) for s in sites])
        n += int(keep.sum())
    if isinstance(total, int):  # this rank has no sequence
        total = torch.zeros(len(sites), neuron_width(handle.model), device=handle.device)
    return distributed.all_reduce_sum(total) / max(distributed.total(n), 1)


def _activations(handle, sites, targets, clean, cfg):
    score = _mean_abs(handle, sites, targets, cfg, cfg.start)
    if clean:
        score = score - _mean_abs(handle, sites, clean, cfg, cfg.start)
    return score


@torch.no_grad()
def _zero_out(handle, sites, targets, cfg, width):
    base = sum(_target_logprob(handle, i, m, cfg.start).sum()
               for i, m in _batches(handle, targets, cfg.batch_size))
    scores = torch.zeros(len(sites), width)
    for layer, site in enumerate(progress_bar(sites, desc="zero-out", unit="layer", leave=False)):
        for k in range(width):
            with ablate(handle, site, [k]):
                lp = sum(_target_logprob(handle, i, m, cfg.start).sum()
                         for i, m in _batches(handle, targets, cfg.batch_size))
            scores[layer, k] = float(base - lp)
    return scores


def _integrated_gradients(handle, sites, targets, cfg, width):
    scores = torch.zeros(len(sites), width)
    alphas = (torch.arange(cfg.steps) + 0.5) / cfg.steps  # midpoint rule on (0, 1]
    for layer, site in enumerate(progress_bar(sites, desc="integrated gradients", unit="layer",
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


def _attribution_patching(handle, sites, targets, cfg, width):
    scores = torch.zeros(len(sites), width)
    for ids, mask in _batches(handle, targets, cfg.batch_size):
        scale = [torch.ones(width, device=handle.device, requires_grad=True) for _ in sites]
        with torch.enable_grad(), _scaled(handle, sites, scale):
            lp = _target_logprob(handle, ids, mask, cfg.start).sum()
            grads = torch.autograd.grad(lp, scale)
        # d lp / d scale_k at 1 = sum_t a_k(t) * dlp/da_k(t): zeroing k costs about this much
        scores += torch.stack([g.detach().cpu() for g in grads])
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
    # Under torchrun, each step each rank takes the next batch in turn.
    size, rank = distributed.world_size(), distributed.rank()
    drive = torch.zeros_like(params)  # how hard the losses pushed each gate, summed
    with tracking_gradients(handle.model, []):
        for step in progress_bar(range(cfg.steps), desc=cfg.method, leave=False):
            ids, mask = batches[(step * size + rank) % len(batches)]
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
            if size > 1:  # data parallel: the mean gradient of the ranks' batches
                distributed.all_reduce_sum(params.grad).div_(size)
            drive -= params.grad
            opt.step()
    # Unclamped parameters rank the neurons (a clamped mask ties every dropped neuron at 0).
    # Adam moves every parameter the loss keeps pushing one way by about lr a step, so the
    # neurons a record needs end nearly tied; among near-equals, the summed push decides.
    tie_break = cfg.lr * drive / drive.abs().max().clamp_min(1e-30)  # at most one step
    return (params.detach() + tie_break).cpu()


def localize(handle: ModelHandle, targets: list[list[int]], clean: list[list[int]] | None = None,
             cfg: LocalizeConfig | None = None) -> torch.Tensor:
    """Score every MLP neuron for the target sequences: [n_layers, d_mlp], higher = more
    responsible. ``clean`` (token ids) is used by ``activations`` only."""
    cfg = cfg or LocalizeConfig()
    if not targets:
        raise DataError("localize needs at least one target sequence (token ids)")
    if not any(len(t) > cfg.start for t in targets):
        raise DataError(f"no target sequence has a token at index >= start {cfg.start}; "
                        "lower start or pass longer sequences")
    sites = neuron_sites(handle.model)
    width = neuron_width(handle.model)
    blocks = list(range(len(sites))) if cfg.blocks is None else list(cfg.blocks)
    if not blocks or not set(blocks) <= set(range(len(sites))):
        raise ConfigError(f"blocks {cfg.blocks} must name some of the model's blocks "
                          f"0..{len(sites) - 1}")
    handle.model.eval()
    chosen = [sites[i] for i in blocks]
    if cfg.method in SUMMED:  # under torchrun: each rank scores its batches; sums reduced
        targets = distributed.shard(targets, cfg.batch_size)
        clean = distributed.shard(clean, cfg.batch_size) if clean else clean
    if cfg.method == "activations":
        scores = _activations(handle, chosen, targets, clean, cfg).cpu()
    elif cfg.method == "zero_out":
        scores = _zero_out(handle, chosen, targets, cfg, width)
    elif cfg.method == "integrated_gradients":
        scores = _integrated_gradients(handle, chosen, targets, cfg, width)
    elif cfg.method == "attribution_patching":
        scores = _attribution_patching(handle, chosen, targets, cfg, width)
    else:
        scores = _train_masks(handle, chosen, targets, cfg, width,
                              hard=cfg.method == "hard_concrete")
    if cfg.method in ("zero_out", "integrated_gradients", "attribution_patching"):
        scores = distributed.all_reduce_sum(scores)
    if len(blocks) == len(sites):
        return scores
    full = torch.full((len(sites), width), float("nan"))
    full[blocks] = scores
    return full


def check_budget(budget: float) -> float:
    if not 0 < budget <= 1:
        raise ConfigError(f"budget is a fraction of each layer's neurons in (0, 1], got "
                          f"{budget}; e.g. 0.01 for 1%")
    return budget


def top_neurons(handle: ModelHandle, scores: torch.Tensor, budget: float) -> pd.DataFrame:
    """The ``ceil(budget * d_mlp)`` highest-scoring neurons of every scored layer (layers
    whose scores are all NaN were not scored), ranked overall: columns layer, site, neuron,
    score, rank."""
    check_budget(budget)
    sites = neuron_sites(handle.model)
    k = math.ceil(budget * scores.shape[1])
    rows = []
    for layer, site in enumerate(sites):
        if torch.isnan(scores[layer]).all():
            continue
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


@dataclass
class NeuronAblation:
    """Neurons to zero (a :func:`top_neurons` table), as an artifact: ``save`` writes
    ``neurons.parquet`` and ``ablation.json`` (with the identity of the model the neurons
    were found in), ``load`` reads them, ``apply`` ablates them while a block runs.

    Example:
        >>> with NeuronAblation.load("neurons/").apply(handle):
        ...     handle.model.generate(ids, max_new_tokens=32)
    """

    table: pd.DataFrame
    identity: Identity
    config: dict | None = None
    scores: torch.Tensor | None = None   # every neuron's score, [n_layers, d_mlp]

    @contextmanager
    def apply(self, handle: ModelHandle) -> Iterator[None]:
        """Zero the neurons while the block runs (refuses a model they were not found in)."""
        self.identity.check_model(handle, "the neuron ablation")
        with ablate_neurons(handle, self.table):
            yield

    def save(self, out_dir: str | Path) -> Path:
        out = prepare_output(out_dir, "ablation", marker="ablation.json")
        files = ("neurons.parquet",) + (("scores.safetensors",) if self.scores is not None
                                        else ())
        if distributed.is_main():  # under torchrun every rank holds the same ablation
            with exclusive(out, "save a neuron ablation"), atomic_dir(out) as tmp:
                self.table.to_parquet(tmp / "neurons.parquet", index=False)
                if self.scores is not None:
                    save_file({"scores": self.scores.float().contiguous()},
                              tmp / "scores.safetensors")
                write_artifact(tmp, "ablation.json", {"how": "zero",
                                                      "n_neurons": len(self.table),
                                                      "config": self.config}, self.identity,
                               files=files)
        distributed.barrier()
        return out

    @classmethod
    def load(cls, path: str | Path) -> NeuronAblation:
        path = Path(path)
        meta, identity = read_artifact(path, "ablation.json", "ablation",
                                       "memlens localize --out DIR")
        scores = (load_file(path / "scores.safetensors")["scores"]
                  if (path / "scores.safetensors").is_file() else None)
        return cls(pd.read_parquet(path / "neurons.parquet"), identity, meta.get("config"),
                   scores)


def find_neurons(handle: ModelHandle, targets: list[list[int]], clean: list[list[int]] | None,
                 cfg: LocalizeConfig, budget: float, inputs: dict | None = None
                 ) -> tuple[torch.Tensor, NeuronAblation]:
    """Score every neuron (:func:`localize`) and keep the top ``budget`` of each layer as a
    :class:`NeuronAblation`; returns the scores too."""
    check_budget(budget)
    scores = localize(handle, targets, clean, cfg)
    config = {**asdict(cfg), "budget": budget, "n_targets": len(targets)}
    identity = Identity.make("ablation", handle, targets, config, inputs)
    return scores, NeuronAblation(top_neurons(handle, scores, budget), identity, config, scores)


@flush_denormals()
def inject(handle: ModelHandle, seqs: list[list[int]], budget: float, steps: int = 300,
           lr: float = 0.01, seed: int = 0, clean: list[list[int]] | None = None,
           progress: bool = False, blocks: list[int] | None = None
           ) -> tuple[WeightEdit, pd.DataFrame]:
    """Ground truth for localization: teach the model ``seqs`` by training only the output
    rows of ``ceil(budget * d_mlp)`` random neurons per layer (of ``blocks`` only, if given).
    With ``clean`` sequences, their loss is kept low too, so the injection does not break
    the model.

    Returns the edit (``restore()`` undoes the injection) and the injected neurons as a
    table like :func:`top_neurons`.
    """
    gen = torch.Generator().manual_seed(seed)
    names = mlp_output_layers(handle.model)
    modules = linear_modules(handle.model)
    edit = WeightEdit(handle)
    rows, weights, masks = [], [], []
    for layer, name in enumerate(names):
        if blocks is not None and layer not in blocks:
            continue
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
        for step in progress_bar(range(steps), desc="inject", disable=not progress):
            with torch.enable_grad():
                target = -_target_logprob(handle, ids, mask, 1).sum() / int(predicts(mask).sum())
                loss = target
                if clean_batches:
                    c_ids, c_mask = clean_batches[step % len(clean_batches)]
                    loss = loss - _target_logprob(handle, c_ids, c_mask, 1).sum() / int(
                        predicts(c_mask).sum())
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
