"""Label step: a model and a JSONL of sequences -> a labels directory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import Config, nested, option
from memlens.core.identity import corpus_hash
from memlens.core.metrics import Extraction
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
from memlens.report.figures import extraction_figure
from memlens.report.page import Section
from memlens.steps.chain import Chain

__all__ = ["LabelCommand", "label_step", "main", "print_extraction_table"]


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
TITLE = "1. Labels: what the organism memorized"
TEXT = ("Which canaries the organism reproduces verbatim from a 32-token prefix, by how "
              "often they were in the training data, and how well simple membership scores "
              "(loss, Min-K%, zlib) tell members from held-out records.")


def report(d: Chain, sec: Section) -> dict:
    labels = label(d.handle, d.splits.labeled, d.cfg, progress=d.progress)
    labels.save(d.labels_dir)
    s = labels.summary
    sec.figure(extraction_figure(
        {"exact (greedy reproduces the suffix)": labels.extraction.exact,
         "loose (75% similar)": labels.extraction.loose},
        "Extraction by duplication count (32-token prefix, 32-token suffix)"))
    sec.table([{"membership score": k, "AUROC (members vs non-members)": v}
               for k, v in s["membership_auroc"].items()])
    exact = labels.extraction.exact
    best = max(s["membership_auroc"], key=s["membership_auroc"].get)
    sec.finding(f"The organism recites {exact['100']:.0%} of its 100x canaries and "
                f"{exact.get('1', 0):.0%} of those seen once; the best membership score "
                f"({best}) tells members from non-members at AUROC "
                f"{s['membership_auroc'][best]:.2f}.")
    return {**labels.extraction.to_json(),
            "membership_auroc": s["membership_auroc"],
            "token_label_counts": s["token_label_counts"],
            "before": d.after().to_json()}
