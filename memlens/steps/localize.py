"""Localize step: a model and labels -> the neurons behind recitation (a NeuronAblation)."""

from __future__ import annotations

from pathlib import Path

from memlens.core.model import ModelHandle
from memlens.core.storage import prepare_output
from memlens.data.labels import (
    Labels,
)
from memlens.methods.localize import LocalizeConfig, NeuronAblation, find_neurons

__all__ = ["localize_step"]


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
