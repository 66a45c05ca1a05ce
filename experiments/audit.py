"""Forgetting audit: which removals forget the 100x canaries, and which only hide them?

    python experiments/audit.py [--preset small] [--steps 10 50 200] [--relearn-lr 1e-3]
                                [--methods aimed steering ...] [--out FILE.json]

The forget set is every canary repeated 100 times. Each removal is tuned on it (the
strength that brings its exact extraction lowest within +10% held-out perplexity) and then
audited with :func:`memlens.methods.audit.audit`: right after the removal, after INT8 / INT4
weight quantization, after 10 / 50 / 200 relearning steps on the other canaries and the
once-seen records, under perturbed prompts, by membership inference against held-out
non-members and by a memorization probe. The gold standard is the organism trained with
the same preset and seed without the forget set. Besides the published removals it tries
loss-matched forgetting (``fine_tune(..., match=nonmembers, anchor=general)``): the forget
set's token losses pulled onto the distribution of the model's losses on held-out
non-members, rather than up without bound, while the general records' losses are held.
Half the non-members serve the removals (loss matching's reference, the probe's
negatives); membership inference is scored on the other half. Steering is scored after
relearning twice: with its gate as fitted, and with gate and direction fitted again on the
relearned model (``relearn_refit``): a stale gate is told apart from memory that came back.

On a pretrained organism that trained only its top blocks (``--preset smollm2-cpu``), the
K-FAC edits, the fine-tuning removals and the relearning attack act on those blocks, and
the removals that would take hours on a CPU there are left out (``PRETRAINED_SKIPS``).

Writes experiments/results/audit.json (``forget_set``, ``methods``: one entry per removal
with ``name``, ``perplexity``, ``after_edit``, ``int8``, ``int4``, ``relearn``,
``perturbed``, ``mia_auroc``, ``probe_score``) and audit.html (the method x attack heatmap).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from memlens import load_model, organism_path
from memlens.core import jsonio
from memlens.core.metrics import edit_metrics
from memlens.data.labels import LabelConfig, label
from memlens.data.organism import get_preset
from memlens.data.splits import Splits
from memlens.methods.audit import AuditConfig, AuditData, audit, fine_tune
from memlens.methods.curvature import (
    KFACConfig,
    aimed_edit,
    collect_factors,
    eigenbasis,
    kfac_weights,
    memorization_gradient,
    svd_weights,
)
from memlens.methods.edits import ParameterEdit
from memlens.methods.layernorm import NormRemoval, layer_groups
from memlens.methods.localize import LocalizeConfig, ablate_neurons, localize, top_neurons
from memlens.methods.steering import memorization_states, steer
from memlens.methods.subnet import SubnetConfig, balanced_subnet
from memlens.methods.unlearn import restorable
from memlens.report.figures import audit_heatmap

FORGET_DUPLICATION = 100


@dataclass
class During:
    """A removal made of a context factory (fine-tuning under ``restorable``, hooks):
    ``make()`` gives a fresh context each time the removal is applied."""

    make: object

    def apply(self, handle):
        return self.make()


class Sweep:
    """Score a removal's strengths on the forget set; keep the best within the allowance."""

    def __init__(self, handle, forget, heldout, cfg, max_rise: float = 0.10):
        self.handle, self.forget, self.heldout, self.cfg = handle, forget, heldout, cfg
        self.base = edit_metrics(handle, forget, heldout, cfg, loose=False).perplexity
        self.max_rise = max_rise

    def best(self, name: str, make, params) -> tuple[object, list[dict]]:
        points = []
        for p in params:
            with make(p).apply(self.handle):
                m = edit_metrics(self.handle, self.forget, self.heldout, self.cfg, loose=False)
            exact = m.exact[str(FORGET_DUPLICATION)]
            points.append({"param": p, "exact": exact, "perplexity": m.perplexity})
            print(f"  {name:40} {p!s:>8}  exact {exact:5.0%}  ppl {m.perplexity:8.3f}",
                  flush=True)
        ok = [q for q in points if q["perplexity"] <= (1 + self.max_rise) * self.base]
        chosen = min(ok or points, key=lambda q: (q["exact"], q["perplexity"]))
        return chosen["param"], points


METHODS = ("ascent", "loss-matched", "keep-mass", "aimed", "svd", "subnet", "zero-out",
           "layernorm", "steering")
# On a pretrained organism on 2 CPU cores these cost an hour or more each (masks over every
# MLP weight; a forward pass per neuron; norm removal that wrecks a model whose gains are far
# from 1), and memorization lives only in the trained blocks the others are scoped to.
PRETRAINED_SKIPS = ("subnet", "zero-out", "layernorm")


def removals(handle, splits, forget, reference, cfg, sweep: Sweep, tokens: int,
             methods: tuple[str, ...], blocks: list[int] | None,
             matched_seeds: tuple[int, ...] = (0,)):
    """Each removal in ``methods`` as (name, the removal at its chosen parameter, the
    parameter, sweep points). ``reference``: non-member token ids for loss matching (not
    the ones membership inference is scored on). ``blocks``: where fine-tuning and K-FAC
    edits act (None: all). ``matched_seeds``: the seeds loss-matched forgetting runs with
    (one audit each)."""
    forget_ids = [s.token_ids[:cfg.prefix + cfg.suffix] for s in forget]
    general = [s.token_ids for s in splits.general]
    out = []

    def tuned(key, name, make, params):
        if key in methods:
            p, pts = sweep.best(name, make, params)
            out.append((name.split(" (")[0], make(p), p, pts))

    def ascent(steps):
        @contextmanager
        def run():
            with restorable(handle):
                fine_tune(handle, forget_ids, steps, 1e-3, ascent=True, blocks=blocks)
                yield
        return During(run)
    tuned("ascent", "gradient ascent (steps)", ascent, (5, 10, 20, 40))

    # Loss-matched forgetting: the forget set's token losses pulled onto the distribution of
    # the model's current losses on the removal's own non-members (not beyond, which
    # membership inference would see), the general records' losses held where they were. Its
    # target is those losses, not extraction, so its steps are fixed rather than tuned; the
    # spread over seeds shows how far one run lands from another.
    for seed in matched_seeds:
        def matched(steps, seed=seed):
            @contextmanager
            def run():
                with restorable(handle):
                    fine_tune(handle, forget_ids, steps, 3e-4, match=reference,
                              anchor=general[:128], blocks=blocks, seed=seed)
                    yield
            return During(run)
        tuned("loss-matched", f"loss-matched forgetting{f' seed {seed}' if seed else ''} "
              "(steps)", matched, (150,))

    if {"keep-mass", "aimed", "svd"} & set(methods):
        layers = tuple(f"model.layers.{i}.mlp.*" for i in blocks) if blocks else ("mlp",)
        factors = collect_factors(handle, general, KFACConfig(layers=layers, max_tokens=tokens),
                                  progress=False)
        basis = eigenbasis(factors)
        tuned("keep-mass", "K-FAC keep-mass (rho)",
              lambda r: ParameterEdit(kfac_weights(handle, basis, r)),
              (0.999, 0.995, 0.98, 0.95, 0.92, 0.9, 0.85, 0.8, 0.7))
        if "aimed" in methods:
            grads = memorization_gradient(handle, forget_ids, factors.layers, start=cfg.prefix)
            tuned("aimed", "K-FAC aimed (KL budget)",
                  lambda b: aimed_edit(handle, basis, b, grads=grads),
                  (0.001, 0.002, 0.003, 0.005, 0.01, 0.02))
        tuned("svd", "SVD (rho)",
              lambda r: ParameterEdit(svd_weights(handle, factors.layers, r)),
              (0.999, 0.99, 0.95, 0.9, 0.8, 0.7, 0.5))
    tuned("subnet", "BalancedSubnet (ratio)",
          lambda r: balanced_subnet(handle, forget_ids, general[:256], SubnetConfig(ratio=r)),
          (0.001, 0.003, 0.01, 0.03))
    if "zero-out" in methods:
        scores = localize(handle, forget_ids, general[:64], LocalizeConfig(method="zero_out"))
        tuned("zero-out", "Zero-Out ablation (budget)",
              lambda b: During(lambda: ablate_neurons(handle, top_neurons(handle, scores, b))),
              (0.01, 0.03, 0.1))
    if "layernorm" in methods:
        groups = layer_groups(handle.n_layers) if handle.n_layers >= 3 else {
            f"block {i}": [i] for i in range(handle.n_layers)}
        p, pts = sweep.best("LayerNorm removal (group)",
                            lambda g: NormRemoval(groups[g]), list(groups))
        if min(q["exact"] for q in pts) < 1.0:  # only where it lowered extraction
            out.append(("LayerNorm removal", NormRemoval(groups[p]),
                        p, pts))
    return out


def steering_removal(handle, seqs, sweep: Sweep, layers: list[int], tune: bool = True):
    """Probe-gated steering at the residual stream of each of ``layers``: probe and direction
    fitted on ``seqs``' labels on the unedited model. Returns the best (or, without
    ``tune``, None) and the probe of the best layer (else the last), for the probe score."""
    tokens = label(handle, seqs, LabelConfig(generate=False), progress=False).tokens
    best = None
    for layer in layers if tune else layers[-1:]:
        site = f"blocks.{layer}.hook_resid_post"
        states = memorization_states(handle, site, seqs, tokens)
        probe, diff = states.fit_probe(), states.mean_difference()
        if not tune:
            return None, probe
        p, pts = sweep.best(f"probe-gated steering L{layer}",
                            lambda a, s=site, d=diff, q=probe: During(
                                lambda: steer(handle, s, d, a, probe=q)),
                            (1.0, 2.0, 4.0, 8.0))
        chosen = next(q for q in pts if q["param"] == p)
        if best is None or (chosen["exact"], chosen["perplexity"]) < best[0]:
            best = ((chosen["exact"], chosen["perplexity"]), site, diff, probe, p, pts)
    _, site, diff, probe, p, pts = best

    def refit():  # the gate and direction fitted again on the model as it is then
        again = memorization_states(handle, site, seqs, tokens)
        q, d = again.fit_probe(), again.mean_difference()
        return During(lambda: steer(handle, site, d, p, probe=q))

    return ("probe-gated steering", During(lambda: steer(handle, site, diff, p, probe=probe)),
            f"{site} alpha {p}", pts, refit), probe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--kfac-tokens", type=int, default=30_000)
    ap.add_argument("--relearn-lr", type=float, default=AuditConfig.relearn_lr,
                    help="the relearning attack's learning rate (lower: a gentler attack "
                         "that erodes the unedited model's own memorization less)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                    help="removals to tune and audit (default: all; on a pretrained organism "
                         f"all but {', '.join(PRETRAINED_SKIPS)})")
    ap.add_argument("--relearn-batch-size", type=int, default=AuditConfig.relearn_batch_size)
    ap.add_argument("--matched-seeds", type=int, nargs="+", default=[0],
                    help="seeds for loss-matched forgetting (each audited on its own)")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/audit.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = organism_path(args.preset, args.arch)
    handle = load_model(path)
    splits = Splits.from_organism(path, handle.tokenizer)
    cfg = LabelConfig()
    # A pretrained organism trained only its top blocks: memorization lives there, so the
    # edits and every fine-tuning (removal or attack) act there too.
    top = get_preset(args.preset).train_blocks
    blocks = list(range(handle.n_layers - top, handle.n_layers)) if top else None
    methods = tuple(args.methods or [m for m in METHODS
                                     if not (blocks and m in PRETRAINED_SKIPS)])
    forget = [s for s in splits.canaries if s.duplication == FORGET_DUPLICATION]
    relearn = ([s.token_ids for s in splits.canaries if s.duplication != FORGET_DUPLICATION]
               + [s.token_ids for s in splits.general[:500]])
    # Half the non-members are the removals' own (loss matching's reference, the probe's
    # negatives); membership inference is scored on the other half.
    half = len(splits.nonmembers) // 2
    own, scored_nonmembers = splits.nonmembers[:half], splits.nonmembers[half:]
    data = AuditData(forget, relearn, scored_nonmembers, splits.heldout)
    config = AuditConfig(relearn_steps=tuple(args.steps), relearn_lr=args.relearn_lr,
                         relearn_batch_size=args.relearn_batch_size,
                         relearn_blocks=tuple(blocks) if blocks else None)
    # Every strength is chosen within a perplexity limit measured on text membership is not
    # scored on: held-out prose where the organism has some, else the removals' own half.
    sweep = Sweep(handle, forget, splits.heldout if splits.prose else
                  [s.token_ids for s in own], cfg)

    print("== tuning the removals on the forget set", flush=True)
    reference = [s.token_ids[:cfg.prefix + cfg.suffix] for s in own]
    chosen = removals(handle, splits, forget, reference, cfg, sweep, args.kfac_tokens,
                      methods, blocks, tuple(args.matched_seeds))
    steering, probe = steering_removal(handle, splits.canaries + own, sweep,
                                       blocks[:-1] if blocks else list(range(handle.n_layers)),
                                       tune="steering" in methods)
    if steering:
        chosen.append(steering)

    results = []

    def audited(name, model, removal, param=None, points=None, refit=None):
        print(f"== audit: {name}", flush=True)
        r = audit(model, removal, data, config, cfg, probe=probe, refit=refit, progress=False)
        results.append({"name": name, "param": param, "perplexity":
                        r["after_edit"]["perplexity"], **r, "sweep": points or []})
        print(f"   after {r['after_edit']['exact']:.0%}, int4 {r['int4']['exact']:.0%}, "
              f"relearn {max(args.steps)} {r['relearn'][str(max(args.steps))]['exact']:.0%}, "
              f"loss AUROC {r['mia_auroc']['loss']:.2f}", flush=True)

    audited("unedited", handle, None)
    without = load_model(organism_path(args.preset, args.arch,
                                       withheld=tuple(int(s.id) for s in forget)))
    audited("retrain without", without, None)
    for name, removal, param, points, *refit in chosen:
        audited(name, handle, removal, param, points, *refit)
    report = {
        "organism": str(path),
        "forget_set": {"what": f"every canary repeated {FORGET_DUPLICATION}x",
                       "size": len(forget), "duplication": FORGET_DUPLICATION,
                       "relearn_sequences": len(relearn),
                       "nonmembers": len(scored_nonmembers),
                       "nonmembers_for_the_removals": len(own)},
        "config": {"relearn_steps": args.steps, "relearn_lr": config.relearn_lr,
                   "relearn_batch_size": config.relearn_batch_size,
                   "relearn_blocks": blocks, "group_size": config.group_size,
                   "methods": list(methods)},
        "methods": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    jsonio.write(args.out, report)
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
        if "relearn_refit" in r:
            (k, v), = r["relearn_refit"].items()
            print(f"{'  its gate refitted':24} after {k} relearning steps {v['exact']:.0%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
