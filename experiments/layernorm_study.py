"""LayerNorm parameters vs memorization and learning, in Pre-LN and Post-LN organisms.

    python experiments/layernorm_study.py [--preset tiny-deep] [--seeds 0 1] [--out DIR]
                                          [--device cuda]
    python experiments/layernorm_study.py --merge run1.json run2.json [--out DIR]

The language-model analogue of Singhal & Kim (2025). Two OPT organisms trained on the same
corpus differ only in where LayerNorm sits: ``opt`` (Pre-LN) and ``opt-postln`` (Post-LN).
Per architecture and seed:

- post hoc: the trained organism with the gain and bias of the LayerNorms in one group of
  blocks (early, middle, late third) or one single block set to 1 and 0;
- training: an organism trained from scratch with those parameters removed in one group;
- every condition scored on memorization (exact and loose extraction of canaries by
  duplication), learning (loss and next-token accuracy on the template tokens of held-out
  records) and recovery (where memorized PII tokens go: ``memlens.methods.layernorm.recovery``);
- attribution on the trained organism: per LayerNorm, the gradient norm at its input for
  memorized PII tokens vs clean template tokens of held-out records, and its scale.

Writes DIR/layernorm_study.json (``conditions``, ``attribution``, ``summary``) and
DIR/layernorm_study.html (the figures). Trained organisms are cached, so a second run only
re-scores them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memlens import load_model, organism_path
from memlens.core import jsonio
from memlens.data.labels import LabelConfig
from memlens.data.splits import Splits
from memlens.methods.layernorm import (
    GROUPS,
    NormRemoval,
    StudyData,
    attribution_table,
    attribution_targets,
    condition_metrics,
    layer_groups,
    memorized_pii_positions,
    norm_attribution,
)
from memlens.report.figures import gradient_ratio_figure, group_bars_figure, layer_heatmap_figure

# The controlled pair: the same OPT decoder with LayerNorm before or after each residual add.
# Other organism archs can join with --archs (llama: Pre-LN with RMSNorm, gain only).
ARCHS = {"opt": "Pre-LN", "opt-postln": "Post-LN", "llama": "Pre-RMSNorm (llama)",
         "neox": "Pre-LN (neox)", "gpt2": "Pre-LN (gpt2)"}
# Memorization is scored on canaries repeated this often or more: the organisms recite
# 25x and 100x canaries fully and 10x ones in part, so removal effects show there.
MIN_DUPLICATION = 10


def run_arch(preset: str, arch: str, seed: int, cfg: LabelConfig, device: str
             ) -> tuple[list, list]:
    path = organism_path(preset, arch, seed, device=device)
    handle = load_model(path, device=device)
    data = StudyData.from_splits(Splits.from_organism(path, handle.tokenizer))
    groups = layer_groups(handle.n_layers)
    pii_positions = memorized_pii_positions(handle, data.canaries, cfg)
    base = dict(arch=arch, layernorm=ARCHS[arch], seed=seed, device=device)
    conditions = []

    def add(when, group, layers, h):
        t0 = time.perf_counter()
        row = {**base, "when": when, "removed_group": group, "removed_layers": layers,
               **condition_metrics(h, data, pii_positions, cfg, MIN_DUPLICATION)}
        conditions.append(row)
        print(f"{ARCHS[arch]:8s} seed {seed} {when:8s} {group:7s} "
              f"exact>={MIN_DUPLICATION}x {row['exact_extraction_rate']:.2f}  "
              f"loose {row['loose_extraction_rate']:.2f}  "
              f"memorized loss {row['recovery']['memorized_loss']:.3f}  "
              f"template loss {row['heldout_loss']:.3f}  "
              f"recovery {row['recovery']['recovered']:.2f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    unedited = condition_metrics(handle, data, pii_positions, cfg, MIN_DUPLICATION)
    for when in ("posthoc", "training"):
        conditions.append({**base, "when": when, "removed_group": "none", "removed_layers": [],
                           **unedited})
    for group in GROUPS:
        with NormRemoval(groups[group]).apply(handle):
            add("posthoc", group, groups[group], handle)
    for layer in range(handle.n_layers):
        with NormRemoval([layer]).apply(handle):
            add("posthoc", f"layer{layer}", [layer], handle)

    sets = attribution_targets(data, pii_positions, cfg, seed=seed)
    attrib = {kind: norm_attribution(handle, ids, pos) for kind, (ids, pos) in sets.items()}
    attribution = [{**base, **row} for row in attribution_table(attrib["memorized"],
                                                                 attrib["clean"])]

    for group in GROUPS:
        trained = load_model(organism_path(preset, arch, seed, norm_free_layers=groups[group],
                                           device=device), device=device)
        if trained.tokenizer.get_vocab() != handle.tokenizer.get_vocab():
            raise RuntimeError("organisms of the same preset and seed have different tokenizers")
        add("training", group, groups[group], trained)
    return conditions, attribution


METRICS = {
    "exact": lambda c: c["exact_extraction_rate"],
    "loose": lambda c: c["loose_extraction_rate"],
    "memorized_loss": lambda c: c["recovery"]["memorized_loss"],
    "template_loss": lambda c: c["heldout_loss"],
    "template_accuracy": lambda c: c["heldout_accuracy"],
    "recovery": lambda c: c["recovery"]["recovered"],
}


def summarize(conditions: list[dict]) -> list[dict]:
    """Mean and spread over seeds per (architecture, when, group), with the change vs none."""
    keys = sorted({(c["layernorm"], c["when"], c["removed_group"]) for c in conditions},
                  key=lambda k: (k[0] != "Pre-LN", k[1], k[2] != "none", k[2]))
    rows = []
    for kind, when, group in keys:
        chosen = [c for c in conditions
                  if (c["layernorm"], c["when"], c["removed_group"]) == (kind, when, group)]
        base = [c for c in conditions
                if (c["layernorm"], c["when"], c["removed_group"]) == (kind, when, "none")]
        row = {"layernorm": kind, "when": when, "removed_group": group, "n_seeds": len(chosen)}
        for name, get in METRICS.items():
            vals = torch.tensor([get(c) for c in chosen], dtype=torch.float64)
            row[name] = vals.mean().item()
            row[f"{name}_std"] = vals.std().item() if len(vals) > 1 else 0.0
            row[f"{name}_change"] = row[name] - sum(get(c) for c in base) / len(base)
        rows.append(row)
    return rows


def print_table(summary: list[dict]) -> None:
    print(f"\n{'':8s} {'when':8s} {'removed':8s} " + " ".join(f"{k:>17s}" for k in METRICS))
    for r in summary:
        if r["removed_group"].startswith("layer"):
            continue
        cells = " ".join(f"{r[k]:8.3f} ({r[k + '_change']:+.3f})" for k in METRICS)
        print(f"{r['layernorm']:8s} {r['when']:8s} {r['removed_group']:8s} {cells}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-deep")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="organism seeds (each seed draws its own corpus); about 11 min each")
    ap.add_argument("--out", type=Path, default=Path("experiments/results"))
    ap.add_argument("--archs", nargs="+", default=["opt", "opt-postln"], choices=list(ARCHS),
                    help="organism archs (default: the Pre-LN / Post-LN OPT pair)")
    ap.add_argument("--device", default="cpu", help="where organisms train and run (cuda)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="instead of running: pool earlier runs' layernorm_study.json files "
                         "(other seeds, other machines) into one result")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    conditions, attribution = [], []
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        args.seeds = sorted({s for r in runs for s in r["seeds"]})
        if len(args.seeds) != sum(len(r["seeds"]) for r in runs):
            raise SystemExit(f"the runs to merge share seeds: {[r['seeds'] for r in runs]}")
        for r in runs:
            conditions += r["conditions"]
            attribution += r["attribution"]
    for seed in [] if args.merge else args.seeds:
        for arch in args.archs:
            c, a = run_arch(args.preset, arch, seed, LabelConfig(), args.device)
            conditions += c
            attribution += a
    result = {"preset": args.preset, "seeds": args.seeds,
              "min_duplication": MIN_DUPLICATION,
              "devices": sorted({c.get("device", "cpu") for c in conditions}),
              "conditions": conditions,
              "attribution": attribution, "summary": summarize(conditions),
              "seconds": round(time.perf_counter() - t0, 1)}
    jsonio.write(args.out / "layernorm_study.json", result)
    figures = [group_bars_figure(conditions), gradient_ratio_figure(attribution),
               layer_heatmap_figure(conditions)]
    (args.out / "layernorm_study.html").write_text(
        "<html><head><meta charset='utf-8'><title>memlens LayerNorm study</title></head><body>"
        + "\n".join(f.to_html(full_html=False, include_plotlyjs=i == 0)
                    for i, f in enumerate(figures)) + "</body></html>")
    print_table(result["summary"])
    print(f"wrote {args.out / 'layernorm_study.json'} and .html in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
