"""Does a removal forget, or only hide? Attacks on a model with memorized text removed.

A removal is anything whose ``apply(handle)`` context changes what the model recites (a
:class:`~memlens.methods.edits.Removal`): a weight edit (a K-FAC edit, a balanced subnet), a
norm removal, a steering setup, a neuron ablation; or a saved edit directory, audited as a
model of its own.
:func:`audit` scores it on the forget set right after the removal and under the attacks
that undo hiding in the literature:

- weight quantization (INT8 per output channel, INT4 group-wise; round to nearest with
  torchao's affine quantization primitives), applied on top of the removal;
- relearning: fine-tuning steps on data disjoint from the forget set (other memorized
  records, generic text), never the forget set itself;
- perturbed prompts: corrupted prefix tokens at the start and near the end of the prefix,
  shorter and longer prefixes, and the loss over a neighbourhood of prefix-perturbed
  copies in the spirit of REMIND;
- membership inference (loss, Min-K%, Min-K%++, zlib AUROC) of the forget set vs held-out
  non-members, and the memorization probe's mean score on the forget set's suffixes.

Each extraction is scored exactly, loosely and by VerbMem (MUSE's ROUGE-L of the greedy
continuation).

Compare the result with the same audit of a model never trained on the forget set
(``organism_path(..., withheld=ids)``): a removal that forgets looks like it.

Example:
    >>> data = AuditData(forget, relearn, nonmembers, heldout)
    >>> report = audit(handle, ParameterEdit(weights), data, AuditConfig(relearn_steps=(10, 50)))
    >>> report["int4"]["exact"], report["relearn"]["50"]["exact"]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from memlens.core.config import COUNT, INDEX, POSITIVE, Config, option
from memlens.core.errors import ConfigError, DataError
from memlens.core.metrics import (
    ExtractionConfig,
    auroc_ci,
    bootstrap_ci,
    continuations,
    exact_extraction,
    loose_distances,
    perplexity,
    sequence_losses,
    verbmem,
)
from memlens.core.model import ModelHandle
from memlens.core.modules import linear_modules
from memlens.core.progress import progress as progress_bar
from memlens.core.scoring import batch_losses, batches, exact_matches
from memlens.core.sequences import Sequence
from memlens.methods.edits import Removal, WeightEdit
from memlens.methods.unlearn import UnlearnConfig, restorable, unlearn

__all__ = ["AuditConfig", "AuditData", "audit", "extraction", "fine_tune", "mean_losses",
           "membership", "neighbourhood_loss", "perturbed_extraction", "perturbed_prompts",
           "probe_fits", "probe_score", "quantized", "quantized_weights"]



@dataclass
class AuditConfig(Config):
    """bits: weight quantizations to try (8: per output channel; 4: groups of
    ``group_size`` input columns). relearn_steps: fine-tuning steps after which the forget
    set is scored (one run, scored on the way); relearn_blocks: the blocks the attacker
    trains (None: every weight). corrupt: prefix tokens replaced in each
    perturbation; shift: tokens removed from / added to the prefix. neighbours: perturbed
    copies per sequence for the neighbourhood loss."""

    bits: tuple[int, ...] = option((8, 4), "weight quantizations (8: per channel, 4: "
                                   "group-wise)", COUNT, choices=(8, 4))
    group_size: int = option(32, "INT4 group size", COUNT)
    relearn_steps: tuple[int, ...] = option((10, 50, 200), "score after these relearning "
                                            "steps", COUNT)
    relearn_lr: float = option(1e-3, "relearning learning rate", POSITIVE)
    relearn_batch_size: int = option(8, "relearning batch size", COUNT)
    relearn_blocks: tuple[int, ...] | None = option(None, "the attacker trains only these "
                                                    "blocks, e.g. the blocks a fine-tune "
                                                    "changed (default: every weight)", INDEX)
    corrupt: int = option(2, "prefix tokens replaced in each perturbed prompt", INDEX)
    shift: int = option(8, "tokens removed from / added to the prefix", INDEX)
    neighbours: int = option(8, "perturbed copies per sequence for the neighbourhood loss",
                             COUNT)
    seed: int = option(0, "seed", INDEX)

    def __post_init__(self):
        self.bits, self.relearn_steps = tuple(self.bits), tuple(sorted(self.relearn_steps))
        if self.relearn_blocks is not None:
            self.relearn_blocks = tuple(self.relearn_blocks)
        super().__post_init__()


@dataclass
class AuditData:
    """forget: the removed sequences. relearn: token ids the attacker fine-tunes on
    (disjoint from ``forget``). nonmembers: sequences never trained on, for membership
    inference (none: the audit leaves membership inference out). heldout: clean token ids,
    for perplexity."""

    forget: list[Sequence]
    relearn: list[list[int]]
    nonmembers: list[Sequence]
    heldout: list[list[int]]

    def __post_init__(self):
        if not self.forget or not self.heldout:
            raise DataError("an audit needs forget and heldout sequences")
        forgotten = {tuple(s.token_ids) for s in self.forget}
        leaked = sum(tuple(ids) in forgotten for ids in self.relearn)
        if leaked:
            raise DataError(f"{leaked} relearning sequences are in the forget set; relearning "
                            "must use other data, or it measures memorizing again")


def quantized_weights(handle: ModelHandle, bits: int, group_size: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """Every linear layer's weight rounded to ``bits``-bit symmetric integers and back
    (weight-only, round to nearest): per output channel, or per ``group_size`` input columns.
    Embeddings and a tied output layer are left alone, as weight-only quantizers do."""
    MappingType, choose_qparams_affine, dequantize_affine, quantize_affine = _torchao()

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = {}
    for name, module in linear_modules(handle.model).items():
        w = module.weight.detach().float()
        if w.data_ptr() == handle.model.get_input_embeddings().weight.data_ptr():
            continue
        block = (1, group_size if group_size and w.shape[1] % group_size == 0 else w.shape[1])
        scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8,
                                            quant_min=lo, quant_max=hi)
        q = quantize_affine(w, block, scale, zero, torch.int8, lo, hi)
        out[f"{name}.weight"] = dequantize_affine(q, block, scale, zero, torch.int8, lo, hi,
                                                  output_dtype=module.weight.dtype)
    return out


def _torchao():
    """torchao's affine quantization primitives."""
    from torchao.quantization import quant_primitives as qp

    return qp.MappingType, qp.choose_qparams_affine, qp.dequantize_affine, qp.quantize_affine


@contextlib.contextmanager
def quantized(handle: ModelHandle, bits: int, group_size: int | None = None):
    """The model with :func:`quantized_weights` while the block runs."""
    with WeightEdit(handle) as edit:
        for name, value in quantized_weights(handle, bits, group_size).items():
            edit.set(name, value)
        yield edit


def fine_tune(handle: ModelHandle, token_ids: list[list[int]], steps: int, lr: float,
              batch_size: int = 8, ascent: bool = False, seed: int = 0,
              every: Callable[[int], None] | None = None, progress: bool = False,
              match: list[list[int]] | None = None, refresh: int = 10,
              anchor: list[list[int]] | None = None,
              blocks: list[int] | None = None) -> None:
    """``steps`` AdamW steps on ``token_ids`` (cycled), in place: learning them (the
    relearning attack), or with ``ascent`` unlearning them by gradient ascent, or with
    ``match`` (held-out text the model never saw) and ``anchor`` (text to hold) by
    loss-matched forgetting (see :mod:`memlens.methods.unlearn`). ``every(step)`` runs
    after each step; ``blocks`` trains only those blocks (and the final norm). Wrap in
    :func:`restorable` to undo.

    Example (forget ``forget_ids`` as if never trained on them):
        >>> with restorable(handle):
        ...     fine_tune(handle, forget_ids, 150, 3e-4, match=nonmember_ids,
        ...               anchor=general_ids)
    """
    if not token_ids:
        raise DataError("fine_tune needs at least one sequence")
    if ascent and match is not None:
        raise ConfigError("fine_tune: give ascent=True or match=..., not both")
    method = "ga" if ascent else "matched" if match is not None else "finetune"
    cfg = UnlearnConfig(method=method, lr=lr, batch_size=batch_size, refresh=refresh,
                        blocks=None if blocks is None else tuple(blocks), seed=seed)
    unlearn(handle, token_ids, anchor or [], cfg, steps, unseen=match, every=every,
            progress=progress)


def extraction(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
               loose: bool = True) -> dict:
    """Exact extraction rate of ``seqs`` and, with ``loose`` (one greedy generation), the
    loose rate and VerbMem (mean ROUGE-L F1 of the continuation, MUSE's verbatim
    memorization); each with a 95% bootstrap interval over the records (``exact_ci``...)."""
    values = {"exact": exact_extraction(handle, seqs, cfg)}
    if loose:
        gens = continuations(handle, seqs, cfg)
        values["loose"] = [1 - d >= cfg.loose_threshold
                           for d in loose_distances(handle, seqs, cfg, gens=gens)]
        values["verbmem"] = verbmem(handle, seqs, cfg, gens)
    out = {}
    for kind, v in values.items():
        out[kind], out[f"{kind}_ci"] = float(np.mean(v)), list(bootstrap_ci(v))
    return out


def _corrupted(ids: list[int], where: range, vocab: int, gen: torch.Generator) -> list[int]:
    out = list(ids)
    for i in where:
        out[i] = int(torch.randint(vocab, (1,), generator=gen))
    return out


def perturbed_prompts(seqs: list[Sequence], cfg: ExtractionConfig, vocab: int,
                      bos: bool, corrupt: int = 2, shift: int = 8, seed: int = 0
                      ) -> dict[str, tuple[list[list[int]], int]]:
    """The perturbed windows and their prefix length, by perturbation: ``corrupt`` random
    prefix tokens at the start (after a BOS when ``bos``) or at the end of the prefix; the
    prefix ``shift`` tokens shorter (its first tokens dropped, the same suffix); and the
    prefix ``shift`` tokens longer, the suffix moving on by ``shift`` (the window grows to
    prefix + shift + suffix tokens, as far as the sequence goes)."""
    p, s = cfg.prefix, cfg.suffix
    if p <= shift + corrupt + 1:
        raise ConfigError(f"prefix {p} is too short to drop {shift} tokens and corrupt {corrupt}")
    gen = torch.Generator().manual_seed(seed)
    windows = [q.token_ids[:p + s] for q in seqs]
    first = 1 if bos else 0
    return {
        "corrupt_start": ([_corrupted(w, range(first, first + corrupt), vocab, gen)
                           for w in windows], p),
        "corrupt_end": ([_corrupted(w, range(p - corrupt, p), vocab, gen) for w in windows], p),
        "shorter_prefix": ([w[:first] + w[first + shift:] for w in windows], p - shift),
        "longer_prefix": ([q.token_ids[:p + shift + s] for q in seqs], p + shift),
    }


def perturbed_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
                         corrupt: int = 2, shift: int = 8, seed: int = 0) -> dict:
    """Exact extraction of ``seqs`` under each of :func:`perturbed_prompts`' perturbations."""
    variants = perturbed_prompts(seqs, cfg, len(handle.tokenizer),
                                 handle.tokenizer.bos_token_id is not None, corrupt, shift, seed)
    return {name: float(np.mean(exact_matches(handle, ids, prefix, cfg.batch_size)))
            for name, (ids, prefix) in variants.items()}


def mean_losses(handle: ModelHandle, token_ids: list[list[int]], start: int = 1,
                batch_size: int = 32) -> np.ndarray:
    """Per sequence: mean next-token loss from token ``start`` on (``start=1``: all of it)."""
    out = []
    for loss, keep in batch_losses(handle, token_ids, batch_size):
        keep[:, :start - 1] = False
        out.extend(((loss * keep).sum(1) / keep.sum(1).clamp(min=1)).tolist())
    return np.array(out)


def neighbourhood_loss(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
                       neighbours: int = 8, corrupt: int = 2, seed: int = 0) -> np.ndarray:
    """Per sequence: mean suffix loss over ``neighbours`` copies with ``corrupt`` random
    prefix tokens changed. Text a model still holds keeps a low loss across the whole
    neighbourhood, even where a removal only breaks the exact prompt (REMIND's signal)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(handle.tokenizer)
    near = []
    for q in seqs:
        w = q.token_ids[:cfg.prefix + cfg.suffix]
        for _ in range(neighbours):
            where = torch.randperm(cfg.prefix - 1, generator=gen)[:corrupt] + 1
            near.append(_corrupted(w, where.tolist(), vocab, gen))
    return mean_losses(handle, near, cfg.prefix, cfg.batch_size).reshape(len(seqs), -1).mean(1)


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def membership(handle: ModelHandle, forget: list[Sequence], nonmembers: list[Sequence],
               cfg: ExtractionConfig, neighbours: int = 8) -> dict:
    """AUROC of forget set vs non-members by each membership attack of ``memlens label``
    (loss, Min-K%, Min-K%++, zlib) and by the neighbourhood loss
    (:func:`neighbourhood_loss`); ``ci``: their 95% intervals; ``scores``: each attack's
    score per forget record and per non-member, in order (higher: more likely a member), for
    comparing two models on the same records (PrivLeak)."""
    from memlens.data.labels import LabelConfig, label, membership_scores

    lc = LabelConfig(prefix=cfg.prefix, suffix=cfg.suffix, generate=False)
    result = label(handle, forget + nonmembers, lc, progress=False)
    if len(result.sequences) != len(forget) + len(nonmembers):
        raise DataError(f"membership inference needs every forget record and non-member "
                        f"longer than the {cfg.prefix}-token prefix; "
                        f"{len(forget) + len(nonmembers) - len(result.sequences)} are not")
    summary = result.summary
    out = dict(summary["membership_auroc"])
    near = np.r_[-neighbourhood_loss(handle, forget, cfg, neighbours),
                 -neighbourhood_loss(handle, nonmembers, cfg, neighbours)]
    y = [1] * len(forget) + [0] * len(nonmembers)
    out["neighbourhood"] = _auroc(near[:len(forget)], near[len(forget):])
    out["ci"] = dict(summary["membership_auroc_ci"], neighbourhood=list(auroc_ci(y, near)))
    scores = {k: v.tolist() for k, v in membership_scores(result.sequences).items()}
    scores["neighbourhood"] = near.tolist()
    n = len(forget)
    out["scores"] = {k: {"forget": v[:n], "nonmembers": v[n:]} for k, v in scores.items()}
    return out


@torch.no_grad()
def probe_score(handle: ModelHandle, probe, seqs: list[Sequence], cfg: ExtractionConfig
                ) -> float:
    """The probe's mean memorization probability on the states predicting the suffixes,
    read before any edit on the probe's own site (steering there) changes them: under
    steering it says what the model still computes, not what the steering hands on."""
    from memlens.core.sites import run_sites

    site = probe.sites[0]
    scores = []
    for chunk, ids, mask in batches(handle, [q.token_ids[:cfg.prefix + cfg.suffix]
                                             for q in seqs], cfg.batch_size):
        acts = run_sites(handle, [site], ids, mask, backend="torch",
                         before_edits=True)[site].float()
        for b, toks in enumerate(chunk):
            states = acts[b, cfg.prefix - 1:len(toks) - 1].cpu().numpy()
            scores.extend(np.asarray(probe.score(states)).tolist())
    return float(np.mean(scores))


def probe_fits(probe, handle: ModelHandle) -> bool:
    """Whether ``probe`` was fitted on this model's activations (its identity names these
    weights; a probe with no recorded model is taken at its word)."""
    fitted_on = (probe.identity or {}).get("model_hash")
    return fitted_on is None or fitted_on == handle.weights_hash()


def audit(handle: ModelHandle, removal: Removal | None, data: AuditData,
          config: AuditConfig | None = None, extraction_config: ExtractionConfig | None = None,
          probe=None, refit: Callable[[], Removal] | None = None, progress: bool = True
          ) -> dict:
    """Score ``removal`` (a :class:`~memlens.methods.edits.Removal`; None: the model as it
    is) on ``data.forget`` right after it and under every attack of the config.

    Returns ``after_edit``, ``int8`` / ``int4``, ``relearn`` (by steps), each with ``exact``,
    ``loose``, ``verbmem``, ``perplexity`` and ``heldout_losses`` (per held-out sequence:
    loss sum and tokens, for paired intervals); ``perturbed`` (exact rate per
    perturbation); ``mia_auroc``; ``probe_score`` (with a probe fitted on this model; None
    for another model's probe); the model comes back unchanged.

    ``refit``, for a removal fitted to the model's states (a steering gate), builds a new
    one on the model as it is then: after the last relearning step the stale removal is taken
    off and the refitted one scored (``relearn_refit``), so hidden memory and a gate that no
    longer fires are told apart. Only for removals that leave the weights alone (hooks).
    """
    cfg = config or AuditConfig()
    ec = extraction_config or ExtractionConfig()

    def scored(loose: bool = True) -> dict:
        losses = sequence_losses(handle, data.heldout, ec.batch_size)
        return {**extraction(handle, data.forget, ec, loose),
                "perplexity": perplexity(handle, data.heldout, losses=losses),
                "heldout_losses": [list(x) for x in losses]}

    stages = ["after_edit", *[f"int{b}" for b in cfg.bits], "relearn", "perturbed", "mia"]
    bar = progress_bar(total=len(stages), desc="audit", unit="attack", disable=not progress)
    out: dict = {}
    # Checked on the model as given: a weight edit below changes its hash, not its stream.
    fits = probe is not None and probe_fits(probe, handle)
    plain = handle.weights_hash() if refit is not None else None
    with bar, contextlib.ExitStack() as applied:
        if removal is not None:
            applied.enter_context(removal.apply(handle))
        if refit is not None and handle.weights_hash() != plain:
            raise ConfigError("refit is for removals that leave the weights alone (steering, "
                              "ablation hooks); this removal changed them")
        out["after_edit"] = scored()
        bar.update()
        for bits in cfg.bits:
            with quantized(handle, bits, None if bits == 8 else cfg.group_size):
                out[f"int{bits}"] = scored()
            bar.update()
        out["perturbed"] = perturbed_extraction(handle, data.forget, ec, cfg.corrupt,
                                                cfg.shift, cfg.seed)
        bar.update()
        out["mia_auroc"] = (membership(handle, data.forget, data.nonmembers, ec, cfg.neighbours)
                            if data.nonmembers else None)
        if fits:
            out["probe_score"] = probe_score(handle, probe, data.forget, ec)
            out["probe_score_nonmembers"] = (probe_score(handle, probe, data.nonmembers, ec)
                                             if data.nonmembers else None)
        elif probe is not None:  # another model's residual stream: its score means nothing
            out["probe_score"] = out["probe_score_nonmembers"] = None
        bar.update()
        relearn: dict = {}

        def score_relearned(step: int) -> None:
            if step in cfg.relearn_steps:
                relearn[str(step)] = scored()

        with restorable(handle):  # the attacker fine-tunes the model with the removal on
            fine_tune(handle, data.relearn, max(cfg.relearn_steps), cfg.relearn_lr,
                      cfg.relearn_batch_size, seed=cfg.seed, every=score_relearned,
                      blocks=cfg.relearn_blocks)
            if refit is not None:
                applied.close()  # the stale hooks off; the relearned weights stay
                with refit().apply(handle):
                    out["relearn_refit"] = {str(max(cfg.relearn_steps)): scored()}
        out["relearn"] = relearn
        bar.update()
    return out
