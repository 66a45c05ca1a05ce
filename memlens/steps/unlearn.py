"""Unlearning step: the baselines a privacy reader expects (gradient ascent, gradient
difference, NPO, SimNPO, RMU) and memlens' loss-matched forgetting, chosen under the same
protocol and utility budget as memlens' removals, for the audit to set beside them.

A baseline is told what to forget: on the calibration half it unlearns that half's recited
records, and its blocks and steps are chosen there (the weakest that stops the target
share being recited within the budget); with that setting it then unlearns the evaluation
half's recited records, and is scored there and audited. Its trained values are saved
under ``OUT/unlearn/``."""

from __future__ import annotations

import contextlib

from safetensors.torch import load_file, save_file

from memlens.core.metrics import bootstrap_ci
from memlens.core.storage import writing
from memlens.methods.edits import ParameterEdit
from memlens.methods.unlearn import METHODS, RETAINING, UnlearnConfig, Unlearner, restorable
from memlens.report.figures import calibration_figure
from memlens.report.page import Section
from memlens.steps.calibrate import choose, needs_recited
from memlens.steps.chain import Chain, skip

__all__ = ["AFTER", "NAME", "SETTINGS", "TEXT", "TITLE", "families", "needs", "removals",
           "report"]

NAME = "unlearn"
TITLE = "7. Unlearning baselines"
TEXT = ("The unlearning methods a privacy reader expects beside memlens' removals: gradient "
        "ascent, gradient difference, NPO, SimNPO, RMU, and memlens' loss-matched "
        "forgetting. Unlike the removals above, each is told what to forget: its blocks and "
        "steps are chosen unlearning the calibration half's recited records, under the same "
        "target and utility budget; with that setting it unlearns the evaluation half's "
        "recited records and is scored there, then audited below.")
AFTER = ("labels", "kfac")
SETTINGS = ("max_ppl_increase", "target_removal", "unlearn_methods", "unlearn_steps",
            "unlearn_lrs")


def needs(d: Chain) -> str | None:
    if not d.config.unlearn_methods:
        return "no unlearning method was asked for (RunConfig.unlearn_methods is empty)"
    return needs_recited(d)


def _window(d: Chain, seqs) -> list[list[int]]:
    return [q.token_ids[:d.cfg.prefix + d.cfg.suffix] for q in seqs]


def families(d: Chain, method: str) -> dict[str, list[dict]]:
    """The settings tried for ``method``: per set of blocks (those the K-FAC step chose,
    where memorization loads; every block that trained) and learning rate, its steps,
    fewest first. RMU instead steers the hidden state after block l, for l the last block
    the K-FAC step chose or the third block that trained, and trains the MLP output
    projections of blocks l-2..l that trained."""
    kfac = d.step_result("kfac")
    located = ((kfac.get("chosen") or {}).get("params") or {}).get("blocks") or (
        [kfac["where_to_look"][0]["block"]] if kfac.get("where_to_look") else None)
    trained = d.trained_blocks
    every = list(trained) if trained else None
    if method == "rmu":
        first = min(trained) + 2 if trained else d.handle.n_layers // 2
        layers = sorted({min(first, d.handle.n_layers - 1), *([max(located)] if located
                                                              else [])})
        scopes = {f"steering block {layer}": (every, layer) for layer in layers}
    else:
        scopes = {"every block that trained" if trained else "every block": (every, None)}
        if located and sorted(located) != sorted(trained or range(d.handle.n_layers)):
            scopes = {f"blocks {sorted(located)} (the K-FAC edit's)": (sorted(located), None),
                      **scopes}
    return {f"{where}, lr {lr:g}": [{"label": f"{k} steps", "steps": k, "blocks": blocks,
                                     "layer": layer, "lr": lr}
                                    for k in sorted(d.config.unlearn_steps)]
            for where, (blocks, layer) in scopes.items() for lr in sorted(d.config.unlearn_lrs)}


def _config(method: str, params: dict) -> UnlearnConfig:
    blocks = params["blocks"]
    return UnlearnConfig(method=method, lr=params["lr"], rmu_layer=params["layer"],
                         blocks=None if blocks is None else tuple(blocks))


def _data(d: Chain, half: str) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The forget set (the half's recited records), the retain set (records seen in
    training that are not in it) and the unseen text loss matching matches to (the
    calibration half's non-members: the evaluation half's are what the audit scores)."""
    forget = d.recited(half)
    gone = {q.id for q in forget}
    retain = [q.token_ids for q in d.splits.general if q.member and q.id not in gone][:256]
    return _window(d, forget), retain, _window(d, d.splits.calibration_nonmembers)


def _path(d: Chain, method: str):
    return d.unlearn_dir / f"{method}.safetensors"


def removals(d: Chain) -> dict[str, ParameterEdit]:
    """Each baseline with a chosen setting, as its saved values on the evaluation half's
    forget set (for the audit), by its name."""
    out = {}
    for method, r in d.step_result(NAME).get("methods", {}).items():
        if r["chosen"]["params"] is not None:
            out[METHODS[method]] = ParameterEdit(params=load_file(_path(d, method)))
    return out


def _one(d: Chain, method: str, sec: Section) -> dict:
    forget, retain, unseen = _data(d, "calibration")
    runs: dict = {}

    @contextlib.contextmanager
    def apply(params):
        family = tuple(params["blocks"] or ()), params["layer"], params["lr"]
        run = runs.get(family)
        if run is None or run.step > params["steps"]:
            run = runs[family] = Unlearner(d.handle, forget, retain, _config(method, params),
                                           unseen)
        with restorable(d.handle):
            run.advance(params["steps"] - run.step)
            yield

    choice = choose(d, families(d, method), apply)
    what = METHODS[method]
    chosen = next((c for c in choice.curve if c["params"] == choice.params
                   and c["family"] == choice.family), None)
    sec.figure(calibration_figure(choice.curve, choice.budget, choice.target, chosen, what))
    out = {"what": what, "chosen": choice.to_json(), "forget_set": None}
    if choice.params is None:
        sec.finding(f"{what}: no setting tried stays within the utility budget (+"
                    f"{choice.budget:.0%} perplexity on the calibration half).")
        return out
    forget, retain, unseen = _data(d, "evaluation")
    with restorable(d.handle):
        run = Unlearner(d.handle, forget, retain, _config(method, choice.params), unseen)
        run.advance(choice.params["steps"])
        m = d.measure("evaluation")
        with writing(_path(d, method)):
            save_file({n: p.detach().contiguous() for n, p in run.params.items()},
                      str(_path(d, method)))
    gone = [not e for e in m.exact]
    change = m.perplexity / d.before_perplexity("evaluation") - 1
    out["forget_set"] = {"half": "evaluation", "n_recited": len(gone), "removed": m.removed,
                         "removed_ci": list(bootstrap_ci(gone)),
                         "removed_by_duplication": m.removed_by_duplication(),
                         "perplexity_change": change}
    out["perplexity_change"] = change
    sec.finding(f"{what}: chosen on the calibration half {choice.label} ("
                f"{choice.removed:.0%} of its recited records no longer recited at "
                f"{choice.perplexity_change:+.1%} perplexity). Unlearning the evaluation "
                f"half's {len(gone)} recited records the same way: {m.removed:.0%} (95% CI "
                f"{out['forget_set']['removed_ci'][0]:.0%} to "
                f"{out['forget_set']['removed_ci'][1]:.0%}) no longer recited, at "
                f"{change:+.1%} perplexity.")
    return out


def _missing(d: Chain, method: str) -> str | None:
    """What the data lacks for ``method``, or None."""
    for half in ("calibration", "evaluation"):
        _, retain, unseen = _data(d, half)
        if method in RETAINING and not retain:
            return (f"add records seen in training that the model does not recite (the "
                    f"{half} half has none to retain)")
        if method == "matched" and not unseen:
            return "add held-out records the model was never trained on, marked 'duplication': 0"
    return None


def report(d: Chain, sec: Section) -> dict:
    d.unlearn_dir.mkdir(parents=True, exist_ok=True)
    out, skipped = {}, []
    for method in d.config.unlearn_methods:
        why = _missing(d, method)
        if why is not None:
            skipped.append(skip(sec, METHODS[method].capitalize(), why))
            continue
        if d.progress:
            print(f"    {METHODS[method]}:", flush=True)
        out[method] = _one(d, method, sec)
    return {"methods": out, "skipped_parts": skipped}
