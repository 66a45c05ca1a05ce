"""The chain: steps run in order on one model, each reading the artifacts of the steps
before it and writing its own under OUT (``labels/``, ``activations/``, ``probes/``,
``kfac/factors.safetensors``, ``neurons/``, ``steering/``).

A step of the chain is a module of ``memlens.steps`` with ``NAME``, ``TITLE``, ``TEXT`` and
``report(chain, section) -> dict``: it runs the step's method, fills its section of the
report and returns its headline numbers. :func:`run_steps` caches each step's numbers and
section in ``OUT/steps/NAME.json``, keyed by the model's weights hash, the settings and the
identity headers of the artifacts the step reads: a second run reuses every step whose key
still matches (an interrupted run resumes at the step it was in).

The organism's :class:`~memlens.data.splits.Splits` keep scores honest: probes, directions
and edits come from the even half of the canaries and non-members, every before/after score
from the odd half.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

from memlens.core import jsonio
from memlens.core.identity import Identity
from memlens.core.metrics import Extraction, edit_metrics
from memlens.core.model import ModelHandle, load_model
from memlens.core.version import VERSION
from memlens.data.labels import LabelConfig, Labels
from memlens.data.organism import organism_path
from memlens.data.splits import Splits
from memlens.report.figures import extraction_figure
from memlens.report.page import Section

__all__ = ["Chain", "before_after", "edit_finding", "run_steps"]


class Chain:
    """Shared state of one run of the chain: the organism, its splits, the artifacts' places,
    the scores before any removal."""

    def __init__(self, out: Path, config, progress: bool = True):
        self.out, self.config, self.progress = out, config, progress
        self.path = organism_path(config.preset, config.arch, config.seed, progress=progress)
        self.organism = json.loads((self.path / "memlens.json").read_text())
        self.cfg = LabelConfig()
        self.labels_dir = out / "labels"
        self.store_dir = out / "activations"
        self.probes_dir = out / "probes"
        self.factors_path = out / "kfac" / "factors.safetensors"
        self.neurons_dir = out / "neurons"
        self.steering_dir = out / "steering"

    @cached_property
    def handle(self) -> ModelHandle:
        return load_model(self.path)

    @cached_property
    def splits(self) -> Splits:
        return Splits.from_organism(self.path, self.handle.tokenizer)

    @cached_property
    def model_hash(self) -> str:
        return self.handle.weights_hash()

    @property
    def labels(self) -> Labels:
        return Labels.load(self.labels_dir)

    @cached_property
    def before(self) -> Extraction:
        """The scores before any removal, as the labels step recorded them."""
        cached = json.loads((self.out / "steps" / "labels.json").read_text())
        return Extraction.from_json(cached["summary"]["before"])

    def probe_path(self, site: str) -> Path:
        return self.probes_dir / "probes" / site

    def after(self, loose: bool = True) -> Extraction:
        s = self.splits
        return edit_metrics(self.handle, s.evaluation, s.heldout, self.cfg, loose=loose)

    def inputs(self, step: str) -> dict[str, str]:
        """Digests of the artifacts ``step`` reads (those that exist yet)."""
        reads = {"labels": self.labels_dir / "summary.json",
                 "probe": self.probe_path(self.config.steer_site) / "probe.json"}
        wanted = {"labels": [], "steering": ["labels", "probe"],
                  "audit": ["labels", "probe"]}.get(step, ["labels"])
        out = {}
        for name in wanted:
            if reads[name].is_file():
                meta = json.loads(reads[name].read_text())
                out[name] = Identity.from_json(meta.get("identity"), str(reads[name])).digest
        return out

    def identity(self, step: str) -> Identity:
        """What a cached step was computed from: the model, the demo's settings and the
        artifacts the step reads."""
        settings = json.loads(json.dumps(asdict(self.config)))  # as cached: lists, not tuples
        return Identity(f"demo step {step}", self.model_hash, None, settings,
                        self.inputs(step), str(self.path), VERSION)


def before_after(before: Extraction, after: Extraction, what: str) -> tuple:
    """Extraction by duplication and perplexity, before vs after an intervention."""
    fig = extraction_figure({
        "exact, before": before.exact, "exact, after": after.exact,
        **({"loose, after": after.loose} if after.loose is not None else {})},
        f"{what}<br><sup>extraction of held-out canaries; perplexity "
        f"{before.perplexity:.3f} -> {after.perplexity:.3f}</sup>")
    headline = {
        "what": what,
        "exact_100x_before": before.exact["100"], "exact_100x_after": after.exact["100"],
        "loose_100x_after": (after.loose or {}).get("100"),
        "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
        "perplexity_change": after.perplexity / before.perplexity - 1}
    return fig, headline


def edit_finding(sec: Section, h: dict) -> None:
    sec.finding(f"{h['what']} takes the held-out 100x canaries from {h['exact_100x_before']:.0%} "
                f"to {h['exact_100x_after']:.0%} exact extraction at "
                f"{h['perplexity_change']:+.1%} held-out perplexity.")


def run_steps(chain: Chain, steps: list, fresh: bool = False) -> tuple[dict, list[Section],
                                                                       list[str]]:
    """Run (or reuse) each step module in order: (each step's numbers and the seconds it
    took when computed, the report sections, the steps reused from the cache)."""
    summary, sections, reused = {}, [], []
    for i, step in enumerate(steps, 1):
        name = step.NAME
        cache = chain.out / "steps" / f"{name}.json"
        want = chain.identity(name)
        cached = json.loads(cache.read_text()) if cache.exists() and not fresh else None
        changed = None
        if cached:  # a cache from before identity headers counts as changed
            changed = (want.differences(Identity.from_json(cached["identity"], str(cache)))
                       if "identity" in cached else ["cache format"])
        t = time.perf_counter()
        if cached and not changed:
            print(f"[{i}/{len(steps)}] {name}: cached (computed in {cached['seconds']:.0f} s)",
                  flush=True)
            sec = Section(**cached["section"])
            reused.append(name)
        else:
            why = f" (changed since the cached run: {', '.join(changed)})" if changed else ""
            print(f"[{i}/{len(steps)}] {name} ...{why}", flush=True)
            sec = Section(step.TITLE, step.TEXT)
            result = step.report(chain, sec)
            cached = {"identity": want.to_json(), "summary": result, "section": asdict(sec),
                      "seconds": round(time.perf_counter() - t, 1)}
            cache.write_text(jsonio.dumps(cached))
            print(f"    {cached['seconds']:.0f} s", flush=True)
        sections.append(sec)
        summary[name] = (cached["summary"], cached["seconds"])
    return summary, sections, reused
