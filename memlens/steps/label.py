"""Label step: a model and a JSONL of sequences -> a labels directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import Config, nested, option
from memlens.core.identity import corpus_hash
from memlens.core.metrics import Extraction, perplexity
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.storage import prepare_output
from memlens.data.labels import (
    LabelConfig,
    Labels,
    label,
    labelable,
    manifest_roles,
    read_sequences,
)
from memlens.data.splits import HALVES
from memlens.report.figures import extraction_figure
from memlens.report.page import Section
from memlens.steps.chain import Chain, skip

__all__ = ["NAME", "SETTINGS", "TEXT", "TITLE", "LabelCommand", "label_step", "main",
           "print_extraction_table", "report"]


def label_step(handle: ModelHandle, data: str | Path, out: str | Path,
               cfg: LabelConfig | None = None, roles: tuple[str, ...] | None = None,
               progress: bool = True, reuse: bool = False) -> Labels:
    """Label the sequences of ``data`` (JSONL or organism dir) into ``out``. With ``reuse``,
    labels already in ``out`` for the same model, sequences and config are loaded instead."""
    cfg = cfg or LabelConfig()
    prepare_output(out, "labels", marker="summary.json")
    seqs = read_sequences(data, handle.tokenizer, roles=roles or manifest_roles(data),
                          max_tokens=cfg.prefix + cfg.suffix)
    if reuse and (Path(out) / "summary.json").is_file():
        done = Labels.load(out)
        ident = done.identity
        if (ident.model_hash, ident.corpus_hash, ident.config) == (
                handle.weights_hash(), corpus_hash(labelable(seqs, cfg)),
                json.loads(json.dumps(asdict(cfg)))):
            return done
    labels = label(handle, seqs, cfg, progress=progress)
    labels.save(out)
    return labels


@dataclass(kw_only=True)
class LabelCommand(Config):
    """label memorization per sequence and per token

    Reads a model and a JSONL of sequences (an organism's corpus.jsonl or your own: 'text'
    and/or 'token_ids', optional 'duplication', 'spans'). Writes OUT/sequences.parquet,
    OUT/tokens.parquet and OUT/summary.json (with the identity of the model and sequences):
    the labels directory every later step reads.
    """

    EXAMPLE: ClassVar[str] = ("memlens label --model organisms/tiny --data organisms/tiny "
                              "--out labels/tiny")
    DISTRIBUTED: ClassVar[bool] = True

    model: ModelOptions = nested(ModelOptions)
    data: Path = option(help="JSONL file or organism directory")
    out: Path = option(help="labels directory to write")
    roles: tuple[str, ...] | None = option(None, "keep only these roles (default for an "
                                           "organism: canary nonmember)")
    labels: LabelConfig = nested(LabelConfig)


def main(cmd: LabelCommand) -> None:
    labels = label_step(cmd.model.load(), cmd.data, cmd.out, cmd.labels, roles=cmd.roles)
    print_extraction_table(labels.summary)
    print(f"wrote {cmd.out}/summary.json")


def print_extraction_table(summary: dict) -> None:
    rates = Extraction.from_json(summary)
    exact, loose = rates.exact, rates.loose or {}
    counts = summary["n_by_duplication"]
    print(f"{'duplication':>12} {'n':>5} {'exact':>7} {'loose':>7}")
    for k in exact:
        name = "non-member" if k == "0" else k if not k.isdigit() else f"{k}x"
        lo = f"{loose[k]:7.1%}" if k in loose else "      -"
        print(f"{name:>12} {counts[k]:>5} {exact[k]:7.1%} {lo}")


# --------------------------------------------------------------------------- in the chain

NAME = "labels"
SETTINGS = ()
TITLE = "1. Labels: what the model memorized"
TEXT = ("Which records the model reproduces verbatim from their first tokens (greedy decoding "
        "from the prefix reproduces the suffix), by how often they were in the training data "
        "where that is known, and how well simple membership scores (loss, Min-K%, zlib) tell "
        "members from held-out records. The records are split by record into a calibration "
        "half (every later setting is chosen on it) and an evaluation half (every later "
        "number is scored on it).")


def report(d: Chain, sec: Section) -> dict:
    labels = label(d.handle, d.splits.labeled, d.cfg, progress=d.progress)
    labels.save(d.labels_dir)
    s = labels.summary
    rates = labels.extraction
    skipped = []
    if d.counts:
        sec.figure(extraction_figure(
            {"exact (greedy reproduces the suffix)": rates.exact,
             "loose (75% similar)": rates.loose},
            f"Extraction by duplication count ({d.cfg.prefix}-token prefix, "
            f"{d.cfg.suffix}-token suffix)"))
    else:
        skipped.append(skip(sec, "Extraction by duplication count", "add a 'duplication' "
                            "count (times seen in training) to each record"))
    if "membership_auroc" in s:
        ci = s.get("membership_auroc_ci", {})
        sec.table([{"membership score": k, "AUROC (members vs non-members)": v,
                    "95% CI": "{:.3f} to {:.3f}".format(*ci[k]) if k in ci else ""}
                   for k, v in s["membership_auroc"].items()])
    else:
        skipped.append(skip(sec, "Membership inference", "add held-out records the model "
                            "was never trained on, marked 'duplication': 0"))
    halves = {h: {"records": len(d.splits.half(h)), "recited": len(d.recited(h)),
                  "clean text": d.clean(h)[1]} for h in HALVES}
    sec.table([{"half": h, **v} for h, v in halves.items()])
    perplexity_before = {h: perplexity(d.handle, d.clean_ids(h), d.cfg.batch_size)
                         for h in HALVES}
    mia = s.get("membership_auroc")
    best = max(mia, key=mia.get) if mia else None
    sec.finding(
        f"The model recites {s['exact_extraction_rate']:.0%} of the {s['n_sequences']} "
        f"records exactly ({halves['calibration']['recited']} in the calibration half, "
        f"{halves['evaluation']['recited']} in the evaluation half)"
        + (f"; the best membership score ({best}) tells members from non-members at AUROC "
           f"{mia[best]:.2f}." if mia else "."))
    return {**rates.to_json(), "exact_extraction_rate": s["exact_extraction_rate"],
            "n_by_duplication": s["n_by_duplication"],
            "membership_auroc": s.get("membership_auroc"),
            "membership_auroc_ci": s.get("membership_auroc_ci"),
            "token_label_counts": s["token_label_counts"],
            "halves": halves, "perplexity_before": perplexity_before,
            "before": d.after().to_json(), "skipped": None, "skipped_parts": skipped}
