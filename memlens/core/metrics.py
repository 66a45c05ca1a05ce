"""What every result is judged by: extraction by duplication, perplexity, held-out loss,
and the unlearning literature's terms: VerbMem (ROUGE-L of the greedy continuation) and
PrivLeak (membership AUROC against a model never trained on the forget set), as MUSE
defines them.

By-duplication tables follow the one rule of :mod:`memlens.core.sequences`: keys are the
counts (``"0"`` for non-members) and ``"unknown"``.

Example:
    >>> m = edit_metrics(handle, canaries, heldout_ids, ExtractionConfig(prefix=32, suffix=32))
    >>> m.exact["100"], m.perplexity
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch
from rapidfuzz.distance import LCSseq, Levenshtein

from memlens.core.config import COUNT, FRACTION, Config, option
from memlens.core.errors import DataError
from memlens.core.model import ModelHandle
from memlens.core.scoring import (
    batch_losses,
    batches,
    exact_matches,
    forward,
    greedy_continuations,
    token_losses,
)
from memlens.core.sequences import Sequence, duplication_key, pii_token_mask, sort_keys

__all__ = ["Extraction", "ExtractionConfig", "auroc_ci", "bootstrap_ci", "by_duplication",
           "continuations", "counts_by_duplication", "edit_metrics", "exact_extraction",
           "heldout_metrics", "loose_distances", "loose_extraction", "n_for_p", "perplexity",
           "perplexity_change_ci", "privleak", "privleak_ci", "rouge_l", "rouge_words",
           "sequence_losses", "verbmem"]


@dataclass
class ExtractionConfig(Config):
    """How recitation is tested: greedy decoding from a ``prefix``-token prompt against the
    next ``suffix`` tokens. ``loose_threshold``: a continuation is a loose match when
    1 - normalized token Levenshtein distance reaches it."""

    prefix: int = option(32, "prefix tokens (the prompt)", COUNT)
    suffix: int = option(32, "suffix tokens (what greedy decoding must reproduce)", COUNT)
    loose_threshold: float = option(0.75, "loose-match similarity (1 - normalized token "
                                    "edit distance)", FRACTION)
    batch_size: int = option(32, "sequences per forward pass", COUNT)


@dataclass
class Extraction:
    """Extraction rates by duplication count (keys ``"0"`` for non-members, ``"1"``, ...,
    ``"unknown"``), and the clean perplexity beside them: what labels report and what a
    removal is judged by. Written to JSON (summaries, caches) by :meth:`to_json`."""

    exact: dict[str, float]
    loose: dict[str, float] | None = None
    perplexity: float | None = None

    KEYS: ClassVar[dict[str, str]] = {"exact": "exact_extraction_rate_by_duplication",
                                      "loose": "loose_extraction_rate_by_duplication"}

    def to_json(self) -> dict:
        out = {self.KEYS["exact"]: self.exact}
        if self.loose is not None:
            out[self.KEYS["loose"]] = self.loose
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        return out

    @classmethod
    def from_json(cls, data: dict) -> Extraction:
        """From :meth:`to_json`'s dict, or any summary holding its keys (a labels summary)."""
        return cls(data[cls.KEYS["exact"]], data.get(cls.KEYS["loose"]), data.get("perplexity"))


def by_duplication(duplications: list[int | None], values: list[float],
                   reduce=statistics.fmean) -> dict[str, float]:
    """``reduce`` (the mean; e.g. ``statistics.median``) of ``values`` per duplication key
    (``"0"``, ``"1"``, ..., ``"unknown"``)."""
    groups: dict[str, list[float]] = {}
    for d, v in zip(duplications, values, strict=True):
        groups.setdefault(duplication_key(d), []).append(float(v))
    return {k: float(reduce(groups[k])) for k in sort_keys(groups)}


def bootstrap_ci(values: list[float], n: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per record,
    resampled with replacement): the uncertainty a rate over few records carries."""
    if not values:
        raise DataError("a bootstrap interval needs at least one value")
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n, len(x)), generator=gen)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                dtype=torch.float64)).tolist()
    return lo, hi


def _pair_aucs(pos: torch.Tensor, neg: torch.Tensor, ip: torch.Tensor, iq: torch.Tensor
               ) -> torch.Tensor:
    """Mann-Whitney AUROC per bootstrap draw (rows of the index tensors ``ip`` into ``pos``,
    ``iq`` into ``neg``): the share of (positive, negative) pairs ordered right, ties half;
    100 draws at a time."""
    p, q = pos[ip], neg[iq]
    return torch.cat([((d > 0).double() + 0.5 * (d == 0).double()).mean((1, 2)) for d in (
        p[i:i + 100, :, None] - q[i:i + 100, None, :] for i in range(0, len(ip), 100))])


def _quantiles(x: torch.Tensor, level: float) -> tuple[float, float]:
    lo, hi = torch.quantile(x, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                            dtype=torch.float64)).tolist()
    return lo, hi


def _draws(n_pos: int, n_neg: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrap draws of positives and negatives, each class resampled at its own size."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(n_pos, (n, n_pos), generator=gen),
            torch.randint(n_neg, (n, n_neg), generator=gen))


def auroc_ci(y: list[int], score: list[float], n: int = 2000, level: float = 0.95,
             seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC of ``score`` for labels ``y`` (1 =
    positive), positives and negatives resampled separately (each draw keeps both classes
    at their sizes), so a few forget records against a few non-members show their spread."""
    y = torch.tensor([int(v) for v in y])
    x = torch.tensor([float(v) for v in score], dtype=torch.float64)
    pos, neg = x[y == 1], x[y == 0]
    if not len(pos) or not len(neg):
        raise DataError("an AUROC interval needs positives and negatives")
    return _quantiles(_pair_aucs(pos, neg, *_draws(len(pos), len(neg), n, seed)), level)


def privleak(auroc: float, auroc_retrain: float) -> float | None:
    """MUSE's PrivLeak (Shi et al. 2024), in percent: how far a membership attack's AUROC on
    the forget set against held-out non-members sits from that of the model retrained
    without the forget set. Both arguments are membership AUROCs with the forget set as the
    positives (1.0: every forget record looks trained on); MUSE's AUC is their complement
    (the held-out records as positives), and PrivLeak = (AUC - AUC_retrain) / AUC_retrain x
    100. 0 is ideal; a model that still holds the forget set sits near -100 (AUROC 1.0
    against the retrained model's 0.5); above 0 it forgot too much, itself a tell. None
    where the retrained model's AUC is 0."""
    muse, muse_retrain = 1 - auroc, 1 - auroc_retrain
    return None if muse_retrain <= 0 else (muse - muse_retrain) / muse_retrain * 100


def privleak_ci(forget: list[float], nonmembers: list[float], forget_retrain: list[float],
                nonmembers_retrain: list[float], n: int = 2000, level: float = 0.95,
                seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of :func:`privleak` from one attack's scores (higher:
    more likely a member) under the model and under the retrained one, on the same records
    in the same order: each draw resamples the forget records and the non-members and
    scores both models on that one draw (paired). None where a draw leaves the retrained
    model's AUC at 0."""
    if len(forget) != len(forget_retrain) or len(nonmembers) != len(nonmembers_retrain):
        raise DataError("PrivLeak pairs the two models' scores record by record: give both "
                        "models' scores on the same forget records and non-members")
    if not forget or not nonmembers:
        raise DataError("a PrivLeak interval needs forget records and non-members")
    t = [torch.tensor([float(v) for v in x], dtype=torch.float64)
         for x in (forget, nonmembers, forget_retrain, nonmembers_retrain)]
    ip, iq = _draws(len(forget), len(nonmembers), n, seed)
    muse, muse_retrain = 1 - _pair_aucs(t[0], t[1], ip, iq), 1 - _pair_aucs(t[2], t[3], ip, iq)
    if (muse_retrain <= 0).any():
        return None
    return _quantiles((muse - muse_retrain) / muse_retrain * 100, level)


def counts_by_duplication(duplications: list[int | None]) -> dict[str, int]:
    """How many sequences per duplication key."""
    counts: dict[str, int] = {}
    for d in duplications:
        counts[duplication_key(d)] = counts.get(duplication_key(d), 0) + 1
    return {k: counts[k] for k in sort_keys(counts)}


def exact_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig
                     ) -> list[bool]:
    """Per sequence: does greedy decoding from the prefix reproduce the suffix exactly?
    (One teacher-forced pass; see :func:`memlens.core.scoring.exact_matches`.)"""
    window = cfg.prefix + cfg.suffix
    return exact_matches(handle, [s.token_ids[:window] for s in seqs], cfg.prefix,
                         cfg.batch_size)


def continuations(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
                  desc: str | None = None) -> list[list[int]]:
    """Per sequence: the greedy continuation of its ``cfg.prefix``-token prompt, as long as
    its true suffix (at most ``cfg.suffix`` tokens)."""
    gens = greedy_continuations(handle, [s.token_ids[:cfg.prefix] for s in seqs], cfg.suffix,
                                cfg.batch_size, desc=desc)
    return [gen[:len(s.token_ids[cfg.prefix:cfg.prefix + cfg.suffix])]
            for s, gen in zip(seqs, gens, strict=True)]


def loose_distances(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
                    desc: str | None = None, gens: list[list[int]] | None = None
                    ) -> list[float]:
    """Per sequence: normalized token Levenshtein distance of the greedy continuation
    (``gens``, from :func:`continuations` when None) from the true suffix."""
    gens = continuations(handle, seqs, cfg, desc) if gens is None else gens
    return [Levenshtein.normalized_distance(gen, s.token_ids[cfg.prefix:cfg.prefix + cfg.suffix])
            for s, gen in zip(seqs, gens, strict=True)]


def rouge_words(text: str) -> list[str]:
    """Words as the ROUGE reference scorer (``rouge_score``, which MUSE uses) splits them
    with its default tokenizer: lowercased runs of letters and digits."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(candidate: list, reference: list) -> float:
    """ROUGE-L F1 (Lin 2004) of two word lists: from the longest common subsequence,
    precision over the candidate's length, recall over the reference's, their harmonic
    mean (0 when either is empty)."""
    lcs = LCSseq.similarity(candidate, reference) if candidate and reference else 0
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def verbmem(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
            gens: list[list[int]] | None = None) -> list[float]:
    """MUSE's VerbMem per sequence: ROUGE-L F1 of the greedy continuation of the prefix
    (``gens``, from :func:`continuations` when None) against the true suffix, as text."""
    gens = continuations(handle, seqs, cfg) if gens is None else gens
    decode = handle.tokenizer.decode
    return [rouge_l(rouge_words(decode(gen, skip_special_tokens=True)),
                    rouge_words(decode(s.token_ids[cfg.prefix:cfg.prefix + cfg.suffix],
                                       skip_special_tokens=True)))
            for s, gen in zip(seqs, gens, strict=True)]


def loose_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig
                     ) -> list[bool]:
    """Per sequence: is the greedy continuation within ``cfg.loose_threshold`` similarity?"""
    return [1 - d >= cfg.loose_threshold for d in loose_distances(handle, seqs, cfg)]


@torch.no_grad()
def sequence_losses(handle: ModelHandle, token_ids: list[list[int]], batch_size: int = 32
                    ) -> list[tuple[float, int]]:
    """Per sequence: the sum of its next-token losses and how many tokens it predicts."""
    out = []
    for loss, keep in batch_losses(handle, token_ids, batch_size):
        out.extend(zip((loss * keep).sum(1).tolist(), keep.sum(1).tolist(), strict=True))
    return out


def perplexity(handle: ModelHandle, token_ids: list[list[int]], batch_size: int = 32,
               losses: list[tuple[float, int]] | None = None) -> float:
    """exp(mean next-token loss) over every predicted token of the sequences (from their
    :func:`sequence_losses` when given)."""
    losses = sequence_losses(handle, token_ids, batch_size) if losses is None else losses
    n = sum(k for _, k in losses)
    if n == 0:
        raise DataError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(sum(t for t, _ in losses) / n)


def perplexity_change_ci(losses: list[tuple[float, int]], base: list[tuple[float, int]],
                         n: int = 2000, level: float = 0.95, seed: int = 0
                         ) -> tuple[float, float]:
    """Percentile bootstrap interval of the relative change in perplexity from ``base`` to
    ``losses`` (each :func:`sequence_losses` of the same sequences under two models): each
    draw resamples the sequences once and scores both models on it (paired)."""
    if len(losses) != len(base) or not losses:
        raise DataError("a perplexity-change interval pairs two models' losses on the same "
                        "sequences")
    t = torch.tensor(losses, dtype=torch.float64)
    b = torch.tensor(base, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(t), (n, len(t)), generator=gen)

    def ppl(x):
        return torch.exp(x[idx, 0].sum(1) / x[idx, 1].sum(1))

    return _quantiles(ppl(t) / ppl(b) - 1, level)


def edit_metrics(handle: ModelHandle, members: list[Sequence], heldout: list[list[int]],
                 cfg: ExtractionConfig | None = None, loose: bool = True) -> Extraction:
    """What an edit is judged by: extraction of members by duplication, clean perplexity.

    ``members`` are the sequences to test for recitation (e.g. an organism's canaries);
    ``heldout`` is clean text the model never saw (token ids), for perplexity.
    """
    cfg = cfg or ExtractionConfig()
    kept = [s for s in members if len(s.token_ids) > cfg.prefix]
    dups = [s.duplication for s in kept]
    exact = by_duplication(dups, exact_extraction(handle, kept, cfg))
    near = by_duplication(dups, loose_extraction(handle, kept, cfg)) if loose else None
    return Extraction(exact, near, perplexity(handle, heldout, cfg.batch_size))


@torch.no_grad()
def heldout_metrics(handle: ModelHandle, seqs: list[Sequence], batch_size: int = 64) -> dict:
    """Loss and next-token accuracy on held-out sequences, split into template vs PII tokens
    (sequences need text offsets and PII spans, as :func:`~memlens.data.labels.read_sequences`
    gives for an organism's corpus)."""
    was_training = handle.model.training
    handle.model.eval()
    sums = {k: [0.0, 0.0, 0] for k in ("all", "template", "pii")}
    token_lists = [s.token_ids for s in seqs]
    for i, (_, ids, mask) in enumerate(batches(handle, token_lists, batch_size)):
        loss, hit, keep = token_losses(forward(handle, ids, mask), ids, mask)
        for b, seq in enumerate(seqs[i * batch_size:(i + 1) * batch_size]):
            flags = pii_token_mask(seq.offsets[:len(seq.token_ids)], seq.spans or [])[1:]
            pii = torch.zeros_like(keep[b])
            pii[:len(flags)] = torch.tensor(flags, dtype=torch.bool)
            for key, sel in (("all", keep[b]), ("pii", keep[b] & pii),
                             ("template", keep[b] & ~pii)):
                sums[key][0] += loss[b][sel].sum().item()
                sums[key][1] += hit[b][sel].sum().item()
                sums[key][2] += int(sel.sum())
    handle.model.train(was_training)
    out = {}
    for key, (ls, hs, n) in sums.items():
        out[f"heldout_{key}_loss"] = ls / max(n, 1)
        out[f"heldout_{key}_accuracy"] = hs / max(n, 1)
    out["heldout_perplexity"] = math.exp(out["heldout_all_loss"])
    return out


def n_for_p(log_pz: float, p: float) -> float:
    """Smallest n with 1 - (1 - p_z)^n >= p (inf when p_z = 0): the draws needed for
    (n, p)-discoverable extraction."""
    pz = math.exp(log_pz)
    if pz >= p:
        return 1.0
    if pz <= 0:
        return math.inf
    return float(math.ceil(math.log1p(-p) / math.log1p(-pz)))
