"""Localize step: a model and labels -> the neurons behind recitation (a NeuronAblation)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core.config import FRACTION, Config, nested, option
from memlens.core.model import ModelHandle, ModelOptions
from memlens.core.storage import prepare_output
from memlens.data.labels import Labels
from memlens.methods.localize import LocalizeConfig, NeuronAblation, find_neurons

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
