"""Localize step: a model and labels -> the neurons behind recitation (a NeuronAblation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import FRACTION, Config, nested, option
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.storage import prepare_output
from memlens.data.labels import Labels
from memlens.methods.localize import (
    LocalizeConfig,
    NeuronAblation,
    ablate_neurons,
    find_neurons,
    top_neurons,
)
from memlens.report.figures import budget_curve_figure, neuron_score_figure
from memlens.report.page import Section
from memlens.steps.chain import Chain, before_after, edit_finding

__all__ = ["LocalizeCommand", "localize_step", "main"]


def localize_step(handle: ModelHandle, labels: Labels, out: str | Path | None,
                  cfg: LocalizeConfig | None = None, budget: float = 0.01,
                  ids: set[str] | None = None, max_targets: int | None = None
                  ) -> NeuronAblation:
    """Score every MLP neuron for the sequences ``labels`` say the model recites (non-members
    as clean text), keep the top ``budget`` of each layer; saved to ``out`` with the scores."""
    labels.check_model(handle)
    if out is not None:
        prepare_output(out, "ablation", marker="ablation.json")
    targets = labels.recited_targets(ids, limit=max_targets)
    clean = [s.token_ids for s in labels.to_sequences() if s.duplication == 0
             and (ids is None or s.id in ids)]
    _, ablation = find_neurons(handle, targets, clean or None, cfg or LocalizeConfig(),
                               budget, inputs={"labels": labels.identity})
    if out is not None:
        ablation.save(out)
    return ablation


@dataclass(kw_only=True)
class LocalizeCommand(Config):
    """rank MLP neurons by responsibility for memorized sequences

    Scores every MLP neuron for the sequences the labels mark as recited (non-members as
    clean text) and writes the top budget fraction of each layer as a neuron ablation:
    OUT/neurons.parquet, OUT/scores.safetensors and OUT/ablation.json. Apply it with
    NeuronAblation.load(OUT).apply(handle).
    """

    EXAMPLE: ClassVar[str] = ("memlens localize --model organisms/tiny --labels labels/tiny "
                              "--method zero_out --budget 0.01 --out neurons/tiny")
    DISTRIBUTED: ClassVar[bool] = True

    model: ModelOptions = nested(ModelOptions)
    labels: Path = option(help="labels directory")
    out: Path = option(help="ablation directory to write")
    budget: float = option(0.01, "fraction of neurons kept per layer", FRACTION)
    localize: LocalizeConfig = nested(LocalizeConfig)


def main(cmd: LocalizeCommand) -> None:
    labels = Labels.load(cmd.labels)
    ablation = localize_step(cmd.model.load(), labels, cmd.out, cmd.localize, cmd.budget)
    print(ablation.table.head(10).to_string(index=False))
    print(f"{len(ablation.table)} neurons -> {cmd.out}")


# --------------------------------------------------------------------------- in the chain

NAME = "interventions"
TITLE = "4. Localization and ablation"
TEXT = ("MLP neurons scored by how much ablating each one lowers the "
                     "log-probability of recited canaries; the top ones are then ablated. "
                     "The curve shows how much must go before heavily duplicated canaries "
                     "stop being recited, for this one ranking method (other methods, and "
                     "targets sampled across counts, are in experiments/interventions.py).")


def report(d: Chain, sec: Section) -> dict:

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
        curve.append({"budget": budget, "perplexity": m.perplexity,
                      **{f"{k}x": v for k, v in m.exact.items()
                         if k in ("10", "25", "100")}})
    fig, headline = before_after(d.before, after, f"Ablating the {len(table)} neurons "
                                  f"{d.config.localize_method} finds")
    heat = neuron_score_figure(scores.numpy(), f"{d.config.localize_method} score of every "
                               f"MLP neuron for {ablation.config['n_targets']} recited canaries")
    sweep = budget_curve_figure(curve, ("100x", "25x", "10x"))
    sec.figure(heat).figure(fig).figure(sweep)
    sec.table(table.head(12)[["rank", "layer", "neuron", "score"]])
    edit_finding(sec, headline)
    return {**headline, "method": d.config.localize_method, "n_neurons": len(table),
            "budget_curve": curve,
            "neurons_per_layer": {str(k): int(v) for k, v in
                                  table.groupby("layer").size().items()}}
