"""Settings chosen on the calibration half, scored on the evaluation half.

Every removal the chain makes (an aimed K-FAC edit, a neuron ablation, steering, a norm
removal) has settings: how strong, and where. :func:`choose` tries them on the calibration
half, weakest first within each family (e.g. one family per set of blocks), and keeps the
weakest that stops the target share of the recited sequences being recited within the
utility budget (the rise in clean perplexity, ``--max-ppl-increase``); where none reaches
the target, the one that removes most within the budget. :func:`evaluate` then applies the
chosen setting once to the evaluation half, which nothing was chosen on, and reports it
beside what the setting did to the sequences it was aimed at.

Example:
    >>> choice = choose(chain, {"all blocks": [{"label": "alpha 2", "alpha": 2.0}]},
    ...                 lambda s: Steering(..., alpha=s["alpha"]).apply(chain.handle))
    >>> headline = evaluate(chain, apply, choice, "Steering", section)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

from memlens.core.metrics import bootstrap_ci
from memlens.report.figures import calibration_figure, extraction_figure
from memlens.report.page import Section
from memlens.steps.chain import Chain

__all__ = ["Choice", "choose", "evaluate", "needs_recited"]

Apply = Callable[[dict], AbstractContextManager]


@dataclass
class Choice:
    """The setting chosen on the calibration half (``params``; None where no setting stays
    within the budget), what it did there, and every setting tried (``curve``)."""

    params: dict | None
    family: str | None
    removed: float | None
    perplexity_change: float | None
    met_target: bool
    curve: list[dict]
    budget: float
    target: float

    @property
    def label(self) -> str:
        return f"{self.params['label']} ({self.family})" if self.params else "none"

    def to_json(self) -> dict:
        return asdict(self)


def needs_recited(chain: Chain) -> str | None:
    """Why a removal cannot be chosen and scored here (no recited record in a half), or
    None."""
    for half in ("calibration", "evaluation"):
        if not chain.recited(half):
            return (f"the model recites no record of the {half} half, so there is nothing "
                    f"to {'choose a setting on' if half == 'calibration' else 'score on'}; "
                    "add records it recites (run the labels step to see which)")
    return None


def choose(chain: Chain, families: dict[str, list[dict]], apply: Apply) -> Choice:
    """Try each family's settings (dicts with a ``label``), weakest first, on the calibration
    half; a family stops at its first setting that reaches the target or leaves the budget
    (stronger ones only cost more)."""
    cfg = chain.config
    base = chain.before_perplexity("calibration")
    curve = []
    for family, settings in families.items():
        for params in settings:
            with apply(params):
                m = chain.measure("calibration")
            change = m.perplexity / base - 1
            gone = [not e for e in m.exact]
            curve.append({"family": family, "setting": params["label"], "params": params,
                          "removed": m.removed,
                          "removed_ci": list(bootstrap_ci(gone)) if gone else None,
                          "removed_by_duplication": m.removed_by_duplication(),
                          "perplexity_change": change,
                          "within_budget": change <= cfg.max_ppl_increase})
            if chain.progress:
                print(f"    {family}, {params['label']}: removes {m.removed:.0%} at "
                      f"{change:+.1%} perplexity", flush=True)
            if change > cfg.max_ppl_increase or m.removed >= cfg.target_removal:
                break
    ok = [c for c in curve if c["within_budget"]]
    met = [c for c in ok if c["removed"] >= cfg.target_removal]
    best = (min(met, key=lambda c: c["perplexity_change"]) if met else
            max(ok, key=lambda c: (c["removed"], -c["perplexity_change"])) if ok else None)
    return Choice(best and best["params"], best and best["family"], best and best["removed"],
                  best and best["perplexity_change"], bool(met), curve,
                  cfg.max_ppl_increase, cfg.target_removal)


def evaluate(chain: Chain, apply: Apply, choice: Choice, what: str, sec: Section,
             figures: bool = True) -> dict:
    """Score the chosen setting on the evaluation half; add the curve it was chosen from,
    the before/after figure (``figures``) and a finding to ``sec``. Returns the headline
    numbers."""
    sec.figure(calibration_figure(choice.curve, choice.budget, choice.target,
                                  next((c for c in choice.curve if c["params"] == choice.params
                                        and c["family"] == choice.family), None), what))
    aimed = len(chain.recited("calibration"))
    out = {"what": what, "chosen": choice.to_json(),
           "aimed_at": {"half": "calibration", "n_recited": aimed, "removed": choice.removed,
                        "perplexity_change": choice.perplexity_change}}
    if choice.params is None:
        sec.finding(f"No {what.lower()} setting tried stays within the utility budget "
                    f"(+{choice.budget:.0%} perplexity on the calibration half): nothing is "
                    "scored on the evaluation half. Raise --max-ppl-increase to allow more.")
        return out | {"never_seen": None}
    with apply(choice.params):
        after = chain.after()
        unseen = chain.measure("evaluation")
    before = chain.before
    gone = [not e for e in unseen.exact]
    lo, hi = bootstrap_ci(gone)
    chosen = next((c for c in choice.curve if c["params"] == choice.params
                   and c["family"] == choice.family), {})
    out["aimed_at"] |= {k: chosen.get(k) for k in ("removed_ci", "removed_by_duplication")}
    out |= {
        "never_seen": {"half": "evaluation", "n_recited": len(gone), "removed": unseen.removed,
                       "removed_ci": [lo, hi],
                       "removed_by_duplication": unseen.removed_by_duplication()},
        "exact_before": before.exact, "exact_after": after.exact, "loose_after": after.loose,
        "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
        "perplexity_change": after.perplexity / before.perplexity - 1}
    if figures:
        sec.figure(extraction_figure(
            {"exact, before": before.exact, "exact, after": after.exact,
             **({"loose, after": after.loose} if after.loose is not None else {})},
            f"{what} ({choice.label}) on the evaluation half<br><sup>extraction of its "
            f"members by duplication; perplexity {before.perplexity:.3f} -> "
            f"{after.perplexity:.3f}</sup>"))
    how = ("the weakest setting tried that reaches the target" if choice.met_target else
           "no setting tried reaches the target within the budget; this one removes most")
    sec.finding(
        f"Chosen on the calibration half: {choice.label}, {how}. There "
        f"{choice.removed:.0%} of the {aimed} recited sequences it was aimed at are no "
        f"longer recited (target {choice.target:.0%}) at {choice.perplexity_change:+.1%} "
        f"perplexity (budget +{choice.budget:.0%}). On the evaluation half, which it never "
        f"saw: {unseen.removed:.0%} (95% CI {lo:.0%} to {hi:.0%}) of {len(gone)} recited "
        f"sequences no longer recited, at {out['perplexity_change']:+.1%} perplexity.")
    return out
