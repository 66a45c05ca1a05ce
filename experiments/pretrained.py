"""memlens on a real pretrained model: SmolLM2-135M continued with planted canaries, every
figure from ``memlens run`` (settings chosen on the calibration half, scored on the
evaluation half) with 95% bootstrap intervals over records.

    python experiments/pretrained.py [--preset smollm2-40] [--parts run probes localize layernorm]
                                     [--out FILE.json] [--doc docs/results/pretrained.json]

Parts (each kept in the JSON when a later run leaves it out):

- run: ``memlens run`` on the organism and its corpus with its default settings and 10, 50
  and 200 relearning steps in the audit: labels, probes, the aimed K-FAC edit beside the
  published keep-mass edit and SVD chosen the same way, neuron ablation, static and
  probe-gated steering, norm attribution and removal, the unlearning baselines (gradient
  ascent and difference, NPO, SimNPO, RMU, loss-matched forgetting) chosen the same way,
  the audit of every removal against the organism trained without the forget set (with
  VerbMem and PrivLeak per membership attack); its report goes beside the JSON
  (``pretrained-run/report.html``), steps already computed are reused;
- probes: the probe variants of ``experiments/probe_variants.py`` on the run's store;
- localize: recall of injected neurons per method at 0.1% and 1% of the trained blocks'
  neurons, over ``--records`` injections per budget (interval over injections);
- layernorm: norm parameters moved part of the way to gain 1 per group, and the published
  LayerNorm findings, each reproduced, refuted or not testable, from that sweep and the
  run's attribution.

``--doc`` writes the headline figures, each with its interval, as a small JSON for the
README (``docs/results/pretrained.json``). Perplexity is on held-out prose throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))  # the sibling experiments

from interventions import run_inject  # noqa: E402
from probe_variants import variants  # noqa: E402

from memlens.core import jsonio  # noqa: E402
from memlens.core.metrics import auroc_ci, bootstrap_ci, edit_metrics  # noqa: E402
from memlens.core.model import load_model  # noqa: E402
from memlens.data.labels import LabelConfig, membership_scores  # noqa: E402
from memlens.data.organism import PRESETS, organism_path  # noqa: E402
from memlens.data.splits import Splits  # noqa: E402
from memlens.methods.layernorm import GROUPS, NormRemoval, layer_groups  # noqa: E402
from memlens.steps.audit import best_removals, markdown_audit_table  # noqa: E402
from memlens.steps.chain import RunConfig  # noqa: E402
from memlens.steps.run import run  # noqa: E402

PARTS = ("run", "probes", "localize", "layernorm")
# On 2 CPU cores zero-out costs a forward pass per neuron (6,144 in four blocks); slimming
# and hard concrete train a mask per target: left out.
LOCALIZE_METHODS = ("attribution_patching", "activations", "integrated_gradients")
RELEARN_STEPS = (10, 50, 200)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-40",
                    choices=[k for k, p in PRESETS.items() if p.base])
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                    help="parts to compute (none: rewrite --doc from --out)")
    ap.add_argument("--records", type=int, default=5, help="injected records per budget")
    ap.add_argument("--inject-steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("experiments/results/pretrained.json"))
    ap.add_argument("--doc", type=Path, default=None,
                    help="also write the headline figures here (docs/results/pretrained.json)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    preset = PRESETS[args.preset]
    path = organism_path(args.preset)
    organism = json.loads((path / "memlens.json").read_text())
    n_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    trained = list(range(n_layers - (preset.train_blocks or n_layers), n_layers))
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result |= {
        "model": f"{organism['base']['source']} de-quantized to float32 "
                 f"({organism['base']['package']}), continued as preset {args.preset!r}",
        "preset": args.preset, "params": organism["n_parameters"],
        "organism": {"train_seconds": organism["train_seconds"],
                     "trained_blocks": trained,
                     "training_tokens_per_epoch": organism["n_training_tokens_per_epoch"],
                     "epochs": preset.epochs,
                     "canaries_per_count": preset.corpus.canaries_per_count,
                     "duplication_counts": list(preset.corpus.duplication_counts),
                     "n_nonmembers": preset.corpus.n_nonmembers,
                     "n_heldout": preset.corpus.n_heldout,
                     "heldout_text_perplexity": {
                         k: organism["heldout_text"][k]["heldout_perplexity"]
                         for k in ("before", "after")}}}
    run_dir = args.out.with_name("pretrained-run")
    seconds = result.get("part_seconds", {})
    for part in args.parts:
        t = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "run":
            result |= run_part(path, run_dir)
        elif part == "probes":
            result["probe_variants"] = variants(run_dir)
        else:
            result |= {"localize": localize_part, "layernorm": layernorm_part}[part](
                args, path, trained)
        if "layernorm_run" in result and "layernorm_partial" in result:
            result["layernorm"] = layernorm_verdicts(result["layernorm_run"],
                                                     result["layernorm_partial"], trained)
        seconds[part] = round(time.perf_counter() - t, 1)
        result["part_seconds"] = seconds
        result["seconds"] = round(sum(seconds.values()), 1)
        jsonio.write(args.out, result)
    if args.doc is not None:
        jsonio.write(args.doc, document(result, f"--preset {args.preset} --doc {args.doc}"))
        print(f"wrote {args.doc}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


def run_part(path: Path, out: Path) -> dict:
    s = run(path, path, out, config=RunConfig(audit_relearn_steps=RELEARN_STEPS),
            title="memlens on SmolLM2-135M")
    seqs = pd.read_parquet(out / "labels" / "sequences.parquet")
    by_count = {}
    for dup, g in seqs.groupby("duplication"):
        hits = g["exact"].astype(float).tolist()
        by_count[str(int(dup))] = {"value": sum(hits) / len(hits),
                                   "ci": list(bootstrap_ci(hits)), "n": len(hits)}
    known = seqs[seqs["member"].notna()]
    member = known["member"].astype(int).tolist()
    scores = membership_scores(known)
    return {
        "labels": {"exact_by_duplication": by_count,
                   "membership_auroc": s["labels"]["membership_auroc"],
                   "membership_auroc_ci": {k: list(auroc_ci(member, v.tolist()))
                                           for k, v in scores.items()},
                   "halves": s["labels"]["halves"],
                   "perplexity_before": s["labels"]["perplexity_before"]},
        "probes": s["probes"],
        "calibration": {k: v for k, v in s["calibration"].items() if not k.endswith("_ids")},
        "run": {k: _without_curves(s[k])
                for k in ("kfac", "interventions", "steering", "layernorm")},
        "unlearn": _without_curves(s.get("unlearn")),
        "audit": s.get("audit"),
        "layernorm_run": s["layernorm"],
        "run_seconds": s["seconds"],
    }


def _without_curves(x):
    """A step summary without the calibration curves (they stay in the run's summary)."""
    if isinstance(x, dict):
        return {k: _without_curves(v) for k, v in x.items() if k != "curve"}
    return x


def _best(audit: dict) -> dict | None:
    rows = {k: v for k, v in audit.items() if isinstance(v, dict) and "verbmem" in v}
    if not rows:
        return None
    return best_removals(rows, str(max(int(k) for k in rows["unedited"]["relearn"])))


def _vc(value, ci) -> dict:
    return {"value": value, "ci": list(ci) if ci is not None else None}


def _removal(x: dict | None) -> dict | None:
    """A removal chosen on the calibration half, as scored on both halves."""
    if x is None or x.get("skipped"):
        return None
    chosen = x["chosen"]
    out = {"setting": (f"{chosen['params']['label']} ({chosen['family']})"
                       if chosen.get("params") else None),
           "met_target_on_calibration": chosen.get("met_target")}
    if x.get("never_seen") is None:
        return out
    aimed, unseen = x["aimed_at"], x["never_seen"]
    by_count = unseen.get("removed_by_duplication") or {}
    top = max(by_count, key=int) if by_count else None
    return out | {
        "removed_aimed_at": _vc(aimed["removed"], aimed.get("removed_ci")),
        "n_aimed_at": aimed["n_recited"],
        "removed_never_seen": _vc(unseen["removed"], unseen["removed_ci"]),
        "n_never_seen": unseen["n_recited"],
        "top_count": top,
        # The most repeated canaries of the evaluation half (every one recited before).
        "top_count_exact_after": (_vc(1 - by_count[top]["removed"],
                                      [1 - by_count[top]["ci"][1], 1 - by_count[top]["ci"][0]])
                                  if top else None),
        "top_count_exact_before": x["exact_before"].get(top) if top else None,
        "perplexity_change": x["perplexity_change"]}


def document(r: dict, command: str) -> dict:
    """The headline figures, each with its 95% interval, for the README."""
    doc = {"command": f"python experiments/pretrained.py {command}".strip(),
           "model": r["model"], "preset": r["preset"],
           "n_canaries_per_count": r["organism"]["canaries_per_count"],
           "organism": r["organism"]}
    if "labels" in r:
        lab = r["labels"]
        doc["labels"] = {
            "exact_by_duplication": lab["exact_by_duplication"],
            "membership_auroc": {k: _vc(v, (lab.get("membership_auroc_ci") or {}).get(k))
                                 for k, v in lab["membership_auroc"].items()},
            "halves": lab["halves"]}
        doc["calibration"] = r["calibration"]
        p = r["probes"]
        top, conf = p["best_overall"], p["confidence"]
        doc["probes"] = {
            "best_probe": top["probe"],
            "best_token_auroc": _vc(top["auroc"], top["auroc_ci"]),
            "pii_auroc": top["pii_auroc"],
            "matched_auroc": {"value": top["matched_auroc"],
                              "coverage": top["matched_coverage"]},
            "gain_over_confidence": _vc(top["gain_over_confidence"][0],
                                        top["gain_over_confidence"][1:]),
            "sequence_auroc": top["sequence_auroc"],
            "best_membership_auroc": p["best_membership_auroc"],
            "confidence_auroc": _vc(conf["auroc"], conf["auroc_ci"]),
            "confidence_pii_auroc": conf["pii_auroc"],
            "confidence_matched_auroc": conf["matched_auroc"],
            "best_single_site": {k: p["best_single_site"][k] for k in (
                "probe", "auroc", "auroc_ci", "pii_auroc", "matched_auroc")}}
        run = r["run"]
        doc["kfac"] = {"aimed": _removal(run["kfac"]),
                       "where_to_look": [w["block"] for w in run["kfac"]["where_to_look"][:4]],
                       **{k: _removal(v) for k, v in run["kfac"].get("compared", {}).items()}}
        doc["ablation"] = _removal(run["interventions"])
        doc["steering"] = _removal(run["steering"])
        doc["norm_removal"] = _removal(run["layernorm"])
        audit = r.get("audit") or {}
        doc["audit"] = {
            "forget_set": audit.get("forget", {}).get("n"),
            "rows": {name: {"exact": _vc(a["exact"], a["ci"]["exact"]),
                            "int4": _vc(a["int4"], a["ci"]["int4"]),
                            "relearn": {k: _vc(v, a["ci"]["relearn"][k])
                                        for k, v in a["relearn"].items()},
                            "membership_auroc": {k: _vc(v, (a["ci"]["mia_auroc"] or {}).get(k))
                                                 for k, v in (a["mia_auroc"] or {}).items()},
                            "verbmem": _vc(a["verbmem"], a["ci"]["verbmem"]),
                            "privleak": {k: _vc(v["value"], v["ci"])
                                         for k, v in (a["privleak"] or {}).items()} or None,
                            "perplexity": a["perplexity"],
                            "perplexity_change": _vc(a["perplexity_change"],
                                                     a["ci"]["perplexity_change"]),
                            "told_forget_set": a["told_forget_set"]}
                     for name, a in audit.items() if isinstance(a, dict) and "ci" in a},
            "best": _best(audit),
            "table": markdown_audit_table(audit) if _best(audit) is not None else None}
        doc["unlearn"] = {m: {"chosen": (u["chosen"]["params"] or {}).get("label"),
                              "family": u["chosen"]["family"],
                              "forget_set": u["forget_set"] and {
                                  "removed": _vc(u["forget_set"]["removed"],
                                                 u["forget_set"]["removed_ci"]),
                                  "n_recited": u["forget_set"]["n_recited"],
                                  "perplexity_change": u["forget_set"]["perplexity_change"]}}
                          for m, u in ((r.get("unlearn") or {}).get("methods") or {}).items()}
    if "probe_variants" in r:
        doc["probe_variants"] = {
            k: {x: v[x] for x in ("site", "auroc", "ci", "pii_auroc", "matched_auroc",
                                  "matched_coverage", "gain_over_confidence", "gain_ci",
                                  "sequence_auroc") if x in v}
            for k, v in r["probe_variants"]["variants"].items() if k != "per field"}
    if "localize" in r:
        loc = r["localize"]
        doc["localization"] = {
            "n_injections_per_budget": loc["records_per_budget"],
            "recall": {m: {"0.1%": _vc(loc["recall_by_method"][m], loc["recall_ci"]["0.001"][m]),
                           "1%": _vc(loc["recall_by_method_1pct"][m],
                                     loc["recall_ci"]["0.01"][m])}
                       for m in loc["recall_by_method"]}}
    if "layernorm" in r:
        doc["layernorm"] = {k: v["verdict"] for k, v in r["layernorm"]["findings"].items()}
    return doc


def _organism(path: Path):
    handle = load_model(path)
    return handle, Splits.from_organism(path, handle.tokenizer), LabelConfig()


def localize_part(args, path: Path, trained: list[int]) -> dict:
    handle, splits, cfg = _organism(path)
    general = [s.token_ids for s in splits.general]
    top = max(s.duplication for s in splits.evaluation)
    r = run_inject(handle, splits.labeled, general,
                   [s for s in splits.evaluation if s.duplication == top], splits.heldout,
                   args.records, cfg, blocks=trained, steps=args.inject_steps,
                   methods=LOCALIZE_METHODS, n_clean=2)
    return {"localize": {"blocks": trained, "inject_steps": args.inject_steps,
                         "records_per_budget": args.records,
                         **{k: r[k] for k in ("recall_by_method", "recall_by_method_1pct",
                                              "recall_ci", "injection_success_rate",
                                              "collateral", "runs")}}}


def layernorm_part(args, path: Path, trained: list[int]) -> dict:
    """Norm parameters moved part of the way to gain 1 per group: extraction of the
    canaries seen 10x or more and held-out prose perplexity, by strength."""
    handle, splits, cfg = _organism(path)
    often = [s for s in splits.canaries if s.duplication >= 10]
    rows = []
    for strength in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
        for group, blocks in layer_groups(handle.n_layers).items():
            if strength == 0 and rows:
                continue
            with NormRemoval(blocks if strength else [], strength or 1.0).apply(handle):
                m = edit_metrics(handle, often, splits.heldout, cfg, loose=False)
            ex = m.exact
            rows.append({"group": group if strength else "none", "strength": strength,
                         "exact_ge_10x": sum(ex.values()) / len(ex),
                         "perplexity": m.perplexity})
            print(f"  norms {rows[-1]['group']:6} strength {strength:4}: exact >= 10x "
                  f"{rows[-1]['exact_ge_10x']:.0%}, perplexity {m.perplexity:.1f}", flush=True)
    return {"layernorm_partial": rows}


def layernorm_verdicts(ln: dict, partial: list[dict], trained: list[int]) -> dict:
    """The four published LayerNorm findings (Singhal & Kim 2025) against the run's norm
    attribution and the removal sweep on this Pre-RMSNorm model; where full removal breaks
    the model, the strongest partial removal that leaves every group readable decides."""
    none = next(r for r in partial if r["group"] == "none")
    full = {r["group"]: r for r in partial if r["strength"] == 1.0}
    effect = {g: {"exact_ge_10x": full[g]["exact_ge_10x"],
                  "perplexity_change": full[g]["perplexity"] / none["perplexity"] - 1}
              for g in GROUPS}
    ratio = {g: [] for g in GROUPS}
    n = 1 + max(int(m.split(".")[2]) for m in ln["grad_ratio_by_module"])
    thirds = {i: g for g, blocks in layer_groups(n).items() for i in blocks}
    for module, v in ln["grad_ratio_by_module"].items():
        if module.startswith("model.layers."):
            ratio[thirds[int(module.split(".")[2])]].append(v)
    grad = {g: sum(v) / len(v) for g, v in ratio.items()}
    # A removal that multiplies perplexity tenfold leaves a model that no longer writes
    # text: a fall in extraction there says nothing about where memorization lives.
    broken = [g for g in GROUPS if effect[g]["perplexity_change"] > 9]
    readable = {}
    for strength in sorted({r["strength"] for r in partial if r["strength"]}):
        by_group = {r["group"]: r for r in partial if r["strength"] == strength}
        if all(r["perplexity"] < 10 * none["perplexity"] for r in by_group.values()):
            readable = {"strength": strength, "rows": by_group}
    at = readable.get("rows", {})

    def kind(r: dict) -> str:
        rise = r["perplexity"] / none["perplexity"] - 1
        kept = r["exact_ge_10x"] >= 0.5 * none["exact_ge_10x"]
        if rise > 0.10:
            return "memorization persists, learning destabilized" if kept else "both fall"
        return "no effect" if kept else "memorization falls, learning holds"

    kinds = {g: kind(r) for g, r in at.items()}
    drops = {g: none["exact_ge_10x"] - r["exact_ge_10x"] for g, r in at.items()}
    rises = {g: r["perplexity"] / none["perplexity"] - 1 for g, r in at.items()}
    most_mem = max(drops, key=drops.get) if len(set(drops.values())) > 1 else None
    most_learn = max(rises, key=rises.get) if rises else None
    pre_ln = ("learning destabilized by full removal: reproduced (perplexity x"
              f"{min(effect[g]['perplexity_change'] for g in GROUPS) + 1:.0f} or more)"
              if broken == list(GROUPS) else "")
    if at:
        against = [g for g, k in kinds.items() if k == "memorization falls, learning holds"]
        pre_ln += (f"; at {readable['strength']:.0%} of the way to gain 1: "
                   + ", ".join(f"{g} {k}" for g, k in kinds.items()) + " -> "
                   + (f"refuted in the {' and '.join(against)} blocks" if against
                      else "reproduced"))
    early = ("not testable: no partial removal separates the groups" if most_mem is None
             else "reproduced" if most_mem == "early" else "refuted")
    most_grad = max(GROUPS, key=lambda g: abs(math.log(grad[g])))
    return {
        "removal": effect, "before": {"exact_ge_10x": none["exact_ge_10x"],
                                      "perplexity": none["perplexity"]},
        "grad_ratio_by_group": grad, "trained_blocks": trained,
        "findings": {
            "post_ln_removal_lowers_memorization_and_recovers": {
                "verdict": "not testable",
                "why": "SmolLM2 is Pre-RMSNorm and no pretrained Post-LN model is available "
                       "offline; experiments/layernorm_study.py tests it on the OPT Post-LN "
                       "organism"},
            "pre_ln_removal_destabilizes_learning_while_memorization_persists": {
                "verdict": pre_ln, "groups_broken_by_full_removal": broken,
                "partial_strength": readable.get("strength"), "by_group": kinds},
            "early_layers_matter_most_for_memorization": {
                "verdict": early, "partial_strength": readable.get("strength"),
                "extraction_drop_by_group": drops, "perplexity_change_by_group": rises,
                "largest_extraction_drop": most_mem, "largest_perplexity_rise": most_learn},
            "gradient_at_norm_input_separates_memorized_from_clean_most_in_early_layers": {
                "verdict": "reproduced" if most_grad == "early" else "refuted",
                "most_separated_group": most_grad,
                "note": "grad_ratio is the gradient norm at the norm's input for memorized "
                        "PII tokens over clean tokens; below 1 means memorized tokens pull "
                        "less (their loss is near 0)"},
        },
    }


if __name__ == "__main__":
    main()
