"""memlens on a real pretrained model: the demo's chain (labels, probes, K-FAC edit, neuron
ablation, probe-gated steering, norm attribution and removal) on SmolLM2-135M continued
with planted canaries.

    python experiments/pretrained.py [--preset smollm2-cpu] [--out FILE.json]

Writes the demo's report beside the JSON (``pretrained-demo/report.html``); steps already
computed for the same model and settings are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from memlens.demo import DemoConfig, run_demo
from memlens.organism import PRESETS, organism_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-cpu",
                    choices=[k for k, p in PRESETS.items()  # the demo reads 10x-100x
                             if p.base and {10, 25, 100} <= set(p.corpus.duplication_counts)])
    ap.add_argument("--steer-site", default="blocks.27.hook_resid_post")
    ap.add_argument("--kfac-tokens", type=int, default=4000)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/pretrained.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = organism_path(args.preset)
    organism = json.loads((path / "memlens.json").read_text())
    config = DemoConfig(preset=args.preset, steer_site=args.steer_site,
                        kfac_tokens=args.kfac_tokens, localize_method="activations",
                        localize_budget=0.001, attribution_tokens=40)
    s = run_demo(args.out.with_name("pretrained-demo"), config=config)
    before = s["labels"]["before"]
    result = {
        "model": f"{organism['base']['source']} de-quantized to float32 "
                 f"({organism['base']['package']}), continued as preset {args.preset!r}",
        "params": organism["n_parameters"],
        "organism": {"train_seconds": organism["train_seconds"],
                     "trained_blocks": PRESETS[args.preset].train_blocks,
                     "training_tokens_per_epoch": organism["n_training_tokens_per_epoch"],
                     "epochs": PRESETS[args.preset].epochs,
                     "heldout_text_perplexity": {
                         k: organism["heldout_text"][k]["heldout_perplexity"]
                         for k in ("before", "after")}},
        "labels": {k: s["labels"][k] for k in ("exact_extraction_rate_by_duplication",
                                               "loose_extraction_rate_by_duplication",
                                               "membership_auroc")},
        "probes": {"best_site": s["probes"]["best_probe"],
                   "best_token_auroc": s["probes"]["auroc"],
                   "confidence_auroc": s["probes"]["other_probes_auroc"].get("confidence"),
                   "selectivity": s["probes"]["selectivity"]},
        "kfac": {"before": {"exact_extraction_rate_by_duplication":
                            before["exact_extraction_rate_by_duplication"],
                            "perplexity": before["perplexity"]},
                 "aimed": s["kfac"]},
        "localize": s["interventions"],
        "steering": s["steering"],
        "layernorm": s["layernorm"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["kfac"]["keep_mass_trained_blocks"] = keep_mass_sweep(
        path, args.out.with_name("pretrained-demo") / "kfac" / "factors.safetensors",
        PRESETS[args.preset].train_blocks)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: result[k] for k in ("labels", "probes")}, indent=1, default=float))
    print(f"wrote {args.out}")


def keep_mass_sweep(path: Path, factors_path: Path, train_blocks: int | None,
                    rhos=(0.99, 0.97, 0.95, 0.9, 0.7)) -> list[dict]:
    """The published keep-mass edit on the MLPs of the blocks the organism trained, by rho:
    extraction of the evaluation canaries and perplexity of the held-out prose."""
    from memlens.core.metrics import edit_metrics
    from memlens.core.model import load_model
    from memlens.curvature import Factors, apply_weights, eigenbasis, kfac_weights, rho_layers
    from memlens.labels import read_sequences
    from memlens.splits import Splits

    handle = load_model(path)
    splits = Splits.from_organism(path, handle.tokenizer)
    prose = [s.token_ids for s in read_sequences(path / "heldout.jsonl", handle.tokenizer)]
    factors = Factors.load(factors_path)
    n = handle.n_layers
    first = n - (train_blocks or n)
    pattern = {f"model.layers.{i}.mlp.*" for i in range(first, n)}
    rows = [{"rho": None, **_metrics(edit_metrics(handle, splits.evaluation, prose,
                                                  loose=False))}]
    for rho in rhos:
        per_layer = {p: rho for p in pattern}
        basis = eigenbasis(factors, rho_layers(factors.layers, per_layer))
        with apply_weights(handle, kfac_weights(handle, basis, per_layer)):
            rows.append({"rho": rho, **_metrics(edit_metrics(handle, splits.evaluation, prose,
                                                             loose=False))})
        print(rows[-1], flush=True)
    return rows


def _metrics(m: dict) -> dict:
    return {"exact_extraction_rate_by_duplication": m["exact_extraction_rate_by_duplication"],
            "prose_perplexity": m["perplexity"]}


if __name__ == "__main__":
    main()
