"""``memlens demo``: the whole chain on the embedded organism, into one report.

The demo is the step order and the report around it: labels, probes, kfac, interventions
(localization and ablation), steering, layernorm, audit (do those removals forget, or only
hide?), each a module of :mod:`memlens.steps` run by :func:`memlens.steps.chain.run_steps`
(cached by identity: a second run reuses every step whose inputs are unchanged and only
rebuilds the page).

Example:
    >>> summary = run_demo("memlens-demo")    # OUT/report.html, OUT/summary.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from memlens.core import jsonio
from memlens.core.config import COUNT, FRACTION, INDEX, POSITIVE, Config, option
from memlens.core.metrics import Extraction
from memlens.core.storage import exclusive
from memlens.methods.localize import METHODS
from memlens.report.page import Report, Section
from memlens.steps import audit, kfac, label, layernorm, localize, probe, steer
from memlens.steps.chain import Chain, run_steps
from memlens.steps.organism import PathCommand

__all__ = ["SECTIONS", "STEPS", "DemoCommand", "DemoConfig", "headline_rows", "main",
           "markdown_table", "run_demo"]

# The chain, in order: each a step module (NAME, TITLE, TEXT, report).
SECTIONS = (label, probe, kfac, localize, steer, layernorm, audit)
STEPS = tuple(s.NAME for s in SECTIONS)


@dataclass
class DemoConfig(Config):
    """The organism and each step's settings (all part of the step cache keys)."""

    preset: str = option("small", "organism preset")
    arch: str = option("llama", "organism architecture")
    seed: int = option(0, "organism seed", INDEX)
    probe_sites: str = option("blocks.*.hook_resid_post", "sites the probes read")
    kfac_tokens: int = option(30_000, "tokens the K-FAC factors are collected over", COUNT)
    kfac_budget: float = option(0.003, "predicted KL of the aimed K-FAC edit", POSITIVE)
    localize_method: str = option("zero_out", "how neurons are scored", choices=METHODS)
    localize_budget: float = option(0.01, "fraction of each layer's MLP neurons ablated",
                                    FRACTION)
    localize_targets: int = option(16, "recited canaries the neurons are scored for", COUNT)
    steer_site: str = option("blocks.1.hook_resid_post", "the steering probe's site")
    steer_alpha: float = option(4.0, "steering strength", POSITIVE)
    attribution_tokens: int = option(200, "tokens per LayerNorm attribution set", COUNT)
    audit_relearn_steps: tuple[int, ...] = option((10, 50), "relearning steps the audit "
                                                  "scores after", COUNT)
    audit: bool = option(True, "run the audit (it trains a second organism; off for models "
                         "slow to retrain)")


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
    chain = Chain(out, config, progress)
    org = chain.organism
    print(f"organism: {chain.path}\n  {org['n_parameters']:,} parameters; held-out template "
          f"accuracy {org['heldout_template_accuracy']:.1%}, PII accuracy "
          f"{org['heldout_pii_accuracy']:.1%}", flush=True)
    report = Report("memlens demo report", intro=(
        f"The {config.preset} {config.arch} organism ({org['n_parameters']:,} parameters), "
        "trained on synthetic PII records with canaries planted 1, 5, 10, 25 and 100 times "
        "and held-out non-members. Every figure is interactive (hover, zoom, click legend "
        "entries)."))
    summary: dict = {"organism": {k: org[k] for k in ("preset", "arch", "seed", "n_parameters",
                                                      "heldout_perplexity")}}
    steps = [s for s in SECTIONS if config.audit or s is not audit]
    results, sections, reused = run_steps(chain, steps, fresh)
    report.sections += sections
    summary |= {name: numbers for name, (numbers, _) in results.items()}
    # This run's wall time; step_seconds are what each step took when it was computed.
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["step_seconds"] = {name: seconds for name, (_, seconds) in results.items()}
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
    exact = Extraction.from_json(labels).exact
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
