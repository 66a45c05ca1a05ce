"""LayerNorm step: where normalization layers carry memorization (the gradient at their
input for memorized tokens vs clean tokens, and their scale), and what removing their
parameters per group of blocks, fully or part of the way, does. ``memlens layernorm`` is
the chain's labels and layernorm steps on any model and data."""

from __future__ import annotations

from memlens.methods.layernorm import (
    NormRemoval,
    StudyData,
    attribution_table,
    attribution_targets,
    layer_groups,
    memorized_positions,
    norm_attribution,
    norm_placement,
)
from memlens.report.figures import gradient_ratio_figure
from memlens.report.page import Section
from memlens.steps.calibrate import choose, evaluate, needs_recited
from memlens.steps.chain import Chain

__all__ = ["AFTER", "NAME", "SETTINGS", "TEXT", "TITLE", "groups", "needs", "removal", "report"]


NAME = "layernorm"
TITLE = "6. LayerNorm attribution and removal"
TEXT = ("Per normalization layer: the gradient at its input for memorized tokens vs clean "
        "tokens (one backward pass per token), and its scale. Then the norms' parameters are "
        "removed (moved to gain 1 and bias 0, fully or part of the way) per group of blocks; "
        "the group and the strength are chosen on the calibration half and scored on the "
        "evaluation half.")
AFTER = ("labels",)
SETTINGS = ("max_ppl_increase", "target_removal", "norm_strengths", "attribution_tokens")


def needs(d: Chain) -> str | None:
    return needs_recited(d)


def groups(n_layers: int) -> dict[str, list[int]]:
    """Early, middle and late thirds; each block alone for models of fewer than 3."""
    return (layer_groups(n_layers) if n_layers >= 3
            else {f"block {i}": [i] for i in range(n_layers)})


def removal(d: Chain) -> NormRemoval | None:
    """The chosen norm removal (for the audit)."""
    chosen = d.step_result(NAME)["chosen"]["params"]
    return None if chosen is None else NormRemoval(chosen["blocks"], chosen["strength"])


def report(d: Chain, sec: Section) -> dict:
    placement = norm_placement(d.handle)
    recited = d.recited("calibration")
    data = StudyData(recited, d.clean("calibration")[0], {})
    positions = memorized_positions(d.labels.tokens, recited)
    sets = attribution_targets(data, positions, d.cfg, n=d.config.attribution_tokens)
    res = {k: norm_attribution(d.handle, ids, pos, progress=d.progress)
           for k, (ids, pos) in sets.items()}
    rows = [dict(layernorm=placement, **r) for r in attribution_table(res["memorized"],
                                                                      res["clean"])]
    sec.figure(gradient_ratio_figure(rows))
    families = {f"{name} blocks {blocks}": [
        {"label": f"strength {s:g}", "group": name, "blocks": blocks, "strength": s}
        for s in sorted(d.config.norm_strengths)]
        for name, blocks in groups(d.handle.n_layers).items()}

    def apply(params):
        return NormRemoval(params["blocks"], params["strength"]).apply(d.handle)

    choice = choose(d, families, apply)
    headline = evaluate(d, apply, choice, f"Removing norm parameters ({placement})", sec)
    if choice.params is not None:
        headline |= {k: choice.params[k] for k in ("group", "blocks", "strength")}
    return {**headline, "placement": placement,
            "grad_ratio_by_module": {r["module"]: r["grad_ratio"] for r in rows},
            "scale_ratio_by_module": {r["module"]: r["scale_ratio"] for r in rows},
            "attribution_tokens": {k: sum(map(len, pos)) for k, (_, pos) in sets.items()}}
