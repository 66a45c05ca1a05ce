"""Memorization labels: per sequence (extraction, membership scores) and per token.

Exact k-extractability comes from one teacher-forced forward pass: greedy
decoding reproduces the suffix iff the argmax at every suffix position is the
true next token. Loose match needs real generation and runs batched with a KV
cache.

Example:
    >>> handle = load_model(organism_path("tiny"))
    >>> seqs = read_sequences(organism_path("tiny") / "corpus.jsonl", handle.tokenizer)
    >>> labels = label(handle, seqs, LabelConfig(prefix=32, suffix=32))
    >>> labels.extraction.exact["100"]
    >>> labels.save("labels/")                 # the artifact capture, probes and edits read
    >>> Labels.load("labels/").recited()       # the sequences the model recites
"""

from __future__ import annotations

import json
import math
import statistics
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memlens.core import distributed
from memlens.core.config import COUNT, FRACTION, POSITIVE, option
from memlens.core.errors import DataError
from memlens.core.identity import Identity, read_artifact, write_artifact
from memlens.core.metrics import (
    Extraction,
    ExtractionConfig,
    auroc_ci,
    by_duplication,
    counts_by_duplication,
    loose_distances,
    n_for_p,
)
from memlens.core.model import ModelHandle
from memlens.core.scoring import score_tokens
from memlens.core.sequences import PiiSpan, Sequence
from memlens.core.storage import atomic_dir, exclusive, prepare_output

__all__ = ["MEMBERSHIP_SCORES", "TOKEN_LABELS", "LabelConfig", "Labels", "label", "labelable",
           "manifest_roles", "membership_scores", "read_sequences", "summarize"]

TOKEN_LABELS = ("memorized", "partial", "generic", "not_memorized", "excluded")
PARTIAL_CHOICES = ("partial", "memorized", "not_memorized", "excluded")


@dataclass
class LabelConfig(ExtractionConfig):
    """How sequences and tokens are labeled (prefix, suffix, loose_threshold and batch_size
    as in :class:`~memlens.core.metrics.ExtractionConfig`).

    Token rule (suffix tokens; prefix tokens are ``excluded``):
      * template text, and PII tokens with no letter or digit (``-``, ``@``) -> ``generic``
      * PII of a member, predicted by argmax, in an exactly extractable sequence -> ``memorized``
      * PII of a member, predicted, in a sequence that is not extractable -> ``partial``
        (or the class named by ``partial_as``)
      * other PII of members, and all PII of non-members -> ``not_memorized``
    A sequence without PII spans counts every token as a candidate value. Sequences of
    unknown duplication count as members (see :mod:`memlens.core.sequences`).
    """

    min_k: float = option(0.2, "Min-K% and Min-K%++ fraction: the lowest-scoring share of "
                          "tokens the score averages", FRACTION)
    sample_top_k: int = option(40, "top-k of the sampler that estimates probabilistic "
                               "extraction", COUNT)
    sample_temperature: float = option(1.0, "temperature of that sampler", POSITIVE)
    target_p: float = option(0.9, "probabilistic extraction: the samples needed to recite "
                             "with this probability", FRACTION)
    partial_as: str = option("partial", "class of predicted member PII in sequences that are "
                             "not extractable", choices=PARTIAL_CHOICES)
    generate: bool = option(True, "greedy generation for the loose-match metrics")
    short: str = option("label", "sequences shorter than prefix + suffix: label what there "
                        "is, or skip them", choices=("label", "skip"))


@dataclass
class Labels:
    """Labels of a set of sequences: the artifact of ``memlens label``.

    ``sequences``: one row per sequence (id, duplication, member, exact, loose, loss, min_k,
    min_k_pp, zlib, log_p_z, token_ids...); ``tokens``: one row per predicted token;
    ``summary``: the headline numbers; ``identity``: the model and sequences they describe.
    """

    sequences: pd.DataFrame
    tokens: pd.DataFrame
    summary: dict
    identity: Identity
    path: Path | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "the labels"

    def save(self, out_dir: str | Path) -> Path:
        """Write sequences.parquet, tokens.parquet and summary.json (with the identity) to a
        new or labels directory, whole or not at all."""
        out = prepare_output(out_dir, "labels", marker="summary.json")
        if distributed.is_main():  # under torchrun every rank holds the same labels
            with exclusive(out, "write labels"), atomic_dir(out) as tmp:
                self.sequences.to_parquet(tmp / "sequences.parquet", index=False)
                self.tokens.to_parquet(tmp / "tokens.parquet", index=False)
                write_artifact(tmp, "summary.json", self.summary, self.identity,
                               files=("sequences.parquet", "tokens.parquet"))
        distributed.barrier()
        self.path = out
        return out

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        """Read a labels directory written by :meth:`save` (``memlens label --out``)."""
        path = Path(path)
        summary, identity = read_artifact(path, "summary.json", "labels", "memlens label")
        summary.pop("identity")
        summary.pop("files", None)
        return cls(pd.read_parquet(path / "sequences.parquet"),
                   pd.read_parquet(path / "tokens.parquet"), summary, identity, path)

    @property
    def extraction(self) -> Extraction:
        """Extraction by duplication (exact and, where generated, loose)."""
        return Extraction.from_json(self.summary)

    @property
    def config(self) -> LabelConfig:
        return LabelConfig(**self.summary["config"])

    def to_sequences(self, recited: bool | None = None) -> list[Sequence]:
        """The labeled sequences (full token ids); ``recited=True`` keeps only those the
        model extracts exactly, ``False`` only the others."""
        df = self.sequences
        if recited is not None:
            df = df[df["exact"] == recited]
        dup = df["duplication"].astype(object).where(df["duplication"].notna(), None)
        return [Sequence(str(i), [int(t) for t in ids], duplication=None if d is None
                         else int(d))
                for i, ids, d in zip(df["id"], df["token_ids"], dup, strict=True)]

    def recited_targets(self, ids: set[str] | None = None, limit: int | None = None
                        ) -> list[list[int]]:
        """Token ids (cut to prefix + suffix) of the sequences the model recites, optionally
        only those with ids in ``ids``. ``limit`` keeps that many, taken in turn from each
        duplication count (most repeated first), so a sample spans the counts rather than
        the corpus order's first ones."""
        cfg = self.config
        seqs = [s for s in self.to_sequences(recited=True) if ids is None or s.id in ids]
        if not seqs:
            raise DataError(f"the model recites none of the sequences in {self.where}; there "
                            "is nothing to aim at")
        if limit is not None:
            counts = sorted({s.duplication or 0 for s in seqs}, reverse=True)
            queues = [[s for s in seqs if (s.duplication or 0) == c] for c in counts]
            seqs = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
            seqs = seqs[:limit]
        return [s.token_ids[:cfg.prefix + cfg.suffix] for s in seqs]

    def check_model(self, handle: ModelHandle) -> None:
        """Refuse a model other than the one these labels were made with."""
        self.identity.check_model(handle, self.where)


def read_sequences(path: str | Path, tokenizer, roles: tuple[str, ...] | None = None,
                   max_tokens: int | None = None) -> list[Sequence]:
    """Read a JSONL of sequences (an organism's ``corpus.jsonl``, or your own).

    Each line is an object with ``text`` (a string) and/or ``token_ids`` (whole numbers);
    optional ``id``, ``duplication`` (0 = non-member, a whole number; unknown when absent),
    ``role`` and ``spans`` (``field``, ``start``, ``end`` character offsets into ``text``).
    A directory means its corpus.jsonl. ``roles`` keeps only lines whose ``role`` is
    listed. ``max_tokens`` keeps the first tokens of each sequence only, and tokenizes no
    more text than they need (a huge line costs what is used).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a JSONL file or an organism directory")
    vocab = len(tokenizer)
    out: list[Sequence] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not UTF-8 text ({exc.reason}); is it a JSONL "
                                "file?") from None
            if not line.strip():
                continue
            obj = _json_line(line, where)
            if roles is not None and obj.get("role") not in roles:
                continue
            out.append(_parse_sequence(obj, tokenizer, vocab, where, len(out), max_tokens))
    if not out:
        what = f" with role in {list(roles)}" if roles else ""
        raise DataError(f"{path}: no sequences{what}; the file is empty")
    return out


def _json_line(line: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line") from None
    if not isinstance(obj, dict) or not ({"text", "token_ids"} & obj.keys()):
        raise DataError(f"{where}: each line must be an object with 'text' or 'token_ids'")
    return obj


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# No BPE token covers more characters than this: cutting text here keeps the first tokens.
_MAX_CHARS_PER_TOKEN = 64


def _parse_sequence(obj: dict, tokenizer, vocab: int, where: str, index: int,
                    max_tokens: int | None = None) -> Sequence:
    text, ids = obj.get("text"), obj.get("token_ids")
    if text is not None:
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{where}: 'text' is not valid Unicode ({exc.reason} at character "
                            f"{exc.start}); fix the line") from None
        if max_tokens is not None:
            text = text[:(max_tokens + 8) * _MAX_CHARS_PER_TOKEN]
    elif ids is None:
        raise DataError(f"{where}: 'text' is null; give a string or 'token_ids'")
    spans = None
    if obj.get("spans") is not None:
        if text is None:
            raise DataError(f"{where}: 'spans' need the 'text' they point into")
        if not isinstance(obj["spans"], list):
            raise DataError(f"{where}: 'spans' must be a list of {{field, start, end}}")
        spans = []
        for s in obj["spans"]:
            if not (isinstance(s, dict) and isinstance(s.get("field"), str)
                    and _whole(s.get("start")) and _whole(s.get("end"))):
                raise DataError(f"{where}: span {s!r} needs a string 'field' and whole-number "
                                "'start' and 'end'")
            if not (0 <= s["start"] < s["end"] <= len(obj["text"])):
                raise DataError(f"{where}: span {s} lies outside the text "
                                f"(length {len(obj['text'])})")
            spans.append(PiiSpan(s["field"], s["start"], s["end"]))
    offsets = None
    if text is not None:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    if ids is None:
        ids = enc["input_ids"]
    else:
        if not isinstance(ids, list):
            raise DataError(f"{where}: 'token_ids' must be a list of whole numbers, got "
                            f"{type(ids).__name__}")
        bad = [t for t in ids if not _whole(t) or not 0 <= t < vocab]
        if bad:
            raise DataError(f"{where}: token id {bad[0]!r} is not a whole number in the model's "
                            f"vocabulary (0..{vocab - 1}); was it made with another tokenizer?")
        ids = ids[:max_tokens]
        if text is not None and list(enc["input_ids"][:len(ids)]) != list(ids):
            raise DataError(f"{where}: 'token_ids' are not the tokenization of 'text' by this "
                            "model's tokenizer; give one of them, or both from this tokenizer")
    dup = obj.get("duplication")
    if dup is None and "member" in obj:
        dup = None if obj["member"] else 0
    if dup is not None and (not _whole(dup) or dup < 0):
        raise DataError(f"{where}: duplication {dup!r} must be a whole number >= 0 (0 = "
                        "non-member), or left out when unknown")
    return Sequence(str(obj.get("id", index)), list(ids[:max_tokens]), obj.get("text"), dup,
                    spans, offsets, obj.get("role"))


def _token_is_candidate(seq: Sequence, pos: int) -> tuple[bool, str]:
    """Whether token ``pos`` can be memorized (a PII value), and the field it belongs to."""
    if seq.spans is None or seq.offsets is None:
        return True, ""
    s, e = seq.offsets[pos] if pos < len(seq.offsets) else (0, 0)
    for sp in seq.spans:
        if s < sp.end and e > sp.start:
            piece = seq.text[max(s, sp.start):min(e, sp.end)]
            return any(c.isalnum() for c in piece), sp.field
    return False, ""


def _sequence_row(seq: Sequence, ts, cfg: LabelConfig, tokenizer) -> dict:
    n = len(ts.logprob)  # predicted tokens
    suf = slice(cfg.prefix - 1, n)
    k = max(1, math.ceil(cfg.min_k * n))
    log_pz = float(ts.sampling_logprob[suf].sum())
    loss = float(-ts.logprob.mean())
    text = tokenizer.decode(seq.token_ids[:n + 1], skip_special_tokens=True)
    # Min-K%++ (Zhang et al. 2024): each gold log-prob standardized by the mean and spread
    # of log p(z) over the model's distribution at that position (the mean is -entropy).
    calibrated = (ts.logprob + ts.entropy) / ts.logprob_std
    return dict(exact=bool(ts.hit[suf].all()), suffix_token_accuracy=float(ts.hit[suf].mean()),
                suffix_len=n - cfg.prefix + 1, loss=loss,
                min_k=float(np.sort(ts.logprob)[:k].mean()),
                min_k_pp=float(np.sort(calibrated)[:k].mean()),
                zlib=loss / max(1, len(zlib.compress(text.encode()))),
                log_p_z=log_pz, n_for_p=n_for_p(log_pz, cfg.target_p))


def labelable(seqs: list[Sequence], cfg: LabelConfig) -> list[Sequence]:
    """The sequences long enough to label: a prefix and one suffix token (the whole suffix
    with ``short="skip"``)."""
    min_len = cfg.prefix + (cfg.suffix if cfg.short == "skip" else 1)
    return [s for s in seqs if len(s.token_ids) >= min_len]


def label(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig | None = None,
          progress: bool = True) -> Labels:
    """Label sequences and tokens; see :class:`LabelConfig` for the rules."""
    cfg = cfg or LabelConfig()
    t0 = time.perf_counter()
    kept = labelable(seqs, cfg)
    n_skipped = len(seqs) - len(kept)
    if not kept:
        raise DataError(f"all {len(seqs)} sequences are shorter than prefix {cfg.prefix} + "
                        "one suffix token; lower --prefix")
    window = cfg.prefix + cfg.suffix
    # Under torchrun each rank scores its share of the batches; every rank gets all scores.
    mine = distributed.shard(kept, cfg.batch_size)
    scores = distributed.gather(list(score_tokens(
        handle, [s.token_ids[:window] for s in mine], cfg.batch_size, cfg.sample_top_k,
        cfg.sample_temperature, desc="teacher forcing" if progress else None)),
        len(kept), cfg.batch_size)
    rows = [_sequence_row(s, ts, cfg, handle.tokenizer)
            for s, ts in zip(kept, scores, strict=True)]
    if cfg.generate:
        dists = distributed.gather(
            loose_distances(handle, mine, cfg, desc="greedy generation" if progress else None),
            len(kept), cfg.batch_size)
        for row, dist in zip(rows, dists, strict=True):
            row.update(greedy_exact=dist == 0, normalized_levenshtein=dist,
                       loose=1 - dist >= cfg.loose_threshold)
    seq_rows, tok_rows = [], []
    for seq, row, ts in zip(kept, rows, scores, strict=True):
        seq_rows.append(dict(id=seq.id, duplication=seq.duplication, member=seq.member,
                             n_tokens=len(seq.token_ids), **row, token_ids=seq.token_ids))
        for t in range(len(ts.hit)):
            pos = t + 1
            cand, fld = _token_is_candidate(seq, pos)
            hit = bool(ts.hit[t])
            tok_rows.append((seq.id, pos, seq.token_ids[pos], fld, cand, hit,
                             float(ts.logprob[t]), int(ts.argmax[t]), float(ts.max_logprob[t]),
                             float(ts.entropy[t]),
                             _token_label(pos, cand, hit, seq, row["exact"], cfg),
                             seq.duplication, seq.member))
    sequences = pd.DataFrame(seq_rows)
    tokens = pd.DataFrame(tok_rows, columns=[
        "id", "position", "token_id", "field", "candidate", "predicted", "logprob",
        "argmax_id", "max_logprob", "entropy", "label", "duplication", "member"])
    # As text (" Laura"), not the tokenizer's symbols ("ĠLaura").
    tokens["token"] = handle.tokenizer.batch_decode([[i] for i in tokens["token_id"].tolist()])
    summary = summarize(sequences, tokens, cfg, n_skipped)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["model"] = handle.name
    return Labels(sequences, tokens, summary, Identity.make("labels", handle, kept, asdict(cfg)))


def _token_label(pos: int, candidate: bool, predicted: bool, seq: Sequence, exact: bool,
                 cfg: LabelConfig) -> str:
    if pos < cfg.prefix:
        return "excluded"
    if not candidate:
        return "generic"
    if not seq.member or not predicted:
        return "not_memorized"
    return "memorized" if exact else cfg.partial_as


def summarize(sequences: pd.DataFrame, tokens: pd.DataFrame, cfg: LabelConfig,
              n_skipped: int) -> dict:
    """Headline numbers: extraction overall and by duplication, membership AUROCs."""
    from sklearn.metrics import roc_auc_score

    dup = [None if pd.isna(d) else int(d) for d in sequences["duplication"]]

    def rate(col):
        return by_duplication(dup, sequences[col].tolist())

    summary = {
        "n_sequences": int(len(sequences)),
        "n_skipped": int(n_skipped),
        "n_short_suffix": int((sequences["suffix_len"] < cfg.suffix).sum()),
        "exact_extraction_rate": float(sequences["exact"].mean()),
        Extraction.KEYS["exact"]: rate("exact"),
        "n_by_duplication": counts_by_duplication(dup),
        # The median: one suffix that top-k sampling can never produce (p_z = 0, log -inf)
        # would make the mean -inf. null where more than half have p_z = 0.
        "median_log_p_z_by_duplication": by_duplication(dup, sequences["log_p_z"].tolist(),
                                                        statistics.median),
        "p_z_zero_share_by_duplication": by_duplication(
            dup, np.isneginf(sequences["log_p_z"]).tolist()),
    }
    if "loose" in sequences:
        summary.update(
            loose_extraction_rate=float(sequences["loose"].mean()),
            **{Extraction.KEYS["loose"]: rate("loose")},
            mean_normalized_levenshtein=float(sequences["normalized_levenshtein"].mean()),
            greedy_agrees_with_teacher_forcing=bool(
                (sequences["greedy_exact"] == sequences["exact"]).all()))
    known = sequences["duplication"].notna()
    members = sequences.loc[known, "member"]
    if members.nunique() == 2:
        scores = membership_scores(sequences)
        summary["membership_auroc"] = {
            k: float(roc_auc_score(members, v[known])) for k, v in scores.items()}
        summary["membership_auroc_ci"] = {
            k: list(auroc_ci(members.tolist(), v[known].tolist())) for k, v in scores.items()}
    summary["token_label_counts"] = {
        k: int(v) for k, v in tokens["label"].value_counts().items()}
    summary["config"] = asdict(cfg)
    return summary


# The membership attacks, each oriented so that a higher score means "more likely a member":
# mean loss (Yeom et al. 2018), Min-K% (Shi et al. 2024), Min-K%++ (Zhang et al. 2024) and
# zlib (Carlini et al. 2021: loss over zlib-compressed length).
MEMBERSHIP_SCORES = {"loss": ("loss", -1), "min_k": ("min_k", 1), "min_k_pp": ("min_k_pp", 1),
                     "zlib": ("zlib", -1)}


def membership_scores(sequences: pd.DataFrame) -> dict[str, pd.Series]:
    """Each membership attack's score per sequence row (higher: more likely a member)."""
    return {name: sign * sequences[col] for name, (col, sign) in MEMBERSHIP_SCORES.items()}


def manifest_roles(path: str | Path) -> tuple[str, ...] | None:
    """Default roles to label from an organism directory: canaries and non-members."""
    p = Path(path)
    return ("canary", "nonmember") if (p.is_dir() or p.name == "corpus.jsonl") else None
