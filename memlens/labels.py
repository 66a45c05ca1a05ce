"""Memorization labels: per sequence (extraction, membership scores) and per token.

Exact k-extractability comes from one teacher-forced forward pass: greedy
decoding reproduces the suffix iff the argmax at every suffix position is the
true next token. Loose match needs real generation and runs batched with a KV
cache.

Example:
    >>> handle = load_model(organism_path("tiny"))
    >>> seqs = read_sequences(organism_path("tiny") / "corpus.jsonl", handle.tokenizer)
    >>> result = label(handle, seqs, LabelConfig(prefix=32, suffix=32))
    >>> result.summary["exact_extraction_rate_by_duplication"]
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rapidfuzz.distance import Levenshtein
from tqdm.auto import tqdm

from memlens.corpus import PiiSpan
from memlens.models import ModelHandle

TOKEN_LABELS = ("memorized", "partial", "generic", "not_memorized", "excluded")
_PARTIAL_CHOICES = ("partial", "memorized", "not_memorized", "excluded")


@dataclass
class LabelConfig:
    """How sequences and tokens are labeled.

    Token rule (suffix tokens; prefix tokens are ``excluded``):
      * template text, and PII tokens with no letter or digit (``-``, ``@``) -> ``generic``
      * PII of a member, predicted by argmax, in an exactly extractable sequence -> ``memorized``
      * PII of a member, predicted, in a sequence that is not extractable -> ``partial``
        (or the class named by ``partial_as``)
      * other PII of members, and all PII of non-members -> ``not_memorized``
    A sequence without PII spans counts every token as a candidate value.
    """

    prefix: int = 32
    suffix: int = 32
    min_k: float = 0.2
    sample_top_k: int = 40
    sample_temperature: float = 1.0
    target_p: float = 0.9
    loose_threshold: float = 0.75
    partial_as: str = "partial"
    generate: bool = True
    short: str = "label"
    batch_size: int = 32

    def __post_init__(self):
        if self.prefix < 1 or self.suffix < 1:
            raise ValueError(f"prefix and suffix must be >= 1, got {self.prefix}, {self.suffix}")
        if self.partial_as not in _PARTIAL_CHOICES:
            raise ValueError(f"partial_as={self.partial_as!r}; choose one of {_PARTIAL_CHOICES}")
        if self.short not in ("label", "skip"):
            raise ValueError(f"short={self.short!r}; choose 'label' (label what there is) or "
                             "'skip'")
        if not 0 < self.min_k <= 1:
            raise ValueError(f"min_k={self.min_k} must be a fraction in (0, 1], e.g. 0.2")


@dataclass
class Sequence:
    """One sequence to label. ``duplication`` 0 marks a non-member; None is unknown."""

    id: str
    token_ids: list[int]
    text: str | None = None
    duplication: int | None = None
    spans: list[PiiSpan] | None = None
    offsets: list[tuple[int, int]] | None = None

    @property
    def member(self) -> bool:
        return self.duplication != 0


@dataclass
class LabelResult:
    sequences: pd.DataFrame
    tokens: pd.DataFrame
    summary: dict

    def save(self, out_dir: str | Path) -> Path:
        """Write sequences.parquet, tokens.parquet and summary.json to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.sequences.to_parquet(out / "sequences.parquet", index=False)
        self.tokens.to_parquet(out / "tokens.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        return out


class DataError(ValueError):
    """Input data is malformed; the message names the file and line."""


def read_sequences(path: str | Path, tokenizer, roles: tuple[str, ...] | None = None
                   ) -> list[Sequence]:
    """Read a JSONL of sequences (an organism's ``corpus.jsonl``, or your own).

    Each line is an object with ``text`` and/or ``token_ids``; optional ``id``,
    ``duplication`` (0 = non-member), ``role`` and ``spans`` (``field``, ``start``,
    ``end`` character offsets into ``text``). A directory means its corpus.jsonl.
    ``roles`` keeps only lines whose ``role`` is listed.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no such file; pass a JSONL file or an organism directory")
    vocab = len(tokenizer)
    out: list[Sequence] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}); fix or remove the line"
                                ) from None
            if not isinstance(obj, dict) or not ({"text", "token_ids"} & obj.keys()):
                raise DataError(f"{where}: each line must be an object with 'text' or "
                                "'token_ids'")
            if roles is not None and obj.get("role") not in roles:
                continue
            out.append(_parse_sequence(obj, tokenizer, vocab, where, len(out)))
    if not out:
        what = f" with role in {list(roles)}" if roles else ""
        raise DataError(f"{path}: no sequences{what}; the file is empty")
    return out


def _parse_sequence(obj: dict, tokenizer, vocab: int, where: str, index: int) -> Sequence:
    text = obj.get("text")
    spans = None
    if obj.get("spans") is not None:
        if text is None:
            raise DataError(f"{where}: 'spans' need the 'text' they point into")
        spans = []
        for s in obj["spans"]:
            if not (0 <= s["start"] < s["end"] <= len(text)):
                raise DataError(f"{where}: span {s} lies outside the text "
                                f"(length {len(text)})")
            spans.append(PiiSpan(s["field"], s["start"], s["end"]))
    offsets = None
    if text is not None:
        enc = tokenizer(text, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    ids = obj.get("token_ids")
    if ids is None:
        ids = enc["input_ids"]
    else:
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise DataError(f"{where}: token id {bad[0]!r} is outside the model's vocabulary "
                            f"(0..{vocab - 1}); was it made with another tokenizer?")
        if text is not None and list(enc["input_ids"][:len(ids)]) != list(ids):
            raise DataError(f"{where}: 'token_ids' are not the tokenization of 'text' by this "
                            "model's tokenizer; give one of them, or both from this tokenizer")
    dup = obj.get("duplication")
    if dup is None and "member" in obj:
        dup = None if obj["member"] else 0
    return Sequence(str(obj.get("id", index)), list(ids), text, dup, spans, offsets)


def _token_is_candidate(seq: Sequence, pos: int, tokenizer) -> tuple[bool, str]:
    """Whether token ``pos`` can be memorized (a PII value), and the field it belongs to."""
    if seq.spans is None or seq.offsets is None:
        return True, ""
    s, e = seq.offsets[pos] if pos < len(seq.offsets) else (0, 0)
    for sp in seq.spans:
        if s < sp.end and e > sp.start:
            piece = seq.text[max(s, sp.start):min(e, sp.end)]
            return any(c.isalnum() for c in piece), sp.field
    return False, ""


def _sampling_logprob(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float):
    """log p(target) under top-k sampling at ``temperature`` (-inf outside the top k)."""
    scaled = logits / temperature
    kth = scaled.topk(min(k, scaled.shape[-1]), dim=-1).values[..., -1:]
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.log_softmax(-1).gather(-1, targets[..., None])[..., 0]


@torch.no_grad()
def teacher_forced(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig,
                   progress: bool = True) -> tuple[list[dict], list[np.ndarray]]:
    """One forward pass per batch: per-sequence scores and, per token, an array of rows
    (hit, logprob, argmax id, max logprob, entropy) of the prediction of that token."""
    rows, token_stats = [], []
    window = cfg.prefix + cfg.suffix
    for i in tqdm(range(0, len(seqs), cfg.batch_size), disable=not progress,
                  desc="teacher forcing", unit="batch"):
        chunk = [s.token_ids[:window] for s in seqs[i:i + cfg.batch_size]]
        ids, mask = handle.pad(chunk, side="right")
        logits = handle.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        logprobs = logits.log_softmax(-1)
        logp = logprobs.gather(-1, targets[..., None])[..., 0]
        # The model's confidence before it sees the token: usable online, in generation.
        max_lp = logprobs.max(-1).values
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        samp = _sampling_logprob(logits, targets, cfg.sample_top_k, cfg.sample_temperature)
        argmax = logits.argmax(-1)
        for b, toks in enumerate(chunk):
            n = len(toks) - 1  # number of predicted tokens
            lp = logp[b, :n].cpu().numpy()
            hit = (argmax[b, :n] == targets[b, :n]).cpu().numpy()
            suf = slice(cfg.prefix - 1, n)
            k = max(1, math.ceil(cfg.min_k * n))
            log_pz = float(samp[b, suf].sum())
            text = handle.tokenizer.decode(toks, skip_special_tokens=True)
            loss = float(-lp.mean())
            rows.append(dict(
                exact=bool(hit[suf].all()),
                suffix_token_accuracy=float(hit[suf].mean()),
                suffix_len=n - cfg.prefix + 1,
                loss=loss,
                min_k=float(np.sort(lp)[:k].mean()),
                zlib=loss / max(1, len(zlib.compress(text.encode()))),
                log_p_z=log_pz,
                n_for_p=_n_for_p(log_pz, cfg.target_p),
            ))
            token_stats.append(np.stack([hit, lp, argmax[b, :n].cpu().numpy(),
                                         max_lp[b, :n].cpu().numpy(),
                                         entropy[b, :n].cpu().numpy()]))
    return rows, token_stats


def _n_for_p(log_pz: float, p: float) -> float:
    """Smallest n with 1 - (1 - p_z)^n >= p (inf when p_z = 0)."""
    pz = math.exp(log_pz)
    if pz >= p:
        return 1.0
    if pz <= 0:
        return math.inf
    return float(math.ceil(math.log1p(-p) / math.log1p(-pz)))


@torch.no_grad()
def greedy_suffixes(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig,
                    progress: bool = True) -> list[list[int]]:
    """Greedy continuations of each prefix, batched with left padding and a KV cache."""
    out = []
    for i in tqdm(range(0, len(seqs), cfg.batch_size), disable=not progress,
                  desc="greedy generation", unit="batch"):
        chunk = [s.token_ids[:cfg.prefix] for s in seqs[i:i + cfg.batch_size]]
        ids, mask = handle.pad(chunk, side="left")
        gen = handle.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=cfg.suffix, do_sample=False,
            pad_token_id=handle.tokenizer.pad_token_id, use_cache=True)
        out.extend(gen[:, ids.shape[1]:].tolist())
    return out


def label(handle: ModelHandle, seqs: list[Sequence], cfg: LabelConfig | None = None,
          progress: bool = True) -> LabelResult:
    """Label sequences and tokens; see :class:`LabelConfig` for the rules."""
    cfg = cfg or LabelConfig()
    t0 = time.perf_counter()
    min_len = cfg.prefix + (cfg.suffix if cfg.short == "skip" else 1)
    kept = [s for s in seqs if len(s.token_ids) >= min_len]
    n_skipped = len(seqs) - len(kept)
    if not kept:
        raise DataError(f"all {len(seqs)} sequences are shorter than prefix {cfg.prefix} + "
                        "one suffix token; lower --prefix")
    rows, token_stats = teacher_forced(handle, kept, cfg, progress)
    if cfg.generate:
        gens = greedy_suffixes(handle, kept, cfg, progress)
        for row, seq, gen in zip(rows, kept, gens, strict=True):
            true = seq.token_ids[cfg.prefix:cfg.prefix + cfg.suffix]
            dist = Levenshtein.normalized_distance(gen[:len(true)], true)
            row.update(greedy_exact=gen[:len(true)] == true, normalized_levenshtein=dist,
                       loose=1 - dist >= cfg.loose_threshold)
    seq_rows, tok_rows = [], []
    for seq, row, (hit, lp, argmax, max_lp, ent) in zip(kept, rows, token_stats, strict=True):
        seq_rows.append(dict(id=seq.id, duplication=seq.duplication, member=seq.member,
                             n_tokens=len(seq.token_ids), **row, token_ids=seq.token_ids))
        for t in range(len(hit)):
            pos = t + 1
            cand, fld = _token_is_candidate(seq, pos, handle.tokenizer)
            tok_rows.append((seq.id, pos, seq.token_ids[pos], fld, cand, bool(hit[t]),
                             float(lp[t]), int(argmax[t]), float(max_lp[t]), float(ent[t]),
                             _token_label(pos, cand, bool(hit[t]), seq, row["exact"], cfg),
                             seq.duplication, seq.member))
    sequences = pd.DataFrame(seq_rows)
    tokens = pd.DataFrame(tok_rows, columns=[
        "id", "position", "token_id", "field", "candidate", "predicted", "logprob",
        "argmax_id", "max_logprob", "entropy", "label", "duplication", "member"])
    tokens["token"] = handle.tokenizer.convert_ids_to_tokens(tokens["token_id"].tolist())
    summary = summarize(sequences, tokens, cfg, n_skipped)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["model"] = handle.name
    return LabelResult(sequences, tokens, summary)


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

    dup = sequences["duplication"].fillna(-1).astype(int)
    by_dup = sequences.groupby(dup)

    def rate(col):
        return {str(k): float(g[col].mean()) for k, g in by_dup if k >= 0}

    summary = {
        "n_sequences": int(len(sequences)),
        "n_skipped": int(n_skipped),
        "n_short_suffix": int((sequences["suffix_len"] < cfg.suffix).sum()),
        "exact_extraction_rate": float(sequences["exact"].mean()),
        "exact_extraction_rate_by_duplication": rate("exact"),
        "n_by_duplication": {str(k): int(len(g)) for k, g in by_dup if k >= 0},
        "mean_log_p_z_by_duplication": rate("log_p_z"),
    }
    if "loose" in sequences:
        summary.update(
            loose_extraction_rate=float(sequences["loose"].mean()),
            loose_extraction_rate_by_duplication=rate("loose"),
            mean_normalized_levenshtein=float(sequences["normalized_levenshtein"].mean()),
            greedy_agrees_with_teacher_forcing=bool(
                (sequences["greedy_exact"] == sequences["exact"]).all()))
    known = sequences["duplication"].notna()
    members = sequences.loc[known, "member"]
    if members.nunique() == 2:  # higher score = more likely a member
        scores = {"loss": -sequences["loss"], "min_k": sequences["min_k"],
                  "zlib": -sequences["zlib"]}
        summary["membership_auroc"] = {
            k: float(roc_auc_score(members, v[known])) for k, v in scores.items()}
    summary["token_label_counts"] = {
        k: int(v) for k, v in tokens["label"].value_counts().items()}
    summary["config"] = asdict(cfg)
    return summary


def read_labels(out_dir: str | Path) -> tuple[list[Sequence], pd.DataFrame]:
    """The sequences (cut to the labeled window) and the per-token table of a labels dir."""
    out = Path(out_dir)
    if not (out / "sequences.parquet").exists():
        raise DataError(f"{out} holds no labels (sequences.parquet); make them with "
                        "memlens label")
    seqs = pd.read_parquet(out / "sequences.parquet")
    config = json.loads((out / "summary.json").read_text())["config"]
    window = config["prefix"] + config["suffix"]
    dup = seqs["duplication"].astype(object).where(seqs["duplication"].notna(), None)
    sequences = [Sequence(str(i), [int(t) for t in ids[:window]],
                          duplication=None if d is None else int(d))
                 for i, ids, d in zip(seqs["id"], seqs["token_ids"], dup, strict=True)]
    return sequences, pd.read_parquet(out / "tokens.parquet")


def manifest_roles(path: str | Path) -> tuple[str, ...] | None:
    """Default roles to label from an organism directory: canaries and non-members."""
    p = Path(path)
    return ("canary", "nonmember") if (p.is_dir() or p.name == "corpus.jsonl") else None


__all__ = ["LabelConfig", "LabelResult", "Sequence", "DataError", "TOKEN_LABELS",
           "read_sequences", "read_labels", "label", "teacher_forced", "greedy_suffixes",
           "summarize", "manifest_roles"]
