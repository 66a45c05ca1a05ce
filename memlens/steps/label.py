"""Label step: a model and a JSONL of sequences -> a labels directory."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from memlens.core.identity import corpus_hash
from memlens.core.model import ModelHandle
from memlens.core.storage import prepare_output
from memlens.data.labels import (
    LabelConfig,
    Labels,
    label,
    labelable,
    manifest_roles,
    read_sequences,
)

__all__ = ["label_step"]


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
