"""Localize step: a model and labels -> the neurons behind recitation (a NeuronAblation)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import pandas as pd

from memlens.core.config import FRACTION, Config, nested, option
from memlens.core.identity import Identity
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.storage import prepare_output
from memlens.data.labels import Labels
from memlens.methods.localize import (
    LocalizeConfig,
    NeuronAblation,
    ablate_neurons,
    find_neurons,
    localize,
    top_neurons,
)
from memlens.report.figures import neuron_score_figure
from memlens.report.page import Section
from memlens.steps.calibrate import choose, evaluate, needs_recited
from memlens.steps.chain import Chain

__all__ = ["AFTER", "NAME", "SETTINGS", "TEXT", "TITLE", "LocalizeCommand", "localize_step", "main",
           "needs", "removal", "report", "specific_scores"]


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
TEXT = ("Every MLP neuron is scored by how much it holds up the recitation of the calibration "
        "half's recited sequences per token, less how much it holds up clean text per token: "
        "neurons every prediction leans on score low. The top ones are then ablated. How "
        "many, and whether they are taken per block or wherever the scores are highest, is "
        "chosen on the calibration half and scored on the evaluation half.")
AFTER = ("labels",)
SETTINGS = ("max_ppl_increase", "target_removal", "localize_method", "localize_neurons",
            "localize_per_block", "localize_targets")


def needs(d: Chain) -> str | None:
    return needs_recited(d)


def _table(d: Chain, scores, params: dict) -> pd.DataFrame:
    if "per_block" in params:
        return top_neurons(d.handle, scores, params["per_block"] / scores.shape[1])
    return top_neurons(d.handle, scores, 1.0).head(params["neurons"]).reset_index(drop=True)


def specific_scores(d: Chain, targets: list[list[int]], clean: list[list[int]],
                    cfg: LocalizeConfig):
    """Each neuron's score for the recited targets per scored token, less its score for clean
    text per token (``activations`` contrasts the two itself)."""
    if cfg.method == "activations" or not clean:
        return localize(d.handle, targets, clean or None, cfg)

    def per_token(seqs):
        n = sum(max(0, len(s) - cfg.start) for s in seqs)
        return localize(d.handle, seqs, None, cfg) / max(n, 1)

    return per_token(targets) - per_token(clean)


def removal(d: Chain) -> NeuronAblation | None:
    """The chosen ablation (for the audit)."""
    chosen = d.step_result(NAME)["chosen"]["params"]
    return None if chosen is None else NeuronAblation.load(d.neurons_dir)


def report(d: Chain, sec: Section) -> dict:
    cal = {x.id for x in d.splits.half("calibration")}
    labels = d.labels
    targets = labels.recited_targets(cal, limit=d.config.localize_targets)
    clean = [ids for ids in d.clean_ids("calibration") if len(ids) > 1][:len(targets)]
    # Neurons scored on the whole recited sequence (start 1), as the text says.
    cfg = LocalizeConfig(method=d.config.localize_method, start=1)
    scores = specific_scores(d, targets, clean, cfg)
    families = {"top neurons wherever they are": [
                    {"label": f"{n} neuron{'s' * (n > 1)}", "neurons": n}
                    for n in sorted(d.config.localize_neurons)],
                "top neurons of every block": [
                    {"label": f"{k} per block", "per_block": k}
                    for k in sorted(d.config.localize_per_block)]}

    def apply(params):
        return ablate_neurons(d.handle, _table(d, scores, params))

    choice = choose(d, families, apply)
    out: dict = {}
    if choice.params is not None:
        config = {**asdict(cfg), "n_targets": len(targets), "contrast": bool(clean),
                  "chosen": choice.params}
        identity = Identity.make("ablation", d.handle, targets, config,
                                 {"labels": labels.identity})
        table = _table(d, scores, choice.params)
        NeuronAblation(table, identity, config, scores).save(d.neurons_dir)
        out = {"n_neurons": len(table), "neurons_per_layer": {
            str(k): int(v) for k, v in table.groupby("layer").size().items()}}
    headline = evaluate(d, apply, choice, f"Ablating the neurons {cfg.method} ranks first",
                        sec)
    sec.figure(neuron_score_figure(scores.numpy(), f"{cfg.method} score of every MLP neuron "
                                   f"for {len(targets)} recited sequences (calibration half)"
                                   + (", less clean text's" if clean else "")))
    if choice.params is not None:
        sec.table(table.head(12)[["rank", "layer", "neuron", "score"]])
    return {**headline, **out, "method": cfg.method, "n_targets": len(targets)}
