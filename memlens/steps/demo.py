"""``memlens demo``: the whole artifact chain on the embedded organism, into one report.

Steps, in order: labels, probes, kfac, interventions (localization and ablation), steering,
layernorm, audit (do those removals forget, or only hide?). Each step reads the artifacts of
the steps before it and writes its own under OUT (``labels/``, ``activations/``, ``probes/``,
``kfac/factors.safetensors``, ``neurons/``, ``steering/``); its headline numbers and its part
of the report go to ``OUT/steps/NAME.json``, keyed by the model's weights hash, the demo's
settings and the identity headers of the artifacts the step reads. A second run reuses every
step whose key still matches and only rebuilds the page (an interrupted run resumes at the
step it was in).

The organism's :class:`~memlens.data.splits.Splits` keep scores honest: probes, directions and
edits come from the even half of the canaries and non-members, every before/after score
from the odd half.

Example:
    >>> summary = run_demo("memlens-demo")    # OUT/report.html, OUT/summary.json
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import ClassVar

import plotly.graph_objects as go

from memlens.core import jsonio
from memlens.core.config import option
from memlens.core.identity import Identity
from memlens.core.metrics import edit_metrics
from memlens.core.model import ModelHandle, load_model
from memlens.core.sequences import Sequence
from memlens.core.storage import exclusive
from memlens.core.version import VERSION
from memlens.data.labels import LabelConfig, Labels, label
from memlens.data.organism import organism_path
from memlens.data.splits import Splits
from memlens.report.figures import extraction_figure, gradient_ratio_figure, loading_figure
from memlens.report.page import Report, Section, labeled_sequence, token_view
from memlens.steps.organism import PathCommand

__all__ = ["RUNNERS", "STEPS", "TEXT", "TITLES", "Demo", "DemoCommand", "DemoConfig",
           "headline_rows", "main",
           "markdown_table", "run_demo", "step_audit", "step_interventions", "step_kfac",
           "step_labels", "step_layernorm", "step_probes", "step_steering"]

STEPS = ("labels", "probes", "kfac", "interventions", "steering", "layernorm", "audit")


@dataclass
class DemoConfig:
    """The organism and each step's settings (all part of the step cache keys)."""

    preset: str = "small"
    arch: str = "llama"
    seed: int = 0
    probe_sites: str = "blocks.*.hook_resid_post"
    kfac_tokens: int = 30_000
    kfac_budget: float = 0.003        # predicted KL of the aimed K-FAC edit
    localize_method: str = "zero_out"
    localize_budget: float = 0.01     # fraction of each layer's MLP neurons ablated
    localize_targets: int = 16        # recited canaries the neurons are scored for
    steer_site: str = "blocks.1.hook_resid_post"
    steer_alpha: float = 4.0
    attribution_tokens: int = 200
    audit_relearn_steps: tuple[int, ...] = (10, 50)
    audit: bool = True  # step 7 trains a second organism; off for models slow to retrain


class Demo:
    """Shared state of one demo run: the organism, its splits, the artifacts' places."""

    def __init__(self, out: Path, config: DemoConfig, progress: bool = True):
        self.out, self.config, self.progress = out, config, progress
        self.path = organism_path(config.preset, config.arch, config.seed, progress=progress)
        self.organism = json.loads((self.path / "memlens.json").read_text())
        self.cfg = LabelConfig()
        self.labels_dir = out / "labels"
        self.store_dir = out / "activations"
        self.probes_dir = out / "probes"
        self.factors_path = out / "kfac" / "factors.safetensors"
        self.neurons_dir = out / "neurons"
        self.steering_dir = out / "steering"

    @cached_property
    def handle(self) -> ModelHandle:
        return load_model(self.path)

    @cached_property
    def splits(self) -> Splits:
        return Splits.from_organism(self.path, self.handle.tokenizer)

    @cached_property
    def model_hash(self) -> str:
        return self.handle.weights_hash()

    @property
    def labels(self) -> Labels:
        return Labels.load(self.labels_dir)

    @cached_property
    def before(self) -> dict:
        return json.loads((self.out / "steps" / "labels.json").read_text())["summary"]["before"]

    def probe_path(self, site: str) -> Path:
        return self.probes_dir / "probes" / site

    def after(self, loose: bool = True) -> dict:
        s = self.splits
        return edit_metrics(self.handle, s.evaluation, s.heldout, self.cfg, loose=loose)

    def inputs(self, step: str) -> dict[str, str]:
        """Digests of the artifacts ``step`` reads (those that exist yet)."""
        reads = {"labels": self.labels_dir / "summary.json",
                 "probe": self.probe_path(self.config.steer_site) / "probe.json"}
        wanted = {"labels": [], "steering": ["labels", "probe"],
                  "audit": ["labels", "probe"]}.get(step, ["labels"])
        out = {}
        for name in wanted:
            if reads[name].is_file():
                meta = json.loads(reads[name].read_text())
                out[name] = Identity.from_json(meta.get("identity"), str(reads[name])).digest
        return out

    def identity(self, step: str) -> Identity:
        """What a cached step was computed from: the model, the demo's settings and the
        artifacts the step reads."""
        settings = json.loads(json.dumps(asdict(self.config)))  # as cached: lists, not tuples
        return Identity(f"demo step {step}", self.model_hash, None, settings,
                        self.inputs(step), str(self.path), VERSION)


def _before_after(before: dict, after: dict, what: str) -> tuple[go.Figure, dict]:
    """Extraction by duplication and perplexity, before vs after an intervention."""
    fig = extraction_figure({
        "exact, before": before["exact_extraction_rate_by_duplication"],
        "exact, after": after["exact_extraction_rate_by_duplication"],
        **({"loose, after": after["loose_extraction_rate_by_duplication"]}
           if "loose_extraction_rate_by_duplication" in after else {})},
        f"{what}<br><sup>extraction of held-out canaries; perplexity "
        f"{before['perplexity']:.3f} -> {after['perplexity']:.3f}</sup>")
    headline = {
        "what": what,
        "exact_100x_before": before["exact_extraction_rate_by_duplication"]["100"],
        "exact_100x_after": after["exact_extraction_rate_by_duplication"]["100"],
        "loose_100x_after": after.get("loose_extraction_rate_by_duplication", {}).get("100"),
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "perplexity_change": after["perplexity"] / before["perplexity"] - 1}
    return fig, headline


def _edit_finding(sec: Section, h: dict) -> None:
    sec.finding(f"{h['what']} takes the held-out 100x canaries from {h['exact_100x_before']:.0%} "
                f"to {h['exact_100x_after']:.0%} exact extraction at "
                f"{h['perplexity_change']:+.1%} held-out perplexity.")


# --------------------------------------------------------------------------- steps


def step_labels(d: Demo, sec: Section) -> dict:
    labels = label(d.handle, d.splits.labeled, d.cfg, progress=d.progress)
    labels.save(d.labels_dir)
    s = labels.summary
    sec.figure(extraction_figure(
        {"exact (greedy reproduces the suffix)": s["exact_extraction_rate_by_duplication"],
         "loose (75% similar)": s["loose_extraction_rate_by_duplication"]},
        "Extraction by duplication count (32-token prefix, 32-token suffix)"))
    sec.table([{"membership score": k, "AUROC (members vs non-members)": v}
               for k, v in s["membership_auroc"].items()])
    exact = s["exact_extraction_rate_by_duplication"]
    best = max(s["membership_auroc"], key=s["membership_auroc"].get)
    sec.finding(f"The organism recites {exact['100']:.0%} of its 100x canaries and "
                f"{exact.get('1', 0):.0%} of those seen once; the best membership score "
                f"({best}) tells members from non-members at AUROC "
                f"{s['membership_auroc'][best]:.2f}.")
    return {"exact_extraction_rate_by_duplication": s["exact_extraction_rate_by_duplication"],
            "loose_extraction_rate_by_duplication": s["loose_extraction_rate_by_duplication"],
            "membership_auroc": s["membership_auroc"],
            "token_label_counts": s["token_label_counts"],
            "before": d.after()}


def _token_rows(d: Demo, seqs: list[Sequence], probe, tokens) -> list[dict]:
    import numpy as np
    import torch

    from memlens.core.sites import run_sites

    site = probe.sites[0]
    out = []
    for seq in seqs:
        ids = seq.token_ids[:d.cfg.prefix + d.cfg.suffix]
        x, mask = d.handle.pad([ids])
        with torch.no_grad():
            acts = run_sites(d.handle, [site], x, mask, backend="torch")[site][0].float()
        # The state that predicts token t sits at t - 1.
        scores = np.concatenate([[np.nan], probe.score(acts.cpu().numpy())[:-1]])
        kind = f"{seq.duplication}x canary" if seq.duplication else "non-member"
        out.append(labeled_sequence(tokens, d.handle.tokenizer, seq.id, ids, scores,
                                    title=f"{kind} {seq.id}"))
    return out


def step_probes(d: Demo, sec: Section) -> dict:
    import pandas as pd

    from memlens.data.store import CaptureConfig
    from memlens.methods.probes import Probe
    from memlens.report.figures import layer_sweep_figure
    from memlens.steps.capture import capture_step
    from memlens.steps.probe import train_probes

    labels = d.labels
    store = capture_step(d.handle, labels, d.store_dir,
                         CaptureConfig(sites=[d.config.probe_sites]), progress=d.progress)
    summary = train_probes(labels, store, d.probes_dir, split=d.splits.probe_split(),
                           progress=d.progress)
    results = pd.read_parquet(d.probes_dir / "results.parquet")
    res = results[~results["control"]].sort_values("auroc", ascending=False)
    # The best probe on activations (not the output-confidence baseline probe).
    best = res[res["probe"] == summary["best_single_site"]].iloc[0]
    probe = Probe.load(d.probe_path(best["probe"]))
    sec.figure(layer_sweep_figure(results, summary["token_baselines"]))
    sec.table(res[["probe", "auroc", "auroc_ci_low", "auroc_ci_high", "f1",
                   "tpr_at_1pct_fpr", "matched_auroc", "control_auroc", "selectivity"]])
    confidence = res[res["kind"] == "confidence"]
    if len(confidence):
        c = confidence.iloc[0]
        gain = best["matched_auroc"] - c["matched_auroc"]
        sec.finding(
            f"The best residual probe ({best['probe']}) scores AUROC {best['auroc']:.3f}, a "
            f"probe on the model's confidence alone {c['auroc']:.3f}; on tokens matched for "
            f"that confidence {best['matched_auroc']:.3f} against {c['matched_auroc']:.3f}, "
            + ("so the residual stream knows more about memorization than the output "
               "distribution shows." if gain > 0.05 else
               "so the residual stream adds little beyond the output distribution here."))
    # Token view: recited and non-recited canaries and non-members from the held-out half.
    s = d.splits
    shown = s.at(100)[:2] + s.at(10)[:1] + s.at(1)[:1] + s.aim_nonmembers[-2:]
    sec.html(token_view(_token_rows(d, shown, probe, labels.tokens), view_id="token-view"))
    others = res[~res["probe"].isin(store.sites)]
    return {"best_probe": best["probe"], "auroc": float(best["auroc"]),
            "other_probes_auroc": dict(zip(others["probe"], others["auroc"].astype(float),
                                           strict=True)),
            "auroc_ci": [float(best["auroc_ci_low"]), float(best["auroc_ci_high"])],
            "selectivity": float(best["selectivity"]),
            "matched_auroc": float(best["matched_auroc"]),
            "confidence_matched_auroc": (float(confidence.iloc[0]["matched_auroc"])
                                         if len(confidence) else None),
            "tpr_at_1pct_fpr": float(best["tpr_at_1pct_fpr"]),
            "token_baselines": summary["token_baselines"]}


def _kfac_edit(d: Demo):
    """The demo's aimed K-FAC edit: (factors, eigenbasis, edited weights, aimed targets);
    the factors are collected once and read back from OUT/kfac afterwards."""
    from memlens.methods.curvature import (
        KFACConfig,
        budget_weights,
        collect_factors,
        eigenbasis,
        memorization_gradient,
    )


    factors = collect_factors(d.handle, [s.token_ids for s in d.splits.general],
                              KFACConfig(max_tokens=d.config.kfac_tokens),
                              out=d.factors_path, progress=d.progress)
    basis = eigenbasis(factors)
    targets = d.labels.recited_targets(ids={s.id for s in d.splits.aim})
    grads = memorization_gradient(d.handle, targets, factors.layers, start=d.cfg.prefix)
    return factors, basis, budget_weights(d.handle, basis, d.config.kfac_budget, grads), targets


def step_kfac(d: Demo, sec: Section) -> dict:
    from memlens.methods.curvature import apply_weights, component_loading

    factors, basis, weights, targets = _kfac_edit(d)
    with apply_weights(d.handle, weights):
        after = d.after()
    fig, headline = _before_after(d.before, after, "The K-FAC edit")
    sec.figure(fig)
    _edit_finding(sec, headline)
    memorized = [s.token_ids for s in d.splits.at(100)]
    sec.figure(loading_figure({
        "memorized (100x canaries)": component_loading(d.handle, basis, memorized,
                                                       d.cfg.prefix),
        "clean (non-members)": component_loading(d.handle, basis, d.splits.heldout,
                                                 d.cfg.prefix)}))
    return {**headline, "kl_budget": d.config.kfac_budget, "factor_tokens": factors.tokens,
            "layers": len(factors.layers), "aimed_with_recited": len(targets)}


def step_interventions(d: Demo, sec: Section) -> dict:
    from memlens.methods.localize import LocalizeConfig, NeuronAblation, ablate_neurons, top_neurons
    from memlens.steps.localize import localize_step

    s = d.splits
    # Neurons scored on the whole recited sequence (start 1), as the text says.
    localize_step(d.handle, d.labels, d.neurons_dir,
                  LocalizeConfig(method=d.config.localize_method, start=1),
                  d.config.localize_budget, ids={x.id for x in s.aim + s.aim_nonmembers},
                  max_targets=d.config.localize_targets)
    ablation = NeuronAblation.load(d.neurons_dir)
    table, scores = ablation.table, ablation.scores
    with ablation.apply(d.handle):
        after = d.after()
    curve = []
    for budget in sorted({d.config.localize_budget, 0.03, 0.1}):
        with ablate_neurons(d.handle, top_neurons(d.handle, scores, budget)):
            m = d.after(loose=False)
        curve.append({"budget": budget, "perplexity": m["perplexity"],
                      **{f"{k}x": v for k, v in m["exact_extraction_rate_by_duplication"].items()
                         if k in ("10", "25", "100")}})
    fig, headline = _before_after(d.before, after, f"Ablating the {len(table)} neurons "
                                  f"{d.config.localize_method} finds")
    n_targets = ablation.config["n_targets"]
    heat = go.Figure(go.Heatmap(z=scores.numpy(), colorscale="Viridis",
                                colorbar=dict(title="score"),
                                hovertemplate="block %{y}, neuron %{x}: %{z:.3f}<extra></extra>"))
    heat.update_layout(title=f"{d.config.localize_method} score of every MLP neuron for "
                       f"{n_targets} recited canaries", xaxis_title="neuron",
                       yaxis_title="block", height=300)
    sweep = go.Figure()
    for dup in ("100x", "25x", "10x"):
        sweep.add_scatter(x=[c["perplexity"] for c in curve], y=[c[dup] for c in curve],
                          mode="lines+markers", name=f"{dup} canaries",
                          text=[f"top {c['budget']:.0%} per layer" for c in curve],
                          hovertemplate="%{text}<br>perplexity %{x:.3f}<br>exact "
                                        "%{y:.0%}<extra></extra>")
    sweep.update_layout(title="Ablating more neurons: exact extraction vs clean perplexity",
                        xaxis_title="perplexity", yaxis_tickformat=".0%", height=380)
    sweep.update_layout(yaxis_title="exact extraction")
    sec.figure(heat).figure(fig).figure(sweep)
    sec.table(table.head(12)[["rank", "layer", "neuron", "score"]])
    _edit_finding(sec, headline)
    return {**headline, "method": d.config.localize_method, "n_neurons": len(table),
            "budget_curve": curve,
            "neurons_per_layer": {str(k): int(v) for k, v in
                                  table.groupby("layer").size().items()}}


def step_steering(d: Demo, sec: Section) -> dict:
    from memlens.methods.probes import Probe
    from memlens.methods.steering import Steering, generate_side_by_side

    site, alpha = d.config.steer_site, d.config.steer_alpha
    # The probe the probes step saved, gating a vector along its own direction.
    Steering.from_probe(Probe.load(d.probe_path(site)), d.handle, alpha,
                        gated=True).save(d.steering_dir)
    steering = Steering.load(d.steering_dir)
    with steering.apply(d.handle):
        after = d.after()
    fig, headline = _before_after(d.before, after, f"Probe-gated steering at {site}, "
                                  f"alpha {alpha}")
    sec.figure(fig)
    prompts = [d.handle.tokenizer.decode(s.token_ids[1:d.cfg.prefix])
               for s in d.splits.at(100)][:3]
    sec.table(generate_side_by_side(d.handle, prompts, lambda: steering.apply(d.handle)))
    _edit_finding(sec, headline)
    return {**headline, "site": site, "alpha": alpha}


def step_layernorm(d: Demo, sec: Section) -> dict:
    from memlens.core.metrics import perplexity
    from memlens.methods.layernorm import (
        StudyData,
        attribution_table,
        attribution_targets,
        condition_metrics,
        layer_groups,
        memorized_positions,
        norm_attribution,
        remove_norm_params,
    )

    data = StudyData.from_splits(d.splits)
    positions = memorized_positions(d.labels.tokens, data.canaries)
    sets = attribution_targets(data, positions, d.cfg, n=d.config.attribution_tokens)
    res = {k: norm_attribution(d.handle, ids, pos, progress=d.progress)
           for k, (ids, pos) in sets.items()}
    rows = [dict(layernorm=f"{d.config.arch} (Pre-LN)", **r)
            for r in attribution_table(res["memorized"], res["clean"])]
    sec.figure(gradient_ratio_figure(rows))
    removal = []
    n = d.handle.n_layers
    groups = layer_groups(n) if n >= 3 else {f"block {i}": [i] for i in range(n)}
    for group, layers in {"none": [], **groups}.items():
        with remove_norm_params(d.handle, layers):
            m = condition_metrics(d.handle, data, positions, d.cfg)
            ppl = perplexity(d.handle, d.splits.heldout, d.cfg.batch_size)
        removal.append({"removed": group, "blocks": str(layers),
                        "exact >= 10x": m["exact_extraction_rate"],
                        "memorized PII loss": m["recovery"]["memorized_loss"],
                        "template loss": m["heldout_loss"],
                        "held-out perplexity": ppl,
                        "recovery": m["recovery"]["recovered"]})
    sec.table(removal)
    worst = max(removal[1:], key=lambda r: r["held-out perplexity"])
    least = min(removal[1:], key=lambda r: r["exact >= 10x"])
    sec.finding(f"Removing the norm parameters of the {least['removed']} blocks lowers exact "
                f"extraction most ({removal[0]['exact >= 10x']:.0%} -> "
                f"{least['exact >= 10x']:.0%}); the {worst['removed']} blocks cost the most "
                f"perplexity ({removal[0]['held-out perplexity']:.2f} -> "
                f"{worst['held-out perplexity']:.2f}).")
    return {"grad_ratio_by_module": {r["module"]: r["grad_ratio"] for r in rows},
            "scale_ratio_by_module": {r["module"]: r["scale_ratio"] for r in rows},
            "removal": removal}


def step_audit(d: Demo, sec: Section) -> dict:
    from memlens.methods.audit import AuditConfig, AuditData, audit
    from memlens.methods.curvature import apply_weights
    from memlens.methods.localize import NeuronAblation
    from memlens.methods.probes import Probe
    from memlens.methods.steering import Steering
    from memlens.report.figures import audit_heatmap

    s = d.splits
    forget = s.at(100)  # the held-out 100x canaries every removal above was scored on
    relearn = ([q.token_ids for q in s.canaries if q.duplication != 100]
               + [q.token_ids for q in s.general[:500]])
    # Membership against the non-members nothing above was fitted on (the steering probe
    # and localization's clean text used the even half).
    data = AuditData(forget, relearn, s.evaluation_nonmembers, s.heldout)
    config = AuditConfig(relearn_steps=d.config.audit_relearn_steps)
    probe = Probe.load(d.probe_path(d.config.steer_site))
    weights = _kfac_edit(d)[2]
    without = load_model(organism_path(d.config.preset, d.config.arch, d.config.seed,
                                       withheld=tuple(int(q.id) for q in forget),
                                       progress=d.progress))
    models = {"unedited": (d.handle, None), "retrain without": (without, None),
              "K-FAC edit": (d.handle, lambda: apply_weights(d.handle, weights)),
              "neuron ablation": (d.handle, lambda: NeuronAblation.load(d.neurons_dir)
                                  .apply(d.handle)),
              "probe-gated steering": (d.handle, lambda: Steering.load(d.steering_dir)
                                       .apply(d.handle))}
    # Steering's gate is refitted on the relearned model too: hidden memory, or a stale gate?
    fit_on = s.aim + s.aim_nonmembers
    refits = {"probe-gated steering": lambda: partial(
        Steering.load(d.steering_dir).refit(d.handle, fit_on, d.labels.tokens).apply,
        d.handle)}
    results = [{"name": name, **audit(model, removal, data, config, d.cfg, probe=probe,
                                      refit=refits.get(name), progress=d.progress)}
               for name, (model, removal) in models.items()]
    sec.figure(audit_heatmap(results))
    last = str(max(config.relearn_steps))
    gold = results[1]

    def gap(r):  # the largest distance from the retrain-without model, extraction and AUROC
        return max(abs(r["int4"]["exact"] - gold["int4"]["exact"]),
                   abs(r["relearn"][last]["exact"] - gold["relearn"][last]["exact"]),
                   abs(r["mia_auroc"]["loss"] - gold["mia_auroc"]["loss"]))

    closest = min(results[2:], key=gap)
    sec.finding(f"Closest to the model that never saw the forget set: {closest['name']} "
                f"(largest gap {gap(closest):.2f}: after INT4 {closest['int4']['exact']:.0%}, "
                f"after {last} relearning steps {closest['relearn'][last]['exact']:.0%}, "
                f"membership AUROC {closest['mia_auroc']['loss']:.2f} against "
                f"{gold['mia_auroc']['loss']:.2f}); a removal that forgets matches that row "
                "under every attack.")
    steered = next(r for r in results if "relearn_refit" in r)
    stale, refitted = steered["relearn"][last]["exact"], steered["relearn_refit"][last]["exact"]
    sec.finding(f"After {last} relearning steps steering leaves {stale:.0%} of the forget set "
                f"recited with its stale gate and {refitted:.0%} with a gate refitted on the "
                f"relearned model (the unedited model after the same steps: "
                f"{results[0]['relearn'][last]['exact']:.0%}).")
    return {r["name"]: {"exact": r["after_edit"]["exact"], "int4": r["int4"]["exact"],
                        "relearn": {k: v["exact"] for k, v in r["relearn"].items()},
                        **({"relearn_refit": {k: v["exact"]
                                              for k, v in r["relearn_refit"].items()}}
                           if "relearn_refit" in r else {}),
                        "mia_auroc_loss": r["mia_auroc"]["loss"],
                        "perplexity": r["after_edit"]["perplexity"]} for r in results}


TEXT = {
    "labels": "Which canaries the organism reproduces verbatim from a 32-token prefix, by how "
              "often they were in the training data, and how well simple membership scores "
              "(loss, Min-K%, zlib) tell members from held-out records.",
    "probes": "A linear probe per residual-stream site classifies memorized tokens from the "
              "state that predicts them; control tasks (random labels per token type) give "
              "its selectivity. The model's own confidence already separates memorized "
              "tokens well (a recited token is predicted with high probability), so the "
              "confidence probe (max log-prob and entropy) is the baseline to beat, and the "
              "right panel scores every probe on tokens matched for that confidence: there "
              "only what the residual stream knows beyond the output distribution counts. "
              "Below, held-out texts token by token: switch between the memorization label "
              "and the best probe's score; hover a token for details.",
    "kfac": "K-FAC factors of every MLP projection give a curvature eigenbasis; the edit "
            "drops the components that hold up the recitation of the even-half canaries per "
            "unit of predicted KL. Scores are on the odd half.",
    "interventions": "MLP neurons scored by how much ablating each one lowers the "
                     "log-probability of recited canaries; the top ones are then ablated. "
                     "The curve shows how much must go before heavily duplicated canaries "
                     "stop being recited, for this one ranking method (other methods, and "
                     "targets sampled across counts, are in experiments/interventions.py).",
    "steering": "A probe at one site gates a steering vector per token: the vector is "
                "subtracted only where the probe sees memorization.",
    "layernorm": "Per normalization layer: the gradient at its input for memorized PII tokens "
                 "vs clean template tokens (one backward pass per token), its scale, and what "
                 "removing the norm's parameters (gain 1) per group of blocks does.",
    "audit": "Does each removal above forget the held-out 100x canaries, or only hide them? "
             "Each is attacked: weights quantized to INT8 and INT4, a few fine-tuning steps "
             "on other records (never the forget set), perturbed prompts, and membership "
             "inference against held-out non-members. The gold standard is the same "
             "organism trained without those canaries (experiments/audit.py audits every "
             "removal memlens has).",
}
TITLES = {"labels": "1. Labels: what the organism memorized",
          "probes": "2. Activations and probes",
          "kfac": "3. Curvature (K-FAC) edit",
          "interventions": "4. Localization and ablation",
          "steering": "5. Steering during generation",
          "layernorm": "6. LayerNorm attribution",
          "audit": "7. Forgetting audit: forgotten or hidden?"}
RUNNERS = {"labels": step_labels, "probes": step_probes, "kfac": step_kfac,
           "interventions": step_interventions, "steering": step_steering,
           "layernorm": step_layernorm, "audit": step_audit}


def run_demo(out: str | Path = "memlens-demo", preset: str = "small", arch: str = "llama",
             seed: int = 0, fresh: bool = False, progress: bool = True,
             config: DemoConfig | None = None) -> dict:
    """Run every step (reusing cached ones unless ``fresh``), write OUT/report.html and
    OUT/summary.json; returns the summary."""
    out = Path(out)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    with exclusive(out, "memlens demo"):
        return _run(out, config or DemoConfig(preset=preset, arch=arch, seed=seed), fresh,
                    progress)


def _run(out: Path, config: DemoConfig, fresh: bool, progress: bool) -> dict:
    t0 = time.perf_counter()
    d = Demo(out, config, progress)
    org = d.organism
    print(f"organism: {d.path}\n  {org['n_parameters']:,} parameters; held-out template "
          f"accuracy {org['heldout_template_accuracy']:.1%}, PII accuracy "
          f"{org['heldout_pii_accuracy']:.1%}", flush=True)
    report = Report("memlens demo report", intro=(
        f"The {config.preset} {config.arch} organism ({org['n_parameters']:,} parameters), "
        "trained on synthetic PII records with canaries planted 1, 5, 10, 25 and 100 times "
        "and held-out non-members. Every figure is interactive (hover, zoom, click legend "
        "entries)."))
    summary: dict = {"organism": {k: org[k] for k in ("preset", "arch", "seed", "n_parameters",
                                                      "heldout_perplexity")}}
    timings, reused = {}, []
    steps = STEPS if config.audit else tuple(x for x in STEPS if x != "audit")
    for i, step in enumerate(steps, 1):
        cache = out / "steps" / f"{step}.json"
        want = d.identity(step)
        cached = json.loads(cache.read_text()) if cache.exists() and not fresh else None
        changed = None
        if cached:  # a cache from before identity headers counts as changed
            changed = (want.differences(Identity.from_json(cached["identity"], str(cache)))
                       if "identity" in cached else ["cache format"])
        t = time.perf_counter()
        if cached and not changed:
            print(f"[{i}/{len(steps)}] {step}: cached (computed in {cached['seconds']:.0f} s)",
                  flush=True)
            sec = Section(**cached["section"])
            reused.append(step)
        else:
            why = f" (changed since the cached run: {', '.join(changed)})" if changed else ""
            print(f"[{i}/{len(steps)}] {step} ...{why}", flush=True)
            sec = Section(TITLES[step], TEXT[step])
            result = RUNNERS[step](d, sec)
            cached = {"identity": want.to_json(), "summary": result, "section": asdict(sec),
                      "seconds": round(time.perf_counter() - t, 1)}
            cache.write_text(jsonio.dumps(cached))
            print(f"    {cached['seconds']:.0f} s", flush=True)
        report.sections.append(sec)
        summary[step] = cached["summary"]
        timings[step] = cached["seconds"]
    # This run's wall time; step_seconds are what each step took when it was computed.
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["step_seconds"] = timings
    summary["cached_steps"] = reused
    report.sections.insert(0, _summary_section(summary))
    report.write(out / "report.html")
    jsonio.write(out / "summary.json", summary)
    print(f"wrote {out / 'report.html'} and {out / 'summary.json'} "
          f"in {summary['seconds']:.0f} s")
    return summary


@dataclass(kw_only=True)
class DemoCommand(PathCommand):
    """run the whole chain on the organism; write a report

    Trains (or reuses) the organism, then runs the artifact chain on it: label, capture,
    probes, K-FAC edit, localization and ablation, steering with the saved probe, LayerNorm
    attribution, the forgetting audit. Out: OUT/report.html (one interactive page, works
    offline), OUT/summary.json, and each step's artifact. Steps are cached by their inputs'
    identities: a second run takes seconds.
    """

    EXAMPLE: ClassVar[str] = "memlens demo --out memlens-demo"

    out: Path = option(Path("memlens-demo"), "output directory")
    fresh: bool = option(False, "rerun every step, ignore the cache")


def main(cmd: DemoCommand) -> None:
    run_demo(cmd.out, preset=cmd.preset, arch=cmd.arch, seed=cmd.seed, fresh=cmd.fresh)


def headline_rows(s: dict) -> list[tuple[str, str]]:
    """One (step, headline) row per step of a demo summary: the report's summary table and
    the README's (``experiments/readme_table.py`` writes it from ``summary.json``).
    Perplexity is on the organism's held-out non-member records."""
    def pct(x):
        return f"{x:.0%}"

    labels = s["labels"]
    exact = labels["exact_extraction_rate_by_duplication"]
    counts = sorted((k for k in exact if k.isdigit() and k != "0"), key=int, reverse=True)
    mia = labels["membership_auroc"]
    rows = [("labels", "canaries recited exactly, by duplication: "
             + ", ".join(f"{k}x {pct(exact[k])}" for k in counts)
             + f", non-members {pct(exact.get('0', 0))}; membership AUROC loss / Min-K% / "
             f"zlib {mia['loss']:.3f} / {mia['min_k']:.3f} / {mia['zlib']:.3f}")]
    p = s["probes"]
    confidence = p["other_probes_auroc"].get("confidence")
    rows.append(("probes", f"best memorized-token probe ({p['best_probe']}): AUROC "
                 f"{p['auroc']:.3f} on the held-out half, {p['matched_auroc']:.3f} on "
                 "confidence-matched tokens"
                 + (f"; the confidence probe: {confidence:.3f} / "
                    f"{p['confidence_matched_auroc']:.3f}" if confidence is not None
                    and p.get("confidence_matched_auroc") is not None else "")))

    def edit(step, what):
        r = s[step]
        return (step, f"{what}: 100x exact {pct(r['exact_100x_before'])} -> "
                      f"{pct(r['exact_100x_after'])} at {r['perplexity_change']:+.1%} perplexity")

    k, i, st = s["kfac"], s["interventions"], s["steering"]
    rows.append(edit("kfac", f"aimed K-FAC edit (KL budget {k['kl_budget']:g}, "
                             f"{k['layers']} layers)"))
    rows.append(edit("interventions", f"ablating the {i['n_neurons']} MLP neurons "
                                      f"{i['method']} ranks first"))
    rows.append(edit("steering", f"probe-gated steering ({st['site']}, alpha {st['alpha']:g})"))
    removal = s["layernorm"]["removal"]
    none = removal[0]
    most = min(removal[1:], key=lambda r: r["exact >= 10x"])
    rows.append(("layernorm", f"removing the {most['removed']} blocks' norm gains: exact "
                 f"extraction (>= 10x) {pct(none['exact >= 10x'])} -> "
                 f"{pct(most['exact >= 10x'])}, template loss {none['template loss']:.3f} -> "
                 f"{most['template loss']:.3f}, perplexity "
                 f"{most['held-out perplexity'] / none['held-out perplexity'] - 1:+.1%}"))
    if "audit" in s:
        a = s["audit"]
        steps = list(a["unedited"]["relearn"])

        def cells(r):
            refit = "".join(f" ({pct(v)} with its gate refitted after {k} steps)"
                            for k, v in r.get("relearn_refit", {}).items())
            return " / ".join([pct(r["exact"]), pct(r["int4"]),
                               *(pct(r["relearn"][n]) for n in steps),
                               f"{r['mia_auroc_loss']:.2f}"]) + refit

        rows.append(("audit", f"100x exact after the removal / INT4 / "
                     f"{' / '.join(steps)} relearning steps / loss membership AUROC: "
                     + "; ".join(f"{name} {cells(r)}" for name, r in a.items()
                                 if name not in ("unedited", "retrain without"))
                     + f"; retrain without {cells(a['retrain without'])}"))
    return rows


def markdown_table(rows: list[tuple[str, str]]) -> str:
    """The headline rows as the README's Markdown table."""
    return "\n".join(["| step | headline |", "|---|---|",
                      *(f"| {step} | {text} |" for step, text in rows)])


def _summary_section(s: dict) -> Section:
    return Section("Summary", "Perplexity is on the organism's held-out non-member "
                   "records.").table([{"step": a, "headline": b} for a, b in headline_rows(s)])
