"""What every result is judged by: extraction by duplication, perplexity, held-out loss.

By-duplication tables follow the one rule of :mod:`memlens.core.sequences`: keys are the
counts (``"0"`` for non-members) and ``"unknown"``.

Example:
    >>> m = edit_metrics(handle, canaries, heldout_ids, ExtractionConfig(prefix=32, suffix=32))
    >>> m.exact["100"], m.perplexity
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import ClassVar

import torch
from rapidfuzz.distance import Levenshtein

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
           "counts_by_duplication", "edit_metrics", "exact_extraction", "heldout_metrics",
           "loose_distances", "loose_extraction", "n_for_p", "perplexity"]


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
    gen = torch.Generator().manual_seed(seed)
    p = pos[torch.randint(len(pos), (n, len(pos)), generator=gen)]
    q = neg[torch.randint(len(neg), (n, len(neg)), generator=gen)]
    # Mann-Whitney per draw: the share of (positive, negative) pairs ordered right, ties
    # half; 100 draws at a time.
    aucs = torch.cat([((d > 0).double() + 0.5 * (d == 0).double()).mean((1, 2)) for d in (
        p[i:i + 100, :, None] - q[i:i + 100, None, :] for i in range(0, n, 100))])
    lo, hi = torch.quantile(aucs, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                               dtype=torch.float64)).tolist()
    return lo, hi


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


def loose_distances(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig,
                    desc: str | None = None) -> list[float]:
    """Per sequence: normalized token Levenshtein distance of the greedy continuation from
    the true suffix."""
    gens = greedy_continuations(handle, [s.token_ids[:cfg.prefix] for s in seqs], cfg.suffix,
                                cfg.batch_size, desc=desc)
    out = []
    for seq, gen in zip(seqs, gens, strict=True):
        true = seq.token_ids[cfg.prefix:cfg.prefix + cfg.suffix]
        out.append(Levenshtein.normalized_distance(gen[:len(true)], true))
    return out


def loose_extraction(handle: ModelHandle, seqs: list[Sequence], cfg: ExtractionConfig
                     ) -> list[bool]:
    """Per sequence: is the greedy continuation within ``cfg.loose_threshold`` similarity?"""
    return [1 - d >= cfg.loose_threshold for d in loose_distances(handle, seqs, cfg)]


@torch.no_grad()
def perplexity(handle: ModelHandle, token_ids: list[list[int]], batch_size: int = 32) -> float:
    """exp(mean next-token loss) over every predicted token of the sequences."""
    total, n = 0.0, 0
    for loss, keep in batch_losses(handle, token_ids, batch_size):
        total += loss[keep].sum().item()
        n += int(keep.sum())
    if n == 0:
        raise DataError("perplexity needs at least one sequence of two or more tokens")
    return math.exp(total / n)


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
