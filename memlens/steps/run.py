"""``memlens run``: the whole workbench on any model and its data, into one report.

labels -> capture and probes -> K-FAC edit -> localization and ablation -> steering ->
LayerNorm -> unlearning baselines -> audit, each a module of :mod:`memlens.steps` run by
:func:`memlens.steps.chain.run_steps` (cached by identity: a second run reuses every step
whose inputs are unchanged). The records are split by record into a calibration half and
an evaluation half; every removal's setting is chosen on the first under the utility budget
(:mod:`memlens.steps.calibrate`) and scored on the second. A step the data cannot support
(no recited records, no non-members, no reference model) is reported as skipped, with what
to add.

Example:
    >>> summary = run("organisms/tiny", "organisms/tiny", "run/tiny")
    >>> summary["calibration"]["chosen"]["steering"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core import jsonio
from memlens.core.config import Config, nested, option
from memlens.core.errors import ConfigError
from memlens.core.metrics import Extraction
from memlens.core.model import ModelOptions
from memlens.core.storage import exclusive
from memlens.report.page import Report, Section
from memlens.steps import audit, kfac, label, layernorm, localize, probe, steer, unlearn
from memlens.steps.chain import Chain, RunConfig, run_steps

__all__ = ["SECTIONS", "STEPS", "LayernormCommand", "RunCommand", "headline_rows", "layernorm_main",
           "main", "markdown_table", "run", "with_dependencies"]

# The chain, in order: each a step module (NAME, TITLE, TEXT, AFTER, report).
SECTIONS = (label, probe, kfac, localize, steer, layernorm, unlearn, audit)
STEPS = tuple(s.NAME for s in SECTIONS)
REMOVAL_STEPS = ("kfac", "interventions", "steering", "layernorm")


def with_dependencies(names: tuple[str, ...] | None) -> list:
    """The step modules to run for ``names`` (every step when None), with the steps they
    read, in chain order."""
    if names is None:
        return list(SECTIONS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise ConfigError(f"--steps {' '.join(unknown)}: no such step; choose among "
                          f"{', '.join(STEPS)}")
    by_name = {s.NAME: s for s in SECTIONS}
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += list(by_name[name].AFTER) if hasattr(by_name[name], "AFTER") else []
    return [s for s in SECTIONS if s.NAME in wanted]


def run(model: str | Path, data: str | Path, out: str | Path = "memlens-run",
        config: RunConfig | None = None, reference: str | Path | None = None,
        steps: tuple[str, ...] | None = None, fresh: bool = False, progress: bool = True,
        options: ModelOptions | None = None, title: str = "memlens report") -> dict:
    """Run the chain on ``model`` and ``data`` (a JSONL of records or an organism
    directory), reusing cached steps unless ``fresh``; write OUT/report.html and
    OUT/summary.json; returns the summary."""
    out = Path(out)
    modules = with_dependencies(tuple(steps) if steps else None)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    with exclusive(out, "memlens run"):
        t0 = time.perf_counter()
        chain = Chain(out, model, data, config or RunConfig(), reference, options, progress)
        report = Report(title, intro=_intro(chain))
        results, sections, reused = run_steps(chain, modules, fresh)
        report.sections += sections
        summary: dict = {"model": chain.model_name, "data": str(chain.data)}
        if chain.organism:
            summary["organism"] = {k: chain.organism.get(k) for k in (
                "preset", "arch", "seed", "n_parameters", "heldout_perplexity")}
        summary |= {name: numbers for name, (numbers, _) in results.items()}
        summary["calibration"] = {
            "calibration_ids": chain.splits.ids("calibration"),
            "evaluation_ids": chain.splits.ids("evaluation"),
            "max_ppl_increase": chain.config.max_ppl_increase,
            "target_removal": chain.config.target_removal,
            "chosen": {name: _chosen(summary[name]) for name in REMOVAL_STEPS
                       if name in summary}}
        summary["skipped"] = {name: numbers["skipped"] for name, (numbers, _) in results.items()
                              if numbers.get("skipped")}
        summary["skipped_parts"] = [n for numbers, _ in results.values()
                                    for n in numbers.get("skipped_parts", [])]
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["step_seconds"] = {name: seconds for name, (_, seconds) in results.items()}
        summary["cached_steps"] = reused
        report.sections.insert(0, Section("Summary", "Every removal's setting was chosen on "
                                          "the calibration half; the numbers are on the "
                                          "evaluation half.").table(
            [{"step": a, "headline": b} for a, b in headline_rows(summary)]))
        report.write(out / "report.html")
        jsonio.write(out / "summary.json", summary)
        print(f"wrote {out / 'report.html'} and {out / 'summary.json'} "
              f"in {summary['seconds']:.0f} s")
        return summary


def _chosen(numbers: dict) -> dict | None:
    if numbers.get("skipped"):
        return None
    c = numbers["chosen"]
    return {"setting": c["params"], "family": c["family"], "met_target": c["met_target"],
            "removed_on_calibration": c["removed"],
            "perplexity_change_on_calibration": c["perplexity_change"],
            "max_ppl_increase": c["budget"], "target_removal": c["target"]}


def _intro(chain: Chain) -> str:
    org = chain.organism
    if org:
        return (f"The {org['preset']} {org['arch']} organism ({org['n_parameters']:,} "
                "parameters), trained on synthetic PII records with canaries planted several "
                "times each and held-out non-members. Every figure is interactive (hover, "
                "zoom, click legend entries).")
    return (f"{chain.model_name} on {chain.data}. Every figure is interactive (hover, zoom, "
            "click legend entries).")


@dataclass(kw_only=True)
class RunCommand(Config):
    """run the whole workbench on a model and its data; write a report

    labels, activations and probes, the aimed K-FAC edit, neuron localization and ablation,
    steering, LayerNorm attribution and removal, the unlearning baselines (gradient ascent,
    gradient difference, NPO, SimNPO, RMU, loss-matched forgetting), the forgetting audit.
    The records are split into a calibration half and an evaluation half: every setting is
    chosen on the first, as the weakest that removes --target-removal of the recited
    sequences within --max-ppl-increase, and scored on the second. Steps the data cannot support are
    reported as skipped, with what to add. Out: OUT/report.html, OUT/summary.json and each
    step's artifact; steps are cached by their inputs' identities.
    """

    EXAMPLE: ClassVar[str] = ("memlens run --model organisms/tiny --data organisms/tiny "
                              "--out run/tiny")

    model: ModelOptions = nested(ModelOptions)
    data: Path = option(help="JSONL of records ('text' or 'token_ids'; optional "
                        "'duplication', 0 for held-out non-members, and PII 'spans'), or an "
                        "organism directory")
    out: Path = option(Path("memlens-run"), "output directory")
    reference: str | None = option(None, "a model never trained on the forget set, for the "
                                   "audit's retrain-without comparison")
    steps: tuple[str, ...] | None = option(None, "run only these steps (and those they read)",
                                           choices=STEPS)
    fresh: bool = option(False, "rerun every step, ignore the cache")
    chain: RunConfig = nested(RunConfig)


def main(cmd: RunCommand) -> None:
    run(cmd.model.model, cmd.data, cmd.out, cmd.chain, cmd.reference, cmd.steps, cmd.fresh,
        options=cmd.model)


@dataclass(kw_only=True)
class LayernormCommand(Config):
    """LayerNorm attribution and per-group removal on a model and its data

    The gradient at each normalization layer's input for memorized vs clean tokens and
    its scale (Pre-LN and Post-LN models), then removal of the norms' parameters per group
    of blocks, fully or part of the way: the group and strength chosen on the calibration
    half within --max-ppl-increase, scored on the evaluation half. The labels and layernorm
    steps of `memlens run`; out: OUT/report.html and OUT/summary.json.
    """

    EXAMPLE: ClassVar[str] = ("memlens layernorm --model organisms/tiny --data "
                              "organisms/tiny --out layernorm/tiny")

    model: ModelOptions = nested(ModelOptions)
    data: Path = option(help="JSONL of records, or an organism directory")
    out: Path = option(Path("memlens-layernorm"), "output directory")
    fresh: bool = option(False, "rerun every step, ignore the cache")
    chain: RunConfig = nested(RunConfig)


def layernorm_main(cmd: LayernormCommand) -> None:
    s = run(cmd.model.model, cmd.data, cmd.out, cmd.chain, steps=("layernorm",),
            fresh=cmd.fresh, options=cmd.model, title="memlens LayerNorm report")
    for step, text in headline_rows(s):
        print(f"{step}: {text}")


def headline_rows(s: dict) -> list[tuple[str, str]]:
    """One (step, headline) row per step of a run's summary: the report's summary table and
    the README's (``experiments/readme_table.py`` writes it from ``summary.json``)."""
    def pct(x):
        return f"{x:.0%}"

    rows = []
    labels = s["labels"]
    exact = Extraction.from_json(labels).exact
    counts = [k for k in exact if k.isdigit() and k != "0"]
    recited = (("canaries recited exactly, by duplication: "
                + ", ".join(f"{k}x {pct(exact[k])}" for k in sorted(counts, key=int,
                                                                     reverse=True))
                + f", non-members {pct(exact.get('0', 0))}") if counts else
               f"records recited exactly: {pct(labels['exact_extraction_rate'])}")
    halves = labels["halves"]
    recited += (f"; recited in the calibration / evaluation half: "
                f"{halves['calibration']['recited']} / {halves['evaluation']['recited']}")
    mia = labels.get("membership_auroc")
    if mia:
        names = {"loss": "loss", "min_k": "Min-K%", "min_k_pp": "Min-K%++", "zlib": "zlib"}
        shown = [k for k in names if k in mia]  # Min-K%++ is missing from older labels
        recited += (f"; membership AUROC {' / '.join(names[k] for k in shown)} "
                    + " / ".join(f"{mia[k]:.3f}" for k in shown))
    rows.append(("labels", recited))
    p = s.get("probes")
    if p and not p.get("skipped"):
        t, c = p["best_overall"], p.get("confidence")
        line = (f"best probe on validation tokens ({t['probe']}): AUROC {t['auroc']:.3f} "
                f"({t['auroc_ci'][0]:.3f} to {t['auroc_ci'][1]:.3f}) on the evaluation half, "
                f"{t['pii_auroc']:.3f} on PII tokens alone, {t['matched_auroc']:.3f} on "
                f"confidence-matched tokens ({pct(t['matched_coverage'])} matched)")
        if c is not None:
            g = t["gain_over_confidence"]
            line += (f"; the confidence probe {c['auroc']:.3f} / {c['pii_auroc']:.3f} / "
                     f"{c['matched_auroc']:.3f}: gain {g[0]:+.3f} ({g[1]:+.3f} to {g[2]:+.3f})")
        rows.append(("probes", line))
    for step in REMOVAL_STEPS:
        r = s.get(step)
        if r is None:
            continue
        if r.get("skipped"):
            rows.append((step, r["skipped"]))
            continue
        c = r["chosen"]
        if c["params"] is None:
            rows.append((step, f"{r['what']}: no setting within the utility budget"))
            continue
        n = r["never_seen"]
        lo, hi = n["removed_ci"]
        hundred = (f"; 100x exact {pct(r['exact_before']['100'])} -> "
                   f"{pct(r['exact_after']['100'])}" if "100" in r["exact_before"] else "")
        rows.append((step, f"{r['what']}, chosen: {c['params']['label']} ({c['family']}); "
                     f"evaluation half: {pct(n['removed'])} (95% CI {pct(lo)} to {pct(hi)}) of "
                     f"{n['n_recited']} recited no longer recited{hundred}, at "
                     f"{r['perplexity_change']:+.1%} perplexity"))
        for what, other in r.get("compared", {}).items():  # chosen the same way
            o = other["never_seen"]
            rows.append((step, f"{what}, chosen: {other['chosen']['params']['label']} "
                         f"({other['chosen']['family']}): {pct(o['removed'])} (95% CI "
                         f"{pct(o['removed_ci'][0])} to {pct(o['removed_ci'][1])}) at "
                         f"{other['perplexity_change']:+.1%}" if o is not None else
                         f"{what}: no setting within the utility budget"))
    u = s.get("unlearn")
    if u and not u.get("skipped"):
        cells = []
        for r in u["methods"].values():
            f = r["forget_set"]
            cells.append(f"{r['what']} {r['chosen']['params']['label']}: {pct(f['removed'])} "
                         f"at {f['perplexity_change']:+.1%}" if f is not None else
                         f"{r['what']}: none within the budget")
        rows.append(("unlearn", "baselines told the forget set, unlearning the evaluation "
                     "half's recited records: " + "; ".join(cells)))
    a = s.get("audit")
    if a and not a.get("skipped"):
        steps = list(a["unedited"]["relearn"])

        def cells(r):
            refit = "".join(f" ({pct(v)} with its gate refitted after {k} steps)"
                            for k, v in r.get("relearn_refit", {}).items())
            mia = f" / {r['mia_auroc_loss']:.2f}" if r["mia_auroc_loss"] is not None else ""
            return " / ".join([pct(r["exact"]), pct(r["int4"]),
                               *(pct(r["relearn"][n]) for n in steps)]) + mia + refit

        others = [k for k, v in a.items() if isinstance(v, dict) and "exact" in v
                  and k not in ("unedited", "retrain without") and not v.get("told_forget_set")]
        mia_head = " / loss membership AUROC" if a["unedited"]["mia_auroc_loss"] is not None \
            else ""
        rows.append(("audit", f"forget set ({a['forget']['n']}) exact after the removal / "
                     f"INT4 / {' / '.join(steps)} relearning steps{mia_head}: "
                     + "; ".join(f"{name} {cells(a[name])}" for name in
                                 ["unedited", *others, "retrain without"] if name in a)))
    return rows


def markdown_table(rows: list[tuple[str, str]]) -> str:
    """The headline rows as the README's Markdown table."""
    return "\n".join(["| step | headline |", "|---|---|",
                      *(f"| {step} | {text} |" for step, text in rows)])
