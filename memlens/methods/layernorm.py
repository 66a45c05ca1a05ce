"""LayerNorm and memorization: parameter removal, gradient attribution, scale statistics.

"Removing" a normalization layer's parameters sets its gain to 1 and its bias to 0 and keeps
the normalization ``(x - mean) / std``. It is done post hoc on a trained model
(:class:`NormRemoval`, reversible) or from the start of training
(``train_organism(..., norm_free_layers=...)``, which calls :func:`freeze_norm_params`).
Everything here uses plain PyTorch hooks on the HF modules, so it runs on Post-LN decoders
that TransformerLens' bridge cannot wrap.

Example:
    >>> groups = layer_groups(handle.n_layers)              # {"early": [0, 1], ...}
    >>> with NormRemoval(groups["early"]).apply(handle):
    ...     print(edit_metrics(handle, members, heldout_ids, cfg))
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pandas as pd
import torch

from memlens.core.errors import ConfigError, DataError
from memlens.core.metrics import (
    ExtractionConfig,
    by_duplication,
    exact_extraction,
    heldout_metrics,
    loose_extraction,
)
from memlens.core.model import ModelHandle
from memlens.core.modules import identity_norm_params, norm_modules, tracking_gradients
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import forward
from memlens.core.sequences import Sequence, pii_field
from memlens.data.labels import LabelConfig, label
from memlens.data.splits import Splits
from memlens.methods.edits import ParameterEdit, WeightEdit

__all__ = ["GROUPS", "NormRemoval", "StudyData", "attribution_table", "attribution_targets",
           "condition_metrics", "field_vocabulary", "layer_groups", "memorized_pii_positions",
           "memorized_positions", "norm_attribution", "norm_placement", "recovery"]

GROUPS = ("early", "middle", "late")


def norm_placement(handle: ModelHandle) -> str:
    """Where the model normalizes: ``Post-LN`` (after each residual add: OPT with
    ``do_layer_norm_before=False``), else ``Pre-LN`` (``Pre-RMSNorm`` for RMSNorm)."""
    cfg = handle.config
    if cfg.model_type == "opt" and not getattr(cfg, "do_layer_norm_before", True):
        return "Post-LN"
    names = {type(m).__name__ for m in norm_modules(handle.model).values()}
    return "Pre-RMSNorm" if any("RMSNorm" in n for n in names) else "Pre-LN"


def layer_groups(n_layers: int) -> dict[str, list[int]]:
    """Blocks split into early, middle and late thirds (the first thirds get the remainder)."""
    if n_layers < 3:
        raise ConfigError(f"a model with {n_layers} blocks cannot be split into early, middle "
                         "and late thirds; use one with at least 3 blocks (preset 'tiny-deep')")
    chunks = torch.arange(n_layers).tensor_split(3)
    return {name: chunk.tolist() for name, chunk in zip(GROUPS, chunks, strict=True)}


@dataclass
class NormRemoval:
    """A removal: gain 1 and bias 0 for the norms of blocks ``layers`` while
    ``with NormRemoval(layers).apply(handle):`` runs (with ``strength`` < 1, that fraction of
    the way there); the trained parameters come back after."""

    layers: tuple[int, ...]
    strength: float = 1.0

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if not 0 < self.strength <= 1:
            raise ConfigError(f"strength {self.strength} must lie in (0, 1]: the fraction of "
                              "the way from the trained parameters to gain 1 and bias 0")

    def edit(self, handle: ModelHandle) -> ParameterEdit:
        """The new norm parameters, from ``handle``'s trained ones."""
        params = {}
        for path, module in norm_modules(handle.model, self.layers).items():
            for pname, value in identity_norm_params(module).items():
                trained = getattr(module, pname).detach()
                params[f"{path}.{pname}"] = trained + self.strength * (value - trained)
        return ParameterEdit(params=params)

    @contextmanager
    def apply(self, handle: ModelHandle) -> Iterator[WeightEdit]:
        with self.edit(handle).apply(handle) as edit:
            yield edit


# --------------------------------------------------------------------------- attribution


def _capture_inputs(modules: dict[str, torch.nn.Module], store: dict[str, torch.Tensor]):
    def make(name):
        def hook(mod, args):
            store[name] = args[0]
        return hook
    return [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]


def _scale(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The divisor a LayerNorm (centred) or RMSNorm (not centred) applies to ``x``."""
    x = x.float()
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))
    spread = x.pow(2).mean() if "rms" in type(module).__name__.lower() else x.var(unbiased=False)
    return (spread + eps).sqrt()


def norm_attribution(handle: ModelHandle, token_ids: list[list[int]],
                     targets: list[list[int]], progress: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Per target token and per block normalization layer: the gradient norm at its input and
    its scale.

    ``targets[i]`` lists positions ``t`` of sequence ``i``; each stands for the prediction of
    token ``t`` (made at position ``t - 1``). Returns ``grad_norm`` and ``scale``, each
    [n_targets, n_norms] in the order of :func:`norm_modules`, with ``names`` and
    ``output_grad_norm`` [n_targets]:

    - grad_norm: ``||d loss_t / d x||`` with ``x`` the layer's input at every position, one
      backward pass per token (the loss of one token, not a sum that mixes tokens);
    - output_grad_norm: ``||d loss_t / d logits||``, the error the token sends back (small for
      tokens predicted with confidence), to compare layers per unit of error;
    - scale: ``sqrt(var(x) + eps)`` at position ``t - 1``, the divisor the layer applies
      (TransformerLens' ``hook_scale``).
    """
    modules = norm_modules(handle.model)
    names = list(modules)
    grads, scales, errors = [], [], []
    store: dict[str, torch.Tensor] = {}
    hooks = _capture_inputs(modules, store)
    try:
        with tracking_gradients(handle.model, params=[]):
            for ids_list, positions in progress_bar(list(zip(token_ids, targets, strict=True)),
                                                    desc="LayerNorm attribution", unit="seq",
                                                    disable=not progress):
                if not positions:
                    continue
                ids = torch.tensor([ids_list], device=handle.device)
                embeds = handle.model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = forward(handle, None, inputs_embeds=embeds)[0].float()
                inputs = [store[n] for n in names]
                # OPT's MLP norm sees [batch * pos, d]: view every input as [pos, d].
                flat = [x.detach().reshape(len(ids_list), -1) for x in inputs]
                logp = logits.log_softmax(-1)
                for t in positions:
                    loss = -logp[t - 1, ids_list[t]]
                    g = torch.autograd.grad(loss, inputs, retain_graph=True)
                    grads.append(torch.stack([x.float().norm() for x in g]))
                    # d loss / d logits = softmax - onehot: the error the token sends back.
                    err = logp[t - 1].detach().exp()
                    err[ids_list[t]] -= 1
                    errors.append(err.norm())
                    scales.append(torch.stack([_scale(modules[n], x[t - 1])
                                               for n, x in zip(names, flat, strict=True)]))
                store.clear()
    finally:
        for h in hooks:
            h.remove()
    if not grads:
        raise DataError("no target positions given; pass at least one position >= 1")
    return {"names": names, "grad_norm": torch.stack(grads), "scale": torch.stack(scales),
            "output_grad_norm": torch.stack(errors)}


# --------------------------------------------------------------------------- recovery


def field_vocabulary(seqs: list[Sequence]) -> dict[str, set[int]]:
    """Per PII field, every token id seen inside that field's values in ``seqs``.

    Built from records other than the memorized ones, it is the set of plausible generic
    tokens for a field: what a model that learned the format but not the record may say.
    """
    vocab: dict[str, set[int]] = {}
    for seq in seqs:
        _require_spans(seq)
        for pos, tok in enumerate(seq.token_ids):
            fld = pii_field(seq, pos)
            if fld is not None:
                vocab.setdefault(fld, set()).add(tok)
    return vocab


def _require_spans(seq: Sequence) -> None:
    if seq.spans is None or seq.offsets is None:
        raise DataError(f"sequence {seq.id!r} has no PII spans or token offsets; read it "
                         "with read_sequences from an organism's corpus.jsonl (it needs text "
                         "and spans)")


def memorized_positions(tokens: pd.DataFrame, seqs: list[Sequence]) -> list[list[int]]:
    """Per sequence, the positions of the tokens a labels table marks ``memorized`` (PII
    tokens the model reproduces, in sequences it extracts exactly)."""
    hits = tokens[tokens["label"] == "memorized"].groupby(
        tokens["id"].astype(str))["position"].apply(list)
    return [sorted(int(p) for p in hits.get(str(s.id), [])) for s in seqs]


def memorized_pii_positions(handle: ModelHandle, seqs: list[Sequence],
                            cfg: LabelConfig | None = None) -> list[list[int]]:
    """:func:`memorized_positions` of ``seqs``, labeled here (teacher forcing only)."""
    cfg = replace(cfg or LabelConfig(), generate=False)
    return memorized_positions(label(handle, seqs, cfg, progress=False).tokens, seqs)


@torch.no_grad()
def recovery(handle: ModelHandle, seqs: list[Sequence], positions: list[list[int]],
             vocab: dict[str, set[int]]) -> dict[str, float]:
    """Where memorized PII tokens go under the current weights (teacher forcing).

    Each position of ``positions`` (memorized PII tokens, e.g. from the unedited model via
    :func:`memorized_pii_positions`) is, by the model's top-1 prediction now:

    - ``kept``: still the memorized token;
    - ``recovered``: another token of the same field's generic vocabulary (``vocab``, from
      :func:`field_vocabulary` on records the model saw once): it fell back to a plausible
      value of the right kind, the analogue of predicting the true label;
    - ``lost``: anything else.

    Returns the three shares (they sum to 1), ``memorized_loss`` (mean -log p of the memorized
    tokens: memorization as a continuous measure) and ``n``.
    """
    counts = {"kept": 0, "recovered": 0, "lost": 0}
    loss = 0.0
    for seq, pos in zip(seqs, positions, strict=True):
        if not pos:
            continue
        _require_spans(seq)
        ids = torch.tensor([seq.token_ids[:max(pos) + 1]], device=handle.device)
        logp = forward(handle, ids)[0].float().log_softmax(-1)
        top = logp.argmax(-1).tolist()
        for t in pos:
            pred, gold = top[t - 1], seq.token_ids[t]
            loss -= logp[t - 1, gold].item()
            fld = pii_field(seq, t)
            key = ("kept" if pred == gold else
                   "recovered" if pred in vocab.get(fld, ()) else "lost")
            counts[key] += 1
    n = sum(counts.values())
    if n == 0:
        raise DataError("no memorized PII positions given; the model recites no PII token "
                         "of these sequences")
    return {**{k: v / n for k, v in counts.items()}, "memorized_loss": loss / n, "n": n}


# --------------------------------------------------------------------------- the study


@dataclass
class StudyData:
    """What each condition is scored on: an organism's canaries (memorization), held-out
    records (learning) and the generic PII vocabulary of its once-seen records (recovery)."""

    canaries: list[Sequence]
    heldout: list[Sequence]
    vocab: dict[str, set[int]]

    @classmethod
    def from_splits(cls, splits: Splits) -> StudyData:
        """Every canary, every non-member, and the vocabulary of the once-seen records."""
        return cls(splits.canaries, splits.nonmembers, field_vocabulary(splits.general))


def condition_metrics(handle: ModelHandle, data: StudyData, pii_positions: list[list[int]],
                      cfg: ExtractionConfig | None = None, min_duplication: int = 10) -> dict:
    """Memorization, learning and recovery of the model as it is now.

    - ``exact_extraction_rate`` / ``loose_extraction_rate``: over canaries repeated at least
      ``min_duplication`` times (and ``*_by_duplication``);
    - ``heldout_loss`` / ``heldout_accuracy``: next-token loss and accuracy on the template
      (non-PII) tokens of held-out records: the format the model learned, not memorized;
    - ``recovery``: :func:`recovery` of ``pii_positions`` (memorized by the reference model).
    """
    cfg = cfg or ExtractionConfig()
    dups = [s.duplication for s in data.canaries]
    out = {}
    for kind, fn in (("exact", exact_extraction), ("loose", loose_extraction)):
        hits = fn(handle, data.canaries, cfg)
        often = [h for h, d in zip(hits, dups, strict=True) if d >= min_duplication]
        out[f"{kind}_extraction_rate"] = sum(often) / len(often)
        out[f"{kind}_by_duplication"] = by_duplication(dups, hits)
    learn = heldout_metrics(handle, data.heldout)
    out.update(heldout_loss=learn["heldout_template_loss"],
               heldout_accuracy=learn["heldout_template_accuracy"],
               heldout_all_loss=learn["heldout_all_loss"],
               recovery=recovery(handle, data.canaries, pii_positions, data.vocab))
    return out


def attribution_targets(data: StudyData, pii_positions: list[list[int]],
                        cfg: LabelConfig | None = None, n: int = 300, seed: int = 0
                        ) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Token sets for :func:`norm_attribution`: ``memorized`` (memorized PII tokens of the
    canaries) and ``clean`` (template tokens of held-out records in the same suffix window;
    every token there for records without PII spans),
    ``n`` of each drawn at random; each as (token ids, target positions) per sequence."""
    cfg = cfg or LabelConfig()
    memorized = [(i, t) for i, pos in enumerate(pii_positions) for t in pos]
    clean = [(i, t) for i, seq in enumerate(data.heldout)
             for t in range(cfg.prefix, min(len(seq.token_ids), cfg.prefix + cfg.suffix))
             if seq.spans is None or pii_field(seq, t) is None]
    rng = random.Random(seed)
    sets = {}
    for kind, pairs, seqs in (("memorized", memorized, data.canaries),
                              ("clean", clean, data.heldout)):
        by_seq: dict[int, list[int]] = {}
        for i, t in sorted(rng.sample(pairs, min(n, len(pairs)))):
            by_seq.setdefault(i, []).append(t)
        sets[kind] = ([seqs[i].token_ids for i in by_seq], list(by_seq.values()))
    return sets


def attribution_table(memorized: dict, clean: dict) -> list[dict]:
    """One row per normalization layer from two :func:`norm_attribution` results: mean gradient
    norm and scale over memorized vs clean tokens, and their ratios (memorized / clean).

    ``grad_per_error_ratio`` compares the gradient per unit of output error
    (``grad_norm / output_grad_norm``): how strongly each kind of token's prediction hangs on
    the layer, with the difference in loss taken out.
    """
    rows = []
    for j, name in enumerate(memorized["names"]):
        gm, gc = memorized["grad_norm"][:, j], clean["grad_norm"][:, j]
        um = gm / memorized["output_grad_norm"].clamp_min(1e-12)
        uc = gc / clean["output_grad_norm"].clamp_min(1e-12)
        sm, sc = memorized["scale"][:, j], clean["scale"][:, j]
        parts = name.split(".")
        layer = next(int(p) for p in parts if p.isdigit())
        rows.append(dict(
            module=name, layer=layer, norm=parts[-1],
            grad_memorized=gm.mean().item(), grad_clean=gc.mean().item(),
            grad_ratio=(gm.mean() / gc.mean()).item(),
            grad_per_error_ratio=(um.mean() / uc.mean()).item(),
            scale_memorized=sm.mean().item(), scale_memorized_std=sm.std().item(),
            scale_clean=sc.mean().item(), scale_clean_std=sc.std().item(),
            scale_ratio=(sm.mean() / sc.mean()).item(),
            n_memorized=len(gm), n_clean=len(gc)))
    return rows
