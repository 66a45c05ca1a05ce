"""memlens on a real pretrained model: SmolLM2-135M continued with planted canaries.

    python experiments/pretrained.py [--preset smollm2-cpu] [--parts run kfac localize steer]
                                     [--out FILE.json]

Parts (each kept in the JSON when a later run leaves it out):

- run: ``memlens run`` on the organism and its corpus, with its default settings (labels,
  probes, the aimed K-FAC edit, neuron ablation, steering, norm attribution and removal,
  the audit; every setting chosen on the calibration half, scored on the evaluation half);
  its report goes beside the JSON (``pretrained-run/report.html``), steps already computed
  are reused;
- kfac: the published keep-mass edit, the aimed KL-budget edit, SVD and the aimed edit's two
  controls at equal predicted KL (random components; a gradient step), each at several
  strengths on the MLPs of the blocks the organism trained (memorization can live only
  there), with factors from ``--kfac-tokens`` prose tokens; every method is interpolated at
  the aimed edit's perplexity, and the canaries' loading on low-curvature components is set
  beside prose and non-member PII records;
- localize: recall of injected neurons per method at 0.1% and 1% of each block's neurons,
  injected into and searched in the trained blocks;
- steer: static and probe-gated steering at the trained blocks' residual streams;
- layernorm: norm parameters moved part of the way to gain 1 per group, and the published
  LayerNorm findings, each reproduced, refuted or not testable, from that sweep and the
  run's attribution.

Perplexity is on held-out prose throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sibling experiments

from interventions import run_inject, run_steer  # noqa: E402
from kfac_edit import AIMED, GRADIENT, PUBLISHED, RANDOM, SVD, sweep_arch  # noqa: E402

from memlens.core import jsonio
from memlens.core.metrics import Extraction, edit_metrics  # noqa: E402
from memlens.core.model import load_model  # noqa: E402
from memlens.data.labels import LabelConfig  # noqa: E402
from memlens.data.organism import PRESETS, organism_path  # noqa: E402
from memlens.data.splits import Splits  # noqa: E402
from memlens.methods.layernorm import GROUPS, NormRemoval, layer_groups  # noqa: E402
from memlens.steps.run import run  # noqa: E402

PARTS = ("run", "kfac", "localize", "steer", "layernorm")
# On 2 CPU cores zero-out costs a forward pass per neuron (6,144 in four blocks) and
# slimming as much as hard concrete, its stronger sibling: both left out.
LOCALIZE_METHODS = ("activations", "integrated_gradients", "hard_concrete")
STEER_VARIANTS = ("static, mean difference", "probe-gated, mean difference",
                  "probe-gated, probe direction")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-cpu",
                    choices=[k for k, p in PRESETS.items()  # the sweeps read 10x-100x
                             if p.base and {10, 25, 100} <= set(p.corpus.duplication_counts)])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--kfac-tokens", type=int, default=20_000)
    ap.add_argument("--records", type=int, default=1, help="injected records per budget")
    ap.add_argument("--inject-steps", type=int, default=100)
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.0, 1.5, 1.75, 2.0, 4.0, 8.0])
    ap.add_argument("--steer-blocks", type=int, nargs="+", default=None,
                    help="residual streams to steer at (default: the trained blocks but the last)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/pretrained.json"))
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
        "params": organism["n_parameters"],
        "organism": {"train_seconds": organism["train_seconds"],
                     "trained_blocks": trained,
                     "training_tokens_per_epoch": organism["n_training_tokens_per_epoch"],
                     "epochs": preset.epochs,
                     "canaries_per_count": preset.corpus.canaries_per_count,
                     "heldout_text_perplexity": {
                         k: organism["heldout_text"][k]["heldout_perplexity"]
                         for k in ("before", "after")}}}
    seconds = result.get("part_seconds", {})
    for part in args.parts:
        t = time.perf_counter()
        print(f"== {part}", flush=True)
        if part == "run":
            result |= run_part(path, trained, args.out.with_name("pretrained-run"))
        elif part == "kfac":
            result["kfac"] = kfac_part(args, trained, args.out.parent)
        else:
            result |= {"localize": localize_part, "steer": steer_part,
                       "layernorm": layernorm_part}[part](args, path, trained)
        if "layernorm_run" in result and "layernorm_partial" in result:
            result["layernorm"] = layernorm_verdicts(result["layernorm_run"],
                                                     result["layernorm_partial"], trained)
        seconds[part] = round(time.perf_counter() - t, 1)
        result["part_seconds"] = seconds
        result["seconds"] = round(sum(seconds.values()), 1)
        jsonio.write(args.out, result)
    print(json.dumps({k: result.get(k) for k in ("labels", "probes")}, indent=1, default=float))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


def run_part(path: Path, trained: list[int], out: Path) -> dict:
    s = run(path, path, out, title="memlens on SmolLM2-135M")
    return {
        "labels": {**Extraction.from_json(s["labels"]).to_json(),
                   "membership_auroc": s["labels"]["membership_auroc"],
                   "halves": s["labels"]["halves"]},
        "probes": {"best_site": s["probes"]["best_probe"],
                   "best_token_auroc": s["probes"]["auroc"],
                   "confidence_auroc": s["probes"]["other_probes_auroc"].get("confidence"),
                   "matched_auroc": s["probes"]["matched_auroc"],
                   "selectivity": s["probes"]["selectivity"],
                   "token_baselines": s["probes"]["token_baselines"]},
        "probe_diagnosis": probe_diagnosis(out, trained),
        "calibration": {k: v for k, v in s["calibration"].items() if not k.endswith("_ids")},
        "run": {k: {x: v for x, v in s[k].items() if x != "chosen"}
                for k in ("kfac", "interventions", "steering", "layernorm")},
        "audit": s.get("audit"),
        "layernorm_run": s["layernorm"],
    }


def probe_diagnosis(out: Path, trained: list[int]) -> dict:
    """What the residual probes learn here, on the demo's store and labels (scikit-learn,
    the demo's split): memorized tokens against template tokens and against PII the model
    does not recall, separately; and a residual site with the model's confidence added."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from memlens.data.labels import Labels
    from memlens.data.store import ActivationStore
    from memlens.methods.probes import ProbeData

    demo = json.loads((out / "steps" / "probes.json").read_text())["summary"]
    path = Path(json.loads((out / "summary.json").read_text())["model"])
    splits = Splits.from_organism(path, load_model(path).tokenizer)
    data = ProbeData.from_store(ActivationStore.open(out / "activations"),
                                Labels.load(out / "labels"), split=splits.probe_split())
    tok, out_rows = data.tokens, {}
    train, test = data.mask("train"), data.mask("test")
    y = tok["y"].to_numpy()

    def auroc(x, keep):
        scale = StandardScaler().fit(x[train])
        fit = LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced").fit(
            scale.transform(x[train]), y[train])
        score = fit.decision_function(scale.transform(x))
        return float(roc_auc_score(y[test & keep], score[test & keep]))

    label = tok["label"].to_numpy()
    template = label != "not_memorized"
    unrecalled = label != "generic"
    everything = np.ones(len(tok), dtype=bool)
    for site in (f"blocks.{trained[0]}.hook_resid_post", demo["best_probe"]):
        x = data.features[site]
        out_rows[site] = {
            "all": auroc(x, everything),
            "memorized_vs_template_tokens": auroc(x, template),
            "memorized_vs_unrecalled_pii": auroc(x, unrecalled),
            "with_confidence": auroc(np.c_[x, data.features["confidence"]], everything)}
    return out_rows


def kfac_part(args, trained: list[int], out_dir: Path) -> dict:
    r = sweep_arch(args.preset, "llama", args.kfac_tokens, out_dir, blocks=trained,
                   methods_named=[PUBLISHED, AIMED, SVD, RANDOM, GRADIENT])
    scope = f"the MLPs of the trained blocks {trained}"
    return {"before": r["before"], "after": r["kfac"]["after"],
            "factor_tokens": r["factor_tokens"], "scope": scope,
            "n_aim_recited": r["n_aim_recited"],
            "best": r["kfac"], "published": r["published"], "svd": r["svd"],
            "svd_best_within_10pct": r["svd_best_within_10pct"],
            "loading_by_curvature_bin": r["loading_by_curvature_bin"],
            "at_aimed_perplexity": r["at_aimed_perplexity"],
            "points": r["points"]}


def _organism(path: Path):
    handle = load_model(path)
    return handle, Splits.from_organism(path, handle.tokenizer), LabelConfig()


def localize_part(args, path: Path, trained: list[int]) -> dict:
    handle, splits, cfg = _organism(path)
    general = [s.token_ids for s in splits.general]
    r = run_inject(handle, splits.labeled, general, splits.evaluation, splits.heldout,
                   args.records, cfg, blocks=trained, steps=args.inject_steps,
                   methods=LOCALIZE_METHODS, n_clean=2)
    return {"localize": {"blocks": trained, "inject_steps": args.inject_steps,
                         "records_per_budget": args.records,
                         **{k: r[k] for k in ("recall_by_method", "recall_by_method_1pct",
                                              "injection_success_rate", "collateral",
                                              "runs")}}}


def steer_part(args, path: Path, trained: list[int]) -> dict:
    handle, splits, cfg = _organism(path)
    before = edit_metrics(handle, splits.evaluation, splits.heldout, cfg)
    aim_ids = {s.id for s in splits.calibration + splits.calibration_nonmembers}
    sites = [f"blocks.{i}.hook_resid_post" for i in (args.steer_blocks or trained[:-1])]
    r = run_steer(handle, splits.labeled, aim_ids, splits.evaluation, splits.heldout, cfg,
                  before, sites, alphas=args.alphas, variants_named=STEER_VARIANTS)
    return {"steering": r}


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
