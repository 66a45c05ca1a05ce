"""LayerNorm step: where normalization layers carry memorization (the gradient at their
input for memorized PII tokens vs clean template tokens, and their scale), and what removing
their parameters per group of blocks does."""

from __future__ import annotations

from memlens.core.metrics import perplexity
from memlens.methods.layernorm import (
    NormRemoval,
    StudyData,
    attribution_table,
    attribution_targets,
    condition_metrics,
    layer_groups,
    memorized_positions,
    norm_attribution,
)
from memlens.report.figures import gradient_ratio_figure
from memlens.report.page import Section
from memlens.steps.chain import Chain

__all__ = ["NAME", "TEXT", "TITLE", "report"]


# --------------------------------------------------------------------------- in the chain

NAME = "layernorm"
TITLE = "6. LayerNorm attribution"
TEXT = ("Per normalization layer: the gradient at its input for memorized PII tokens "
                 "vs clean template tokens (one backward pass per token), its scale, and what "
                 "removing the norm's parameters (gain 1) per group of blocks does.")


def report(d: Chain, sec: Section) -> dict:

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
        with NormRemoval(layers).apply(d.handle):
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
