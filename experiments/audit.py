"""Forgetting audit: which removals forget the 100x canaries, and which only hide them?

    python experiments/audit.py [--preset small] [--steps 10 50 200] [--relearn-lr 1e-3]
                                [--out FILE.json]

The forget set is every canary repeated 100 times. Each removal is tuned on it (the
strength that brings its exact extraction lowest within +10% held-out perplexity) and then
audited with :func:`memlens.audit.audit`: right after the removal, after INT8 / INT4
weight quantization, after 10 / 50 / 200 relearning steps on the other canaries and the
once-seen records, under perturbed prompts, by membership inference against held-out
non-members and by a memorization probe. The gold standard is the organism trained with
the same preset and seed without the forget set. Besides the published removals it tries
loss-matched forgetting (``fine_tune(..., match_losses=...)``): the forget set's token losses
pulled onto the distribution of the model's losses on held-out non-members, rather than up
without bound.

Writes experiments/results/audit.json (``forget_set``, ``methods``: one entry per removal
with ``name``, ``perplexity``, ``after_edit``, ``int8``, ``int4``, ``relearn``,
``perturbed``, ``mia_auroc``, ``probe_score``) and audit.html (the method x attack heatmap).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from memlens import load_model, organism_path
from memlens.audit import (
    AuditConfig,
    AuditData,
    audit,
    fine_tune,
    restorable,
    token_loss_values,
)
from memlens.core.metrics import edit_metrics
from memlens.curvature import (
    KFACConfig,
    apply_weights,
    budget_weights,
    collect_factors,
    eigenbasis,
    kfac_weights,
    memorization_gradient,
    svd_weights,
)
from memlens.figures import audit_heatmap
from memlens.labels import LabelConfig, label
from memlens.layernorm import layer_groups, remove_norm_params
from memlens.localize import LocalizeConfig, ablate_neurons, localize, top_neurons
from memlens.splits import Splits
from memlens.steering import memorization_states, steer
from memlens.subnet import SubnetConfig, balanced_subnet

FORGET_DUPLICATION = 100


class Sweep:
    """Score a removal's strengths on the forget set; keep the best within the allowance."""

    def __init__(self, handle, forget, heldout, cfg, max_rise: float = 0.10):
        self.handle, self.forget, self.heldout, self.cfg = handle, forget, heldout, cfg
        self.base = edit_metrics(handle, forget, heldout, cfg, loose=False)["perplexity"]
        self.max_rise = max_rise

    def best(self, name: str, make, params) -> tuple[object, list[dict]]:
        points = []
        for p in params:
            with make(p):
                m = edit_metrics(self.handle, self.forget, self.heldout, self.cfg, loose=False)
            exact = m["exact_extraction_rate_by_duplication"][str(FORGET_DUPLICATION)]
            points.append({"param": p, "exact": exact, "perplexity": m["perplexity"]})
            print(f"  {name:28} {p!s:>8}  exact {exact:5.0%}  ppl {m['perplexity']:8.3f}",
                  flush=True)
        ok = [q for q in points if q["perplexity"] <= (1 + self.max_rise) * self.base]
        chosen = min(ok or points, key=lambda q: (q["exact"], q["perplexity"]))
        return chosen["param"], points


def removals(handle, splits, forget, cfg, sweep: Sweep, tokens: int):
    """Each removal as (name, context factory, chosen parameter, sweep points)."""
    forget_ids = [s.token_ids[:cfg.prefix + cfg.suffix] for s in forget]
    general = [s.token_ids for s in splits.general]
    out = []

    def ascent(steps):
        @contextmanager
        def run():
            with restorable(handle):
                fine_tune(handle, forget_ids, steps, 1e-3, ascent=True)
                yield
        return run()
    p, pts = sweep.best("gradient ascent (steps)", ascent, (5, 10, 20, 40))
    out.append(("gradient ascent", lambda p=p: ascent(p), p, pts))

    # Loss-matched forgetting: the forget set's token losses pulled onto the distribution of
    # the model's losses on held-out non-members (not beyond, which membership inference
    # would see), the general records held in place.
    reference = token_loss_values(handle, [s.token_ids[:cfg.prefix + cfg.suffix]
                                           for s in splits.nonmembers])

    def matched(steps):
        @contextmanager
        def run():
            with restorable(handle):
                fine_tune(handle, forget_ids, steps, 3e-4, match_losses=reference,
                          retain=general[:256])
                yield
        return run()
    p, pts = sweep.best("loss-matched forgetting (steps)", matched, (50, 100, 200))
    out.append(("loss-matched forgetting", lambda p=p: matched(p), p, pts))

    factors = collect_factors(handle, general, KFACConfig(max_tokens=tokens), progress=False)
    basis = eigenbasis(factors)
    p, pts = sweep.best("K-FAC keep-mass (rho)",
                        lambda r: apply_weights(handle, kfac_weights(handle, basis, r)),
                        (0.98, 0.95, 0.92, 0.9, 0.85, 0.8, 0.7))
    out.append(("K-FAC keep-mass", lambda p=p: apply_weights(
        handle, kfac_weights(handle, basis, p)), p, pts))
    grads = memorization_gradient(handle, forget_ids, factors.layers, start=cfg.prefix)
    p, pts = sweep.best("K-FAC aimed (KL budget)",
                        lambda b: apply_weights(handle, budget_weights(handle, basis, b, grads)),
                        (0.001, 0.002, 0.003, 0.005, 0.01, 0.02))
    out.append(("K-FAC aimed", lambda p=p: apply_weights(
        handle, budget_weights(handle, basis, p, grads)), p, pts))
    p, pts = sweep.best("SVD (rho)",
                        lambda r: apply_weights(handle, svd_weights(handle, factors.layers, r)),
                        (0.99, 0.95, 0.9, 0.8, 0.7, 0.5))
    out.append(("SVD", lambda p=p: apply_weights(
        handle, svd_weights(handle, factors.layers, p)), p, pts))
    p, pts = sweep.best("BalancedSubnet (ratio)",
                        lambda r: balanced_subnet(handle, forget_ids, general[:256],
                                                  SubnetConfig(ratio=r)),
                        (0.001, 0.003, 0.01, 0.03))
    out.append(("BalancedSubnet", lambda p=p: balanced_subnet(
        handle, forget_ids, general[:256], SubnetConfig(ratio=p)), p, pts))
    scores = localize(handle, forget_ids, general[:64], LocalizeConfig(method="zero_out"))
    p, pts = sweep.best("Zero-Out ablation (budget)",
                        lambda b: ablate_neurons(handle, top_neurons(handle, scores, b)),
                        (0.01, 0.03, 0.1))
    out.append(("Zero-Out ablation", lambda p=p: ablate_neurons(
        handle, top_neurons(handle, scores, p)), p, pts))
    groups = layer_groups(handle.n_layers) if handle.n_layers >= 3 else {
        f"block {i}": [i] for i in range(handle.n_layers)}
    p, pts = sweep.best("LayerNorm removal (group)",
                        lambda g: remove_norm_params(handle, groups[g]), list(groups))
    if min(q["exact"] for q in pts) < 1.0:  # only where it lowered extraction
        out.append(("LayerNorm removal", lambda p=p: remove_norm_params(handle, groups[p]),
                    p, pts))
    return out


def steering_removal(handle, splits, forget, cfg, sweep: Sweep):
    """Probe-gated steering at each block's residual stream: probe and direction fitted on
    the canaries and non-members' labels of the unedited model."""
    seqs = splits.labeled
    tokens = label(handle, seqs, LabelConfig(generate=False), progress=False).tokens
    best = None
    for layer in range(handle.n_layers):
        site = f"blocks.{layer}.hook_resid_post"
        states = memorization_states(handle, site, seqs, tokens)
        probe, diff = states.fit_probe(), states.mean_difference()
        p, pts = sweep.best(f"probe-gated steering L{layer}",
                            lambda a, s=site, d=diff, q=probe: steer(handle, s, d, a, probe=q),
                            (1.0, 2.0, 4.0, 8.0))
        chosen = next(q for q in pts if q["param"] == p)
        if best is None or (chosen["exact"], chosen["perplexity"]) < best[0]:
            best = ((chosen["exact"], chosen["perplexity"]), site, diff, probe, p, pts)
    _, site, diff, probe, p, pts = best
    return ("probe-gated steering", lambda: steer(handle, site, diff, p, probe=probe),
            f"{site} alpha {p}", pts), probe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--kfac-tokens", type=int, default=30_000)
    ap.add_argument("--relearn-lr", type=float, default=AuditConfig.relearn_lr,
                    help="the relearning attack's learning rate (lower: a gentler attack "
                         "that erodes the unedited model's own memorization less)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/audit.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = organism_path(args.preset, args.arch)
    handle = load_model(path)
    splits = Splits.from_organism(path, handle.tokenizer)
    cfg = LabelConfig()
    forget = [s for s in splits.canaries if s.duplication == FORGET_DUPLICATION]
    relearn = ([s.token_ids for s in splits.canaries if s.duplication != FORGET_DUPLICATION]
               + [s.token_ids for s in splits.general[:500]])
    data = AuditData(forget, relearn, splits.nonmembers, splits.heldout)
    config = AuditConfig(relearn_steps=tuple(args.steps), relearn_lr=args.relearn_lr)
    sweep = Sweep(handle, forget, splits.heldout, cfg)

    print("== tuning the removals on the forget set", flush=True)
    methods = removals(handle, splits, forget, cfg, sweep, args.kfac_tokens)
    steering, probe = steering_removal(handle, splits, forget, cfg, sweep)
    methods.append(steering)

    results = []

    def audited(name, model, removal, param=None, points=None):
        print(f"== audit: {name}", flush=True)
        r = audit(model, removal, data, config, cfg, probe=probe, progress=False)
        results.append({"name": name, "param": param, "perplexity":
                        r["after_edit"]["perplexity"], **r, "sweep": points or []})
        print(f"   after {r['after_edit']['exact']:.0%}, int4 {r['int4']['exact']:.0%}, "
              f"relearn {max(args.steps)} {r['relearn'][str(max(args.steps))]['exact']:.0%}, "
              f"loss AUROC {r['mia_auroc']['loss']:.2f}", flush=True)

    audited("unedited", handle, None)
    without = load_model(organism_path(args.preset, args.arch,
                                       withheld=tuple(int(s.id) for s in forget)))
    audited("retrain without", without, None)
    for name, make, param, points in methods:
        audited(name, handle, make, param, points)
    report = {
        "organism": str(path),
        "forget_set": {"what": f"every canary repeated {FORGET_DUPLICATION}x",
                       "size": len(forget), "duplication": FORGET_DUPLICATION,
                       "relearn_sequences": len(relearn),
                       "nonmembers": len(splits.nonmembers)},
        "config": {"relearn_steps": args.steps, "relearn_lr": config.relearn_lr,
                   "group_size": config.group_size},
        "methods": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    fig = audit_heatmap(results)
    args.out.with_suffix(".html").write_text(fig.to_html(include_plotlyjs=True))
    _print_table(results, args.steps)
    print(f"wrote {args.out} and {args.out.with_suffix('.html')}")


def _print_table(results, steps):
    head = ["after", "int8", "int4", *[f"rl{k}" for k in steps], "perturb", "AUROC", "ppl"]
    print(f"\n{'exact extraction':24}" + "".join(f"{h:>8}" for h in head))
    for r in results:
        cells = [r["after_edit"]["exact"], r["int8"]["exact"], r["int4"]["exact"],
                 *[r["relearn"][str(k)]["exact"] for k in steps],
                 max(r["perturbed"].values())]
        print(f"{r['name']:24}" + "".join(f"{c:8.0%}" for c in cells)
              + f"{r['mia_auroc']['loss']:8.2f}{r['perplexity']:8.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
