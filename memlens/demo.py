"""``memlens demo``: the pipeline on the embedded organism, end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

from memlens.cli import print_extraction_table
from memlens.labels import LabelConfig, label, read_sequences
from memlens.models import load_model
from memlens.organism import organism_path


def run_demo(out: str | Path = "memlens-demo", preset: str = "small", arch: str = "llama",
             seed: int = 0) -> dict:
    """Train or reuse the organism, label its canaries and non-members, write OUT/summary.json."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = organism_path(preset, arch, seed)
    organism = json.loads((path / "memlens.json").read_text())
    print(f"organism: {path}\n  {organism['n_parameters']:,} parameters, trained in "
          f"{organism['train_seconds']:.0f} s; held-out template-token accuracy "
          f"{organism['heldout_template_accuracy']:.1%}, PII-token accuracy "
          f"{organism['heldout_pii_accuracy']:.1%}")
    handle = load_model(path)
    seqs = read_sequences(path, handle.tokenizer, roles=("canary", "nonmember"))
    labels = label(handle, seqs, LabelConfig())
    labels.save(out / "labels")
    print_extraction_table(labels.summary)
    summary = {"organism": organism, "labels": labels.summary,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return summary
