"""K-FAC memorization edits on the organism: the Pareto curve of extraction vs perplexity.

    python experiments/kfac_edit.py [--preset small] [--arch llama neox gpt2]

Per architecture: true-Fisher factors over the organism's general records (about 84k tokens),
then a sweep of edits, each scored on held-out canaries (exact extraction by duplication) and
on non-member records (perplexity):

- published: keep-mass rho on every MLP projection (Merullo et al.);
- keep-mass on the last two blocks, on the output projections only, on the input ones only;
- kl-budget: the cheapest components by predicted KL, 0.5 * l_i m_j C_ij^2, which weighs the
  curvature by how much weight the component carries (no memorized data needed);
- kl-budget aimed: components that hold up the recitation of memorized sequences, ranked by
  recitation log-odds per unit of predicted KL. The canaries are split in two: the edit is
  aimed with the recited canaries of one half and every method is scored on the other half;
- svd: the baseline that drops the smallest singular components of W;
- two controls for the aimed edit at the same predicted KL: random components (does the
  selection matter, or the size?) and one step against the recitation gradient (aimed, but
  without curvature's component selection).

Every method's 100x extraction is also interpolated at the aimed edit's perplexity
(``at_aimed_perplexity``), rather than read at the nearest grid point. On an organism
continued on prose, the loading of the memorized canaries on low-curvature components is
compared with prose and with non-member PII records (the control that isolates
memorization from PII formatting).

Writes experiments/results/kfac_edit.json (`kfac` and `svd`: before/after for the best K-FAC
point and the SVD point at matched perplexity, first architecture; `by_arch`: every point)
and one HTML page of figures per architecture.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from memlens import load_model, organism_path
from memlens.core import jsonio
from memlens.core.metrics import edit_metrics, exact_extraction
from memlens.core.modules import mlp_output_layers
from memlens.data.labels import LabelConfig
from memlens.data.splits import Splits
from memlens.methods.curvature import (
    KFACConfig,
    aimed_edit,
    budget_weights,
    collect_factors,
    component_loading,
    eigenbasis,
    gradient_step_weights,
    kfac_weights,
    mass_curves,
    memorization_gradient,
    spectra,
    svd_weights,
)
from memlens.methods.edits import ParameterEdit
from memlens.report.figures import loading_figure, mass_curve_figure, pareto_figure, spectrum_figure

RHOS = [0.999, 0.995, 0.99, 0.98, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.9, 0.88, 0.85, 0.8, 0.7]
KL_BUDGETS = [0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15]
AIMED_BUDGETS = [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02]
SVD_RHOS = [0.999, 0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4]
PUBLISHED = "published keep-mass (all MLP)"
AIMED = "kl-budget aimed at recited canaries"
SVD = "svd (smallest singular components)"
RANDOM = "random components at the same predicted KL (control)"
GRADIENT = "gradient step at the same predicted KL (aimed, no selection)"


def sweep_arch(preset: str, arch: str, tokens: int, out_dir: Path,
               blocks: list[int] | None = None, methods_named: list[str] | None = None) -> dict:
    """Every edit method at every strength on one organism. ``blocks`` limits the factors
    (and so every edit) to those blocks' MLPs; ``methods_named`` runs only those methods."""
    t0 = time.perf_counter()
    path = organism_path(preset, arch)
    handle = load_model(path)
    splits = Splits.from_organism(path, handle.tokenizer)
    general = [s.token_ids for s in splits.general]
    aim_half, eval_half = splits.calibration, splits.evaluation
    # Perplexity on held-out prose where the organism has some, else on every non-member.
    heldout = splits.heldout if splits.prose else [s.token_ids for s in splits.nonmembers]
    cfg = LabelConfig()

    layer_globs = tuple(f"model.layers.{i}.mlp.*" for i in blocks) if blocks else ("mlp",)
    factors = collect_factors(handle, general, KFACConfig(layers=layer_globs, max_tokens=tokens),
                              out=out_dir / f"kfac_factors_{preset}_{arch}.safetensors",
                              progress=True)
    basis = eigenbasis(factors)
    layers = factors.layers
    outputs = mlp_output_layers(handle.model)
    last_two = [n for n in layers
                if int(re.search(r"\.(\d+)\.", n).group(1)) >= handle.n_layers - 2]
    recited = [s for s, hit in zip(aim_half, exact_extraction(handle, aim_half, cfg),
                                   strict=True) if hit]
    grads = memorization_gradient(handle, [s.token_ids[:cfg.prefix + cfg.suffix]
                                           for s in recited], layers, start=cfg.prefix)

    def sub(names):
        return {n: basis[n] for n in names}

    methods = {
        PUBLISHED: [(r, lambda r=r: kfac_weights(handle, basis, r)) for r in RHOS],
        "keep-mass, last two blocks": [
            (r, lambda r=r: kfac_weights(handle, sub(last_two), r)) for r in RHOS],
        "keep-mass, output projections": [
            (r, lambda r=r: kfac_weights(handle, sub(outputs), r)) for r in RHOS],
        "keep-mass, input projections": [
            (r, lambda r=r: kfac_weights(handle, sub([n for n in layers if n not in outputs]), r))
            for r in RHOS],
        "kl-budget (no memorized data)": [
            (b, lambda b=b: budget_weights(handle, basis, b)) for b in KL_BUDGETS],
        AIMED: [
            (b, lambda b=b: aimed_edit(handle, basis, b, grads=grads).weights)
            for b in AIMED_BUDGETS],
        SVD: [
            (r, lambda r=r: svd_weights(handle, layers, r)) for r in SVD_RHOS],
        RANDOM: [
            (b, lambda b=b: budget_weights(handle, basis, b, shuffle=0)) for b in AIMED_BUDGETS],
        GRADIENT: [
            (b, lambda b=b: gradient_step_weights(handle, basis, b, grads))
            for b in AIMED_BUDGETS],
    }
    if methods_named:
        methods = {k: v for k, v in methods.items() if k in methods_named}
    before = edit_metrics(handle, eval_half, heldout, cfg)
    points = []
    for method, grid in methods.items():
        for param, make in grid:
            with ParameterEdit(make()).apply(handle):
                m = edit_metrics(handle, eval_half, heldout, cfg, loose=False)
            exact = m.exact
            points.append(dict(method=method, param=param, perplexity=m.perplexity,
                               exact_100=exact["100"], exact_25=exact["25"],
                               exact_by_duplication=exact))
            print(f"  {arch:5} {method:38} {param:<8} ppl {m.perplexity:7.3f}  "
                  + " ".join(f"{k}x {v:4.0%}" for k, v in exact.items()), flush=True)
    df = pd.DataFrame(points)
    base_ppl = before.perplexity

    def best(frame):
        """Cheapest point that meets the goal (100x at most 5%, perplexity +10% at most),
        else the least extraction within +10%, else the least extraction."""
        within = frame[frame.perplexity <= 1.1 * base_ppl]
        goal = within[within.exact_100 <= 0.05]
        if len(goal):
            return goal.sort_values("perplexity").iloc[0]
        frame = within if len(within) else frame
        return frame.sort_values(["exact_100", "perplexity"]).iloc[0]

    def after(row):
        make = dict(methods[row.method])[row.param]
        with ParameterEdit(make()).apply(handle):
            return edit_metrics(handle, eval_half, heldout, cfg)

    is_svd = df.method.str.startswith("svd")
    kfac_row, pub_row = best(df[~is_svd]), best(df[df.method == PUBLISHED])
    svd = df[is_svd]
    svd_row = svd.iloc[(svd.perplexity.map(math.log) - math.log(kfac_row.perplexity))
                       .abs().argmin()]
    aimed_ppl = float(best(df[df.method == AIMED]).perplexity) if AIMED in methods else None
    result = {
        "organism": str(path), "factor_tokens": factors.tokens,
        "n_aim_recited": len(recited), "n_eval_by_duplication":
            pd.Series([s.duplication for s in eval_half]).value_counts().sort_index()
            .rename(str).to_dict(),
        "before": before,
        "kfac": {"method": kfac_row.method, "param": kfac_row.param, "before": before,
                 "after": after(kfac_row)},
        "published": {"method": pub_row.method, "param": pub_row.param, "before": before,
                      "after": after(pub_row)},
        "svd": {"method": svd_row.method, "param": svd_row.param, "before": before,
                "after": after(svd_row)},
        "svd_best_within_10pct": {"param": best(svd).param, "after": after(best(svd))},
        # Each edit's 100x extraction interpolated at the aimed edit's perplexity (linear in
        # log perplexity between its grid points; None outside its range).
        "at_aimed_perplexity": {"perplexity": aimed_ppl, **{
            m: at_perplexity(df[df.method == m], aimed_ppl) for m in df.method.unique()}},
        "points": points,
    }
    memorized = [s.token_ids for s in eval_half if s.duplication == 100]
    loads = {"memorized (100x canaries)": component_loading(handle, basis, memorized, cfg.prefix),
             "clean (non-members)": component_loading(handle, basis, heldout, cfg.prefix)}
    if splits.prose:  # the clean text is prose: the control for PII is PII never trained on
        loads["clean (held-out prose)"] = loads.pop("clean (non-members)")
        loads["non-member PII records"] = component_loading(
            handle, basis, [s.token_ids for s in splits.evaluation_nonmembers], cfg.prefix)
    result["loading_by_curvature_bin"] = {
        k: v.groupby("bin").loading.mean().round(5).tolist() for k, v in loads.items()}
    figs = [pareto_figure(df, baseline_x=base_ppl), loading_figure(loads),
            spectrum_figure(spectra(basis)), mass_curve_figure(mass_curves(basis))]
    html = out_dir / f"kfac_edit_{arch}.html"
    html.write_text("\n".join(f.to_html(full_html=False, include_plotlyjs=i == 0)
                              for i, f in enumerate(figs)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def at_perplexity(points: pd.DataFrame, ppl: float) -> float | None:
    """100x extraction of a method's grid interpolated at perplexity ``ppl`` (linear in log
    perplexity between the two grid points around it); None outside the grid's range."""
    pts = points.sort_values("perplexity")
    x, y = np.log(pts.perplexity.to_numpy()), pts.exact_100.to_numpy()
    if not x[0] <= math.log(ppl) <= x[-1]:
        return None
    return float(np.interp(math.log(ppl), x, y))


def _row(name: str, entry: dict) -> str:
    a = entry["after"]
    ex, lo = a.exact, a.loose
    return (f"{name:34} {str(entry.get('param', '')):>8} {a.perplexity:8.3f} "
            f"{ex['100']:7.1%} {lo['100']:7.1%} {ex['25']:7.1%} {ex['10']:7.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--arch", nargs="+", default=["llama", "neox", "gpt2"])
    ap.add_argument("--tokens", type=int, default=84_000, help="factor tokens")
    ap.add_argument("--out", type=Path, default=Path("experiments/results/kfac_edit.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    by_arch = {a: sweep_arch(args.preset, a, args.tokens, args.out.parent) for a in args.arch}
    first = by_arch[args.arch[0]]
    report = {"preset": args.preset, "arch": args.arch[0], "kfac": first["kfac"],
              "svd": first["svd"], "by_arch": by_arch}
    jsonio.write(args.out, report)
    for arch, r in by_arch.items():
        b = r["before"]
        ex = b.exact
        print(f"\n{arch}: {'':27} {'param':>8} {'ppl':>8} {'100x':>7} {'loose':>7} "
              f"{'25x':>7} {'10x':>7}")
        print(f"{'before':34} {'':>8} {b.perplexity:8.3f} {ex['100']:7.1%} "
              f"{b.loose['100']:7.1%} {ex['25']:7.1%} "
              f"{ex['10']:7.1%}")
        print(_row("best K-FAC: " + r["kfac"]["method"][:22], r["kfac"]))
        print(_row("published recipe", r["published"]))
        print(_row("svd at matched perplexity", r["svd"]))
        print(f"100x extraction at the aimed edit's perplexity "
              f"({r['at_aimed_perplexity']['perplexity']:.3f}):")
        for k, v in r["at_aimed_perplexity"].items():
            if k != "perplexity":
                print(f"  {k:44} " + ("outside its grid" if v is None else f"{v:.0%}"))
        print("loading, memorized vs clean (bin 0 = top curvature):")
        for k, v in r["loading_by_curvature_bin"].items():
            print(f"  {k:26} " + " ".join(f"{x:.3f}" for x in v))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
