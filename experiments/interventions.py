"""Localization on injected ground truth, BalancedSubnet removal, and steering, on the organism.

    python experiments/interventions.py [--preset small] [--parts inject subnet steer]

- inject: fresh records are taught to the model through the output rows of a random
  0.1% / 1% of MLP neurons per layer (one record per run); every localization method is scored
  by the recall of those neurons at the same budget; the neurons found are then ablated to
  measure collateral damage on the canaries and on clean perplexity.
- subnet: BalancedSubnet at several drop ratios, aimed with the recited canaries of the even
  half, scored on the odd half.
- steer: static and per-token (probe-gated) steering at several sites and strengths, against
  the baseline gate (a sigmoid of the projection on the mean-difference direction). Probes
  and directions come from the even half of the canaries and non-members; scores from the
  odd half.

Writes experiments/results/interventions.json with `recall_by_method` (at 0.1%),
`balanced_subnet` and `steering` (each `before` / `after` with
`exact_extraction_rate_by_duplication` and `perplexity`) and every point measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from memlens import load_model, organism_path
from memlens.core import jsonio
from memlens.core.metrics import Extraction, bootstrap_ci, edit_metrics, exact_extraction
from memlens.core.modules import neuron_width
from memlens.core.sequences import Sequence
from memlens.data.corpus import CorpusConfig, build_corpus
from memlens.data.labels import LabelConfig, label
from memlens.data.splits import Splits
from memlens.methods.interventions import add_vector
from memlens.methods.localize import (
    METHODS,
    LocalizeConfig,
    ablate_neurons,
    inject,
    localize,
    recall,
    top_neurons,
)
from memlens.methods.steering import memorization_states, steer, steering_vector
from memlens.methods.subnet import SubnetConfig, balanced_subnet


def _goal_row(points: pd.DataFrame, base_ppl: float, max_rise: float) -> pd.Series:
    """Least 100x extraction within the perplexity allowance, then the lowest perplexity."""
    ok = points[points.perplexity <= (1 + max_rise) * base_ppl]
    return (ok if len(ok) else points).sort_values(["exact_100", "perplexity"]).iloc[0]


def run_inject(handle, corpus_seqs, general, eval_canaries, heldout, n_records, cfg,
               blocks=None, steps=600, methods=METHODS, n_clean=64):
    """Recall of injected neurons per method; ``blocks`` limits both the injection and the
    search to those blocks (a model fine-tuned only there)."""
    records = build_corpus(CorpusConfig(n_general=0, canaries_per_count=1,
                                        n_nonmembers=n_records, seed=777)).by_role("nonmember")
    targets = [handle.tokenizer(r.text)["input_ids"][:64] for r in records[:n_records]]
    rows, damage = [], []
    for budget in (0.001, 0.01):
        for j, target in enumerate(targets):
            edit, truth = inject(handle, [target], budget, steps=steps, lr=0.03, seed=j,
                                 clean=general[:n_clean], blocks=blocks)
            seq = Sequence(id=f"injected-{j}", token_ids=target, text="", duplication=1,
                           spans=[], offsets=[])
            learned = exact_extraction(handle, [seq], cfg)[0]
            injected_metrics = edit_metrics(handle, eval_canaries, heldout, cfg)
            for method in methods:
                t0 = time.perf_counter()
                scores = localize(handle, [target], general[:n_clean],
                                  LocalizeConfig(method=method, blocks=blocks))
                found = top_neurons(handle, scores, budget)
                rec = recall(found, truth)
                with ablate_neurons(handle, found):
                    after = edit_metrics(handle, eval_canaries, heldout, cfg)
                    target_after = exact_extraction(handle, [seq], cfg)[0]
                rows.append(dict(budget=budget, record=j, method=method, recall=rec,
                                 n_injected=len(truth), injected_exact=learned,
                                 target_exact_after_ablation=target_after,
                                 seconds=round(time.perf_counter() - t0, 1)))
                top = str(max(int(k) for k in after.exact))  # the most repeated canaries
                damage.append(dict(budget=budget, record=j, method=method, top_count=top,
                                   perplexity_injected=injected_metrics.perplexity,
                                   perplexity_ablated=after.perplexity,
                                   exact_top_injected=injected_metrics.exact[top],
                                   exact_top_ablated=after.exact[top],
                                   loose_top_injected=injected_metrics.loose[top],
                                   loose_top_ablated=after.loose[top]))
                print(f"  inject {budget:.3f} #{j} {method:22} recall {rec:.2f}  "
                      f"ppl {after.perplexity:.3f}", flush=True)
            edit.restore()
    df, dmg = pd.DataFrame(rows), pd.DataFrame(damage)
    by = df.groupby(["budget", "method"])["recall"]
    mean = by.mean()
    ci = by.apply(lambda r: list(bootstrap_ci(r.tolist())))
    return {
        "recall_by_method": {m: float(mean[(0.001, m)]) for m in methods},
        "recall_by_method_1pct": {m: float(mean[(0.01, m)]) for m in methods},
        "recall_ci": {f"{b:g}": {m: ci[(b, m)] for m in methods} for b in (0.001, 0.01)},
        "n_injections": n_records,
        "injection_success_rate": df.groupby("budget")["injected_exact"].mean()
        .rename(str).to_dict(),
        "collateral": dmg.drop(columns="top_count").groupby(["budget", "method"])
        .mean(numeric_only=True)
        .drop(columns="record").reset_index().to_dict("records"),
        "runs": df.to_dict("records"),
    }


def run_recited(handle, splits, cfg, methods=METHODS, budgets=(0.01, 0.03, 0.1),
                n_targets=16, seed=0):
    """Is recitation in a few neurons? Every method scores the neurons for ``n_targets``
    recited canaries of the even half, sampled across the duplication counts; the top
    ``budget`` of each layer is ablated and both the targets themselves (``exact_targets``)
    and the odd half's canaries of the same counts are scored (with held-out perplexity),
    beside as many random neurons per layer."""
    labels = label(handle, splits.labeled, LabelConfig(generate=False), progress=False)
    aim = {s.id for s in splits.calibration}
    targets = labels.recited_targets(aim, limit=n_targets)  # round-robin over the counts
    counts = sorted({s.duplication for s in labels.to_sequences(recited=True) if s.id in aim})
    clean = [s.token_ids for s in splits.calibration_nonmembers]
    scored = [s for s in splits.evaluation if s.duplication in counts]
    aimed = [Sequence(id=f"target-{i}", token_ids=t, text="", duplication=None, spans=[],
                      offsets=[]) for i, t in enumerate(targets)]

    def point(method, budget, seconds=0.0):
        m = edit_metrics(handle, scored, splits.heldout, cfg)
        row = dict(method=method, budget=budget, perplexity=m.perplexity,
                   seconds=round(seconds, 1),
                   exact_targets=float(sum(exact_extraction(handle, aimed, cfg)) / len(aimed)),
                   **{f"exact_{k}x": v for k, v in
                      m.exact.items() if int(k) in counts})
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items()), flush=True)
        return row

    rows = [point("none", 0.0)]
    gen = torch.Generator().manual_seed(seed)
    shape = (handle.n_layers, neuron_width(handle.model))
    for method in ("random", *methods):
        t0 = time.perf_counter()
        scores = (torch.rand(shape, generator=gen) if method == "random" else
                  localize(handle, targets, clean, LocalizeConfig(method=method, start=1)))
        seconds = time.perf_counter() - t0
        for budget in budgets:
            with ablate_neurons(handle, top_neurons(handle, scores, budget)):
                rows.append(point(method, budget, seconds))
    return {"recited_localization": {"targets": len(targets), "counts": counts,
                                     "scored": len(scored), "points": rows}}


def run_subnet(handle, aim, eval_canaries, general, heldout, cfg, before):
    recited = [s.token_ids[:cfg.prefix + cfg.suffix] for s, hit in
               zip(aim, exact_extraction(handle, aim, cfg), strict=True) if hit]
    points = []
    for ratio in (0.001, 0.003, 0.01, 0.03):
        subnet = balanced_subnet(handle, recited, general[:256], SubnetConfig(ratio=ratio))
        with subnet.apply(handle):
            m = edit_metrics(handle, eval_canaries, heldout, cfg)
        points.append(dict(ratio=ratio, perplexity=m.perplexity,
                           exact_100=m.exact["100"],
                           after=m))
        print(f"  subnet ratio {ratio}: 100x {points[-1]['exact_100']:.2f} "
              f"ppl {m.perplexity:.3f}", flush=True)
    best = _goal_row(pd.DataFrame(points), before.perplexity, 0.10)
    return {"ratio": best.ratio, "before": before, "after": best.after,
            "points": [{k: v for k, v in p.items() if k != "after"} for p in points]}


ALPHAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


def run_steer(handle, seqs, aim_ids, eval_canaries, heldout, cfg, before, sites,
              alphas=ALPHAS, variants_named=None):
    tokens = label(handle, seqs, LabelConfig(generate=False), progress=False).tokens
    points, contexts = [], {}
    for site in sites:
        states = memorization_states(handle, site, [s for s in seqs if s.id in aim_ids], tokens)
        probe = states.fit_probe()
        diff = states.mean_difference()
        unit = diff / diff.norm()
        proj = states.x @ unit
        mid = float((proj[states.y].mean() + proj[~states.y].mean()) / 2)

        def baseline_gate(x, unit=unit, mid=mid):
            return torch.sigmoid(x.float() @ unit - mid)

        probe_dir = steering_vector(probe)  # the probe's direction, |mean difference| long
        variants = {
            "static, mean difference": lambda a, s=site, d=diff: steer(handle, s, d, a),
            "baseline gate (sigmoid of projection), mean difference":
                lambda a, s=site, d=diff, g=baseline_gate: add_vector(handle, s, -d, a, gate=g),
            "probe-gated, mean difference":
                lambda a, s=site, d=diff, p=probe: steer(handle, s, d, a, probe=p),
            "probe-gated, probe direction":
                lambda a, s=site, p=probe, v=probe_dir: steer(handle, s, v, a, probe=p),
        }
        if variants_named:
            variants = {k: v for k, v in variants.items() if k in variants_named}
        for name, make in variants.items():
            for alpha in alphas:
                with make(alpha):
                    m = edit_metrics(handle, eval_canaries, heldout, cfg, loose=False)
                ex = m.exact
                points.append(dict(site=site, method=name, alpha=alpha,
                                   perplexity=m.perplexity, exact_100=ex["100"],
                                   exact_by_duplication=ex))
                contexts[(site, name, alpha)] = make
                print(f"  steer {site} {name:52} a={alpha:<4} 100x {ex['100']:.2f} "
                      f"ppl {m.perplexity:.3f}", flush=True)
    df = pd.DataFrame(points)
    out = {"before": before, "points": points}
    for key, frame in (("dynamic", df[df.method.str.startswith("probe")]),
                       ("baseline", df[df.method.str.startswith("baseline")]),
                       ("static", df[df.method.str.startswith("static")])):
        if frame.empty:  # a variant not run
            continue
        row = _goal_row(frame, before.perplexity, 0.05)
        with contexts[(row.site, row.method, row.alpha)](row.alpha):
            after = edit_metrics(handle, eval_canaries, heldout, cfg)
        out[key] = {"site": row.site, "method": row.method, "alpha": row.alpha,
                    "before": before, "after": after}
    out["after"] = out["dynamic"]["after"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--parts", nargs="+", default=["inject", "recited", "subnet", "steer"],
                    choices=["inject", "recited", "subnet", "steer"])
    ap.add_argument("--records", type=int, default=3, help="injected records per budget")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/interventions.json"))
    args = ap.parse_args()
    path = organism_path(args.preset, args.arch)
    handle = load_model(path)
    splits = Splits.from_organism(path, handle.tokenizer)
    seqs, eval_canaries, heldout = splits.labeled, splits.evaluation, splits.heldout
    aim_ids = {s.id for s in splits.calibration + splits.calibration_nonmembers}
    general = [s.token_ids for s in splits.general]
    cfg = LabelConfig()
    before = edit_metrics(handle, eval_canaries, heldout, cfg)
    result = {"organism": str(path), "before": before}
    if args.out.exists():  # keep parts measured by an earlier run
        result = {**json.loads(args.out.read_text()), **result}
    t0 = time.perf_counter()
    if "inject" in args.parts:
        result.update(run_inject(handle, seqs, general, eval_canaries, heldout, args.records,
                                 cfg))
    if "recited" in args.parts:
        result.update(run_recited(handle, splits, cfg))
    if "subnet" in args.parts:
        result["balanced_subnet"] = run_subnet(handle, splits.calibration, eval_canaries,
                                               general, heldout, cfg, before)
    if "steer" in args.parts:
        sites = [f"blocks.{i}.hook_resid_post" for i in range(1, handle.n_layers)]
        result["steering"] = run_steer(handle, seqs, aim_ids, eval_canaries, heldout, cfg,
                                       before, sites)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    jsonio.write(args.out, result)
    b = before
    print(f"\nbefore: 100x exact {b.exact['100']:.0%}, "
          f"loose {b.loose['100']:.0%}, "
          f"perplexity {b.perplexity:.3f}")
    if "recall_by_method" in result:
        print("recall of injected neurons at 0.1% / 1%:")
        for m in METHODS:
            print(f"  {m:22} {result['recall_by_method'][m]:.2f} / "
                  f"{result['recall_by_method_1pct'][m]:.2f}")
    for key in ("balanced_subnet",):
        if key in result:
            a = Extraction.from_json(jsonio.plain(result[key]["after"]))
            print(f"{key}: 100x exact {a.exact['100']:.0%}, "
                  f"loose {a.loose['100']:.0%}, "
                  f"perplexity {a.perplexity:.3f}")
    if "steering" in result:
        for key in ("dynamic", "baseline", "static"):
            if key not in result["steering"]:
                continue
            r = result["steering"][key]
            a = Extraction.from_json(jsonio.plain(r["after"]))
            print(f"steering {key:8} ({r['site']}, {r['method']}, alpha {r['alpha']}): "
                  f"100x exact {a.exact['100']:.0%}, "
                  f"loose {a.loose['100']:.0%}, "
                  f"perplexity {a.perplexity:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
